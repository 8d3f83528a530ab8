"""Face analysis of one photo, with no database: what a single upload and each bulk-import worker run.

Kept free of models so an import's worker processes can run it without setting Django's apps up
(that imports every app, torch included: seconds per worker); only settings are read.
"""

from __future__ import annotations

from dataclasses import dataclass

from characters.faces import DetectedFace, EmbedderInfo, get_embedder
from characters.photos import Photo, load_photo
from characters.quality import assess, pick_subject


@dataclass
class AnalysedPhoto:
    photo: Photo
    embedder: EmbedderInfo
    subject: DetectedFace
    others: list[DetectedFace]
    quality: dict
    warnings: list[str]


def photo_analyse_bytes(*, data: bytes, min_face_px: int | None = None, max_pixels: int | None = None) -> AnalysedPhoto:
    """Validate, decode and face-analyse photo bytes: the subject face, its embedding and quality figures.
    Unprocessable (the single-upload codes) on any problem."""
    photo = load_photo(data, max_pixels=max_pixels)
    embedder = get_embedder()
    subject, others = pick_subject(embedder.analyze(photo.pixels), min_face_px=min_face_px)
    quality, warnings = assess(photo.pixels, subject)
    quality["det_score"] = round(subject.score, 4)
    return AnalysedPhoto(photo, embedder.info, subject, others, quality, warnings)
