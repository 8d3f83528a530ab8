"""Money rules, in one place. Every amount is a `Decimal`; floats never touch a price.

- unit prices (USD per meter unit: per second, per token, per GB-hour) are the book's price
  divided by its price unit, rounded to 1e-12 USD;
- the cost of one event is quantity x unit price, rounded to 1e-6 USD;
- totals are exact sums of event costs; shown to people rounded to cents.
All rounding is ROUND_HALF_UP.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

UNIT_PRICE_STEP = Decimal("1e-12")
COST_STEP = Decimal("0.000001")
QUANTITY_STEP = Decimal("0.000001")
CENT = Decimal("0.01")
ZERO = Decimal(0)


def to_decimal(value) -> Decimal:
    """A quantity from the job row (a float or int) as a Decimal, through its shortest repr."""
    if isinstance(value, Decimal):
        return value
    return Decimal(str(value or 0))


def quantity(value) -> Decimal:
    return to_decimal(value).quantize(QUANTITY_STEP, rounding=ROUND_HALF_UP)


def unit_price(price: Decimal, per: Decimal) -> Decimal:
    return (Decimal(price) / Decimal(per)).quantize(UNIT_PRICE_STEP, rounding=ROUND_HALF_UP)


def cost(amount: Decimal, price_per_unit: Decimal) -> Decimal:
    return (amount * price_per_unit).quantize(COST_STEP, rounding=ROUND_HALF_UP)


def cents(amount: Decimal | None) -> Decimal:
    return (amount or ZERO).quantize(CENT, rounding=ROUND_HALF_UP)


def exact(amount: Decimal | None) -> str:
    """An amount as the API shows it: a string with the ledger's six decimals."""
    return str((amount or ZERO).quantize(COST_STEP, rounding=ROUND_HALF_UP))
