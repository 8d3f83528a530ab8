"""Training jobs through the same two calls as generations: admission at submission, the ledger at the end."""

from decimal import Decimal

import pytest
from django.apps import apps
from django.db import transaction

from alkemy.jobs import JobStatus, job_claim, job_finish
from characters.services import character_create, reference_add
from tests import photos
from usage.models import Reservation, UsageEvent
from usage.services import budget_set, usage_admit, usage_quote, usage_record_job

pytestmark = pytest.mark.django_db

try:
    TrainingJob = apps.get_model("training", "TrainingJob")
except LookupError:  # the training app has no jobs yet
    TrainingJob = None
    pytestmark = [pytestmark, pytest.mark.skip(reason="training.TrainingJob does not exist yet")]


@pytest.fixture
def eileen(studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def training(character, **overrides):
    fields = {"tenant": character.tenant, "character": character, "base_model": "flux", "steps": 1000, "rank": 16,
              "alpha": 16.0, "learning_rate": 1e-4, "resolution": 1024, "trigger_token": "ohwx_eileen", "seed": 1,
              **overrides}  # fmt: skip
    return TrainingJob(**fields)


def submit_training(character, **overrides):
    with transaction.atomic():  # as training_submit does: the INSERT, then admission in the same transaction
        job = training(character, **overrides)
        job.save()
        usage_admit(job=job)
    return job


def test_a_training_job_is_estimated_from_its_steps_and_reserved(eileen):
    quote = usage_quote(job=training(eileen))
    assert quote.estimate.method == "train_flux" and quote.estimate.gpu_class == "default"
    assert quote.estimate.device_seconds == Decimal("500.000")  # 0.50 s per FLUX step at 1024² (no history yet)
    assert quote.estimate.cost == Decimal("0.415278")  # 500 s at $2.99 / hour
    job = submit_training(eileen)
    assert Reservation.objects.unscoped().get(job_kind="training", job_id=job.pk).estimated_cost == quote.estimate.cost


def test_queued_training_jobs_count_against_the_tenants_job_limit(eileen, studio_a, api_a):
    budget_set(tenant=studio_a.tenant, max_concurrent_jobs=1)
    submit_training(eileen)
    refused = api_a.post("/api/v1/generations", {"character": eileen.pk, "method": "gemini", "prompt": "p",
                                                 "width": 512, "height": 512}, format="json")  # fmt: skip
    assert refused.status_code == 429 and refused.json()["error"]["details"]["queued"] == 1


def test_a_finished_training_job_is_billed_once(eileen):
    job = submit_training(eileen, steps=200)
    assert job_claim(TrainingJob, job.pk, worker="trainer:1")
    for _ in range(2):  # the second finish (a duplicate delivery) changes nothing
        with transaction.atomic():
            if job_finish(TrainingJob, job.pk, worker="trainer:1", status=JobStatus.SUCCEEDED,
                          device="cuda:NVIDIA H200", device_seconds=100.0, usage={"steps": 200}):  # fmt: skip
                usage_record_job(job=job)
    with transaction.atomic():
        usage_record_job(job=job)
    events = {e.meter: e for e in UsageEvent.objects.unscoped().filter(job_kind="training", job_id=job.pk)}
    assert set(events) == {"gpu_seconds", "training_steps"}
    assert events["gpu_seconds"].gpu_class == "H200" and events["gpu_seconds"].method == "train_flux"
    assert events["gpu_seconds"].cost == Decimal("0.110833")  # 100 s at $3.99 / hour
    assert events["training_steps"].quantity == 200 and all(e.billable for e in events.values())


@pytest.fixture
def models(settings, tiny_models_dir, media_root):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir  # submission checks the base model's files
    return tiny_models_dir


def test_training_dry_run_answers_the_estimate_and_creates_nothing(eileen, api_a, models):
    body = {"character": eileen.pk, "base_model": "sdxl", "steps": 1000, "resolution": 1024}
    response = api_a.post("/api/v1/trainings?dry_run=true", body, format="json")
    assert response.status_code == 200, response.json()
    assert response.json()["dry_run"] is True and response.json()["allowed"] is True
    assert response.json()["estimate"]["method"] == "train_sdxl"
    assert not TrainingJob.objects.unscoped().exists() and not Reservation.objects.unscoped().exists()


def test_training_over_the_job_limit_is_429_with_retry_after(eileen, studio_a, api_a, models):
    budget_set(tenant=studio_a.tenant, max_concurrent_jobs=1)
    submit_training(eileen)
    body = {"character": eileen.pk, "base_model": "sdxl", "steps": 10, "resolution": 1024}
    refused = api_a.post("/api/v1/trainings", body, format="json")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert TrainingJob.objects.unscoped().count() == 1
    quote = api_a.post("/api/v1/trainings?dry_run=true", body, format="json").json()
    assert quote["allowed"] is False and quote["refusal"]["code"] == "too_many_jobs"
