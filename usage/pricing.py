"""Which price book applies, which GPU class a device is, and what one unit of a meter costs."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from usage.models import DEVICE_METERS, PRICE_UNITS, Meter, PriceBook
from usage.money import ZERO, unit_price

DEFAULT_GPU_CLASS = "default"
CPU_CLASS = "cpu"


def price_book_for(*, tenant_id: int, at: datetime) -> PriceBook:
    """The tenant's own latest version in effect at `at`, else the default book's."""
    from usage.defaults import ensure_default_price_book

    books = PriceBook.objects.filter(effective_from__lte=at).order_by("-effective_from", "-version")
    book = books.filter(tenant_id=tenant_id).first() or books.filter(tenant__isnull=True).first()
    if book is None:
        book = ensure_default_price_book()
    return book


@dataclass
class Rates:
    """The rates of one price book, looked up by meter and GPU class."""

    book: PriceBook
    prices: dict[tuple[str, str], Decimal] = field(default_factory=dict)

    @classmethod
    def of(cls, book: PriceBook) -> Rates:
        rates = cls(book)
        for rate in book.rates.all():
            rates.prices[(rate.meter, rate.gpu_class)] = rate.unit_price
        return rates

    @property
    def gpu_classes(self) -> list[str]:
        """Named GPU classes of the book, longest first (so L40S wins over L40)."""
        named = {cls for meter, cls in self.prices if meter == Meter.GPU_SECONDS and cls not in ("", DEFAULT_GPU_CLASS)}
        return sorted(named, key=len, reverse=True)

    def gpu_class(self, device: str) -> str:
        """`cuda:NVIDIA H100 80GB HBM3` → H100; an unknown GPU → default; `cpu` → cpu."""
        if not device or device == "cpu" or not device.startswith("cuda"):
            return CPU_CLASS
        name = device.upper()
        for candidate in self.gpu_classes:
            if candidate.upper() in name:
                return candidate
        return DEFAULT_GPU_CLASS

    def unit_price(self, meter: str, gpu_class: str = "") -> tuple[Decimal, bool]:
        """(USD per meter unit, priced?). A meter missing from the book costs 0 and says so."""
        keys = [(meter, gpu_class)]
        if meter in DEVICE_METERS:
            keys += [(meter, DEFAULT_GPU_CLASS), (meter, "")]
        for key in keys:
            if key in self.prices:
                return self.prices[key], True
        return ZERO, False


def device_meter(gpu_class: str) -> str:
    return Meter.CPU_SECONDS if gpu_class == CPU_CLASS else Meter.GPU_SECONDS


def display_price(meter: str, per_unit: Decimal) -> str:
    per, label = PRICE_UNITS[meter]
    return f"${(per_unit * per).normalize():f} {label}"


__all__ = ["Rates", "device_meter", "display_price", "price_book_for", "unit_price"]
