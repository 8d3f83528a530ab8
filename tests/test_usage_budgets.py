"""Budgets and job limits at submission: estimates, reservations, 402 / 429, dry runs, under concurrency."""

import threading
from decimal import Decimal

import pytest
from django.db import connection

from alkemy.jobs import JobStatus
from characters.services import character_create, reference_add
from generation.models import GenerationJob
from generation.tasks import run_generation_job
from tests import photos
from tests.test_gemini import gemini, image_reply  # noqa: F401  (gemini is a fixture)
from usage.models import Reservation, UsageEvent
from usage.services import budget_set

pytestmark = pytest.mark.django_db

#: the fallback estimate of one Gemini image: 1100 input tokens at $0.30/1M + 1290 output tokens at $30/1M
GEMINI_IMAGE_ESTIMATE = Decimal("0.000330") + Decimal("0.038700")


@pytest.fixture
def eileen(studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


def body(character, **overrides):
    return {"character": character.pk, "method": "gemini", "prompt": "on the deck of a ship", "width": 512,
            "height": 512, "seed": 4, **overrides}  # fmt: skip


def submit(api, character, **overrides):
    return api.post("/api/v1/generations", body(character, **overrides), format="json")


def twenty_at_once(tenant_fixture, character) -> list:
    """20 API submissions released together, each on its own thread and database connection."""
    start = threading.Barrier(20)
    answers: list = []

    def one_request():
        try:
            client = tenant_fixture.client()
            start.wait()
            response = submit(client, character)
            answers.append((response.status_code, response.json(), response.get("Retry-After")))
        finally:
            connection.close()  # this thread's own connection

    threads = [threading.Thread(target=one_request) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


@pytest.mark.django_db(transaction=True)
def test_twenty_simultaneous_submissions_with_room_for_five_admit_exactly_five(studio_a, eileen):
    # room for 5 estimates, not 6 (limits are whole cents)
    budget_set(tenant=studio_a.tenant, monthly_limit=(GEMINI_IMAGE_ESTIMATE * Decimal("5.5")).quantize(Decimal("0.01")))
    answers = twenty_at_once(studio_a, eileen)
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [202] * 5 + [402] * 15
    assert GenerationJob.objects.unscoped().filter(tenant=studio_a.tenant).count() == 5
    assert Reservation.objects.unscoped().filter(tenant=studio_a.tenant).count() == 5
    refusal = next(body for status, body, _ in answers if status == 402)["error"]
    assert refusal["code"] == "budget_exceeded"
    details = refusal["details"]
    assert Decimal(details["limit"]) == Decimal("0.21") and Decimal(details["estimate"]) == GEMINI_IMAGE_ESTIMATE
    assert Decimal(details["spent"]) == 0 and Decimal(details["reserved"]) == 5 * GEMINI_IMAGE_ESTIMATE



@pytest.mark.django_db(transaction=True)
def test_twenty_simultaneous_submissions_with_five_job_slots_admit_exactly_five(studio_a, eileen):
    budget_set(tenant=studio_a.tenant, max_concurrent_jobs=5)
    answers = twenty_at_once(studio_a, eileen)
    assert sorted(status for status, _, _ in answers) == [202] * 5 + [429] * 15
    assert all(int(retry_after) >= 1 for status, _, retry_after in answers if status == 429)
    assert GenerationJob.objects.unscoped().filter(tenant=studio_a.tenant).count() == 5


def test_the_job_limit_answers_429_with_retry_after_until_a_job_ends(api_a, studio_a, eileen):
    budget_set(tenant=studio_a.tenant, max_concurrent_jobs=2)
    first, second = submit(api_a, eileen), submit(api_a, eileen)
    assert first.status_code == second.status_code == 202
    refused = submit(api_a, eileen)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_jobs"
    assert int(refused["Retry-After"]) >= 1
    assert refused.json()["error"]["details"]["queued"] == 2
    assert GenerationJob.objects.unscoped().count() == 2

    api_a.post(f"/api/v1/generations/{first.json()['id']}/cancel")  # a job ends: room again
    assert submit(api_a, eileen).status_code == 202


def test_the_queue_limit_and_per_method_limits(api_a, studio_a, eileen):
    budget_set(tenant=studio_a.tenant, max_queued_jobs=1)
    assert submit(api_a, eileen).status_code == 202
    assert submit(api_a, eileen).status_code == 429

    budget_set(tenant=studio_a.tenant, max_queued_jobs=None, method_limits={"gemini": {"max_active_jobs": 2}})
    assert submit(api_a, eileen).status_code == 202
    assert submit(api_a, eileen).json()["error"]["details"]["method"] == "gemini"

    budget_set(tenant=studio_a.tenant, method_limits={"gemini": {"monthly_limit": "0.05"}})
    refused = submit(api_a, eileen)
    assert refused.status_code == 402 and refused.json()["error"]["details"]["method"] == "gemini"


def test_a_dry_run_returns_the_estimate_and_creates_nothing(api_a, studio_a, eileen):
    answer = api_a.post("/api/v1/generations?dry_run=true", body(eileen, num_images=2), format="json")
    assert answer.status_code == 200
    estimate = answer.json()["estimate"]
    assert Decimal(estimate["cost"]) == 2 * GEMINI_IMAGE_ESTIMATE and estimate["currency"] == "USD"
    assert estimate["gpu_class"] is None and estimate["device_seconds"] == 0  # Gemini runs at Google
    assert answer.json()["allowed"] is True and "fallback" in estimate["basis"]

    gpu = api_a.post("/api/v1/generations?dry_run=true", body(eileen, method="pulid_flux", width=1024, height=1024,
                                                              steps=28), format="json")  # fmt: skip
    assert gpu.json()["estimate"]["gpu_class"] == "default"
    assert gpu.json()["estimate"]["device_seconds"] == pytest.approx(0.24 * 28)  # the documented fallback

    budget_set(tenant=studio_a.tenant, monthly_limit=Decimal("0.01"))
    refused = api_a.post("/api/v1/generations?dry_run=true", body(eileen), format="json").json()
    assert refused["allowed"] is False and refused["refusal"]["code"] == "budget_exceeded"
    assert not GenerationJob.objects.unscoped().exists() and not Reservation.objects.unscoped().exists()
    assert api_a.post("/api/v1/generations?dry_run=true", body(eileen, width=1), format="json").status_code == 400


def test_a_reservation_counts_until_the_job_ends_and_its_cost_replaces_it(gemini, api_a, studio_a, eileen):  # noqa: F811
    gemini.reply(image_reply())
    budget_set(tenant=studio_a.tenant, monthly_limit=Decimal("10.00"))
    job_id = submit(api_a, eileen).json()["id"]
    held = api_a.get("/api/v1/usage/budget").json()
    assert Decimal(held["reserved"]) == GEMINI_IMAGE_ESTIMATE and Decimal(held["spent"]) == 0
    assert Decimal(held["remaining"]) == Decimal("10") - GEMINI_IMAGE_ESTIMATE and held["queued_jobs"] == 1

    assert run_generation_job(job_id) == JobStatus.SUCCEEDED
    after = api_a.get("/api/v1/usage/budget").json()
    billed = sum(e.cost for e in UsageEvent.objects.unscoped().filter(job_id=job_id, billable=True))
    assert Decimal(after["reserved"]) == 0 and Decimal(after["spent"]) == billed > 0
    job = api_a.get(f"/api/v1/generations/{job_id}").json()
    assert Decimal(job["cost"]["total"]) == billed and Decimal(job["cost"]["estimated"]) == GEMINI_IMAGE_ESTIMATE
    assert {e["meter"] for e in job["cost"]["events"]} == {"gemini_input_tokens", "gemini_output_tokens",
                                                           "images_generated"}  # fmt: skip


def test_a_soft_limit_admits_past_it_and_says_so(api_a, studio_a, eileen):
    budget_set(tenant=studio_a.tenant, monthly_limit=Decimal("0.01"), limit_kind="soft")
    assert submit(api_a, eileen).status_code == 202
    assert Reservation.objects.unscoped().get().over_soft_limit
    assert api_a.get("/api/v1/usage/budget").json()["over_limit"] is True


def test_estimates_follow_the_median_of_recent_jobs(gemini, studio_a, api_a, eileen):  # noqa: F811
    reply = image_reply()
    reply.body["usageMetadata"] = {"promptTokenCount": 500, "candidatesTokenCount": 1000, "totalTokenCount": 1500}
    gemini.reply(reply)
    for _ in range(3):
        assert run_generation_job(submit(api_a, eileen).json()["id"]) == JobStatus.SUCCEEDED
    estimate = api_a.post("/api/v1/generations?dry_run=true", body(eileen), format="json").json()["estimate"]
    assert "median tokens of 3 recent gemini jobs" in estimate["basis"]
    assert Decimal(estimate["cost"]) == Decimal("0.000150") + Decimal("0.030000")  # 500 in, 1000 out


def test_without_a_budget_nothing_is_limited(api_a, eileen):
    for _ in range(3):
        assert submit(api_a, eileen).status_code == 202
    budget = api_a.get("/api/v1/usage/budget").json()
    assert budget["limit"] is None and budget["remaining"] is None and budget["queued_jobs"] == 3
