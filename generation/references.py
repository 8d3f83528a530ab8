"""A character's reference faces and identity, as the generation methods consume them.

Embedding spaces: PuLID and InstantID take the embeddings of the face embedder their weights were
trained on (`model_registry.embedding_space`: antelopev2 for the released files). A character
whose references were embedded by another embedder is refused with `embedding_space_mismatch`
(at submit when the weights are in place, by the worker otherwise), and the error names the command
that re-embeds its stored photos (`manage.py reembed_references`).

Embeddings are stored as unit vectors with their raw length (`FaceEmbedding.raw_norm`); each
`ReferenceFace` carries both, and the methods feed the raw embedding as the official pipelines do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from alkemy.errors import Unprocessable
from characters.faces import resolve_embedder_name
from characters.models import Character, CharacterIdentity, FaceEmbedding, ReferenceImage
from characters.photos import oriented
from generation.methods.base import ReferenceFace, embedding_space_mismatch
from generation.model_registry import ID_ENCODER_COMPONENTS, embedding_space, weights_present


def reference_faces(*, character: Character, embedder: str | None = None, method: str = "") -> list[ReferenceFace]:
    """The character's references with their analysed faces in `embedder`'s space, best detection first.

    `embedding_space_mismatch` when `method` has an ID encoder and the character has embeddings, but only
    from other embedders; `no_identity` otherwise.
    """
    embedder = embedder or resolve_embedder_name()
    rows = {e.reference_id: e for e in FaceEmbedding.objects.unscoped().filter(character=character, embedder=embedder)}
    references = ReferenceImage.objects.unscoped().filter(character=character, pk__in=rows).order_by("-det_score")
    faces = []
    for reference in references:
        with reference.file.open("rb") as handle:
            pixels = np.asarray(oriented(Image.open(handle)).convert("RGB"))
        row = rows[reference.pk]
        faces.append(
            ReferenceFace(
                image=pixels,
                box=tuple(reference.face_box),
                keypoints=np.asarray(reference.landmarks, dtype=np.float32),
                embedding=np.asarray(row.embedding, dtype=np.float32),
                embedder=embedder,
                quality=reference.quality,
                raw_norm=row.raw_norm,
            )
        )
    if not faces:
        _refuse_missing_space(character=character, embedder=embedder, method=method)
    return faces


def _refuse_missing_space(*, character: Character, embedder: str, method: str) -> None:
    others = list(
        FaceEmbedding.objects.unscoped().filter(character=character).exclude(embedder=embedder)
        .values_list("embedder", flat=True).distinct()
    )  # fmt: skip
    if others and method in ID_ENCODER_COMPONENTS:
        raise embedding_space_mismatch(
            method=method, needs=embedder, found=others, character_id=character.pk, character_name=character.name
        )
    raise Unprocessable(
        f"Character '{character.name}' has no reference photo analysed by the '{embedder}' embedder.",
        code="no_identity",
        field="character",
    )


def method_embedder(*, method: str, models_dir: Path, default: str) -> str:
    """Whose embeddings `method` runs on: its weights' embedding space when they are in `models_dir`, else `default`.

    With the weights absent the job fails later with `model_missing` anyway; the space is then unknown.
    """
    if not weights_present(models_dir, method):
        return default
    space = embedding_space(models_dir, method)
    return space.embedder if space is not None else default


def identity_check(*, character: Character, method: str, embedder: str) -> None:
    """Refuse a job up front: `embedding_space_mismatch` or `no_identity` when `character` has no identity in
    `embedder`'s space (see `reference_faces`)."""
    if not CharacterIdentity.objects.unscoped().filter(character=character, embedder=embedder).exists():
        _refuse_missing_space(character=character, embedder=embedder, method=method)


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
