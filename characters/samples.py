"""Sample faces that ship inside our dependencies, for the demo (no photos in the repository).

- "Eileen Collins": `skimage.data.astronaut()`, public domain.
- "Tom Hanks": insightface's `Tom_Hanks_54745.png`.
- six people of insightface's `t1.jpg`, cropped one per photo.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image


def _insightface_image(name: str) -> np.ndarray:
    folder = Path(importlib.util.find_spec("insightface").origin).parent / "data" / "images"
    return np.asarray(Image.open(folder / name).convert("RGB"))


def sample_people() -> dict[str, np.ndarray]:
    """Display name → RGB photo of one person."""
    from skimage import data

    from characters.faces import get_embedder

    people = {"Eileen Collins": data.astronaut(), "Tom Hanks": _insightface_image("Tom_Hanks_54745.png")}
    group = _insightface_image("t1.jpg")
    faces = sorted(get_embedder().analyze(group), key=lambda f: f.box[0])
    for index, face in enumerate(faces, start=1):
        x1, y1, x2, y2 = face.box
        cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, face.side * 1.3
        crop = group[int(max(cy - half, 0)) : int(cy + half), int(max(cx - half, 0)) : int(cx + half)]
        people[f"Group photo person {index}"] = crop
    return people


def as_upload(pixels: np.ndarray, name: str) -> SimpleUploadedFile:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return SimpleUploadedFile(name, buffer.getvalue(), content_type="image/png")
