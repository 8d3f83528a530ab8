"""Choosing the subject face of a photo and judging whether it is good enough to be a reference."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from django.conf import settings

from alkemy.errors import Unprocessable
from characters.faces import DetectedFace

#: a face is "clearly dominant" when the next face has at most this share of its area
DOMINANT_AREA_RATIO = 0.5
#: a face can be the subject when its detection score is at least this share of the best face's
SUBJECT_SCORE_SHARE = 0.5
#: ...and competes with the subject ("multiple faces") from this share on
RIVAL_SCORE_SHARE = 0.25
DARK_BELOW = 40
BRIGHT_ABOVE = 220


@dataclass
class SubjectFace:
    face: DetectedFace
    others: list[DetectedFace]
    quality: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _box_json(face: DetectedFace) -> list[float]:
    return [round(v, 1) for v in face.box]


def rank_faces(faces: list[DetectedFace]) -> tuple[DetectedFace, list[DetectedFace], list[DetectedFace]]:
    """(subject, rivals, others): the subject is the largest face among the confident ones.

    Detector scores vary by photo, so confidence is relative to the best face: a badge or a
    texture detected at a fraction of the real face's score never becomes the subject, and
    never makes the photo "multiple faces". Rivals are the other faces that could be the subject.
    """
    best = max(face.score for face in faces)
    confident = [f for f in faces if f.score >= SUBJECT_SCORE_SHARE * best]
    subject = max(confident, key=lambda f: f.area)
    others = sorted((f for f in faces if f is not subject), key=lambda f: f.area, reverse=True)
    rivals = [f for f in others if f.score >= RIVAL_SCORE_SHARE * best and f.area > subject.area * DOMINANT_AREA_RATIO]
    return subject, rivals, others


def pick_subject(
    faces: list[DetectedFace], *, min_face_px: int | None = None
) -> tuple[DetectedFace, list[DetectedFace]]:
    """The subject face and the other faces, or Unprocessable no_face / multiple_faces / face_too_small."""
    min_face_px = settings.ALKEMY_MIN_FACE_PX if min_face_px is None else min_face_px
    if not faces:
        raise Unprocessable("No face was found in the photo.", code="no_face", field="image")
    subject, rivals, others = rank_faces(faces)
    if rivals:
        raise Unprocessable(
            f"The photo shows {len(rivals) + 1} faces of similar size; send a photo of one person.",
            code="multiple_faces",
            field="image",
            details={"faces": [_box_json(f) for f in [subject, *rivals]]},
        )
    if subject.side < min_face_px:
        raise Unprocessable(
            f"The face is {subject.side:.0f} px wide; at least {min_face_px} px are needed.",
            code="face_too_small",
            field="image",
            details={"face_px": round(subject.side), "min_face_px": min_face_px, "box": _box_json(subject)},
        )
    return subject, others


def assess(pixels: np.ndarray, face: DetectedFace) -> tuple[dict, list[str]]:
    """Quality figures of the face region and the warnings they raise (never a refusal)."""
    x1, y1, x2, y2 = (int(round(v)) for v in face.box)
    crop = pixels[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)]
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY) if crop.size else np.zeros((1, 1), np.uint8)
    # Sharpness on a fixed-size crop so it does not depend on the face's pixel size.
    normalised = cv2.resize(gray, (128, 128), interpolation=cv2.INTER_AREA)
    sharpness = float(cv2.Laplacian(normalised, cv2.CV_64F).var())
    brightness = float(gray.mean())
    quality = {
        "face_px": round(face.side, 1),
        "eye_distance_px": round(face.eye_distance, 1),
        "sharpness": round(sharpness, 1),
        "brightness": round(brightness, 1),
    }
    warnings = []
    if sharpness < settings.ALKEMY_BLUR_WARN_BELOW:
        warnings.append("blurry")
    if brightness < DARK_BELOW:
        warnings.append("too_dark")
    if brightness > BRIGHT_ABOVE:
        warnings.append("overexposed")
    return quality, warnings
