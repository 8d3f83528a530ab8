"""The aspect ratios Gemini 2.5 Flash Image can produce, and the nearest one to a requested size.

The API takes an aspect ratio, not a size: it answers with its own resolution for that ratio
(about one megapixel, e.g. 1024x1024 for 1:1, 832x1248 for 2:3, 1344x768 for 16:9).
"""

from __future__ import annotations

import math

#: "W:H" strings as the API spells them
ASPECT_RATIOS: tuple[str, ...] = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")


def ratio_value(ratio: str) -> float:
    width, height = ratio.split(":")
    return int(width) / int(height)


def nearest_aspect_ratio(width: int, height: int) -> str:
    """The supported ratio closest to width/height.

    Distance is measured on the log of the ratio so that 2:1 and 1:2 are equally far from 1:1
    (on the plain ratio, wide formats would look further away than tall ones).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    wanted = math.log(width / height)
    return min(ASPECT_RATIOS, key=lambda ratio: abs(math.log(ratio_value(ratio)) - wanted))
