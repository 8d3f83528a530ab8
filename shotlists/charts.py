"""The method comparison chart: identity similarity against seconds per image, one point per character × method.

Drawn with Pillow (no plotting library in the service's requirements). A point sits at (median seconds per
image, mean identity similarity) with a whisker down to the row's minimum; a dashed line marks the
embedder's same-person threshold; the legend gives each method's colour and cost per image (with the
amortised training cost for `lora` when the LoRA was trained here). Rows without any face found are
drawn hollow on the bottom edge, labelled "no face".
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 960, 600
LEFT, RIGHT, TOP, BOTTOM = 70, 300, 30, 60
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def _legend_cost(rows: list[dict]) -> str:
    costs = [float(r["cost_per_image"]) for r in rows if r["cost_per_image"] is not None]
    text = f"${sum(costs) / len(costs):.6f}/img" if costs else "cost n/a"
    trained = [r["training"] for r in rows if r.get("training") and r["training"]["amortised_cost_per_image"]]
    if trained:
        extra = sum(float(t["amortised_cost_per_image"]) for t in trained) / len(trained)
        text += f" + training ${extra:.6f}/img"
    return text


def render_chart(report: dict) -> bytes:
    """A PNG of `report` (shotlists.report.shotlist_report)."""
    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    rows = report["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colour = {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(methods)}
    seconds = [r["seconds_per_image"]["p50"] for r in rows if r["seconds_per_image"]["p50"] is not None]
    lows = [r["identity"]["min"] for r in rows if r["identity"]["min"] is not None]
    threshold = report.get("same_person_threshold")
    x_max = max(seconds) * 1.15 if seconds else 1.0
    y_min = min(lows + ([threshold] if threshold else []) + [1.0]) - 0.05
    y_max = 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x_of(value: float) -> float:
        return LEFT + value / x_max * plot_w

    def y_of(value: float) -> float:
        return TOP + (y_max - value) / (y_max - y_min) * plot_h

    draw.rectangle([LEFT, TOP, LEFT + plot_w, TOP + plot_h], outline=(0, 0, 0))
    for i in range(6):
        xv, yv = x_max * i / 5, y_min + (y_max - y_min) * i / 5
        draw.text((x_of(xv) - 10, TOP + plot_h + 6), f"{xv:.2f}", fill=(0, 0, 0), font=font)
        draw.text((8, y_of(yv) - 6), f"{yv:.3f}", fill=(0, 0, 0), font=font)
    draw.text((LEFT + plot_w // 2 - 60, HEIGHT - 24), "seconds per image (p50)", fill=(0, 0, 0), font=font)
    draw.text((8, 8), "identity similarity to the character (mean, whisker to min)", fill=(0, 0, 0), font=font)
    if threshold:
        y = y_of(threshold)
        for x in range(LEFT, LEFT + plot_w, 12):
            draw.line([x, y, x + 6, y], fill=(120, 120, 120))
        draw.text((LEFT + 4, y - 14), f"same person >= {threshold}", fill=(90, 90, 90), font=font)
    for row in rows:
        seconds_p50 = row["seconds_per_image"]["p50"]
        if seconds_p50 is None:
            continue
        x, c = x_of(seconds_p50), colour[row["method"]]
        name = row["character"]["name"] if row["character"] else "?"
        if row["identity"]["mean"] is None:
            y = TOP + plot_h - 8
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=c, width=2)
            draw.text((x + 7, y - 16), f"{name}: no face", fill=c, font=font)
            continue
        y, low = y_of(row["identity"]["mean"]), y_of(row["identity"]["min"])
        draw.line([x, y, x, low], fill=c, width=2)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=c)
        draw.text((x + 7, y - 6), name, fill=c, font=font)
    legend_x = LEFT + plot_w + 20
    draw.text((legend_x, TOP), "method: cost per image", fill=(0, 0, 0), font=font)
    for i, method in enumerate(methods):
        y = TOP + 22 + i * 34
        draw.rectangle([legend_x, y, legend_x + 12, y + 12], fill=colour[method])
        draw.text((legend_x + 18, y), method, fill=(0, 0, 0), font=font)
        draw.text((legend_x + 18, y + 13), _legend_cost([r for r in rows if r["method"] == method]), fill=(0, 0, 0),
                  font=font)  # fmt: skip
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
