"""Admin thumbnails of reference photos with the detected face drawn on them."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from characters.models import ReferenceImage
from characters.photos import oriented

BOX_COLOUR = (46, 204, 113)
OTHER_COLOUR = (230, 126, 34)
DEFAULT_SIZE, MIN_SIZE, MAX_SIZE = 256, 32, 1024


def thumbnail_size(raw: str | None) -> int:
    """A thumbnail's side from a `?size=` query value: clamped to 32-1024 px, the default when not a number."""
    try:
        size = int(raw)
    except (TypeError, ValueError):
        return DEFAULT_SIZE
    return min(max(size, MIN_SIZE), MAX_SIZE)


def reference_thumbnail(reference: ReferenceImage, *, size: int = DEFAULT_SIZE, face_only: bool = False) -> bytes:
    """JPEG bytes: the oriented photo (or just the face) with the subject's box and keypoints."""
    with reference.file.open("rb") as handle:
        image = oriented(Image.open(handle)).convert("RGB")
    x1, y1, x2, y2 = reference.face_box
    if face_only:
        margin = 0.25 * (x2 - x1)
        image = image.crop((max(x1 - margin, 0), max(y1 - margin, 0), x2 + margin, y2 + margin))
    else:
        draw = ImageDraw.Draw(image)
        width = max(2, round(max(image.size) / 250))
        for box in reference.other_faces:
            draw.rectangle(box, outline=OTHER_COLOUR, width=width)
        draw.rectangle(reference.face_box, outline=BOX_COLOUR, width=width)
        for x, y in reference.landmarks:
            r = width * 1.5
            draw.ellipse((x - r, y - r, x + r, y + r), fill=BOX_COLOUR)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()
