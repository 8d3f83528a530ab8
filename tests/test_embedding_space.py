"""Embedding spaces: weights declare the face embedder they take, other spaces are refused until re-embedded;
the raw ArcFace embedding of the shrunk ID photo is stored and fed; the antelopev2 path runs end to end.

The production face path runs on the tiny antelopev2 pack that `build_test_models` writes
(`generation/tiny/antelopev2.py`: a fixed SCRFD-layout detector that finds one centred portrait
face, and an ArcFace-layout 112→512 recogniser), chosen with `ALKEMY_FACE_EMBEDDER=arcface_antelopev2`.
"""

from __future__ import annotations

import io
import json
import shutil

import cv2
import numpy as np
import pytest
from django.core.management import CommandError, call_command
from PIL import Image

from characters.faces import get_embedder, resolve_embedder_name
from characters.faces.insightface_backend import PACKS, pack_dir_in
from characters.models import CharacterIdentity, FaceEmbedding, ReferenceImage
from characters.services import character_create, reference_add
from generation.methods.base import EmbeddingSpaceMismatch, GenerationRequest, InvalidWeights, LoadOptions
from generation.model_registry import (
    EMBEDDING_SPACE_MARKER,
    PRODUCTION_EMBEDDER,
    embedding_space,
    embedding_space_marker,
)
from generation.models import GenerationJob
from generation.references import reference_faces
from generation.tasks import run_generation_job
from generation.tiny.antelopev2 import portrait_face
from tests import photos

pytestmark = pytest.mark.django_db

ANTELOPE = "arcface_antelopev2"


@pytest.fixture(scope="module")
def antelope_models(tiny_models_dir, tmp_path_factory):
    """The tiny models with PuLID's and InstantID's ID encoders built for 512-d antelopev2 embeddings."""
    from generation.tiny.instantid import write_instantid_components
    from generation.tiny.pulid import write_pulid_components

    directory = tmp_path_factory.mktemp("antelope") / "models"
    shutil.copytree(tiny_models_dir, directory)
    write_pulid_components(directory, embedder=ANTELOPE)
    write_instantid_components(directory, embedder=ANTELOPE)
    yield directory
    from characters.faces import _instance

    _instance.cache_clear()  # the loaded antelopev2 embedder reads this folder


@pytest.fixture
def antelope_active(settings, antelope_models, media_root):
    settings.ALKEMY_MODELS_DIR = antelope_models
    settings.ALKEMY_FACE_EMBEDDER = ANTELOPE
    return antelope_models


def enrol(tenant, name: str, pixels: np.ndarray):
    character = character_create(tenant=tenant, name=name)
    reference_add(character=character, upload=photos.upload(pixels))
    return character


def pulid_shrink(pixels: np.ndarray) -> np.ndarray:
    """PuLID's `resize_numpy_image_long(image, 1024)`, written out."""
    height, width = pixels.shape[:2]
    if max(height, width) <= 1024:
        return pixels
    k = 1024 / max(height, width)
    return cv2.resize(pixels, (int(width * k), int(height * k)), interpolation=cv2.INTER_LANCZOS4)


def official_raw_embedding(models_dir, pixels: np.ndarray) -> np.ndarray:
    """What PuLID's and InstantID's code feed: insightface's raw `embedding` of the ID photo, as they compute
    it (`FaceAnalysis(name="antelopev2").get` = SCRFD at 640 → norm_crop → ArcFace), on PuLID's shrunk photo."""
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD
    from insightface.utils import face_align

    pack, detector_file, recogniser_file = PACKS[ANTELOPE]
    folder = pack_dir_in(models_dir, pack)
    detector = SCRFD(model_file=str(folder / detector_file))
    detector.prepare(-1, input_size=(640, 640))
    recogniser = ArcFaceONNX(model_file=str(folder / recogniser_file))
    recogniser.prepare(-1)
    bgr = np.ascontiguousarray(pulid_shrink(pixels)[:, :, ::-1])
    _, keypoints = detector.detect(bgr, input_size=(640, 640))
    return recogniser.get_feat(face_align.norm_crop(bgr, landmark=keypoints[0], image_size=112)).ravel()


def set_declared_space(models_dir, method: str, embedder: str | None) -> None:
    marker = embedding_space_marker(models_dir, method)
    if embedder is None:
        marker.unlink(missing_ok=True)
    else:
        marker.write_text(json.dumps({"embedder": embedder}))


# --- the weights declare their embedding space ------------------------------------------------------


def test_tiny_weights_declare_the_embedder_they_were_built_for_and_released_files_antelopev2(tiny_models_dir, tmp_path):
    active = resolve_embedder_name()
    assert active == "dlib"  # the offline default, also with the tiny antelopev2 pack in the models dir
    for method, folder in (("pulid_flux", "pulid"), ("instantid_sdxl", "instantid")):
        marker = tiny_models_dir / folder / EMBEDDING_SPACE_MARKER
        assert json.loads(marker.read_text()) == {"embedder": active}
        assert embedding_space(tiny_models_dir, method).embedder == active
    assert embedding_space(tiny_models_dir, "lora") is None and embedding_space(tiny_models_dir, "gemini") is None

    # the released files carry no marker: they take antelopev2 embeddings
    released = tmp_path / "models"
    shutil.copytree(tiny_models_dir / "pulid", released / "pulid")
    set_declared_space(released, "pulid_flux", None)
    space = embedding_space(released, "pulid_flux")
    assert (space.embedder, space.declared_by) == (PRODUCTION_EMBEDDER, "the released weights")


def test_weights_whose_declared_embedder_has_another_width_do_not_load(tiny_models_dir, tmp_path):
    from generation.methods.instantid_sdxl import InstantIdSdxlMethod
    from generation.methods.pulid_flux import PulidFluxMethod

    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    for method, cls in (("pulid_flux", PulidFluxMethod), ("instantid_sdxl", InstantIdSdxlMethod)):
        set_declared_space(models, method, None)  # 128-d dlib weights posing as the released 512-d files
        with pytest.raises(InvalidWeights, match="takes 128-d face embeddings, but its face embedder 'arcface_antel"):
            cls.load(models, LoadOptions())
        set_declared_space(models, method, "nonsense")
        with pytest.raises(InvalidWeights, match="names the face embedder 'nonsense'"):
            cls.load(models, LoadOptions())


def test_check_models_says_which_embeddings_each_method_needs(tiny_models_dir, antelope_models):
    out = io.StringIO()
    call_command("check_models", "--models-dir", str(tiny_models_dir), stdout=out)
    text = out.getvalue()
    assert (
        f"needs face embeddings from: dlib (declared by {tiny_models_dir / 'pulid' / EMBEDDING_SPACE_MARKER})" in text
    )
    assert "not picked by auto" in text and "tiny test pack" in text

    out = io.StringIO()
    call_command("check_models", "--models-dir", str(antelope_models), stdout=out)
    text = out.getvalue()
    assert f"needs face embeddings from: {ANTELOPE}" in text
    assert f"manage.py reembed_references --character ID --embedder {ANTELOPE}" in text


# --- the guard ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pulid_flux", "instantid_sdxl"])
def test_submit_refuses_a_character_embedded_in_another_space_and_names_the_fix(
    studio_a, api_a, media_root, settings, tiny_models_dir, antelope_models, method
):
    settings.ALKEMY_MODELS_DIR = antelope_models  # weights take antelopev2; the active embedder stays dlib
    character = enrol(studio_a.tenant, "Eileen", photos.astronaut())
    body = {"character": character.pk, "method": method, "prompt": "a portrait", "width": 64, "height": 64}
    for url in ("/api/v1/generations", "/api/v1/generations?dry_run=true"):
        response = api_a.post(url, body, format="json")
        assert response.status_code == 422, response.json()
        error = response.json()["error"]
        assert error["code"] == "embedding_space_mismatch"
        assert error["details"]["field"] == "character"
        assert error["details"]["needs_embedder"] == ANTELOPE and error["details"]["reference_embedders"] == ["dlib"]
        assert f"manage.py reembed_references --character {character.pk} --embedder {ANTELOPE}" in error["message"]
    assert not GenerationJob.objects.unscoped().exists()

    # weights built for the character's space accept it (the existing tiny weights, dlib)
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    assert api_a.post("/api/v1/generations?dry_run=true", body, format="json").status_code == 200


def test_a_job_refused_by_the_worker_fails_with_the_fix_then_renders_after_reembedding(
    studio_a, media_root, settings, antelope_models, tmp_path
):
    from generation.jobs import generation_submit

    character = enrol(studio_a.tenant, "Eileen", photos.astronaut())
    # submitted while no weights were in place (the space is unknown then), run once antelopev2 weights are
    settings.ALKEMY_MODELS_DIR = tmp_path / "empty"
    job, _ = generation_submit(
        tenant=studio_a.tenant, character=character, prompt="a portrait", method="instantid_sdxl", width=64,
        height=64, steps=2, seed=1,
    )  # fmt: skip
    settings.ALKEMY_MODELS_DIR = antelope_models
    assert run_generation_job(job.pk) == "failed"
    job.refresh_from_db()
    assert job.error_code == "embedding_space_mismatch"
    assert f"manage.py reembed_references --character {character.pk} --embedder {ANTELOPE}" in job.error_message

    call_command("reembed_references", "--character", str(character.pk), "--embedder", ANTELOPE, stdout=io.StringIO())
    job, _ = generation_submit(
        tenant=studio_a.tenant, character=character, prompt="a portrait", method="instantid_sdxl", width=64,
        height=64, steps=2, seed=1,
    )  # fmt: skip
    assert run_generation_job(job.pk) == "succeeded"
    assert job.outputs.model.objects.unscoped().filter(job=job).count() == 1


def test_methods_refuse_references_from_another_space(tiny_models_dir):
    from generation.methods.instantid_sdxl import InstantIdSdxlMethod

    method = InstantIdSdxlMethod.load(tiny_models_dir, LoadOptions())  # built for dlib
    assert method.embedding_space == "dlib" and InstantIdSdxlMethod.needs_embedder == PRODUCTION_EMBEDDER
    face = get_embedder().analyze(photos.astronaut())[0]
    from generation.methods.base import ReferenceFace

    foreign = ReferenceFace(photos.astronaut(), face.box, face.keypoints, face.embedding, "arcface_buffalo_l")
    request = GenerationRequest(references=[foreign], prompt="a portrait", width=64, height=64, steps=1)
    with pytest.raises(EmbeddingSpaceMismatch) as caught:
        method.generate(request)
    assert caught.value.code == "embedding_space_mismatch"
    assert "'arcface_buffalo_l'" in caught.value.message and "reembed_references" in caught.value.message


# --- re-embedding ------------------------------------------------------------------------------------


def test_reembed_adds_the_other_space_keeps_the_first_and_is_idempotent(
    studio_a, media_root, settings, antelope_models
):
    settings.ALKEMY_MODELS_DIR = antelope_models
    character = enrol(studio_a.tenant, "Eileen", photos.astronaut())
    crops = photos.group_crops()
    reference_add(character=character, upload=photos.upload(crops[0]))

    def state():
        rows = FaceEmbedding.objects.unscoped().filter(character=character).order_by("reference_id", "embedder")
        return [(r.reference_id, r.embedder, r.dims, r.raw_norm, np.asarray(r.embedding).tolist()) for r in rows]

    out = io.StringIO()
    call_command("reembed_references", "--character", str(character.pk), "--embedder", ANTELOPE, stdout=out)
    assert "2 of 2 reference(s) embedded" in out.getvalue()
    first = state()
    assert [(e, d) for _, e, d, _, _ in first] == [(ANTELOPE, 512), ("dlib", 128)] * 2
    assert all((raw is None) == (embedder == "dlib") for _, embedder, _, raw, _ in first)
    identity = CharacterIdentity.objects.unscoped().get(character=character, embedder=ANTELOPE)
    assert identity.reference_count == 2 and identity.dims == 512

    call_command("reembed_references", "--character", str(character.pk), "--embedder", ANTELOPE, stdout=io.StringIO())
    assert state() == first

    with pytest.raises(CommandError, match="No character with id 999999"):
        call_command("reembed_references", "--character", "999999", "--embedder", ANTELOPE, stdout=io.StringIO())


# --- raw norms and the shrunk ID photo -------------------------------------------------------------


def test_enrolment_stores_the_raw_embedding_of_the_photo_shrunk_as_pulid_does(studio_a, antelope_active):
    large = np.asarray(Image.fromarray(photos.astronaut()).resize((2048, 2048), Image.BICUBIC))
    character = enrol(studio_a.tenant, "Eileen", large)
    row = FaceEmbedding.objects.unscoped().get(character=character)
    assert (row.embedder, row.dims) == (ANTELOPE, 512)
    unit = np.asarray(row.embedding)
    assert np.linalg.norm(unit) == pytest.approx(1.0, abs=1e-5)

    official = official_raw_embedding(antelope_active, large)
    assert row.raw_norm == pytest.approx(float(np.linalg.norm(official)), rel=1e-5)
    assert np.allclose(unit * row.raw_norm, official, atol=1e-4)
    reference = ReferenceImage.objects.unscoped().get(character=character)
    # box and keypoints are in the uploaded photo's pixels (the tiny detector's centred portrait face)
    box, keypoints = portrait_face(2048, 2048)
    assert np.allclose(reference.face_box, box, atol=2.5)
    assert np.allclose(reference.landmarks, keypoints, atol=2.5)


def test_dlib_keeps_unit_vectors_without_a_raw_norm(studio_a, media_root):
    character = enrol(studio_a.tenant, "Eileen", photos.astronaut())
    row = FaceEmbedding.objects.unscoped().get(character=character)
    assert (row.embedder, row.raw_norm) == ("dlib", None)
    face = reference_faces(character=character)[0]
    assert face.raw_norm is None


def test_both_methods_feed_the_raw_antelopev2_embedding_as_the_official_code(studio_a, antelope_active):
    from generation.methods.instantid_sdxl import id_embedding
    from generation.methods.pulid_flux import scaled_references

    large = np.asarray(Image.fromarray(photos.astronaut()).resize((1600, 1600), Image.BICUBIC))
    character = enrol(studio_a.tenant, "Eileen", large)
    face = reference_faces(character=character, embedder=ANTELOPE)[0]
    official = official_raw_embedding(antelope_active, large)

    assert np.allclose(scaled_references([face], None)[0].embedding, official, atol=1e-4)
    assert np.allclose(id_embedding([face], 512), official, atol=1e-4)
    assert np.linalg.norm(official) != pytest.approx(512**0.5, rel=0.05)  # not the old sqrt(dims) guess
    # an explicit id_embedding_norm still rescales
    assert np.linalg.norm(id_embedding([face], 512, norm=10.0)) == pytest.approx(10.0)


# --- the production face path end to end -------------------------------------------------------------


def test_antelopev2_enrols_searches_and_renders_with_both_methods_end_to_end(studio_a, api_a, antelope_active):
    from generation.jobs import generation_submit

    people = {"astronaut": photos.astronaut(), **{f"group-{i}": c for i, c in enumerate(photos.group_crops()[:2])}}
    cast = {}
    for name, pixels in people.items():
        response = api_a.post("/api/v1/characters", {"name": name}, format="json")
        character_id = response.json()["id"]
        response = api_a.post(
            f"/api/v1/characters/{character_id}/references", {"image": photos.upload(pixels)}, format="multipart"
        )
        assert response.status_code == 201, response.json()
        cast[name] = character_id
    assert set(FaceEmbedding.objects.unscoped().values_list("embedder", "dims")) == {(ANTELOPE, 512)}

    response = api_a.post("/api/v1/search/faces", {"image": photos.upload(people["group-1"])}, format="multipart")
    assert response.status_code == 200, response.json()
    assert response.json()["embedder"] == ANTELOPE
    best = response.json()["results"][0]
    assert best["character"]["id"] == cast["group-1"] and best["similarity"] == pytest.approx(1.0, abs=1e-3)

    for method in ("pulid_flux", "instantid_sdxl"):
        from characters.models import Character

        character = Character.objects.unscoped().get(pk=cast["astronaut"])
        job, _ = generation_submit(
            tenant=studio_a.tenant, character=character, prompt="a portrait", method=method, width=64, height=64,
            steps=2, seed=5,
        )  # fmt: skip
        assert run_generation_job(job.pk) == "succeeded", method
        job.refresh_from_db()
        output = job.outputs.model.objects.unscoped().get(job=job)
        assert job.embedder == ANTELOPE and output.identity_similarity is not None  # scored with antelopev2
