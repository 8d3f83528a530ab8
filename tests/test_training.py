"""LoRA training in one process (tiny SDXL / FLUX on the CPU): requests, data preparation, learning, resume, cancel.

The end-to-end runs through real worker processes are in test_training_workers.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from alkemy.jobs import JobStatus
from characters.services import character_create, reference_add
from tests import photos
from training.jobs import training_cancel, training_submit
from training.models import LoraArtifact, TrainingJob
from training.trainer.data import Example, face_crop, reference_examples, with_flips
from training.trainer.loop import (
    TrainingConfig,
    checkpoint_bytes,
    evaluation_loss,
    load_checkpoint,
    optimize,
    train,
    trainer_for,
)
from training.worker import run_training_job

pytestmark = pytest.mark.django_db

ASTRONAUT_FACE = (175, 40, 265, 150)  # roughly where the detector puts Eileen Collins' face (512² photo)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models are too small to gain from threads; on a shared CPU, one per process is fastest."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def models(settings, tiny_models_dir, media_root):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    return tiny_models_dir


@pytest.fixture
def eileen(studio_a, models):
    character = character_create(tenant=studio_a.tenant, name="Eileen Collins")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    crop = face_crop(Image.fromarray(photos.astronaut()), ASTRONAUT_FACE, 64)
    return with_flips([Example(crop, "a photo of ohwx_eileen person")])


def config(models_dir, base_model, **overrides) -> TrainingConfig:
    values = dict(base_model=base_model, models_dir=models_dir, steps=12, rank=4, learning_rate=3e-3, resolution=64,
                  seed=5, checkpoint_every=0, log_every=4)  # fmt: skip
    return TrainingConfig(**{**values, **overrides})


# -- requests ------------------------------------------------------------------------------------------------


def test_submit_fills_in_the_defaults_and_queues_the_job(api_a, eileen):
    response = api_a.post("/api/v1/trainings", {"character": eileen.pk, "base_model": "sdxl"}, format="json")
    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["status"] == "queued" and body["progress"] == 0
    assert (body["steps"], body["rank"], body["alpha"], body["resolution"]) == (1000, 16, 16.0, 1024)
    assert body["trigger_token"] == "ohwx_eileen_collins"
    assert body["lora"] is None and body["error"] is None
    assert api_a.get(f"/api/v1/trainings?character={eileen.pk}&status=queued").json()["count"] == 1
    assert api_a.get("/api/v1/trainings?status=succeeded").json()["count"] == 0


@pytest.mark.parametrize(
    ("overrides", "status", "code", "field"),
    [
        ({"rank": 0}, 400, "invalid_parameter", "rank"),
        ({"rank": 129}, 400, "invalid_parameter", "rank"),
        ({"steps": 0}, 400, "invalid_parameter", "steps"),
        ({"steps": 10_000_000}, 400, "invalid_parameter", "steps"),
        ({"resolution": 1000}, 400, "invalid_parameter", "resolution"),
        ({"resolution": 4096}, 400, "invalid_parameter", "resolution"),
        ({"learning_rate": 0}, 400, "invalid_parameter", "learning_rate"),
        ({"trigger_token": "two words"}, 400, "invalid_parameter", "trigger_token"),
        ({"captions": {"999999": "a photo"}}, 400, "invalid_parameter", "captions"),
    ],
)
def test_bad_requests_are_refused_with_a_code_and_queue_nothing(api_a, eileen, overrides, status, code, field):
    from django_q.models import OrmQ

    body = {"character": eileen.pk, "base_model": "sdxl", **overrides}
    response = api_a.post("/api/v1/trainings", body, format="json")
    assert response.status_code == status, response.json()
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["details"]["field"] == field
    assert not TrainingJob.objects.unscoped().exists() and not OrmQ.objects.exists()


def test_a_character_without_references_cannot_be_trained(api_a, studio_a, models):
    bare = character_create(tenant=studio_a.tenant, name="Nobody Yet")
    response = api_a.post("/api/v1/trainings", {"character": bare.pk, "base_model": "flux"}, format="json")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "no_references"
    assert not TrainingJob.objects.unscoped().exists()


def test_another_tenants_character_is_404(api_b, eileen):
    response = api_b.post("/api/v1/trainings", {"character": eileen.pk, "base_model": "sdxl"}, format="json")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "character_not_found"
    assert not TrainingJob.objects.unscoped().exists()


def test_missing_base_weights_are_refused_up_front(api_a, eileen, settings, tmp_path):
    settings.ALKEMY_MODELS_DIR = tmp_path / "empty"
    response = api_a.post("/api/v1/trainings", {"character": eileen.pk, "base_model": "flux"}, format="json")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_missing"
    assert response.json()["error"]["details"]["field"] == "base_model"


def test_a_retry_with_the_same_idempotency_key_returns_the_same_job(api_a, eileen):
    body = {"character": eileen.pk, "base_model": "flux", "steps": 50}
    first = api_a.post("/api/v1/trainings", body, format="json", HTTP_IDEMPOTENCY_KEY="train-1")
    again = api_a.post("/api/v1/trainings", body, format="json", HTTP_IDEMPOTENCY_KEY="train-1")
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    other = api_a.post("/api/v1/trainings", {**body, "steps": 60}, format="json", HTTP_IDEMPOTENCY_KEY="train-1")
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert TrainingJob.objects.unscoped().count() == 1


def test_another_tenant_cannot_see_or_cancel_a_training(api_a, api_b, eileen):
    job_id = api_a.post("/api/v1/trainings", {"character": eileen.pk, "base_model": "sdxl"}, format="json").json()["id"]
    assert api_b.get(f"/api/v1/trainings/{job_id}").status_code == 404
    assert api_b.post(f"/api/v1/trainings/{job_id}/cancel").status_code == 404
    assert api_b.get("/api/v1/trainings").json()["count"] == 0
    canceled = api_a.post(f"/api/v1/trainings/{job_id}/cancel").json()
    assert canceled["status"] == "canceled"


# -- data preparation --------------------------------------------------------------------------------------


def test_references_become_face_centred_crops_and_their_flips(eileen):
    examples = reference_examples(character=eileen, resolution=128, trigger_token="ohwx_eileen", captions={})
    assert len(examples) == 2
    assert [e.caption for e in examples] == ["a photo of ohwx_eileen person"] * 2
    crop, flipped = (np.asarray(e.image) for e in examples)
    assert crop.shape == flipped.shape == (128, 128, 3)
    assert np.array_equal(crop[:, ::-1], flipped)
    reference = eileen.references.model.objects.unscoped().get(character=eileen)
    x1, y1, x2, y2 = reference.face_box
    face = max(x2 - x1, y2 - y1)
    # head and shoulders: about three face heights, the face in the upper middle
    side = min(3 * face, reference.width, reference.height)
    assert side > 2 * face


def test_given_captions_keep_the_trigger_token(eileen):
    reference = eileen.references.model.objects.unscoped().get(character=eileen)
    examples = reference_examples(character=eileen, resolution=64, trigger_token="ohwx_eileen",
                                  captions={str(reference.pk): "an astronaut in an orange suit"})  # fmt: skip
    assert examples[0].caption == "ohwx_eileen, an astronaut in an orange suit"


# -- learning ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("base_model", "steps", "learning_rate"), [("flux", 24, 3e-3), ("sdxl", 10, 1e-1)])
def test_training_lowers_the_loss_on_a_fixed_dataset(tiny_models_dir, examples, base_model, steps, learning_rate):
    cfg = config(tiny_models_dir, base_model, steps=steps, learning_rate=learning_rate)
    trainer = trainer_for(cfg)
    trainer.load()
    trainer.cache(examples)
    trainer.add_lora()
    before = evaluation_loss(trainer, repeats=1)
    result = optimize(trainer, cfg)
    after = evaluation_loss(trainer, repeats=1)
    assert after < before, (before, after, result.loss_history)
    assert result.steps == steps and result.loss_history[-1][0] == steps
    assert evaluation_loss(trainer, repeats=1) == after  # seeded: the same evaluation gives the same number


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_models_dir, examples):
    cfg = config(tiny_models_dir, "flux", steps=9, checkpoint_every=3)
    checkpoints = {}

    def store(step, state):  # as the worker does: serialised at once, read back by the next attempt
        checkpoints[step] = load_checkpoint(checkpoint_bytes(state), cfg)

    straight = train(cfg, examples, on_checkpoint=store)
    assert sorted(checkpoints) == [3, 6]  # none at the last step: the LoRA itself is saved then

    resumed = train(cfg, examples, checkpoint=checkpoints[6])
    assert resumed.resumed_from_step == 6 and resumed.steps == 9
    assert resumed.state_dict.keys() == straight.state_dict.keys()
    for key, value in straight.state_dict.items():
        assert torch.equal(value, resumed.state_dict[key]), key
    assert resumed.loss_history == straight.loss_history


def test_the_lora_targets_the_attention_projections(tiny_models_dir, examples):
    flux = train(config(tiny_models_dir, "flux", steps=1), examples).state_dict
    assert any(".add_q_proj.lora_A" in key for key in flux) and any(".to_add_out.lora_B" in key for key in flux)
    assert any("single_transformer_blocks.0.attn.to_q.lora_A" in key for key in flux)
    sdxl = train(config(tiny_models_dir, "sdxl", steps=1), examples).state_dict
    assert {key.split(".")[-3] for key in sdxl} == {"to_q", "to_k", "to_v", "0"}  # to_out.0


# -- the worker in this process ----------------------------------------------------------------------------


def test_cancel_during_training_keeps_no_lora(studio_a, eileen, settings):
    from alkemy.webhooks.models import WebhookDelivery
    from alkemy.webhooks.services import endpoint_create

    settings.ALKEMY_WEBHOOK_ALLOW_PRIVATE = True
    endpoint_create(tenant=studio_a.tenant, url="http://127.0.0.1:9/hook", events=["training.running",
                                                                                    "training.canceled"])  # fmt: skip
    settings.ALKEMY_TRAINING_CHECKPOINT_STEPS = 2
    job, _ = training_submit(tenant=studio_a.tenant, character=eileen, base_model="flux", steps=40, rank=4,
                             resolution=64, seed=1)  # fmt: skip
    seen = []

    def progress(step, total, loss):
        seen.append(step)
        if step == 5:
            training_cancel(job=TrainingJob.objects.unscoped().get(pk=job.pk))

    assert run_training_job(job.pk, progress=progress) == JobStatus.CANCELED
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELED and job.error_code == "canceled"
    assert max(seen) == 5 < job.steps  # stopped before the next step
    assert job.lora is None and not LoraArtifact.objects.unscoped().exists()
    assert job.checkpoint_file == ""  # an ended job cannot resume: the checkpoint goes
    assert job.device == "cpu" and job.device_seconds > 0 and job.usage["steps"] == 5
    events = list(WebhookDelivery.objects.unscoped().order_by("id").values_list("event", "payload__status"))
    assert events == [("training.running", "running"), ("training.canceled", "canceled")]


def test_train_lora_command_trains_in_process_and_adds_a_version(eileen, capsys):
    from django.core.management import call_command

    call_command("train_lora", "--character", str(eileen.pk), "--base", "flux", "--steps", "3", "--rank", "4",
                 "--resolution", "64", "--seed", "2")  # fmt: skip
    out, err = capsys.readouterr()
    assert "LoRA v1 (selected), trigger 'ohwx_eileen_collins'" in out
    assert "3/3" in err  # the progress bar
    artifact = LoraArtifact.objects.unscoped().get(character=eileen)
    assert artifact.source == "trained" and artifact.metadata["steps"] == 3
    assert TrainingJob.objects.unscoped().get().status == JobStatus.SUCCEEDED


# -- admin -------------------------------------------------------------------------------------------------


def test_staff_train_a_lora_from_the_character_page_and_follow_it(client, staff_of_a, studio_b, eileen, settings):
    settings.ALKEMY_TRAINING_LOG_STEPS = 1
    client.force_login(staff_of_a)
    page = client.get(f"/admin/characters/character/{eileen.pk}/change/").content.decode()
    url = f"/admin/training/trainingjob/train/{eileen.pk}/"
    assert url in page and "Train a LoRA…" in page
    assert client.get(url).status_code == 200
    bad = client.post(url, {"base_model": "sdxl", "rank": 16, "resolution": 100, "lr_schedule": "constant"})
    assert bad.status_code == 200 and "multiple of 64" in bad.content.decode()
    assert not TrainingJob.objects.unscoped().exists()

    response = client.post(url, {"base_model": "flux", "steps": 3, "rank": 4, "resolution": 64,
                                 "lr_schedule": "constant", "seed": 1})  # fmt: skip
    job = TrainingJob.objects.unscoped().get()
    assert response.status_code == 302 and response["Location"].endswith(
        f"/admin/training/trainingjob/{job.pk}/change/"
    )
    assert job.requested_by == staff_of_a and job.steps == 3
    assert run_training_job(job.pk) == JobStatus.SUCCEEDED
    detail = client.get(response["Location"]).content.decode()
    assert "Loss curve" in detail and "<polyline" in detail and "LoRA v1" in detail

    outsider = character_create(tenant=studio_b.tenant, name="Someone Else")
    assert client.get(f"/admin/training/trainingjob/train/{outsider.pk}/").status_code == 404
