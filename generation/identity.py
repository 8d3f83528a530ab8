"""Identity score: how much each generated image looks like the character.

Every output is face-analysed with the same embedder the character's identity was built with,
and gets the cosine similarity of its main face to that identity, or None with a reason
(`no_face`) when no face is found.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from characters.faces import get_embedder
from characters.quality import rank_faces


@dataclass(frozen=True)
class IdentityScore:
    similarity: float | None
    reason: str | None = None  # why similarity is None
    face_box: tuple[float, float, float, float] | None = None

    def as_dict(self) -> dict:
        return {"identity_similarity": self.similarity, "identity_reason": self.reason, "face_box": self.face_box}


def score_image(image: Image.Image, *, identity: np.ndarray, embedder: str) -> IdentityScore:
    faces = get_embedder(embedder).analyze(np.asarray(image.convert("RGB")))
    if not faces:
        return IdentityScore(None, "no_face")
    face, _, _ = rank_faces(faces)
    similarity = float(np.dot(face.embedding, identity) / np.linalg.norm(identity))
    return IdentityScore(round(similarity, 4), None, tuple(round(v, 1) for v in face.box))


def score_images(images: list[Image.Image], *, identity: np.ndarray, embedder: str) -> list[IdentityScore]:
    return [score_image(image, identity=identity, embedder=embedder) for image in images]
