"""The ledger: a finished job writes exactly its events at the price book's rates, once, per the failure policy."""

import time
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal

import pytest
from django.db import connection, transaction
from django.db.utils import DatabaseError
from django.utils import timezone
from PIL import Image

from alkemy.jobs import JobStatus, job_claim
from characters.services import character_create, reference_add
from generation.jobs import generation_cancel, generation_submit
from generation.models import GenerationJob
from generation.tasks import reap_jobs, run_generation_job
from tests import photos
from tests.test_gemini import USAGE, Reply, error_reply, gemini, image_reply  # noqa: F401  (gemini is a fixture)
from usage.models import PriceBook, UsageEvent
from usage.services import usage_record_job

pytestmark = pytest.mark.django_db

CPU_PER_HOUR = Decimal("0.10")
GEMINI_IN_PER_M, GEMINI_OUT_PER_M = Decimal("0.30"), Decimal("30.00")


def per_unit(price: Decimal, per: int) -> Decimal:
    return (price / per).quantize(Decimal("1e-12"), rounding=ROUND_HALF_UP)


def priced(quantity: Decimal, unit: Decimal) -> Decimal:
    return (quantity * unit).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def events_of(job) -> dict[str, UsageEvent]:
    rows = UsageEvent.objects.unscoped().filter(job_kind="generation", job_id=job.pk)
    return {event.meter: event for event in rows}


@pytest.fixture
def eileen(studio_a, media_root):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


@pytest.fixture
def queued_job(studio_a, eileen, settings, tiny_models_dir):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    job, _ = generation_submit(
        tenant=studio_a.tenant, character=eileen, prompt="a portrait", width=64, height=64, steps=2, seed=3,
        method="instantid_sdxl",
    )  # fmt: skip
    return job


class FakeMethod:
    """Stands in for a loaded method: takes a little time, then does what the test needs."""

    def __init__(self, action=None):
        self.action = action

    def generate(self, request, on_step=None):
        time.sleep(0.05)
        if self.action is not None:
            self.action(on_step)
        on_step(1, 1)
        return [Image.new("RGB", (request.width, request.height))]


@pytest.fixture
def method_returns(monkeypatch):
    from generation import worker

    def use(method):
        monkeypatch.setattr(worker.pipeline_cache(), "get", lambda key: method)
        monkeypatch.setattr(worker.pipeline_cache(), "clear", lambda: None)
        monkeypatch.setattr(worker.pipeline_cache(), "trim", lambda: None)

    return use


def test_a_succeeded_job_writes_its_events_at_the_price_books_rates(queued_job):
    assert run_generation_job(queued_job.pk) == JobStatus.SUCCEEDED
    job = GenerationJob.objects.unscoped().get(pk=queued_job.pk)
    events = events_of(job)
    assert set(events) == {"cpu_seconds", "images_generated"}  # tiny models run on the CPU
    seconds = events["cpu_seconds"]
    default_book = PriceBook.objects.get(tenant__isnull=True, version=1)
    assert seconds.quantity == Decimal(str(job.device_seconds)) > 0
    assert seconds.unit_price == per_unit(CPU_PER_HOUR, 3600) and seconds.gpu_class == "cpu"
    assert seconds.cost == priced(seconds.quantity, seconds.unit_price)
    assert seconds.billable and seconds.price_book == default_book and seconds.tenant_id == job.tenant_id
    assert seconds.idempotency_key == f"generation:{job.pk}:1:cpu_seconds"
    assert (seconds.method, seconds.character_id, seconds.attempt) == ("instantid_sdxl", job.character_id, 1)
    assert events["images_generated"].quantity == 1 and events["images_generated"].cost == 0
    assert seconds.occurred_at == job.finished_at


def test_finishing_a_job_twice_writes_nothing_more(queued_job):
    assert run_generation_job(queued_job.pk) == JobStatus.SUCCEEDED
    before = sorted(UsageEvent.objects.unscoped().values_list("pk", "cost"))
    assert run_generation_job(queued_job.pk) == "skipped"  # a duplicate delivery
    with transaction.atomic():
        usage_record_job(job=queued_job)  # a second recording of the same attempt
    assert reap_jobs() == {"requeued": 0, "failed": 0, "canceled": 0}
    assert sorted(UsageEvent.objects.unscoped().values_list("pk", "cost")) == before


def test_a_worker_finishing_after_the_reaper_failed_its_job_writes_nothing(queued_job, settings):
    from generation.worker import _finish

    settings.ALKEMY_JOB_MAX_ATTEMPTS = 1
    assert job_claim(GenerationJob, queued_job.pk, worker="slow:1")
    started = GenerationJob.objects.unscoped().get(pk=queued_job.pk).started_at
    GenerationJob.objects.unscoped().filter(pk=queued_job.pk).update(
        heartbeat_at=started + timedelta(seconds=7), lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert reap_jobs()["failed"] == 1
    lost = events_of(queued_job)
    assert set(lost) == {"gpu_seconds"}  # the dead worker never said where it ran: the reserved class
    event = lost["gpu_seconds"]
    assert event.quantity == 7 and not event.billable and event.reason == "worker_lost"
    assert event.cost == priced(Decimal(7), per_unit(Decimal("2.99"), 3600))  # recorded at its price anyway

    assert _finish(queued_job, "slow:1", JobStatus.SUCCEEDED, "", "", 3.0) == "lost"  # the late worker
    assert reap_jobs() == {"requeued": 0, "failed": 0, "canceled": 0}
    assert UsageEvent.objects.unscoped().count() == 1


def test_failures_caused_by_us_are_recorded_but_not_billable(queued_job, method_returns, monkeypatch):
    import torch

    def out_of_memory(on_step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    method_returns(FakeMethod(out_of_memory))
    assert run_generation_job(queued_job.pk) == JobStatus.FAILED
    event = events_of(queued_job)["cpu_seconds"]
    assert not event.billable and event.reason == "gpu_out_of_memory" and event.quantity > 0
    assert event.job_status == "failed"


def test_a_timed_out_job_is_not_billable(studio_a, eileen, method_returns, settings):
    settings.ALKEMY_METHOD_TIMEOUT_SECONDS = 0
    method_returns(FakeMethod())
    job, _ = generation_submit(tenant=studio_a.tenant, character=eileen, prompt="p", width=64, height=64, steps=1,
                               method="instantid_sdxl")  # fmt: skip
    assert run_generation_job(job.pk) == JobStatus.FAILED
    assert [(e.reason, e.billable) for e in events_of(job).values()] == [("timeout", False)]


def test_a_cancel_after_start_is_billable_for_the_seconds_used(queued_job, method_returns):
    def cancel(on_step):
        GenerationJob.objects.unscoped().filter(pk=queued_job.pk).update(cancel_requested=True)

    method_returns(FakeMethod(cancel))
    assert run_generation_job(queued_job.pk) == JobStatus.CANCELED
    job = GenerationJob.objects.unscoped().get(pk=queued_job.pk)
    event = events_of(job)["cpu_seconds"]
    assert event.billable and event.job_status == "canceled"
    # the method never returned its measured time: the seconds from start to stop
    assert Decimal("0.05") <= event.quantity <= Decimal(str((job.finished_at - job.started_at).total_seconds()))
    assert "images_generated" not in events_of(job)


def test_a_cancel_before_start_records_nothing(queued_job):
    generation_cancel(job=queued_job)
    assert GenerationJob.objects.unscoped().get(pk=queued_job.pk).status == JobStatus.CANCELED
    assert not UsageEvent.objects.unscoped().exists()


def test_a_cancel_whose_worker_died_bills_until_the_last_heartbeat(queued_job):
    assert job_claim(GenerationJob, queued_job.pk, worker="dead:1")
    started = GenerationJob.objects.unscoped().get(pk=queued_job.pk).started_at
    GenerationJob.objects.unscoped().filter(pk=queued_job.pk).update(
        cancel_requested=True, heartbeat_at=started + timedelta(seconds=4),
        lease_expires_at=timezone.now() - timedelta(seconds=1),
    )  # fmt: skip
    assert reap_jobs()["canceled"] == 1
    event = events_of(queued_job)["gpu_seconds"]
    assert event.billable and event.quantity == 4


def gemini_job(tenant, character, **overrides):
    job, _ = generation_submit(tenant=tenant, character=character, method="gemini", prompt="on a ship", width=512,
                               height=512, seed=4, **overrides)  # fmt: skip
    return job


def test_a_gemini_job_bills_its_tokens_not_the_waiting(gemini, studio_a, eileen):  # noqa: F811
    gemini.reply(image_reply())
    job = gemini_job(studio_a.tenant, eileen)
    assert run_generation_job(job.pk) == JobStatus.SUCCEEDED
    events = events_of(job)
    assert set(events) == {"gemini_input_tokens", "gemini_output_tokens", "images_generated"}
    tokens_in, tokens_out = events["gemini_input_tokens"], events["gemini_output_tokens"]
    assert tokens_in.quantity == USAGE["promptTokenCount"] and tokens_out.quantity == USAGE["candidatesTokenCount"]
    assert tokens_in.cost == priced(Decimal(1100), per_unit(GEMINI_IN_PER_M, 10**6)) == Decimal("0.000330")
    assert tokens_out.cost == Decimal("0.038700")  # 1290 tokens at $30 / 1M: the published $0.039 per image
    assert all(event.billable for event in events.values())


def test_tokens_on_the_studios_own_gemini_key_are_recorded_not_billed(gemini, studio_a, eileen):  # noqa: F811
    from alkemy.tenancy.services import tenant_set_gemini_key

    tenant_set_gemini_key(tenant=studio_a.tenant, api_key="AIzaSyTENANT-0123456789abcdefghijklmn")
    gemini.reply(image_reply())
    job = gemini_job(studio_a.tenant, eileen)
    assert run_generation_job(job.pk) == JobStatus.SUCCEEDED
    events = events_of(job)
    assert GenerationJob.objects.unscoped().get(pk=job.pk).usage["key_source"] == "tenant"
    for meter in ("gemini_input_tokens", "gemini_output_tokens"):
        assert (events[meter].billable, events[meter].reason) == (False, "tenant_key")
    assert events["images_generated"].billable  # our side of the work is still the studio's


def test_a_blocked_gemini_reply_is_billable_because_google_billed_it(gemini, studio_a, eileen):  # noqa: F811
    gemini.reply(
        Reply(body={"candidates": [{"content": {"parts": []}, "finishReason": "IMAGE_SAFETY"}],
                    "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10}})
    )  # fmt: skip
    job = gemini_job(studio_a.tenant, eileen)
    assert run_generation_job(job.pk) == JobStatus.FAILED
    events = events_of(job)
    assert set(events) == {"gemini_input_tokens"}
    assert events["gemini_input_tokens"].quantity == 10 and events["gemini_input_tokens"].billable


def test_a_gemini_outage_is_not_billable(gemini, studio_a, eileen):  # noqa: F811
    gemini.reply(image_reply(), error_reply(503, "UNAVAILABLE", "The model is overloaded."))
    job = gemini_job(studio_a.tenant, eileen, num_images=2)  # the first image came back, then the outage
    assert run_generation_job(job.pk) == JobStatus.FAILED
    events = events_of(job)
    assert GenerationJob.objects.unscoped().get(pk=job.pk).error_code == "provider_unavailable"
    assert events["gemini_output_tokens"].quantity == 1290
    assert {(e.billable, e.reason) for e in events.values()} == {(False, "provider_unavailable")}


def test_the_ledger_is_append_only(queued_job):
    assert run_generation_job(queued_job.pk) == JobStatus.SUCCEEDED
    event = UsageEvent.objects.unscoped().first()
    event.cost = Decimal(0)
    for change in (event.save, event.delete, lambda: UsageEvent.objects.unscoped().update(cost=0),
                   lambda: UsageEvent.objects.unscoped().all().delete()):  # fmt: skip
        with pytest.raises(TypeError, match="append-only"):
            change()
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE usage_usageevent SET cost = 0")
