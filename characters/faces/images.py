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


def shrink_long_side(image: np.ndarray, long_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The photo shrunk to `long_side` exactly as PuLID shrinks its ID image (`resize_numpy_image_long`:
    cv2 Lanczos, sizes truncated); returned with the (x, y) scale new/old. A photo whose long side
    is at most `long_side` is returned unchanged (PuLID never enlarges)."""
    import cv2

    height, width = image.shape[:2]
    if max(height, width) <= long_side:
        return image, (1.0, 1.0)
    factor = long_side / max(height, width)
    new_height, new_width = max(int(height * factor), 1), max(int(width * factor), 1)
    resized = cv2.resize(np.ascontiguousarray(image), (new_width, new_height), interpolation=cv2.INTER_LANCZOS4)
    return resized, (new_width / width, new_height / height)
