"""What a job will cost before it runs: the admission estimate.

Device time = work units x the rolling median of measured seconds per work unit, where a work unit is
steps x images x megapixels (training: steps x megapixels). The median is over the last
`HISTORY_SIZE` succeeded jobs of the same kind, method and GPU class, from every tenant (durations
are a property of the hardware, not of the studio), read from the ledger's device events and the
work units their reservations recorded. With fewer than `MIN_HISTORY` such jobs the fallback is a
fixed seconds-per-unit figure per method, taken from the reference measurements in DESIGN.md
(FLUX.1-dev 6.7 s / 28 steps on an H100 with stock diffusers; SDXL about 0.07 s per step; LoRA
training 0.42 s (SDXL) and 0.50 s (FLUX) per step at 1024²) — on the slow side, so a first job is
over- rather than under-reserved.

Gemini jobs are estimated in tokens: the median input tokens per request and output tokens per image
of recent succeeded Gemini jobs, else 1100 input tokens per request (three reference crops and the
prompt) and 1290 output tokens per image (Google's figure for a 1024² image).

The GPU class is the one the method last ran on (from the ledger), else the price book's default.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

from django.utils import timezone

from usage.jobkinds import JobKindSpec
from usage.models import DEVICE_METERS, Meter, Reservation, UsageEvent
from usage.money import ZERO, cost, exact, quantity
from usage.pricing import DEFAULT_GPU_CLASS, Rates, device_meter, price_book_for

HISTORY_SIZE = 20
MIN_HISTORY = 3
#: seconds per work unit when a method has no history yet (see the module docstring)
FALLBACK_SECONDS_PER_UNIT: dict[str, Decimal] = {
    "pulid_flux": Decimal("0.24"),
    "lora": Decimal("0.24"),
    "instantid_sdxl": Decimal("0.07"),
    "train_sdxl": Decimal("0.42"),
    "train_flux": Decimal("0.50"),
}
FALLBACK_DEFAULT_SECONDS_PER_UNIT = Decimal("0.25")
FALLBACK_GEMINI_INPUT_TOKENS_PER_REQUEST = Decimal(1100)
FALLBACK_GEMINI_OUTPUT_TOKENS_PER_IMAGE = Decimal(1290)


@dataclass
class Estimate:
    job_kind: str
    method: str
    gpu_class: str
    work_units: Decimal
    device_seconds: Decimal
    cost: Decimal
    basis: str
    lines: list[dict] = field(default_factory=list)
    price_book_id: int | None = None

    def as_dict(self) -> dict:
        return {
            "job_kind": self.job_kind,
            "method": self.method,
            "gpu_class": self.gpu_class or None,
            "device_seconds": float(self.device_seconds),
            "cost": exact(self.cost),
            "currency": "USD",
            "basis": self.basis,
            "lines": self.lines,
            "price_book": self.price_book_id,
        }


def _median(values: list[Decimal]) -> Decimal:
    return Decimal(statistics.median(values)) if values else ZERO


def _ratios(spec: JobKindSpec, method: str, meters, gpu_class: str | None = None) -> list[Decimal]:
    """quantity / work units of the last succeeded jobs of this method, newest first."""
    events = UsageEvent.objects.unscoped().filter(
        job_kind=spec.kind, method=method, meter__in=list(meters), job_status="succeeded"
    )
    if gpu_class is not None:
        events = events.filter(gpu_class=gpu_class)
    rows = list(events.order_by("-occurred_at", "-id").values_list("job_id", "quantity")[:HISTORY_SIZE])
    units = dict(
        Reservation.objects.unscoped()
        .filter(job_kind=spec.kind, job_id__in=[job_id for job_id, _ in rows])
        .values_list("job_id", "work_units")
    )
    return [amount / units[job_id] for job_id, amount in rows if units.get(job_id)]


def _recent_gpu_class(spec: JobKindSpec, method: str) -> str | None:
    return (
        UsageEvent.objects.unscoped()
        .filter(job_kind=spec.kind, method=method, meter__in=list(DEVICE_METERS), job_status="succeeded")
        .order_by("-occurred_at", "-id")
        .values_list("gpu_class", flat=True)
        .first()
    )


def estimate_job(*, spec: JobKindSpec, job, tenant_id: int) -> Estimate:
    """The estimate of one (possibly unsaved) job of `spec`, priced with the tenant's book in effect now."""
    method = spec.method(job)
    units = spec.work_units(job)
    rates = Rates.of(price_book_for(tenant_id=tenant_id, at=timezone.now()))
    lines: list[dict] = []
    total = ZERO
    device_seconds = ZERO
    gpu_class = ""
    bases = []

    def add(meter: str, amount: Decimal, klass: str = "") -> None:
        nonlocal total
        price, _ = rates.unit_price(meter, klass)
        line_cost = cost(quantity(amount), price)
        total += line_cost
        lines.append({"meter": meter, "gpu_class": klass or None, "quantity": str(quantity(amount)),
                      "unit_price": str(price), "cost": exact(line_cost)})  # fmt: skip

    if spec.uses_device(job):
        gpu_class = _recent_gpu_class(spec, method) or DEFAULT_GPU_CLASS
        history = _ratios(spec, method, DEVICE_METERS, gpu_class)
        if len(history) >= MIN_HISTORY:
            per_unit = _median(history)
            bases.append(f"median of {len(history)} recent {method} runs on {gpu_class}")
        else:
            per_unit = FALLBACK_SECONDS_PER_UNIT.get(method, FALLBACK_DEFAULT_SECONDS_PER_UNIT)
            bases.append(f"fallback {per_unit} s per step-megapixel for {method} (no history yet)")
        device_seconds = (per_unit * units).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP)
        add(device_meter(gpu_class), device_seconds, gpu_class)
    else:  # a remote API: its tokens
        images = Decimal(job.num_images)
        inputs = _ratios(spec, method, [Meter.GEMINI_INPUT_TOKENS])
        outputs = _ratios(spec, method, [Meter.GEMINI_OUTPUT_TOKENS])
        if len(outputs) >= MIN_HISTORY:
            per_request, per_image = _median(inputs), _median(outputs)
            bases.append(f"median tokens of {len(outputs)} recent {method} jobs")
        else:
            per_request, per_image = FALLBACK_GEMINI_INPUT_TOKENS_PER_REQUEST, FALLBACK_GEMINI_OUTPUT_TOKENS_PER_IMAGE
            bases.append(f"fallback {per_request} input and {per_image} output tokens per image (no history yet)")
        add(Meter.GEMINI_INPUT_TOKENS, (per_request * images).to_integral_value(ROUND_HALF_UP))
        add(Meter.GEMINI_OUTPUT_TOKENS, (per_image * images).to_integral_value(ROUND_HALF_UP))
    return Estimate(
        job_kind=spec.kind, method=method, gpu_class=gpu_class, work_units=units, device_seconds=device_seconds,
        cost=total, basis="; ".join(bases), lines=lines, price_book_id=rates.book.pk,
    )  # fmt: skip
