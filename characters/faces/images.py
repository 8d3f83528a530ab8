"""Geometry helpers shared by the face backends."""

from __future__ import annotations

import numpy as np
from PIL import Image


def downscale(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink so the long side is at most `max_side`; returns (image, factor original/scaled)."""
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest <= max_side:
        return image, 1.0
    factor = longest / max_side
    size = (max(round(width / factor), 1), max(round(height / factor), 1))  # a 5000x1 strip stays 1 px high
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)), factor
