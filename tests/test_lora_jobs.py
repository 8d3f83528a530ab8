"""LoRA versions over the API and LoRA generations through the worker."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from alkemy.jobs import JobStatus
from characters.services import character_create
from generation.jobs import generation_submit
from generation.model_registry import component_path
from generation.models import GeneratedImage
from generation.tasks import run_generation_job
from generation.tiny.lora import write_peft_lora
from tests.conftest import stored_files
from training.models import LoraArtifact

pytestmark = pytest.mark.django_db


@pytest.fixture
def models(settings, tiny_models_dir, media_root):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    return tiny_models_dir


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_models_dir):
    folder = tmp_path_factory.mktemp("loras")
    sdxl = component_path(tiny_models_dir, "sdxl")
    return {
        "a": write_peft_lora(folder / "a.safetensors", base_dir=sdxl, base_model="sdxl", rank=4, seed=1).read_bytes(),
        "b": write_peft_lora(folder / "b.safetensors", base_dir=sdxl, base_model="sdxl", rank=4, seed=2).read_bytes(),
    }


@pytest.fixture
def kai(studio_a):
    return character_create(tenant=studio_a.tenant, name="Kai")


def upload(api, character, data, **fields):
    body = {"file": SimpleUploadedFile("kai.safetensors", data), "base_model": "sdxl", **fields}
    return api.post(f"/api/v1/characters/{character.pk}/loras", body, format="multipart")


def test_upload_versions_and_select(api_a, kai, models, lora_files):
    first = upload(api_a, kai, lora_files["a"], trigger_token="ohwx kai")
    assert first.status_code == 201, first.json()
    assert first.json()["version"] == 1 and first.json()["is_selected"] is True
    assert first.json()["lora_format"] == "diffusers" and first.json()["rank"] == 4
    second = upload(api_a, kai, lora_files["b"]).json()
    assert second["version"] == 2 and second["is_selected"] is True
    versions = {v["version"]: v["is_selected"] for v in api_a.get(f"/api/v1/characters/{kai.pk}/loras").json()}
    assert versions == {1: False, 2: True}
    selected = api_a.post(f"/api/v1/characters/{kai.pk}/loras/{first.json()['id']}/select").json()
    assert selected["is_selected"] is True
    assert LoraArtifact.objects.unscoped().get(pk=second["id"]).is_selected is False


def test_invalid_lora_is_refused_and_leaves_nothing(api_a, kai, models, media_root):
    response = upload(api_a, kai, b"\x80\x04\x95 definitely a pickle")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_lora"
    assert response.json()["error"]["details"]["field"] == "file"
    assert not LoraArtifact.objects.unscoped().exists() and stored_files(media_root) == []


def test_loras_are_tenant_private(api_a, api_b, kai, models, lora_files):
    artifact = upload(api_a, kai, lora_files["a"]).json()
    assert api_b.get(f"/api/v1/characters/{kai.pk}/loras").status_code == 404
    assert upload(api_b, kai, lora_files["a"]).status_code == 404
    assert api_b.post(f"/api/v1/characters/{kai.pk}/loras/{artifact['id']}/select").status_code == 404


def test_lora_job_runs_with_the_selected_version(api_a, studio_a, kai, models, lora_files):
    upload(api_a, kai, lora_files["a"], trigger_token="ohwx")
    job, _ = generation_submit(
        tenant=studio_a.tenant, character=kai, method="lora", prompt="a portrait", width=64, height=64, steps=2, seed=1
    )
    assert job.lora.version == 1
    assert run_generation_job(job.pk) == JobStatus.SUCCEEDED
    output = GeneratedImage.objects.unscoped().get(job=job)
    assert (output.width, output.height) == (64, 64)
    assert output.identity_reason == "no_identity"  # Kai has a LoRA but no reference photo to score against


def test_lora_job_without_a_lora_is_422(api_a, kai, models):
    response = api_a.post(
        "/api/v1/generations", {"character": kai.pk, "method": "lora", "prompt": "x", "width": 64, "height": 64},
        format="json",
    )  # fmt: skip
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "no_lora"


def test_style_lora_must_match_the_base_model(api_a, kai, models, lora_files):
    upload(api_a, kai, lora_files["a"])
    style = api_a.post(
        "/api/v1/style-loras",
        {"file": SimpleUploadedFile("noir.safetensors", lora_files["b"]), "name": "noir", "base_model": "sdxl"},
        format="multipart",
    )
    assert style.status_code == 201, style.json()
    body = {"character": kai.pk, "method": "lora", "prompt": "x", "width": 64, "height": 64,
            "params": {"style_lora": style.json()["id"]}}  # fmt: skip
    assert api_a.post("/api/v1/generations", body, format="json").status_code == 202
    body["params"] = {"style_lora": 999999}
    assert api_a.post("/api/v1/generations", body, format="json").json()["error"]["code"] == "style_lora_not_found"
