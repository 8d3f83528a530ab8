"""A daily cost bar chart as inline SVG: no plotting library, nothing but numbers and dates in it."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from django.utils.html import escape

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 16, 36


def _nice_ceiling(value: Decimal) -> Decimal:
    """1, 2 or 5 x a power of ten, at or above `value` (the chart's top line)."""
    if value <= 0:
        return Decimal(1)
    exponent = value.adjusted()
    for step in (1, 2, 5, 10):
        top = Decimal(step).scaleb(exponent)
        if top >= value:
            return top
    return Decimal(10).scaleb(exponent)


def daily_cost_svg(days: list[tuple[date, Decimal]], *, title: str) -> str:
    """Bars of cost per day (USD), one per entry of `days`, with the top value and a few dates labelled."""
    top = _nice_ceiling(max((cost for _, cost in days), default=Decimal(0)))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(days), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(title)}" style="font: 11px sans-serif">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" stroke="#999"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{WIDTH - RIGHT}" y2="{TOP}" stroke="#ddd"/>',
        f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end">${top:f}</text>',
        f'<text x="{LEFT - 6}" y="{TOP + plot_h + 4}" text-anchor="end">$0</text>',
    ]
    label_every = max(1, round(len(days) / 8))
    for index, (day, cost) in enumerate(days):
        height = float(cost / top) * plot_h if top else 0.0
        x = LEFT + index * slot
        parts.append(
            f'<rect x="{x + slot * 0.15:.1f}" y="{TOP + plot_h - height:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{height:.1f}" fill="#417690"><title>{day.isoformat()}: ${cost:.2f}</title></rect>'
        )
        if index % label_every == 0:
            parts.append(f'<text x="{x + slot / 2:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">'
                         f"{day:%d %b}</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)
