"""Reads of the ledger, reservations and budgets. Every function takes the tenant explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.db.models import Count, Max, Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from alkemy.jobs import JobStatus
from usage.jobkinds import installed_kinds
from usage.models import Budget, Reservation, UsageEvent
from usage.money import ZERO, cents, exact

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
GROUP_BY = ("method", "day", "meter", "character")


def month_bounds(when: datetime | None = None) -> tuple[datetime, datetime]:
    """[first instant of the UTC calendar month, first instant of the next)."""
    when = (when or timezone.now()).astimezone(UTC)
    start = datetime(when.year, when.month, 1, tzinfo=UTC)
    end = datetime(when.year + (when.month == 12), when.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def month_of(text: str) -> tuple[datetime, datetime]:
    """'2026-12' → the month's bounds; ValueError for anything else."""
    year, month = (int(part) for part in text.split("-"))
    return month_bounds(datetime(year, month, 1, tzinfo=UTC))


def budget_of(*, tenant_id: int) -> Budget | None:
    return Budget.objects.unscoped().filter(tenant_id=tenant_id).first()


def spent(*, tenant_id: int, start: datetime, end: datetime, method: str | None = None) -> Decimal:
    """Billable cost of the tenant's events in [start, end)."""
    events = UsageEvent.objects.unscoped().filter(
        tenant_id=tenant_id, billable=True, occurred_at__gte=start, occurred_at__lt=end
    )
    if method:
        events = events.filter(method=method)
    return events.aggregate(total=Sum("cost"))["total"] or ZERO


@dataclass
class ActiveJob:
    kind: str
    job_id: int
    status: str
    method: str
    started_at: datetime | None


def active_jobs(*, tenant_id: int, exclude: tuple[str, int] | None = None) -> list[ActiveJob]:
    """The tenant's queued and running jobs of every installed kind (training counts once it exists)."""
    found: list[ActiveJob] = []
    for spec, model in installed_kinds():
        rows = model.objects.unscoped().filter(tenant_id=tenant_id, status__in=ACTIVE)
        if exclude and exclude[0] == spec.kind:
            rows = rows.exclude(pk=exclude[1])
        fields = ["pk", "status", "started_at", "base_model" if spec.kind == "training" else "method"]
        for pk, status, started_at, method in rows.values_list(*fields):
            found.append(ActiveJob(spec.kind, pk, status, f"train_{method}" if spec.kind == "training" else method,
                                   started_at))  # fmt: skip
    return found


def reservations_of(jobs: list[ActiveJob], *, tenant_id: int) -> dict[tuple[str, int], Reservation]:
    wanted = Q(pk__in=[])
    for kind in {job.kind for job in jobs}:
        wanted |= Q(job_kind=kind, job_id__in=[job.job_id for job in jobs if job.kind == kind])
    rows = Reservation.objects.unscoped().filter(wanted, tenant_id=tenant_id)
    return {(row.job_kind, row.job_id): row for row in rows}


def reserved(jobs: list[ActiveJob], reservations: dict, method: str | None = None) -> Decimal:
    """Estimates still held by the active jobs: released the moment a job leaves queued/running."""
    total = ZERO
    for job in jobs:
        row = reservations.get((job.kind, job.job_id))
        if row is not None and (method is None or job.method == method):
            total += row.estimated_cost
    return total


def budget_status(*, tenant_id: int) -> dict:
    """limit, spent (this UTC month), reserved, remaining, and the job limits with current counts."""
    budget = budget_of(tenant_id=tenant_id)
    start, end = month_bounds()
    jobs = active_jobs(tenant_id=tenant_id)
    spent_now = spent(tenant_id=tenant_id, start=start, end=end)
    held = reserved(jobs, reservations_of(jobs, tenant_id=tenant_id))
    limit = budget.monthly_limit if budget else None
    return {
        "currency": "USD",
        "period_start": start.isoformat(),
        "period_end": end.isoformat(),
        "limit": exact(limit) if limit is not None else None,
        "limit_kind": budget.limit_kind if budget else None,
        "spent": exact(spent_now),
        "reserved": exact(held),
        "remaining": exact(limit - spent_now - held) if limit is not None else None,
        "spent_usd": str(cents(spent_now)),
        "over_limit": limit is not None and spent_now + held > limit,
        "max_concurrent_jobs": budget.max_concurrent_jobs if budget else None,
        "max_queued_jobs": budget.max_queued_jobs if budget else None,
        "method_limits": budget.method_limits if budget else {},
        "running_jobs": sum(job.status == JobStatus.RUNNING for job in jobs),
        "queued_jobs": sum(job.status == JobStatus.QUEUED for job in jobs),
    }


def parse_day(text: str | None, default: date) -> date:
    """A YYYY-MM-DD day; `default` only when the parameter is absent (an empty value is an error)."""
    return default if text is None else date.fromisoformat(text)


def day_bounds(first: date, last: date) -> tuple[datetime, datetime]:
    """[first 00:00 UTC, the day after `last` 00:00 UTC): both days included."""
    return (datetime(first.year, first.month, first.day, tzinfo=UTC),
            datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1))  # fmt: skip


def usage_summary(*, tenant_id: int, start: datetime, end: datetime, group_by: str) -> dict:
    """Totals and groups of the tenant's events in [start, end). `cost` counts billable events only
    (the spend), `unbilled_cost` what failures on our side would have cost; groups add up to the total."""
    events = UsageEvent.objects.unscoped().filter(tenant_id=tenant_id, occurred_at__gte=start, occurred_at__lt=end)
    sums = {  # aliases may not reuse the model's field names
        "billed": Sum("cost", filter=Q(billable=True), default=ZERO),
        "unbilled": Sum("cost", filter=Q(billable=False), default=ZERO),
        "events": Count("id"),
    }
    if group_by == "method":
        rows = events.values("method").annotate(**sums).order_by("method")
        key = lambda row: {"method": row["method"] or None}  # noqa: E731
    elif group_by == "day":
        rows = events.annotate(day=TruncDate("occurred_at", tzinfo=UTC)).values("day").annotate(**sums).order_by("day")
        key = lambda row: {"day": row["day"].isoformat()}  # noqa: E731
    elif group_by == "meter":
        rows = events.values("meter").annotate(**sums, amount=Sum("quantity")).order_by("meter")
        key = lambda row: {"meter": row["meter"], "quantity": str(row["amount"])}  # noqa: E731
    elif group_by == "character":
        rows = events.values("character_id").annotate(**sums, name=Max("character_name")).order_by("character_id")
        key = lambda row: {"character": row["character_id"], "character_name": row["name"] or None}  # noqa: E731
    else:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}")
    groups = [
        {**key(row), "cost": exact(row["billed"]), "cost_usd": str(cents(row["billed"])),
         "unbilled_cost": exact(row["unbilled"]), "events": row["events"]}
        for row in rows
    ]  # fmt: skip
    total = events.aggregate(**sums)
    return {
        "currency": "USD",
        "from": start.date().isoformat(),
        "to": (end - timedelta(days=1)).date().isoformat(),
        "group_by": group_by,
        "total": {"cost": exact(total["billed"]), "cost_usd": str(cents(total["billed"])),
                  "unbilled_cost": exact(total["unbilled"]), "events": total["events"]},
        "groups": groups,
    }  # fmt: skip


def job_cost(*, job_kind: str, job_id: int, tenant_id: int) -> dict:
    """A job's events and estimate, as its API and admin pages show them."""
    events = list(
        UsageEvent.objects.unscoped()
        .filter(tenant_id=tenant_id, job_kind=job_kind, job_id=job_id)
        .order_by("attempt", "meter")
        .values("attempt", "meter", "gpu_class", "quantity", "unit_price", "cost", "billable", "reason")
    )
    reservation = Reservation.objects.unscoped().filter(job_kind=job_kind, job_id=job_id).first()
    billable = sum((e["cost"] for e in events if e["billable"]), ZERO)
    return {
        "currency": "USD",
        "total": exact(billable),
        "total_usd": str(cents(billable)),
        "estimated": exact(reservation.estimated_cost) if reservation else None,
        "events": [
            {**e, "quantity": str(e["quantity"]), "unit_price": str(e["unit_price"]), "cost": exact(e["cost"]),
             "gpu_class": e["gpu_class"] or None, "reason": e["reason"] or None}
            for e in events
        ],
    }  # fmt: skip


def character_spend(*, tenant_id: int, character_id: int) -> dict:
    """What a character's jobs cost: billable totals this month and overall, per method (all time), and the
    unbilled cost of failures on our side. Money as Decimal."""
    events = UsageEvent.objects.unscoped().filter(tenant_id=tenant_id, character_id=character_id)
    start, end = month_bounds()
    sums = {
        "billed": Sum("cost", filter=Q(billable=True), default=ZERO),
        "month": Sum("cost", filter=Q(billable=True, occurred_at__gte=start, occurred_at__lt=end), default=ZERO),
        "unbilled": Sum("cost", filter=Q(billable=False), default=ZERO),
        "events": Count("id"),
    }
    total = events.aggregate(**sums)
    by_method = events.values("method").annotate(**sums).order_by("method")
    return {
        "total": total["billed"],
        "this_month": total["month"],
        "unbilled": total["unbilled"],
        "events": total["events"],
        "by_method": [{"method": row["method"] or "—", "cost": row["billed"], "events": row["events"]}
                      for row in by_method],  # fmt: skip
    }
