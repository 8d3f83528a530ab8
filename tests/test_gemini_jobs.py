"""Gemini through the job system: CPU cluster, the tenant's own key, usage on the job, identity score."""

import pytest

from alkemy.jobs import JobStatus
from alkemy.tenancy.services import tenant_set_gemini_key
from characters.services import character_create, reference_add
from generation.jobs import generation_submit
from generation.models import GeneratedImage, GenerationJob
from generation.tasks import run_generation_job
from generation.worker import claim_within_limits
from tests import photos
from tests.test_gemini import error_reply, gemini, image_reply  # noqa: F401  (gemini is a fixture)

pytestmark = pytest.mark.django_db

TENANT_KEY = "AIzaSyTENANT-0123456789abcdefghijklmn"


@pytest.fixture
def eileen(studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def submit(tenant, character, **overrides):
    job, _ = generation_submit(
        tenant=tenant, character=character, method="gemini", prompt="on the deck of a ship", width=512, height=512,
        seed=4, **overrides,
    )  # fmt: skip
    return job


def test_gemini_job_runs_on_the_cpu_cluster_with_the_tenants_key(
    gemini,  # noqa: F811
    studio_a,
    eileen,
    django_capture_on_commit_callbacks,  # noqa: F811
):
    from django_q.models import OrmQ

    tenant_set_gemini_key(tenant=studio_a.tenant, api_key=TENANT_KEY)
    gemini.reply(image_reply())  # the model "returns" a photo of the same astronaut
    with django_capture_on_commit_callbacks(execute=True):
        job = submit(studio_a.tenant, eileen)
    queued = OrmQ.objects.filter(key="default")
    assert queued.count() == 1 and not OrmQ.objects.filter(key="gpu").exists()  # routed to the CPU cluster

    assert run_generation_job(job.pk) == JobStatus.SUCCEEDED
    job.refresh_from_db()
    assert job.usage["input_tokens"] > 0 and job.usage["output_tokens"] > 0 and job.usage["images"] == 1
    assert gemini.requests[0]["headers"]["x-goog-api-key"] == TENANT_KEY
    output = GeneratedImage.objects.unscoped().get(job=job)
    assert (output.width, output.height) == (512, 512)
    assert output.identity_similarity > 0.92  # a real face, scored against the character's identity


def test_safety_block_fails_the_job_with_the_reason(gemini, studio_a, eileen):  # noqa: F811
    from tests.test_gemini import Reply

    gemini.reply(
        Reply(body={"candidates": [{"content": {"parts": []}, "finishReason": "IMAGE_SAFETY"}],
                    "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10}})
    )  # fmt: skip
    job = submit(studio_a.tenant, eileen)
    assert run_generation_job(job.pk) == JobStatus.FAILED
    job.refresh_from_db()
    assert job.error_code == "content_blocked"
    assert "IMAGE_SAFETY" in str(job.error_details)
    assert len(gemini.requests) == 1  # not retried


def test_concurrency_limit_defers_the_claim(studio_a, eileen, settings):
    settings.ALKEMY_GEMINI_CONCURRENCY_PER_TENANT = 1
    first, second = submit(studio_a.tenant, eileen), submit(studio_a.tenant, eileen, num_images=2)
    assert claim_within_limits(first.pk, "w:1") is True
    assert claim_within_limits(second.pk, "w:2") is None  # the tenant's one slot is taken
    assert GenerationJob.objects.unscoped().get(pk=second.pk).status == JobStatus.QUEUED
    settings.ALKEMY_GEMINI_CONCURRENCY_PER_TENANT = 2
    assert claim_within_limits(second.pk, "w:2") is True
