"""IdentityNet's control image: the 5 face keypoints drawn on black, and where they go in the output frame.

The drawing is the one IdentityNet was trained on: the two eyes and the two mouth corners are each
joined to the nose by a filled ellipse ("limb") in the colour of the outer point at 60 % brightness,
then every keypoint is a filled circle in its own colour. The training drawings were made on images
of about 1024 px with 4 px limbs and 10 px circles; we scale those sizes with the canvas so the
drawing covers the same fraction of the face at any output size.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

#: colours of left eye, right eye, nose, left mouth corner, right mouth corner (insightface order), RGB
KEYPOINT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
NOSE = 2
#: pixel sizes on a 1024 px canvas
LIMB_HALF_WIDTH = 4
CIRCLE_RADIUS = 10
LIMB_BRIGHTNESS = 0.6


def draw_keypoints(keypoints: np.ndarray, width: int, height: int) -> Image.Image:
    """RGB control image of size width × height with the (5, 2) keypoints (pixel x, y) drawn on black."""
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(5, 2)
    size = math.sqrt(width * height) / 1024
    limb_half_width = max(1, round(LIMB_HALF_WIDTH * size))
    radius = max(1, round(CIRCLE_RADIUS * size))

    limbs = np.zeros((height, width, 3), np.uint8)
    for outer in (0, 1, 3, 4):
        (x0, y0), (x1, y1) = keypoints[outer], keypoints[NOSE]
        length = math.hypot(x1 - x0, y1 - y0)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), limb_half_width), int(angle), 0, 360, 1)
        color = tuple(int(c * LIMB_BRIGHTNESS) for c in KEYPOINT_COLORS[outer])
        cv2.fillConvexPoly(limbs, polygon, color)

    for (x, y), color in zip(keypoints, KEYPOINT_COLORS, strict=True):
        cv2.circle(limbs, (int(x), int(y)), radius, color, -1)
    return Image.fromarray(limbs)


def place_keypoints(
    keypoints: np.ndarray, source_size: tuple[int, int], width: int, height: int, margin: float = 0.05
) -> np.ndarray:
    """Map keypoints of a (source_width, source_height) reference photo into a width × height output frame.

    The reference photo is scaled to cover the output frame (as a centre-cropped resize would), so the
    face keeps its size and place relative to the frame; the crop window is then shifted, within the
    photo, as little as needed to keep every keypoint at least `margin` of the frame inside it (a
    portrait reference cropped to a landscape frame would otherwise lose a high face).
    """
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(5, 2)
    source_width, source_height = source_size
    scale = max(width / source_width, height / source_height)
    scaled = keypoints * scale
    offset = np.empty(2)
    for axis, (frame, extent) in enumerate(((width, source_width * scale), (height, source_height * scale))):
        start = (extent - frame) / 2
        pad = margin * frame
        low, high = scaled[:, axis].min() - pad, scaled[:, axis].max() + pad
        if low < start:
            start = low
        if high > start + frame:
            start = high - frame
        offset[axis] = min(max(start, 0.0), extent - frame)
    return scaled - offset
