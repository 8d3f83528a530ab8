"""IdentityNet's control image: the 5 face keypoints drawn on black, and where they go in the output frame.

The drawing is InstantID's `draw_kps`, the one IdentityNet was trained on: the two eyes and the two
mouth corners are each joined to the nose by a filled ellipse ("limb") in the colour of the outer
point at 60 % brightness, then every keypoint is a filled circle in its own colour. `draw_kps` uses
a 4-px limb half-width and a 10-px radius whatever the canvas size, and so do we by default; our
earlier drawing, which scales both with the canvas (relative to 1024 px), stays available as
`scale_with_canvas=True` (request param `keypoint_drawing: "scaled"`).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

#: colours of left eye, right eye, nose, left mouth corner, right mouth corner (insightface order), RGB
KEYPOINT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
NOSE = 2
#: draw_kps's fixed pixel sizes (`stickwidth = 4`, circle radius 10)
LIMB_HALF_WIDTH = 4
CIRCLE_RADIUS = 10
LIMB_BRIGHTNESS = 0.6


def draw_keypoints(keypoints: np.ndarray, width: int, height: int, *, scale_with_canvas: bool = False) -> Image.Image:
    """RGB control image of size width × height with the (5, 2) keypoints (pixel x, y) drawn on black.

    Sizes are draw_kps's fixed ones; `scale_with_canvas` scales them by sqrt(width * height) / 1024.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(5, 2)
    limb_half_width, radius = LIMB_HALF_WIDTH, CIRCLE_RADIUS
    if scale_with_canvas:
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


def place_box(
    box: tuple[float, float, float, float], from_keypoints: np.ndarray, to_keypoints: np.ndarray
) -> tuple[float, float, float, float]:
    """The face box moved the way its keypoints moved (similarity fit), as the bounds (x1, y1, x2, y2)."""
    matrix, _ = cv2.estimateAffinePartial2D(
        np.asarray(from_keypoints, dtype=np.float32).reshape(5, 2),
        np.asarray(to_keypoints, dtype=np.float32).reshape(5, 2),
        method=cv2.LMEDS,
    )
    if matrix is None:
        raise ValueError("cannot relate these keypoints by a similarity transform")
    x1, y1, x2, y2 = box
    corners = np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2]], dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2]
    (left, top), (right, bottom) = corners.min(axis=0), corners.max(axis=0)
    return float(left), float(top), float(right), float(bottom)


def face_region_mask(box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """(height, width) float32 mask, 1 inside the face box and 0 elsewhere.

    As InstantID's demo builds its `control_mask`: the box corners truncated to int pixels
    (clipped to the frame here, where the demo would wrap a negative index).
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    mask = np.zeros((height, width), dtype=np.float32)
    mask[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = 1.0
    return mask
