"""The default price book shipped with the service (sources in the README, "Usage and cost").

`migrations/0002_default_price_book.py` carries a frozen copy of these rates; this module lets a
process recreate the book when a database was emptied (a test flush) rather than run unpriced.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

DEFAULT_BOOK_NAME = "Public list prices"
DEFAULT_EFFECTIVE_FROM = datetime(2026, 1, 1, tzinfo=UTC)
DEFAULT_SOURCE = (
    "GPU: on-demand list prices of public GPU clouds (Lambda, RunPod, 2025-2026), per GPU-hour. "
    "Gemini 2.5 Flash Image: Google AI for Developers pricing, $0.30 per 1M input tokens, $30 per 1M "
    "output tokens (1290 tokens per 1024x1024 image = $0.039). Storage: S3 Standard, $0.023 per GB-month."
)

#: (meter, gpu class, USD per the meter's price unit: GPU/CPU per hour, tokens per 1M, GB-month, image, 1000 steps)
DEFAULT_RATES: list[tuple[str, str, Decimal]] = [
    ("gpu_seconds", "H200", Decimal("3.99")),
    ("gpu_seconds", "H100", Decimal("2.99")),
    ("gpu_seconds", "A100", Decimal("1.79")),
    ("gpu_seconds", "L40S", Decimal("0.99")),
    ("gpu_seconds", "default", Decimal("2.99")),
    ("cpu_seconds", "cpu", Decimal("0.10")),
    ("gemini_input_tokens", "", Decimal("0.30")),
    ("gemini_output_tokens", "", Decimal("30.00")),
    ("images_generated", "", Decimal("0")),
    ("training_steps", "", Decimal("0")),
    ("storage_gb_hours", "", Decimal("0.023")),
]


def ensure_default_price_book():
    """The default price book's first version, created if no default book exists. Returns the latest one."""
    from django.db import IntegrityError, transaction

    from usage.models import PriceBook, PriceRate

    book = PriceBook.objects.filter(tenant__isnull=True).order_by("-effective_from", "-version").first()
    if book is not None:
        return book
    try:
        with transaction.atomic():
            book = PriceBook.objects.create(
                name=DEFAULT_BOOK_NAME, tenant=None, version=1, effective_from=DEFAULT_EFFECTIVE_FROM,
                source=DEFAULT_SOURCE,
            )  # fmt: skip
            PriceRate.objects.bulk_create(
                PriceRate(price_book=book, meter=meter, gpu_class=gpu_class, price=price)
                for meter, gpu_class, price in DEFAULT_RATES
            )
    except IntegrityError:  # another process created it meanwhile
        book = PriceBook.objects.filter(tenant__isnull=True).order_by("-effective_from", "-version").first()
    return book
