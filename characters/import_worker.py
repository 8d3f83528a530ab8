"""What a bulk import's worker processes run: the face work of one photo (characters/imports.py).

Kept apart from `characters.imports` on purpose: a spawned worker imports this module to find the
functions it is given before Django is set up, so nothing Django-dependent may be imported at the top.
"""

from __future__ import annotations

from dataclasses import replace


def init() -> None:
    """Set Django up in a fresh worker and load the face models once, before the first photo."""
    import django

    django.setup()
    from characters.faces import get_embedder

    get_embedder()


def analyse(data: bytes, min_face_px: int | None, max_pixels: int | None):
    """An AnalysedPhoto without its pixels (not worth sending back between processes), or (code, message,
    details) of the refusal: the same checks and codes as a single upload."""
    from alkemy.errors import AlkemyError
    from characters.services import photo_analyse_bytes

    try:
        analysed = photo_analyse_bytes(data=data, min_face_px=min_face_px, max_pixels=max_pixels)
    except AlkemyError as exc:
        return (exc.code, exc.message, exc.details)
    analysed.photo = replace(analysed.photo, pixels=None)
    return analysed
