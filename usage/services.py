"""Metering and admission: what every job kind calls at submission and when it ends.

The interface for job kinds (generation uses it; `training.TrainingJob` calls the same):

    usage_admit(*, job: Job) -> Quote
        At submission, inside the `transaction.atomic()` that created the job row (after the INSERT).
        Takes the tenant's account lock (a transaction-scoped advisory lock, held until commit), estimates
        the job, counts the tenant's other queued/running jobs of every kind and its spend + reservations,
        then either stores a `Reservation` of the estimate or raises `TooManyJobs` (429, `retry_after`)
        or `BudgetExceeded` (402); the raise rolls the job back with the transaction.

    usage_quote(*, job: Job) -> Quote
        The same estimate and verdicts for an unsaved job, without lock or reservation (dry runs).

    usage_record_job(*, job: Job) -> list[UsageEvent]
        Inside the transaction that moved the job to a terminal state (the conditional UPDATE of
        `alkemy.jobs.job_finish` or of the reaper's `job_requeue_or_fail` returned True).
        Reads the job row as that UPDATE left it and writes its events per the failure policy below,
        keyed `<kind>:<job id>:<attempt>:<meter>` (UNIQUE, inserted ON CONFLICT DO NOTHING): a second
        call for the same attempt writes nothing. The reservation needs no release: it counts only
        while the job is queued or running.

Billing policy (`billing_policy`):
- succeeded: every meter billable.
- canceled before it started: nothing recorded. Canceled after it started: billable for the seconds
  used (the method's measured device time, else the wall time from start to stop) and any tokens.
- failed with `content_blocked` / `no_image` (Gemini answered, Google billed the request): billable.
- every other failure is ours (worker_lost, gpu_out_of_memory, timeout, internal_error,
  provider_unavailable, provider_auth_failed, provider_error, model_missing, ...): recorded, not
  billable, with the code as `reason`. When the reaper ends a job (`worker_lost`, or a cancel whose
  worker died) its time is measured from the start of the last attempt to its last heartbeat. An
  attempt the reaper re-queues is not recorded: its worker died without reporting, and nothing of it
  is billed.
- Remote-API methods (Gemini) bill their tokens, not the CPU worker's waiting time. Tokens spent on
  the studio's own Gemini key (`usage.key_source == "tenant"`) are recorded but not billable, with
  reason `tenant_key`: Google bills the studio directly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.db import connection, transaction
from django.utils import timezone

from alkemy.jobs import JobStatus
from usage.errors import BudgetExceeded, TooManyJobs
from usage.estimates import Estimate, estimate_job
from usage.jobkinds import JobKindSpec, job_kind_of
from usage.models import Budget, JobKind, LimitKind, Meter, Reservation, UsageEvent
from usage.money import cost, exact, quantity
from usage.pricing import Rates, device_meter, price_book_for
from usage.selectors import active_jobs, budget_of, month_bounds, reservations_of, reserved, spent

logger = logging.getLogger(__name__)

#: failures the customer's request caused, where the provider did (and billed) the work
BILLABLE_FAILURES = frozenset({"content_blocked", "no_image"})
#: the lock namespace of tenants' accounts (pg_advisory_xact_lock(namespace, tenant id))
ACCOUNT_LOCK = "alkemy-usage-account"
RETRY_AFTER_DEFAULT = 30
RETRY_AFTER_MAX = 3600


# --- admission -------------------------------------------------------------------------------------


@dataclass
class Quote:
    """An estimate and the verdicts of the tenant's budget and job limits on it."""

    estimate: Estimate
    budget: dict
    jobs: dict
    allowed: bool
    refusal: BudgetExceeded | TooManyJobs | None = None

    def as_dict(self) -> dict:
        refusal = None
        if self.refusal is not None:
            refusal = {"code": self.refusal.code, "message": self.refusal.message, "details": self.refusal.details}
        return {"estimate": self.estimate.as_dict(), "budget": self.budget, "jobs": self.jobs,
                "allowed": self.allowed, "refusal": refusal}  # fmt: skip


def _lock_account(tenant_id: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s), %s)", [ACCOUNT_LOCK, tenant_id])


def _retry_after(jobs, reservations) -> int:
    """Seconds until the first of the tenant's active jobs should end, from its estimate."""
    now = timezone.now()
    waits = []
    for job in jobs:
        row = reservations.get((job.kind, job.job_id))
        if row is None:
            continue
        left = float(row.estimated_device_seconds)
        if job.started_at is not None:
            left -= (now - job.started_at).total_seconds()
        waits.append(left)
    wait = min(waits) if waits else RETRY_AFTER_DEFAULT
    return int(min(max(math.ceil(wait), 1), RETRY_AFTER_MAX))


def _assess(spec: JobKindSpec, job) -> Quote:
    tenant_id = job.tenant_id
    estimate = estimate_job(spec=spec, job=job, tenant_id=tenant_id)
    budget = budget_of(tenant_id=tenant_id)
    start, end = month_bounds()
    jobs = active_jobs(tenant_id=tenant_id, exclude=(spec.kind, job.pk) if job.pk else None)
    holds = reservations_of(jobs, tenant_id=tenant_id)
    spent_now = spent(tenant_id=tenant_id, start=start, end=end)
    held = reserved(jobs, holds)
    running = sum(j.status == JobStatus.RUNNING for j in jobs)
    queued = sum(j.status == JobStatus.QUEUED for j in jobs)
    limit = budget.monthly_limit if budget else None
    budget_view = {
        "limit": exact(limit) if limit is not None else None,
        "limit_kind": budget.limit_kind if budget else None,
        "spent": exact(spent_now),
        "reserved": exact(held),
        "remaining": exact(limit - spent_now - held) if limit is not None else None,
        "estimate": exact(estimate.cost),
        "period_start": start.isoformat(),
        "period_end": end.isoformat(),
        "currency": "USD",
    }
    jobs_view = {"running": running, "queued": queued,
                 "max_concurrent_jobs": budget.max_concurrent_jobs if budget else None,
                 "max_queued_jobs": budget.max_queued_jobs if budget else None}  # fmt: skip
    refusal = None
    over_soft = False
    if budget is not None:
        method_limit = (budget.method_limits or {}).get(estimate.method) or {}
        in_flight = running + queued
        method_in_flight = sum(j.method == estimate.method for j in jobs)
        too_many = None
        if budget.max_concurrent_jobs is not None and in_flight >= budget.max_concurrent_jobs:
            too_many = f"{in_flight} job(s) in flight; the limit is {budget.max_concurrent_jobs}."
        elif budget.max_queued_jobs is not None and queued >= budget.max_queued_jobs:
            too_many = f"{queued} job(s) waiting to start; the limit is {budget.max_queued_jobs}."
        elif (cap := method_limit.get("max_active_jobs")) is not None and method_in_flight >= int(cap):
            too_many = (f"{method_in_flight} {estimate.method} job(s) in flight; "
                        f"the limit is {method_limit['max_active_jobs']}.")  # fmt: skip
        if too_many:
            refusal = TooManyJobs(
                f"Too many jobs: {too_many} Try again when one has finished.",
                retry_after=_retry_after(jobs, holds), details={**jobs_view, "method": estimate.method},
            )  # fmt: skip
        checks = []
        if limit is not None:
            checks.append((limit, spent_now, held, None))
        if method_limit.get("monthly_limit") is not None:
            method_spent = spent(tenant_id=tenant_id, start=start, end=end, method=estimate.method)
            checks.append((Decimal(str(method_limit["monthly_limit"])), method_spent,
                           reserved(jobs, holds, method=estimate.method), estimate.method))  # fmt: skip
        for cap, used, holding, method in checks:
            if used + holding + estimate.cost <= cap:
                continue
            if budget.limit_kind == LimitKind.SOFT:
                over_soft = True
                continue
            if refusal is None:
                scope = f"the {method} limit" if method else "the monthly limit"
                refusal = BudgetExceeded(
                    f"This job (estimated ${exact(estimate.cost)}) would take the month's spend past {scope} "
                    f"of ${exact(cap)}: ${exact(used)} spent and ${exact(holding)} reserved.",
                    details={"spent": exact(used), "reserved": exact(holding), "limit": exact(cap),
                             "estimate": exact(estimate.cost), "remaining": exact(cap - used - holding),
                             "method": method, "period_start": start.isoformat(), "period_end": end.isoformat()},
                )  # fmt: skip
    budget_view["over_soft_limit"] = over_soft
    return Quote(estimate=estimate, budget=budget_view, jobs=jobs_view, allowed=refusal is None, refusal=refusal)


def usage_quote(*, job) -> Quote:
    """The estimate and the verdicts for a job that is not (necessarily) saved: nothing is locked or stored."""
    return _assess(job_kind_of(job), job)


def usage_admit(*, job) -> Quote:
    """Admit a just-created job or raise 429 `too_many_jobs` / 402 `budget_exceeded` (see the module docstring).

    Must run inside the transaction that inserted the job: the account lock it takes is held until that
    transaction ends, so concurrent submissions of one tenant are admitted one at a time."""
    if not connection.in_atomic_block:
        raise RuntimeError("usage_admit must run inside the transaction that creates the job")
    spec = job_kind_of(job)
    _lock_account(job.tenant_id)
    quote = _assess(spec, job)
    if quote.refusal is not None:
        raise quote.refusal
    estimate = quote.estimate
    Reservation.objects.unscoped().create(
        tenant_id=job.tenant_id, job_kind=spec.kind, job_id=job.pk, method=estimate.method,
        gpu_class=estimate.gpu_class, work_units=estimate.work_units,
        estimated_device_seconds=estimate.device_seconds, estimated_cost=estimate.cost,
        estimate_basis=estimate.basis[:200], over_soft_limit=quote.budget["over_soft_limit"],
    )  # fmt: skip
    if quote.budget["over_soft_limit"]:
        logger.warning("tenant %s: %s #%s admitted past its soft budget", job.tenant_id, spec.kind, job.pk)
    return quote


# --- recording -------------------------------------------------------------------------------------


@dataclass
class Line:
    meter: str
    quantity: Decimal
    gpu_class: str = ""


def billing_policy(job) -> tuple[str, bool, str] | None:
    """(job_status, billable, reason) of a job as its terminal UPDATE left it; None: nothing to record."""
    if job.status == JobStatus.SUCCEEDED:
        return job.status, True, ""
    if job.status == JobStatus.CANCELED:
        return (job.status, True, "") if job.started_at else None
    if job.status == JobStatus.FAILED:
        code = job.error_code or "failed"
        return (job.status, True, "") if code in BILLABLE_FAILURES else (job.status, False, code)
    return None  # still running: nothing ended


def _device_seconds(job) -> Decimal:
    """Measured device time; when the worker did not report it (canceled mid-run, died), the wall time
    from the start to the stop, or to the last heartbeat when the worker died."""
    measured = quantity(job.device_seconds or 0)
    if measured > 0 or job.started_at is None:
        return measured
    # The worker finished it itself (canceled or failed before the method returned), or the reaper ended
    # it: then the worker's last sign of life is the end.
    end = (job.finished_at or timezone.now()) if job.device else (job.heartbeat_at or job.started_at)
    return quantity(max((end - job.started_at).total_seconds(), 0))


def _lines(spec: JobKindSpec, job, rates: Rates, job_status: str) -> list[Line]:
    lines: list[Line] = []
    usage = job.usage or {}
    if spec.uses_device(job):
        gpu_class = rates.gpu_class(job.device) if job.device else _reserved_class(spec, job)
        lines.append(Line(device_meter(gpu_class), _device_seconds(job), gpu_class))
    lines.append(Line(Meter.GEMINI_INPUT_TOKENS, quantity(usage.get("input_tokens", 0))))
    lines.append(Line(Meter.GEMINI_OUTPUT_TOKENS, quantity(usage.get("output_tokens", 0))))
    if spec.kind == JobKind.GENERATION and job_status == JobStatus.SUCCEEDED:
        lines.append(Line(Meter.IMAGES_GENERATED, quantity(usage.get("images", job.num_images))))
    if spec.kind == JobKind.TRAINING:
        lines.append(Line(Meter.TRAINING_STEPS, quantity(usage.get("steps", job.current_step))))
    return [line for line in lines if line.quantity > 0]


def _reserved_class(spec: JobKindSpec, job) -> str:
    from usage.pricing import DEFAULT_GPU_CLASS

    row = Reservation.objects.unscoped().filter(job_kind=spec.kind, job_id=job.pk).values_list("gpu_class", flat=True)
    return row.first() or DEFAULT_GPU_CLASS


def usage_record_job(*, job) -> list[UsageEvent]:
    """Write the ended job's (or lost attempt's) events in the caller's transaction; idempotent per
    job + attempt + meter. Returns the events of this attempt (already present ones included)."""
    spec = job_kind_of(job)
    row = type(job).objects.unscoped().select_related("character").get(pk=job.pk)
    policy = billing_policy(row)
    if policy is None:
        return []
    job_status, billable, reason = policy
    occurred_at = row.finished_at or timezone.now()
    rates = Rates.of(price_book_for(tenant_id=row.tenant_id, at=occurred_at))
    events = []
    own_key = (row.usage or {}).get("key_source") == "tenant"
    for line in _lines(spec, row, rates, job_status):
        price, priced = rates.unit_price(line.meter, line.gpu_class)
        details = {"device": row.device} if line.gpu_class else {}
        if not priced:
            details["unpriced"] = True
        line_billable, line_reason = billable, reason
        if own_key and line.meter in (Meter.GEMINI_INPUT_TOKENS, Meter.GEMINI_OUTPUT_TOKENS):
            line_billable, line_reason = False, "tenant_key"
        events.append(
            UsageEvent(
                tenant_id=row.tenant_id, job_kind=spec.kind, job_id=row.pk, attempt=row.attempt,
                method=spec.method(row), character_id=row.character_id, character_name=row.character.name[:200],
                meter=line.meter, gpu_class=line.gpu_class, quantity=line.quantity, unit_price=price,
                cost=cost(line.quantity, price), price_book=rates.book, billable=line_billable,
                job_status=job_status, reason=line_reason, occurred_at=occurred_at, details=details,
                idempotency_key=f"{spec.kind}:{row.pk}:{row.attempt}:{line.meter}",
            )
        )  # fmt: skip
    with transaction.atomic():  # a savepoint when called inside the finishing transaction
        UsageEvent.objects.unscoped().bulk_create(events, ignore_conflicts=True)
    return list(
        UsageEvent.objects.unscoped().filter(job_kind=spec.kind, job_id=row.pk, attempt=row.attempt).order_by("meter")
    )


# --- storage ---------------------------------------------------------------------------------------


def tenant_stored_bytes(*, tenant_id: int) -> dict[str, int]:
    """Bytes the tenant keeps in storage: reference photos, generated outputs, LoRA files."""
    from django.core.files.storage import default_storage
    from django.db.models import Sum

    from characters.models import ReferenceImage
    from generation.models import GeneratedImage
    from training.models import LoraArtifact, StyleLora

    def size(name: str) -> int:
        try:
            return default_storage.size(name)
        except OSError:  # a file already gone: nothing stored
            return 0

    outputs = GeneratedImage.objects.unscoped().filter(tenant_id=tenant_id).values_list("file", flat=True)
    return {
        "references": ReferenceImage.objects.unscoped().filter(tenant_id=tenant_id)
        .aggregate(total=Sum("file_size"))["total"] or 0,
        "outputs": sum(size(name) for name in outputs.iterator()),
        "loras": (LoraArtifact.objects.unscoped().filter(tenant_id=tenant_id)
                  .aggregate(total=Sum("file_size"))["total"] or 0)
        + (StyleLora.objects.unscoped().filter(tenant_id=tenant_id).aggregate(total=Sum("file_size"))["total"] or 0),
    }  # fmt: skip


GB = Decimal(10**9)


def usage_record_storage(*, tenant_id: int, day: date) -> UsageEvent | None:
    """One `storage_gb_hours` event for the tenant's bytes on `day` (24 hours of them); once per day."""
    stored = tenant_stored_bytes(tenant_id=tenant_id)
    total = sum(stored.values())
    if total == 0:
        return None
    occurred_at = datetime(day.year, day.month, day.day, tzinfo=UTC)
    rates = Rates.of(price_book_for(tenant_id=tenant_id, at=occurred_at))
    amount = quantity(Decimal(total) / GB * 24)
    price, priced = rates.unit_price(Meter.STORAGE_GB_HOURS)
    details = {"bytes": stored} if priced else {"bytes": stored, "unpriced": True}
    key = f"storage:{tenant_id}:{day.isoformat()}"
    UsageEvent.objects.unscoped().bulk_create(
        [UsageEvent(
            tenant_id=tenant_id, job_kind=JobKind.STORAGE, job_id=None, meter=Meter.STORAGE_GB_HOURS,
            quantity=amount, unit_price=price, cost=cost(amount, price), price_book=rates.book, billable=True,
            occurred_at=occurred_at, idempotency_key=key, details=details,
        )],
        ignore_conflicts=True,
    )  # fmt: skip
    return UsageEvent.objects.unscoped().filter(idempotency_key=key).first()


def usage_record_storage_all(*, day: date | None = None) -> int:
    """The daily schedule: every active tenant's storage for `day` (default: yesterday, UTC)."""
    from alkemy.tenancy.models import Tenant

    day = day or (timezone.now().astimezone(UTC).date() - timedelta(days=1))
    recorded = 0
    for tenant_id in Tenant.objects.filter(is_active=True).values_list("pk", flat=True):
        recorded += usage_record_storage(tenant_id=tenant_id, day=day) is not None
    return recorded


# --- price books and budgets -------------------------------------------------------------------------


def price_book_new_version(*, based_on, effective_from: datetime, prices: dict[tuple[str, str], Decimal] | None = None):
    """A new version of `based_on`'s book (same tenant), its rates copied and then overridden by
    `prices` {(meter, gpu class): price per price unit}. Old events keep the version that priced them."""
    from django.db.models import Max

    from usage.models import PriceBook, PriceRate

    with transaction.atomic():
        latest = PriceBook.objects.filter(tenant_id=based_on.tenant_id).aggregate(v=Max("version"))["v"] or 0
        book = PriceBook.objects.create(
            name=based_on.name, tenant_id=based_on.tenant_id, version=latest + 1, effective_from=effective_from,
            source=based_on.source,
        )  # fmt: skip
        rates = {(r.meter, r.gpu_class): r.price for r in based_on.rates.all()}
        rates.update(prices or {})
        PriceRate.objects.bulk_create(
            PriceRate(price_book=book, meter=meter, gpu_class=gpu_class, price=price)
            for (meter, gpu_class), price in rates.items()
        )
    return book


def budget_set(*, tenant, **limits) -> Budget:
    """Create or change the tenant's budget: monthly_limit, limit_kind, max_concurrent_jobs,
    max_queued_jobs, method_limits."""
    budget, _ = Budget.objects.unscoped().get_or_create(tenant=tenant)
    for name, value in limits.items():
        setattr(budget, name, value)
    budget.full_clean(validate_unique=False)  # the database holds one budget per tenant
    budget.save()
    return budget
