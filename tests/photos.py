"""Real photos that ship inside our dependencies (no photos are committed to the repository).

- `skimage.data.astronaut()`: Eileen Collins, public domain.
- insightface's `t1.jpg`: six people side by side; cropped into one photo per person here.
- insightface's `Tom_Hanks_54745.png`: an aligned 112x112 face.
"""

from __future__ import annotations

import importlib.util
import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image


def insightface_image(name: str) -> np.ndarray:
    folder = Path(importlib.util.find_spec("insightface").origin).parent / "data" / "images"
    return np.asarray(Image.open(folder / name).convert("RGB"))


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def tom_hanks() -> np.ndarray:
    return insightface_image("Tom_Hanks_54745.png")


def group_photo() -> np.ndarray:
    return insightface_image("t1.jpg")


@lru_cache(maxsize=1)
def group_crops() -> tuple[np.ndarray, ...]:
    """One photo per person of t1.jpg, left to right: the face with a margin around it."""
    from characters.faces import get_embedder

    image = group_photo()
    faces = sorted(get_embedder().analyze(image), key=lambda f: f.box[0])
    crops = []
    for face in faces:
        x1, y1, x2, y2 = face.box
        cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, face.side * 1.3
        top, left = int(max(cy - half, 0)), int(max(cx - half, 0))
        crops.append(image[top : int(cy + half), left : int(cx + half)].copy())
    return tuple(crops)


def people() -> dict[str, np.ndarray]:
    """Eight distinct people: the astronaut, Tom Hanks and the six of t1.jpg."""
    result = {"astronaut": astronaut(), "tom-hanks": tom_hanks()}
    result.update({f"group-{i}": crop for i, crop in enumerate(group_crops())})
    return result


def encode(pixels: np.ndarray, fmt: str = "PNG", **save_options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **save_options)
    return buffer.getvalue()


def upload(pixels_or_bytes, fmt: str = "PNG", name: str | None = None, **save_options) -> SimpleUploadedFile:
    data = pixels_or_bytes if isinstance(pixels_or_bytes, bytes) else encode(pixels_or_bytes, fmt, **save_options)
    content_type = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}.get(fmt, "image/png")
    return SimpleUploadedFile(name or f"photo.{fmt.lower()}", data, content_type=content_type)
