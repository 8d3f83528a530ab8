"""The contact sheet: one PNG, rows = character × method, columns = shots, drawn with Pillow.

Each cell holds the thumbnails of the shot's outputs for that row (re-rolls beside the first render, at
most `MAX_PER_CELL`, the latest kept), each labelled with its identity score; outliers are framed in red
and marked `!`. A failed or canceled job shows its error code in a grey box, unfinished work its status.

Geometry (all in pixels): a header band of `HEADER_H` with the shot numbers, a `LABEL_W` column with the
row names; a cell is `per_cell` thumbnails of `thumb` side, `PAD` apart, over a `SCORE_H` score line:

    width  = LABEL_W + shots × (per_cell × (thumb + PAD)) + PAD
    height = HEADER_H + rows × (thumb + SCORE_H + PAD) + PAD

`thumb` is `THUMB` unless that would make either side exceed `MAX_SIDE`, then it shrinks to fit (never
below `MIN_THUMB`; a sheet that cannot fit even then is refused with 422 `contact_sheet_too_large`).
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont, ImageOps

from alkemy.errors import AlkemyError
from generation.models import GeneratedImage
from shotlists.models import ShotList

THUMB = 128
MIN_THUMB = 32
PAD = 4
SCORE_H = 14
HEADER_H = 18
LABEL_W = 150
MAX_PER_CELL = 4
MAX_SIDE = 4096

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
OUTLIER = (210, 30, 30)
EMPTY = (225, 225, 225)


def sheet_size(*, rows: int, shots: int, per_cell: int, thumb: int) -> tuple[int, int]:
    width = LABEL_W + shots * (per_cell * (thumb + PAD)) + PAD
    height = HEADER_H + rows * (thumb + SCORE_H + PAD) + PAD
    return width, height


def fit_thumb(*, rows: int, shots: int, per_cell: int) -> int:
    """The largest thumbnail side up to `THUMB` that keeps the sheet within `MAX_SIDE`."""
    thumb = THUMB
    while thumb > MIN_THUMB and max(sheet_size(rows=rows, shots=shots, per_cell=per_cell, thumb=thumb)) > MAX_SIDE:
        thumb -= 8
    if max(sheet_size(rows=rows, shots=shots, per_cell=per_cell, thumb=thumb)) > MAX_SIDE:
        raise AlkemyError(
            f"A contact sheet of {rows} rows × {shots} shots does not fit in {MAX_SIDE} px; use the report.",
            code="contact_sheet_too_large", status_code=422,
        )  # fmt: skip
    return thumb


def _cells(report: dict) -> list[list[dict]]:
    """Per row, per shot: {'outputs': [...], 'note': str | None} (the note when there is no output)."""
    grid = []
    for row in report["rows"]:
        cells = []
        for shot in row["shots"]:
            outputs = [o for job in shot["jobs"] for o in job["outputs"]][-MAX_PER_CELL:]
            note = None
            if not outputs:
                errors = [job["error"]["code"] for job in shot["jobs"] if job["error"]]
                note = errors[0] if errors else (shot["status"] or "no job")
            cells.append({"outputs": outputs, "note": note})
        grid.append(cells)
    return grid


def _label(output: dict) -> str:
    if output["identity_similarity"] is not None:
        text = f"{output['identity_similarity']:.3f}"
    else:
        text = (output["reason"] or "n/a").replace("_", " ")
    return f"{text} !" if output["outlier"] else text


def render_contact_sheet(*, shot_list: ShotList, report: dict) -> bytes:
    """The PNG of `report` (what `shotlists.report.shotlist_report` answers for `shot_list`)."""
    grid = _cells(report)
    rows, shots = len(grid), len(report["shots"])
    per_cell = max([len(cell["outputs"]) for cells in grid for cell in cells] + [1])
    thumb = fit_thumb(rows=rows, shots=shots, per_cell=per_cell)
    sheet = Image.new("RGB", sheet_size(rows=rows, shots=shots, per_cell=per_cell, thumb=thumb), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    files = {
        image.pk: image.file
        for image in GeneratedImage.objects.unscoped().filter(
            tenant_id=shot_list.tenant_id,
            pk__in=[o["id"] for cells in grid for cell in cells for o in cell["outputs"]],
        )
    }
    column = per_cell * (thumb + PAD)
    line = thumb + SCORE_H + PAD
    for index in range(shots):
        draw.text((LABEL_W + index * column, 2), f"shot {index}", fill=INK, font=font)
    for r, (row, cells) in enumerate(zip(report["rows"], grid, strict=True)):
        top = HEADER_H + r * line
        name = row["character"]["name"] if row["character"] else "?"
        draw.text((PAD, top + 2), name[:22], fill=INK, font=font)
        draw.text((PAD, top + 16), row["method"], fill=INK, font=font)
        if row["identity"]["mean"] is not None:
            draw.text((PAD, top + 30), f"mean {row['identity']['mean']:.3f}", fill=INK, font=font)
        for s, cell in enumerate(cells):
            left = LABEL_W + s * column
            if cell["note"]:
                draw.rectangle([left, top, left + thumb - 1, top + thumb - 1], fill=EMPTY)
                draw.text((left + 3, top + 3), cell["note"][:18], fill=INK, font=font)
                continue
            for k, output in enumerate(cell["outputs"]):
                x = left + k * (thumb + PAD)
                sheet.paste(_thumbnail(files.get(output["id"]), thumb), (x, top))
                colour = OUTLIER if output["outlier"] else INK
                if output["outlier"]:
                    draw.rectangle([x, top, x + thumb - 1, top + thumb - 1], outline=OUTLIER, width=3)
                draw.text((x + 1, top + thumb + 1), _label(output), fill=colour, font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _thumbnail(file, side: int) -> Image.Image:
    if file is None:
        return Image.new("RGB", (side, side), EMPTY)
    try:
        with file.open("rb") as handle:
            image = Image.open(handle)
            image.draft("RGB", (side, side))  # JPEG: decode at a reduced size
            return ImageOps.pad(image.convert("RGB"), (side, side), color=BACKGROUND)
    except Exception:  # an unreadable file shows as an empty box; the report says `unreadable`
        return Image.new("RGB", (side, side), EMPTY)
