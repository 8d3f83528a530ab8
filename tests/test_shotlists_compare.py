"""`manage.py compare_methods` on tiny models, in-process: every file written, the chart a real image, a LoRA
trained first and its training amortised over the lora outputs."""

import csv
import io
import json

import pytest
from django.core.management import CommandError, call_command
from PIL import Image

from characters.services import character_create, reference_add
from shotlists import charts
from shotlists.models import ShotList
from tests import photos
from training.models import LoraArtifact, TrainingJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def eileen(studio_a, settings, tiny_models_dir, media_root):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a two-shot storyboard\nwalking in the rain\n\nclose-up under a streetlight\n")
    return path


def test_compare_methods_trains_a_lora_and_writes_every_file(eileen, prompts, tmp_path):
    out = tmp_path / "out"
    stdout = io.StringIO()
    call_command(
        "compare_methods", "--characters", str(eileen.pk), "--prompts", str(prompts),
        "--methods", "pulid_flux,instantid_sdxl,lora", "--inline", "--train-lora", "--lora-steps", "2",
        "--lora-resolution", "64", "--width", "64", "--height", "64", "--steps", "2", "--out", str(out),
        stdout=stdout,
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["chart.png", "contact_sheet.png", "report.csv", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert [row["method"] for row in report["rows"]] == ["pulid_flux", "instantid_sdxl", "lora"]
    assert all(row["outputs"] == 2 and row["jobs_by_status"]["succeeded"] == 2 for row in report["rows"])
    assert all(row["seconds_per_image"]["p50"] > 0 for row in report["rows"])

    training = TrainingJob.objects.unscoped().get(character=eileen)
    lora_row = report["rows"][2]
    assert lora_row["training"]["training_jobs"] == [training.pk]
    assert lora_row["training"]["loras"] == [{"id": training.lora_id, "version": 1, "source": "trained"}]
    assert lora_row["training"]["amortised_seconds_per_image"] == pytest.approx(training.device_seconds / 2, abs=1e-3)
    assert LoraArtifact.objects.unscoped().get(character=eileen).is_selected

    table = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert [line["method"] for line in table] == ["pulid_flux", "instantid_sdxl", "lora"]
    chart = Image.open(out / "chart.png")
    chart.verify()
    assert chart.format == "PNG" and chart.size == (charts.WIDTH, charts.HEIGHT)
    assert Image.open(out / "contact_sheet.png").format == "PNG"
    printed = stdout.getvalue()
    assert "pulid_flux" in printed and "train s/img" in printed and "Wrote report.json" in printed
    assert ShotList.objects.unscoped().count() == 1


def test_compare_methods_refuses_lora_without_one_unless_asked_to_train(eileen, prompts, tmp_path):
    with pytest.raises(CommandError, match="has no LoRA"):
        call_command("compare_methods", "--characters", str(eileen.pk), "--prompts", str(prompts),
                     "--methods", "lora", "--inline", "--out", str(tmp_path / "x"))  # fmt: skip
    with pytest.raises(CommandError, match="Unknown method"):
        call_command("compare_methods", "--characters", str(eileen.pk), "--prompts", str(prompts),
                     "--methods", "dalle")  # fmt: skip
    assert not ShotList.objects.unscoped().exists()
