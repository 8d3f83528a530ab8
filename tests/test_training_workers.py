"""LoRA training end to end: the API, real `qcluster` GPU worker processes, tiny SDXL / FLUX on the CPU."""

import numpy as np
import pytest
import torch

from alkemy.jobs import JobStatus
from characters.services import character_create, reference_add
from generation.lora.bases import base_spec, pipeline_class
from generation.model_registry import component_path
from tests import photos
from tests.qcluster import Cluster, wait_for
from training.models import LoraArtifact, TrainingJob

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

WORKER_ENV = {
    "OMP_NUM_THREADS": "1",  # tiny models: one torch thread per process is fastest on a shared CPU
    "ALKEMY_JOB_LEASE_SECONDS": "3",
    "ALKEMY_TRAINING_LOG_STEPS": "2",
    "ALKEMY_TRAINING_VALIDATION_STEPS": "2",
}


@pytest.fixture(scope="module")
def shared_media(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def gpu_cluster(django_db_setup, django_db_blocker, tiny_models_dir, shared_media):
    """One GPU worker for the module: it imports torch and warms its pipelines once, as in production."""
    with django_db_blocker.unblock():
        paths = {"ALKEMY_MEDIA_ROOT": str(shared_media), "ALKEMY_MODELS_DIR": str(tiny_models_dir)}
        cluster = Cluster("gpu", **WORKER_ENV, ALKEMY_TRAINING_CHECKPOINT_STEPS="5", **paths).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def worker_env(settings, tiny_models_dir, shared_media, gpu_cluster):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    settings.MEDIA_ROOT = shared_media
    return settings


@pytest.fixture
def eileen(studio_a, worker_env):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def training(job_id) -> TrainingJob:
    return TrainingJob.objects.unscoped().get(pk=job_id)


def submit(api, character, **overrides) -> int:
    body = {"character": character.pk, "base_model": "sdxl", "steps": 4, "rank": 4, "resolution": 64,
            "learning_rate": 1e-2, "seed": 3, **overrides}  # fmt: skip
    response = api.post("/api/v1/trainings", body, format="json")
    assert response.status_code == 202, response.json()
    return response.json()["id"]


def render(pipeline, base_model: str) -> np.ndarray:
    return pipeline(
        prompt="ohwx_eileen, a portrait", width=64, height=64, num_inference_steps=2,
        guidance_scale=base_spec(base_model).default_guidance, generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]  # fmt: skip


@pytest.mark.parametrize(("base_model", "steps"), [("sdxl", 4), ("flux", 10)])
def test_training_through_the_api_adds_a_selected_lora_that_generations_use(
    api_a, eileen, worker_env, gpu_cluster, tiny_models_dir, base_model, steps
):
    job_id = submit(api_a, eileen, base_model=base_model, steps=steps, validation_prompt="on the moon")
    wait_for(lambda: training(job_id).is_terminal, timeout=400, what="the training to finish")
    body = api_a.get(f"/api/v1/trainings/{job_id}").json()
    assert body["status"] == "succeeded", (body, "".join(gpu_cluster.log[-40:]))
    assert body["progress"] == 1.0 and body["current_step"] == steps and body["attempt"] == 1
    assert body["loss"] > 0 and body["loss_history"][-1][0] == steps and body["steps_per_second"] > 0
    assert body["device"] == "cpu" and body["device_seconds"] > 0 and body["usage"]["steps"] == steps
    assert body["resumed_from_step"] is None
    assert body["lora"]["version"] == 1 and body["lora"]["is_selected"] is True

    artifact = LoraArtifact.objects.unscoped().get(pk=body["lora"]["id"])
    assert (artifact.source, artifact.base_model, artifact.rank) == ("trained", base_model, 4)
    assert artifact.trigger_token == "ohwx_eileen"
    assert artifact.metadata["training_job"] == job_id and artifact.metadata["steps"] == steps
    assert artifact.metadata["final_loss"] == body["loss"] and artifact.metadata["seconds"] > 0
    # the validation render, identity-scored (tiny random networks draw no face, and the score says so)
    assert body["validation"]["identity_reason"] == "no_face"
    assert api_a.get(body["validation"]["url"])["Content-Type"] == "image/png"

    download = api_a.get(f"/api/v1/characters/{eileen.pk}/loras/{artifact.pk}/file")
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == artifact.file.open("rb").read()

    # the file is what diffusers' load_lora_weights reads, and it changes the base model's output
    pipeline = pipeline_class(base_spec(base_model)).from_pretrained(
        component_path(tiny_models_dir, base_model), **({"add_watermarker": False} if base_model == "sdxl" else {})
    )
    pipeline.set_progress_bar_config(disable=True)
    plain = render(pipeline, base_model)
    pipeline.load_lora_weights(artifact.file.path)
    assert np.abs(render(pipeline, base_model) - plain).max() > 1e-4

    generation = api_a.post(
        "/api/v1/generations",
        {"character": eileen.pk, "method": "lora", "prompt": "on the moon", "width": 64, "height": 64, "steps": 2,
         "seed": 1},
        format="json",
    )  # fmt: skip
    assert generation.status_code == 202, generation.json()
    generation_id = generation.json()["id"]

    def generation_done():
        return api_a.get(f"/api/v1/generations/{generation_id}").json()["status"] in ("succeeded", "failed")

    wait_for(generation_done, timeout=300, what="the LoRA generation to finish")
    finished = api_a.get(f"/api/v1/generations/{generation_id}").json()
    assert finished["status"] == "succeeded", (finished, "".join(gpu_cluster.log[-40:]))


def test_cancel_through_the_api_stops_a_running_training_without_a_lora(api_a, eileen, worker_env):
    job_id = submit(api_a, eileen, base_model="flux", steps=2000)
    wait_for(lambda: training(job_id).current_step >= 5, timeout=300, what="the training to make progress")
    assert api_a.post(f"/api/v1/trainings/{job_id}/cancel").status_code == 200
    wait_for(lambda: training(job_id).is_terminal, timeout=120, what="the training to stop")
    stopped = training(job_id)
    assert stopped.status == JobStatus.CANCELED and stopped.error_code == "canceled"
    assert 5 <= stopped.current_step < stopped.steps and stopped.lora is None
    assert not LoraArtifact.objects.unscoped().exists()
    assert stopped.checkpoint_file == "" and not list(worker_env.MEDIA_ROOT.rglob("checkpoint-*.pt"))
