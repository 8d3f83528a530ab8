"""A character's reference faces and identity, as the generation methods consume them."""

from __future__ import annotations

import numpy as np
from PIL import Image

from alkemy.errors import Unprocessable
from characters.faces import resolve_embedder_name
from characters.models import Character, CharacterIdentity, FaceEmbedding, ReferenceImage
from characters.photos import oriented
from generation.methods.base import ReferenceFace


def reference_faces(*, character: Character, embedder: str | None = None) -> list[ReferenceFace]:
    """The character's references with their analysed faces, best detection first."""
    embedder = embedder or resolve_embedder_name()
    embeddings = {
        e.reference_id: np.asarray(e.embedding, dtype=np.float32)
        for e in FaceEmbedding.objects.unscoped().filter(character=character, embedder=embedder)
    }
    references = ReferenceImage.objects.unscoped().filter(character=character, pk__in=embeddings).order_by("-det_score")
    faces = []
    for reference in references:
        with reference.file.open("rb") as handle:
            pixels = np.asarray(oriented(Image.open(handle)).convert("RGB"))
        faces.append(
            ReferenceFace(
                image=pixels,
                box=tuple(reference.face_box),
                keypoints=np.asarray(reference.landmarks, dtype=np.float32),
                embedding=embeddings[reference.pk],
                embedder=embedder,
                quality=reference.quality,
            )
        )
    if not faces:
        raise Unprocessable(
            f"Character '{character.name}' has no reference photo analysed by the '{embedder}' embedder.",
            code="no_identity",
            field="character",
        )
    return faces


def character_identity(*, character: Character, embedder: str | None = None) -> np.ndarray:
    embedder = embedder or resolve_embedder_name()
    identity = CharacterIdentity.objects.unscoped().filter(character=character, embedder=embedder).first()
    if identity is None:
        raise Unprocessable(
            f"Character '{character.name}' has no identity for the '{embedder}' embedder yet.",
            code="no_identity",
            field="character",
        )
    return np.asarray(identity.embedding, dtype=np.float32)
