"""What a bulk import's worker processes run: the face work of one photo (characters/imports.py).

Kept apart from `characters.imports` on purpose: a spawned worker imports this module to find the
functions it is given, and never sets Django's apps up (that imports every app, torch included:
seconds per worker). The analysis needs no model, only settings (`DJANGO_SETTINGS_MODULE` is inherited).
"""

from __future__ import annotations

import os
from dataclasses import replace


def init() -> None:
    """Load the face models once per worker, before the first photo. One BLAS thread per worker: the pool
    already has a worker per core (set before numpy is first imported)."""
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
    from characters.faces import get_embedder

    get_embedder()


def analyse(data: bytes, min_face_px: int | None, max_pixels: int | None):
    """An AnalysedPhoto without its pixels (not worth sending back between processes), or (code, message,
    details) of the refusal: the same checks and codes as a single upload."""
    from alkemy.errors import AlkemyError
    from characters.analysis import photo_analyse_bytes

    try:
        analysed = photo_analyse_bytes(data=data, min_face_px=min_face_px, max_pixels=max_pixels)
    except AlkemyError as exc:
        return (exc.code, exc.message, exc.details)
    analysed.photo = replace(analysed.photo, pixels=None)
    return analysed
