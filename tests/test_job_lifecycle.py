"""Job lifecycle rules, in-process: claims, duplicate deliveries, the reaper, cancellation per step."""

from datetime import timedelta

import pytest
from django.utils import timezone

from alkemy.jobs import IllegalTransition, JobStatus, check_transition, job_claim, job_finish
from characters.services import character_create, reference_add
from generation.jobs import generation_submit
from generation.models import GeneratedImage, GenerationJob
from generation.tasks import reap_jobs, run_generation_job
from generation.worker import JobCanceled, StepGuard
from tests import photos

pytestmark = pytest.mark.django_db


@pytest.fixture
def queued_job(studio_a, media_root, settings, tiny_models_dir):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    job, _ = generation_submit(
        tenant=studio_a.tenant, character=character, prompt="a portrait", width=64, height=64, steps=2, seed=3,
        method="instantid_sdxl",
    )  # fmt: skip
    return job


def test_transitions_are_enforced():
    check_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    for terminal in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED):
        with pytest.raises(IllegalTransition):
            check_transition(terminal, JobStatus.RUNNING)
    with pytest.raises(IllegalTransition):
        check_transition(JobStatus.RUNNING, "exploded")


def test_only_one_claim_wins(queued_job):
    assert job_claim(GenerationJob, queued_job.pk, worker="a:1") is True
    assert job_claim(GenerationJob, queued_job.pk, worker="b:2") is False
    assert not job_finish(GenerationJob, queued_job.pk, worker="b:2", status=JobStatus.SUCCEEDED)
    assert job_finish(GenerationJob, queued_job.pk, worker="a:1", status=JobStatus.SUCCEEDED)


def test_duplicate_delivery_does_not_run_the_job_twice(queued_job):
    assert run_generation_job(queued_job.pk) == JobStatus.SUCCEEDED
    outputs = list(GeneratedImage.objects.unscoped().filter(job=queued_job).values_list("pk", flat=True))
    assert len(outputs) == 1
    assert run_generation_job(queued_job.pk) == "skipped"
    assert list(GeneratedImage.objects.unscoped().filter(job=queued_job).values_list("pk", flat=True)) == outputs


def test_step_guard_stops_at_the_next_step_after_cancel(queued_job):
    job_claim(GenerationJob, queued_job.pk, worker="w:1")
    import time

    guard = StepGuard(queued_job.pk, "w:1", timeout_seconds=60, started=time.monotonic())
    guard(1, 10)
    GenerationJob.objects.unscoped().filter(pk=queued_job.pk).update(cancel_requested=True)
    with pytest.raises(JobCanceled):
        guard(2, 10)


def expire(job, attempt):
    GenerationJob.objects.unscoped().filter(pk=job.pk).update(
        status=JobStatus.RUNNING,
        worker="gone:1",
        attempt=attempt,
        lease_expires_at=timezone.now() - timedelta(seconds=1),
    )


def test_reaper_requeues_then_gives_up(queued_job, settings):
    settings.ALKEMY_JOB_MAX_ATTEMPTS = 2
    expire(queued_job, attempt=1)
    assert reap_jobs() == {"requeued": 1, "failed": 0, "canceled": 0}
    assert GenerationJob.objects.unscoped().get(pk=queued_job.pk).status == JobStatus.QUEUED

    expire(queued_job, attempt=2)
    assert reap_jobs() == {"requeued": 0, "failed": 1, "canceled": 0}
    lost = GenerationJob.objects.unscoped().get(pk=queued_job.pk)
    assert lost.status == JobStatus.FAILED and lost.error_code == "worker_lost"


def test_reaper_leaves_live_leases_alone(queued_job):
    job_claim(GenerationJob, queued_job.pk, worker="alive:1")
    assert reap_jobs() == {"requeued": 0, "failed": 0, "canceled": 0}


def test_method_errors_fail_the_job_with_their_code(queued_job, settings, tmp_path):
    settings.ALKEMY_MODELS_DIR = tmp_path  # no weights there
    assert run_generation_job(queued_job.pk) == JobStatus.FAILED
    failed = GenerationJob.objects.unscoped().get(pk=queued_job.pk)
    assert failed.error_code == "model_missing" and "stable-diffusion-xl-base-1.0" in failed.error_message


def test_pipeline_cache_keeps_methods_warm_and_evicts_least_recently_used(settings, tiny_models_dir):
    from generation.worker import PipelineCache

    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    cache = PipelineCache()
    first = cache.get("instantid_sdxl")
    assert cache.get("instantid_sdxl") is first and cache.loads == 1  # warm between jobs
    cache.get("pulid_flux")
    assert "instantid_sdxl" in cache and "pulid_flux" in cache  # both fit the default budget

    settings.ALKEMY_GPU_MEMORY_BUDGET_GB = 1e-6  # nothing fits: keep only the newest
    cache.get("instantid_sdxl")  # touch: now pulid_flux is the least recently used
    squeezed = PipelineCache()
    squeezed.get("pulid_flux")
    squeezed.get("instantid_sdxl")
    assert "pulid_flux" not in squeezed and "instantid_sdxl" in squeezed


class _ExplodingMethod:
    """Stands in for a loaded method whose generate() fails the way a full GPU does."""

    def __init__(self, error):
        self.error = error

    def generate(self, request, on_step=None):
        on_step(1, 2)
        raise self.error


def test_cuda_out_of_memory_fails_the_job_and_frees_the_cache(queued_job, monkeypatch):
    import torch

    from generation import worker

    cache = worker.pipeline_cache()
    cleared = []
    monkeypatch.setattr(cache, "get", lambda key: _ExplodingMethod(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    monkeypatch.setattr(cache, "clear", lambda: cleared.append(True))
    assert run_generation_job(queued_job.pk) == JobStatus.FAILED
    failed = GenerationJob.objects.unscoped().get(pk=queued_job.pk)
    assert failed.error_code == "gpu_out_of_memory" and cleared == [True]
    assert not GeneratedImage.objects.unscoped().filter(job=queued_job).exists()


def test_a_job_past_its_method_timeout_fails(queued_job, settings):
    settings.ALKEMY_METHOD_TIMEOUT_SECONDS = 0
    assert run_generation_job(queued_job.pk) == JobStatus.FAILED
    assert GenerationJob.objects.unscoped().get(pk=queued_job.pk).error_code == "timeout"


def test_an_unexpected_method_error_fails_the_job_not_the_worker(queued_job, monkeypatch):
    from generation import worker

    monkeypatch.setattr(worker.pipeline_cache(), "get", lambda key: _ExplodingMethod(ValueError("boom")))
    assert run_generation_job(queued_job.pk) == JobStatus.FAILED
    failed = GenerationJob.objects.unscoped().get(pk=queued_job.pk)
    assert failed.error_code == "internal_error" and "boom" in failed.error_message


def test_admin_job_page_shows_outputs_to_the_tenants_staff_only(client, queued_job, staff_of_a, studio_b):
    from django.contrib.auth import get_user_model

    from alkemy.tenancy.services import membership_set

    assert run_generation_job(queued_job.pk) == JobStatus.SUCCEEDED
    output = GeneratedImage.objects.unscoped().get(job=queued_job)
    client.force_login(staff_of_a)
    page = client.get(f"/admin/generation/generationjob/{queued_job.pk}/change/").content.decode()
    image_url = f"/admin/generation/generationjob/outputs/{output.pk}/image.png"
    assert image_url in page and "no_face" in page
    assert client.get(image_url)["Content-Type"] == "image/png"

    outsider = get_user_model().objects.create_user("bob", password="pw-bob-12345", is_staff=True)
    membership_set(tenant=studio_b.tenant, user=outsider)
    client.force_login(outsider)
    assert client.get(image_url).status_code == 404
    assert client.get(f"/admin/generation/generationjob/{queued_job.pk}/change/").status_code == 302
