"""Face analysis backends: find faces in a photo, their 5 keypoints, and an identity embedding.

One small interface (`FaceEmbedder.analyze(image) -> list[DetectedFace]`), implementations
looked up by name in a registry. `ALKEMY_FACE_EMBEDDER=auto` (the default) picks insightface's
ArcFace when its model files are in `$ALKEMY_MODELS_DIR`, otherwise dlib's ResNet, whose weights
ship in the `face-recognition-models` package and so always work offline. A tiny test pack that
`manage.py build_test_models` writes (marked as such) is never picked by `auto`: only by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np


@dataclass
class DetectedFace:
    """One face in image coordinates (of the EXIF-oriented image the analyser was given)."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float  # detector confidence, embedder-specific scale (see `score_scale`)
    keypoints: np.ndarray  # (5, 2): left eye, right eye, nose tip, left mouth, right mouth (insightface order)
    embedding: np.ndarray = field(repr=False)  # unit-normalised float32 vector
    #: length of the embedder's raw output (insightface's `Face.embedding`, which PuLID and InstantID
    #: feed their ID encoders); None where the raw length means nothing (dlib's descriptor)
    raw_norm: float | None = None

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def side(self) -> float:
        return min(self.width, self.height)

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def eye_distance(self) -> float:
        return float(np.linalg.norm(self.keypoints[0] - self.keypoints[1]))


@dataclass(frozen=True)
class EmbedderInfo:
    name: str
    dims: int
    #: cosine similarity at or above which two faces are taken for the same person
    match_threshold: float
    #: cosine similarity at or above which two characters' identities are flagged as possible duplicates
    duplicate_threshold: float
    description: str


class FaceEmbedder:
    info: EmbedderInfo

    def analyze(self, image: np.ndarray) -> list[DetectedFace]:
        """Detect every face in an RGB uint8 image (H, W, 3) and embed it, largest first."""
        raise NotImplementedError


class EmbedderUnavailable(RuntimeError):
    pass


_REGISTRY: dict[str, tuple[EmbedderInfo, Callable[[], FaceEmbedder], Callable[[], str | None]]] = {}
_NOT_FOR_AUTO: dict[str, Callable[[], str | None]] = {}


def register(
    info: EmbedderInfo,
    factory: Callable[[], FaceEmbedder],
    missing: Callable[[], str | None],
    not_for_auto: Callable[[], str | None] | None = None,
) -> None:
    """`missing()` returns None when the embedder can load, else what is missing.

    `not_for_auto()` returns why `auto` must pass the embedder by although it can load (a tiny
    test pack), or None; such an embedder is still used when named explicitly.
    """
    _REGISTRY[info.name] = (info, factory, missing)
    if not_for_auto is not None:
        _NOT_FOR_AUTO[info.name] = not_for_auto


def embedder_not_for_auto(name: str) -> str | None:
    """Why `auto` skips `name` although it may load (e.g. it is a tiny test pack), or None."""
    _load_builtin()
    check = _NOT_FOR_AUTO.get(name)
    return check() if check else None


def embedder_infos() -> dict[str, EmbedderInfo]:
    _load_builtin()
    return {name: entry[0] for name, entry in _REGISTRY.items()}


def embedder_missing(name: str) -> str | None:
    _load_builtin()
    if name not in _REGISTRY:
        return f"unknown face embedder '{name}'"
    return _REGISTRY[name][2]()


#: auto picks the first available, in this order
AUTO_ORDER = ("arcface_antelopev2", "arcface_buffalo_l", "dlib")


def resolve_embedder_name(name: str | None = None) -> str:
    from django.conf import settings

    _load_builtin()
    name = name or settings.ALKEMY_FACE_EMBEDDER
    if name != "auto":
        if name not in _REGISTRY:
            raise EmbedderUnavailable(f"Unknown face embedder '{name}'; known: auto, {', '.join(_REGISTRY)}")
        return name
    for candidate in AUTO_ORDER:
        if embedder_missing(candidate) is None and embedder_not_for_auto(candidate) is None:
            return candidate
    raise EmbedderUnavailable(
        "No face embedder can load: "
        + "; ".join(f"{n}: {embedder_missing(n) or embedder_not_for_auto(n)}" for n in AUTO_ORDER)
    )


@lru_cache(maxsize=4)
def _instance(name: str) -> FaceEmbedder:
    info, factory, missing = _REGISTRY[name]
    problem = missing()
    if problem:
        raise EmbedderUnavailable(f"Face embedder '{name}' cannot load: {problem}")
    return factory()


def get_embedder(name: str | None = None) -> FaceEmbedder:
    """The configured (or named) embedder, loaded once per process."""
    return _instance(resolve_embedder_name(name))


def _load_builtin() -> None:
    # imported here, not at the top: they import this module; importing one of them elsewhere first
    # must not hide the other
    from characters.faces import dlib_backend, insightface_backend  # noqa: F401  (they register themselves)
