"""Gemini as a method of a shot list (through the local Gemini stand-in of tests/test_gemini.py): the stand-in
answers real photos, so the comparison has real faces to measure; a blocked shot shows its error, not a hole."""

import json

import numpy as np
import pytest
from django.core.management import call_command
from PIL import Image

from characters.faces import get_embedder
from characters.models import CharacterIdentity
from characters.services import character_create, reference_add
from generation.models import GeneratedImage
from tests import photos
from tests.test_gemini import Reply, gemini, image_reply  # noqa: F401  (gemini is a fixture)

pytestmark = pytest.mark.django_db


@pytest.fixture
def eileen(studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def test_compare_methods_with_gemini_measures_faces_and_shows_a_blocked_shot(gemini, eileen, tmp_path):  # noqa: F811
    blocked = Reply(body={"candidates": [{"content": {"parts": []}, "finishReason": "IMAGE_SAFETY"}],
                          "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10}})  # fmt: skip
    gemini.reply(image_reply(), image_reply(photos.astronaut()[:, ::-1].copy()), blocked)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("on the deck of a ship\nin a spacesuit on the moon\nin a crowd at night\n")
    out = tmp_path / "out"
    call_command("compare_methods", "--characters", str(eileen.pk), "--prompts", str(prompts), "--methods", "gemini",
                 "--inline", "--width", "512", "--height", "512", "--out", str(out))  # fmt: skip

    (row,) = json.loads((out / "report.json").read_text())["rows"]
    assert row["outputs"] == row["faces"] == 2 and len(gemini.requests) == 3
    assert [(e["shot"], e["code"]) for e in row["errors"]] == [(2, "content_blocked")]
    assert [s["status"] for s in row["shots"]] == ["succeeded", "succeeded", "failed"]

    identity = np.asarray(CharacterIdentity.objects.unscoped().get(character=eileen).embedding)
    vectors = []
    for output in GeneratedImage.objects.unscoped().filter(job__character=eileen).order_by("pk"):
        (face,) = get_embedder().analyze(np.asarray(Image.open(output.file.path).convert("RGB")))
        vectors.append(face.embedding / np.linalg.norm(face.embedding))
    similarities = [float(v @ identity / np.linalg.norm(identity)) for v in vectors]
    assert row["identity"]["mean"] == pytest.approx(np.mean(similarities), abs=1e-4)
    assert row["identity"]["min"] == pytest.approx(min(similarities), abs=1e-4)
    assert row["consistency"]["pairs"] == 1
    assert row["consistency"]["mean"] == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-4)
    assert row["same_person_share"] == 1.0 and row["outliers"] == []
    assert float(row["cost_per_image"]) > 0  # Gemini's tokens, the blocked request's included (Google billed it)
    assert Image.open(out / "chart.png").format == "PNG"
