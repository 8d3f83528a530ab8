"""Usage and cost: price books (versioned rates), the append-only ledger, reservations, budgets.

Money is `Decimal`, never float (rules in `usage.money`). A price book that priced an event is
frozen: a change of rates is a new version with a later `effective_from`. Ledger rows are
written once, by the transaction that finished their job, and never updated or deleted through
the ORM (the queryset refuses, and a database trigger refuses UPDATE as well).
"""

from __future__ import annotations

from decimal import Decimal

from django.db import models
from django.utils import timezone

from alkemy.tenancy.scoping import TenantOwnedModel, TenantScopedManager


class Meter(models.TextChoices):
    GPU_SECONDS = "gpu_seconds", "GPU seconds"
    CPU_SECONDS = "cpu_seconds", "CPU seconds"
    GEMINI_INPUT_TOKENS = "gemini_input_tokens", "Gemini input tokens"
    GEMINI_OUTPUT_TOKENS = "gemini_output_tokens", "Gemini output tokens"
    IMAGES_GENERATED = "images_generated", "Images generated"
    TRAINING_STEPS = "training_steps", "Training steps"
    STORAGE_GB_HOURS = "storage_gb_hours", "Storage GB-hours"


#: how many meter units a price-book price is quoted for (GPU per hour, tokens per 1M, storage per GB-month)
PRICE_UNITS: dict[str, tuple[Decimal, str]] = {
    Meter.GPU_SECONDS: (Decimal(3600), "per hour"),
    Meter.CPU_SECONDS: (Decimal(3600), "per hour"),
    Meter.GEMINI_INPUT_TOKENS: (Decimal(1_000_000), "per 1M tokens"),
    Meter.GEMINI_OUTPUT_TOKENS: (Decimal(1_000_000), "per 1M tokens"),
    Meter.IMAGES_GENERATED: (Decimal(1), "per image"),
    Meter.TRAINING_STEPS: (Decimal(1000), "per 1000 steps"),
    Meter.STORAGE_GB_HOURS: (Decimal(730), "per GB-month (730 h)"),
}

#: meters measuring time on a device: their rate depends on the GPU class
DEVICE_METERS = frozenset({Meter.GPU_SECONDS, Meter.CPU_SECONDS})


class PriceBook(models.Model):
    """One version of the rates: the default book (no tenant) or a tenant's negotiated book.

    The book in effect for a tenant at time t is its own latest version with `effective_from <= t`,
    else the default's. Once an event used a version, that version is never changed or deleted.
    """

    name = models.CharField(max_length=100)
    tenant = models.ForeignKey(
        "tenancy.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="price_books",
        help_text="Empty: the default price book; set: this studio's negotiated rates",
    )  # fmt: skip
    version = models.PositiveIntegerField()
    effective_from = models.DateTimeField(default=timezone.now)
    source = models.TextField(blank=True, help_text="Where the rates come from (public price lists, a contract)")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant_id", "-effective_from", "-version"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "version"], nulls_distinct=False, name="price_book_unique_version_per_tenant"
            ),
        ]

    def __str__(self) -> str:
        owner = self.tenant.slug if self.tenant_id else "default"
        return f"{self.name} v{self.version} ({owner}, from {self.effective_from:%Y-%m-%d})"

    @property
    def is_used(self) -> bool:
        return UsageEvent.objects.unscoped().filter(price_book=self).exists()


class PriceRate(models.Model):
    """One rate of a price book: `price` USD per `PRICE_UNITS[meter]` units (GPU rates per class)."""

    price_book = models.ForeignKey(PriceBook, on_delete=models.CASCADE, related_name="rates")
    meter = models.CharField(max_length=32, choices=Meter.choices)
    gpu_class = models.CharField(
        max_length=32, blank=True,
        help_text="GPU meters only: H100, H200, A100, L40S, default (matched in the device name); cpu for CPU",
    )  # fmt: skip
    price = models.DecimalField(max_digits=16, decimal_places=6, help_text="USD per the meter's price unit")

    class Meta:
        ordering = ["price_book", "meter", "gpu_class"]
        constraints = [
            models.UniqueConstraint(fields=["price_book", "meter", "gpu_class"], name="price_rate_unique_meter"),
            models.CheckConstraint(condition=models.Q(price__gte=0), name="price_rate_not_negative"),
        ]

    def __str__(self) -> str:
        label = f"{self.meter}:{self.gpu_class}" if self.gpu_class else self.meter
        return f"{label} ${self.price} {PRICE_UNITS[self.meter][1]}"

    @property
    def unit_price(self) -> Decimal:
        from usage.money import unit_price

        return unit_price(self.price, PRICE_UNITS[self.meter][0])


class JobKind(models.TextChoices):
    GENERATION = "generation", "Generation"
    TRAINING = "training", "Training"
    STORAGE = "storage", "Storage"


class AppendOnlyQuerySet(models.QuerySet):
    """The ledger's queryset: rows are added, never changed or removed through the ORM."""

    def update(self, **kwargs):
        raise TypeError("UsageEvent is append-only: record a correcting event instead of updating one")

    def delete(self):
        raise TypeError("UsageEvent is append-only: it cannot be deleted")

    def bulk_update(self, objs, fields, batch_size=None):
        raise TypeError("UsageEvent is append-only: record a correcting event instead of updating one")


class UsageEventManager(TenantScopedManager.from_queryset(AppendOnlyQuerySet)):
    pass


class UsageEvent(TenantOwnedModel):
    """One priced quantity of one meter: the ledger, the source of truth of what a tenant spent.

    `cost = quantity x unit_price` (rounded to 1e-6 USD, half up) whether billable or not; only
    billable events count as spend. The job reference is generic (`job_kind` + `job_id`) so any
    `alkemy.jobs.Job` subclass can be billed; `method` and `character_id` are copied from the job
    at the time (reports group by them even after a character is deleted).
    """

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="usage_events")
    job_kind = models.CharField(max_length=16, choices=JobKind.choices)
    job_id = models.BigIntegerField(null=True, blank=True, help_text="Empty for storage")
    attempt = models.PositiveSmallIntegerField(default=0)
    method = models.CharField(max_length=40, blank=True)
    character_id = models.BigIntegerField(null=True, blank=True)
    character_name = models.CharField(max_length=200, blank=True)
    meter = models.CharField(max_length=32, choices=Meter.choices)
    gpu_class = models.CharField(max_length=32, blank=True)
    quantity = models.DecimalField(max_digits=20, decimal_places=6)
    unit_price = models.DecimalField(max_digits=24, decimal_places=12, help_text="USD per meter unit")
    cost = models.DecimalField(max_digits=18, decimal_places=6, help_text="USD, quantity x unit price")
    price_book = models.ForeignKey(PriceBook, on_delete=models.RESTRICT, related_name="events")
    billable = models.BooleanField()
    job_status = models.CharField(max_length=16, blank=True, help_text="The job's outcome when this was recorded")
    reason = models.CharField(max_length=64, blank=True, help_text="Why not billable (the failure code)")
    occurred_at = models.DateTimeField(db_index=True)
    recorded_at = models.DateTimeField(auto_now_add=True)
    idempotency_key = models.CharField(max_length=200, unique=True)
    details = models.JSONField(default=dict, blank=True)

    objects = UsageEventManager()

    class Meta:
        ordering = ["-occurred_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=models.Q(quantity__gte=0), name="usage_event_quantity_not_negative"),
        ]
        indexes = [
            models.Index(fields=["tenant", "occurred_at"], name="usage_event_tenant_time_idx"),
            models.Index(fields=["job_kind", "job_id"], name="usage_event_job_idx"),
            models.Index(fields=["job_kind", "method", "meter", "-occurred_at"], name="usage_event_history_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.meter} {self.quantity} = ${self.cost} ({self.job_kind} #{self.job_id})"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise TypeError("UsageEvent is append-only: record a correcting event instead of updating one")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise TypeError("UsageEvent is append-only: it cannot be deleted")


class Reservation(TenantOwnedModel):
    """The estimate a job was admitted with. It counts against the budget while the job is queued or
    running (derived from the job's status, so every terminal path releases it: finish, fail, cancel,
    the reaper); the job's events replace it in the same transaction that ends the job."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="usage_reservations")
    job_kind = models.CharField(max_length=16, choices=JobKind.choices)
    job_id = models.BigIntegerField()
    method = models.CharField(max_length=40)
    gpu_class = models.CharField(max_length=32, blank=True)
    work_units = models.DecimalField(max_digits=20, decimal_places=6, help_text="steps x images x megapixels")
    estimated_device_seconds = models.DecimalField(max_digits=14, decimal_places=3)
    estimated_cost = models.DecimalField(max_digits=18, decimal_places=6)
    estimate_basis = models.CharField(max_length=200, blank=True)
    over_soft_limit = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["job_kind", "job_id"], name="reservation_unique_job")]

    def __str__(self) -> str:
        return f"{self.job_kind} #{self.job_id}: ${self.estimated_cost}"


class LimitKind(models.TextChoices):
    HARD = "hard", "Hard: refuse jobs past the limit (402)"
    SOFT = "soft", "Soft: accept, flag as over the limit"


class Budget(TenantOwnedModel):
    """A tenant's spending limit per calendar month (UTC) and its limits on jobs in flight.

    `method_limits`: optional per method, e.g. {"pulid_flux": {"monthly_limit": "200.00",
    "max_active_jobs": 2}} (training methods are `train_sdxl`, `train_flux`).
    """

    tenant = models.OneToOneField("tenancy.Tenant", on_delete=models.CASCADE, related_name="usage_budget")
    monthly_limit = models.DecimalField(
        max_digits=12, decimal_places=2, null=True, blank=True, help_text="USD per calendar month; empty: none"
    )
    limit_kind = models.CharField(max_length=8, choices=LimitKind.choices, default=LimitKind.HARD)
    max_concurrent_jobs = models.PositiveIntegerField(
        null=True, blank=True, help_text="Jobs in flight (queued + running) at once; empty: no limit"
    )
    max_queued_jobs = models.PositiveIntegerField(
        null=True, blank=True, help_text="Jobs waiting to start at once; empty: no limit"
    )
    method_limits = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant__slug"]

    def __str__(self) -> str:
        return f"Budget of {self.tenant}"
