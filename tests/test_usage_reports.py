"""Prices over time, the usage API, the admin usage page, the CSV, the monthly statement and the storage meter."""

import csv
import io
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import transaction

from alkemy.jobs import JobStatus, job_claim, job_finish
from characters.services import character_create, reference_add
from generation.jobs import generation_submit
from generation.models import GenerationJob
from tests import photos
from usage.models import PriceBook, UsageEvent
from usage.services import price_book_new_version, usage_record_job, usage_record_storage

pytestmark = pytest.mark.django_db

H100 = "cuda:NVIDIA H100 80GB HBM3"


def at(day: int, hour: int = 12) -> datetime:
    return datetime(2026, 11, day, hour, tzinfo=UTC)


@pytest.fixture
def characters(studio_a, media_root):
    eileen = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=eileen, upload=photos.upload(photos.astronaut()))
    tom = character_create(tenant=studio_a.tenant, name="Tom")
    reference_add(character=tom, upload=photos.upload(photos.tom_hanks()))
    return eileen, tom


def finished_job(character, *, when, method="pulid_flux", status=JobStatus.SUCCEEDED, error_code="", **run):
    """A job run and finished the way the worker does it: the finishing UPDATE and the ledger in one transaction."""
    job, _ = generation_submit(tenant=character.tenant, character=character, method=method, prompt="p", width=512,
                               height=512, steps=4)  # fmt: skip
    assert job_claim(GenerationJob, job.pk, worker="w:1")
    with transaction.atomic():
        assert job_finish(GenerationJob, job.pk, worker="w:1", status=status, error_code=error_code,
                          error_message=error_code, **run)  # fmt: skip
        GenerationJob.objects.unscoped().filter(pk=job.pk).update(finished_at=when)
        usage_record_job(job=job)
    return job


def gpu_job(character, when, seconds="10", **kwargs):
    return finished_job(character, when=when, device=H100, device_seconds=float(seconds), **kwargs)


def gemini_job(character, when):
    return finished_job(character, when=when, method="gemini", device="cpu", device_seconds=3.0,
                        usage={"input_tokens": 1100, "output_tokens": 1290, "images": 1, "requests": 1})  # fmt: skip


@pytest.fixture
def november(characters):
    eileen, tom = characters
    gpu_job(eileen, at(3), seconds="12.5")
    gpu_job(tom, at(3, 18), seconds="7.25")
    gemini_job(eileen, at(4))
    gemini_job(tom, at(9))
    gpu_job(tom, at(9), seconds="30", status=JobStatus.FAILED, error_code="gpu_out_of_memory")  # not billable
    return characters


def billable_total(tenant) -> Decimal:
    events = UsageEvent.objects.unscoped().filter(tenant=tenant, billable=True, occurred_at__month=11)
    return sum((e.cost for e in events), Decimal(0))


def test_events_keep_the_prices_of_their_time_and_a_tenant_book_overrides_the_default(
    characters, studio_b, media_root
):
    eileen, _ = characters
    default = PriceBook.objects.get(tenant__isnull=True)
    early = gpu_job(eileen, at(5), seconds="3600")
    price_book_new_version(based_on=default, effective_from=at(10, 0), prices={("gpu_seconds", "H100"): Decimal("4")})
    late = gpu_job(eileen, at(15), seconds="3600")

    def event(job):
        return UsageEvent.objects.unscoped().get(job_id=job.pk, meter="gpu_seconds")

    assert event(early).cost == Decimal("2.990000") and event(early).price_book == default
    assert event(late).cost == Decimal("4.000000") and event(late).price_book.version == 2
    assert event(early).cost == Decimal("2.990000")  # the old event did not move

    negotiated = PriceBook.objects.create(name="Studio A contract", tenant=eileen.tenant, version=1,
                                          effective_from=at(1, 0))  # fmt: skip
    negotiated.rates.create(meter="gpu_seconds", gpu_class="H100", price=Decimal("1.50"))
    contract = gpu_job(eileen, at(20), seconds="3600")
    bob = character_create(tenant=studio_b.tenant, name="Bob")
    reference_add(character=bob, upload=photos.upload(photos.astronaut()))
    public = gpu_job(bob, at(20), seconds="3600")
    assert event(contract).cost == Decimal("1.500000") and event(contract).price_book == negotiated
    assert event(public).cost == Decimal("4.000000")


def test_a_gpu_class_comes_from_the_device_name_and_unknown_gpus_use_the_default_rate(characters):
    eileen, _ = characters
    l40s = finished_job(eileen, when=at(2), device="cuda:NVIDIA L40S", device_seconds=3600.0)
    other = finished_job(eileen, when=at(2), device="cuda:NVIDIA RTX 4090", device_seconds=3600.0)
    gpu = UsageEvent.objects.unscoped().filter(meter="gpu_seconds")
    assert gpu.get(job_id=l40s.pk).gpu_class == "L40S" and gpu.get(job_id=l40s.pk).cost == Decimal("0.990000")
    assert gpu.get(job_id=other.pk).gpu_class == "default"


@pytest.mark.parametrize("group_by", ["method", "day", "meter", "character"])
def test_api_totals_equal_the_sum_of_events_for_every_grouping(november, api_a, studio_a, group_by):
    answer = api_a.get(f"/api/v1/usage?from=2026-11-01&to=2026-11-30&group_by={group_by}").json()
    expected = billable_total(studio_a.tenant)
    assert expected > 0
    assert Decimal(answer["total"]["cost"]) == expected
    assert sum(Decimal(group["cost"]) for group in answer["groups"]) == expected
    assert sum(group["events"] for group in answer["groups"]) == UsageEvent.objects.unscoped().count()
    assert Decimal(answer["total"]["unbilled_cost"]) > 0  # the out-of-memory failure, recorded not billed
    assert answer["total"]["cost_usd"] == str(expected.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def test_usage_groups_say_what_they_are(november, api_a):
    by_day = api_a.get("/api/v1/usage?from=2026-11-01&to=2026-11-30&group_by=day").json()["groups"]
    assert [group["day"] for group in by_day] == ["2026-11-03", "2026-11-04", "2026-11-09"]
    by_character = api_a.get("/api/v1/usage?from=2026-11-01&to=2026-11-30&group_by=character").json()["groups"]
    assert {group["character_name"] for group in by_character} == {"Eileen", "Tom"}
    by_meter = {g["meter"]: g for g in api_a.get("/api/v1/usage?from=2026-11-01&to=2026-11-30&group_by=meter").json()
                ["groups"]}  # fmt: skip
    assert Decimal(by_meter["gpu_seconds"]["quantity"]) == Decimal("12.5") + Decimal("7.25") + 30
    assert Decimal(by_meter["gemini_output_tokens"]["quantity"]) == 2 * 1290
    only_the_4th = api_a.get("/api/v1/usage?from=2026-11-04&to=2026-11-04&group_by=method").json()
    assert [group["method"] for group in only_the_4th["groups"]] == ["gemini"]


def test_another_tenant_sees_none_of_it(november, api_b):
    answer = api_b.get("/api/v1/usage?from=2026-11-01&to=2026-11-30&group_by=method").json()
    assert answer["groups"] == [] and Decimal(answer["total"]["cost"]) == 0
    assert api_b.get("/api/v1/usage/events?from=2026-11-01&to=2026-11-30").json()["results"] == []
    assert Decimal(api_b.get("/api/v1/usage/budget").json()["spent"]) == 0


def test_the_ledger_api_lists_the_tenants_events(november, api_a):
    events = api_a.get("/api/v1/usage/events?from=2026-11-01&to=2026-11-30&meter=gpu_seconds").json()["results"]
    assert len(events) == 3 and {e["billable"] for e in events} == {True, False}


def test_bad_usage_parameters_are_400(api_a):
    assert api_a.get("/api/v1/usage?group_by=tenant").json()["error"]["details"]["field"] == "group_by"
    assert api_a.get("/api/v1/usage?from=yesterday").status_code == 400
    assert api_a.get("/api/v1/usage?from=2026-11-05&to=2026-11-01").status_code == 400
    assert api_a.get("/api/v1/usage/events?job_id=abc").status_code == 400


def test_the_statement_and_the_csv_add_up(november, studio_a, studio_b, capsys):
    call_command("usage_report", "--month", "2026-11", "--tenant", "studio-a")
    statement = capsys.readouterr().out
    expected = billable_total(studio_a.tenant)
    assert f"Total (USD): {expected}" in statement and "studio-a" in statement
    assert "gpu_seconds" in statement and "H100" in statement

    call_command("usage_report", "--month", "2026-11", "--csv")
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {row["tenant"] for row in rows} == {"studio-a"}
    assert sum(Decimal(row["cost"]) for row in rows if row["billable"] == "yes") == expected
    assert len(rows) == UsageEvent.objects.unscoped().count()


def test_the_admin_usage_page_shows_totals_a_chart_and_exports_csv(november, client, studio_a, studio_b, staff_of_a):
    expected = billable_total(studio_a.tenant)
    admin_user = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-12345")
    client.force_login(admin_user)
    page = client.get(f"/admin/usage/usageevent/report/?tenant={studio_a.tenant.pk}&month=2026-11")
    html = page.content.decode()
    assert page.status_code == 200 and "<svg" in html and "Daily cost" in html
    assert f"${expected.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP)}" in html
    assert html.count("<rect") == 30  # one bar per day of November
    export = client.get(f"/admin/usage/usageevent/report.csv?tenant={studio_a.tenant.pk}&month=2026-11")
    rows = list(csv.DictReader(io.StringIO(export.content.decode())))
    assert sum(Decimal(row["cost"]) for row in rows if row["billable"] == "yes") == expected

    client.force_login(staff_of_a)  # a studio's staff: their own tenant only, whatever they ask for
    other = client.get(f"/admin/usage/usageevent/report/?tenant={studio_b.tenant.pk}&month=2026-11").content.decode()
    assert "studio-b" not in other and "studio-a" in other


def test_the_ledger_and_used_price_books_cannot_be_edited_in_admin(november, client, staff_of_a):
    event = UsageEvent.objects.unscoped().first()
    client.force_login(staff_of_a)
    assert client.get(f"/admin/usage/usageevent/{event.pk}/change/").status_code == 200  # looking is fine
    assert client.post(f"/admin/usage/usageevent/{event.pk}/change/", {"cost": "0"}).status_code == 403
    assert client.post(f"/admin/usage/usageevent/{event.pk}/delete/", {"post": "yes"}).status_code == 403
    assert client.get("/admin/usage/usageevent/add/").status_code == 403
    assert client.get("/admin/usage/pricebook/").status_code == 403  # price books are the operator's

    root = get_user_model().objects.create_superuser("root", "root@example.com", "pw-root-12345")
    client.force_login(root)
    used = PriceBook.objects.get(tenant__isnull=True)
    page = client.get(f"/admin/usage/pricebook/{used.pk}/change/").content.decode()
    assert 'name="_save"' not in page  # shown read-only
    assert client.post(f"/admin/usage/pricebook/{used.pk}/delete/", {"post": "yes"}).status_code == 403
    client.post("/admin/usage/pricebook/", {"action": "new_version", "_selected_action": [used.pk]})
    assert PriceBook.objects.filter(tenant__isnull=True, version=2).exists()


def test_the_daily_schedule_records_each_tenants_stored_bytes_once(characters, studio_a):
    from django_q.models import Schedule

    from characters.models import ReferenceImage

    assert Schedule.objects.filter(func="usage.tasks.record_storage", schedule_type="D").exists()
    stored = sum(ReferenceImage.objects.unscoped().filter(tenant=studio_a.tenant).values_list("file_size", flat=True))
    event = usage_record_storage(tenant_id=studio_a.tenant.pk, day=date(2026, 11, 30))
    assert event.meter == "storage_gb_hours" and event.details["bytes"]["references"] == stored
    assert event.quantity == (Decimal(stored) / 10**9 * 24).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
    assert event.occurred_at == datetime(2026, 11, 30, tzinfo=UTC) and event.billable
    usage_record_storage(tenant_id=studio_a.tenant.pk, day=date(2026, 11, 30))
    assert UsageEvent.objects.unscoped().filter(meter="storage_gb_hours").count() == 1


def test_gpu_estimates_follow_the_rolling_median_of_measured_durations(characters, api_a):
    eileen, _ = characters
    for seconds in ("10", "20", "90"):  # 512² x 4 steps = 1 work unit each; the outlier does not move a median
        gpu_job(eileen, at(6), seconds=seconds)
    request = {"character": eileen.pk, "method": "pulid_flux", "prompt": "p", "width": 1024, "height": 1024,
               "steps": 4}  # fmt: skip
    estimate = api_a.post("/api/v1/generations?dry_run=true", request, format="json").json()["estimate"]
    assert estimate["gpu_class"] == "H100" and "median of 3 recent pulid_flux runs on H100" in estimate["basis"]
    assert estimate["device_seconds"] == 80.0  # 4 work units x 20 s
    assert Decimal(estimate["cost"]) == (Decimal(80) * Decimal("2.99") / 3600).quantize(Decimal("0.000001"))
