"""Monthly statements of a tenant: the admin usage page, its CSV, and `manage.py usage_report` read these.

A statement's lines group the month's events by method, meter, GPU class and unit price; a line's cost
is the exact sum of its events' costs, so the lines (and the CSV rows) add up to the total to the
micro-dollar. Amounts are shown rounded to cents (half up) only at the end.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDate

from usage.models import UsageEvent
from usage.money import ZERO, cents, exact

CSV_COLUMNS = ["tenant", "occurred_at", "job_kind", "job_id", "attempt", "method", "character_id", "meter",
               "gpu_class", "quantity", "unit_price", "cost", "billable", "reason", "price_book_id"]  # fmt: skip


@dataclass
class Statement:
    tenant_id: int
    tenant_slug: str
    start: datetime
    end: datetime
    lines: list[dict]
    total: Decimal
    unbilled: Decimal
    days: list[tuple]

    @property
    def month(self) -> str:
        return f"{self.start:%Y-%m}"


def _events(tenant_id: int, start: datetime, end: datetime):
    return UsageEvent.objects.unscoped().filter(tenant_id=tenant_id, occurred_at__gte=start, occurred_at__lt=end)


def statement(*, tenant, start: datetime, end: datetime) -> Statement:
    """The tenant's billable usage in [start, end), in lines, per day, and in total."""
    events = _events(tenant.pk, start, end)
    billable = events.filter(billable=True)
    lines = [
        {**row, "quantity": row.pop("amount"), "cost": row.pop("billed")}
        for row in billable.values("method", "meter", "gpu_class", "unit_price")
        .annotate(amount=Sum("quantity"), billed=Sum("cost"), events=Count("id"))
        .order_by("method", "meter", "gpu_class", "unit_price")
    ]
    per_day = dict(
        billable.annotate(day=TruncDate("occurred_at", tzinfo=start.tzinfo))
        .values("day")
        .annotate(billed=Sum("cost"))
        .values_list("day", "billed")
    )
    days = []
    day = start.date()
    while day < end.date():
        days.append((day, per_day.get(day, ZERO)))
        day += timedelta(days=1)
    totals = events.aggregate(
        total=Sum("cost", filter=Q(billable=True), default=ZERO),
        unbilled=Sum("cost", filter=Q(billable=False), default=ZERO),
    )
    return Statement(tenant.pk, tenant.slug, start, end, lines, totals["total"], totals["unbilled"], days)


def statement_text(report: Statement) -> str:
    """A plain-text statement: one line per method, meter, GPU class and rate, then the total."""
    out = [f"Statement {report.month} — {report.tenant_slug}", ""]
    out.append(f"{'method':<16} {'meter':<22} {'class':<8} {'quantity':>18} {'unit price':>16} {'cost':>14}")
    for line in report.lines:
        out.append(
            f"{line['method'] or '-':<16} {line['meter']:<22} {line['gpu_class'] or '-':<8} "
            f"{line['quantity']:>18} {line['unit_price'].normalize():>16f} {exact(line['cost']):>14}"
        )
    out.append("")
    out.append(f"Total (USD): {exact(report.total)}  →  ${cents(report.total)}")
    if report.unbilled:
        out.append(f"Not billed (failures on our side): {exact(report.unbilled)}")
    return "\n".join(out)


def events_csv(*, tenants, start: datetime, end: datetime) -> str:
    """Every event of the tenants in [start, end), one row each (billable or not: see the column)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for tenant in tenants:
        for event in _events(tenant.pk, start, end).order_by("occurred_at", "id").iterator():
            writer.writerow([
                tenant.slug, event.occurred_at.isoformat(), event.job_kind, event.job_id or "", event.attempt,
                event.method, event.character_id or "", event.meter, event.gpu_class, event.quantity,
                event.unit_price, event.cost, "yes" if event.billable else "no", event.reason, event.price_book_id,
            ])  # fmt: skip
    return buffer.getvalue()
