"""insightface: SCRFD detection with 5 keypoints and a 512-d ArcFace embedding.

Model files live in `$ALKEMY_MODELS_DIR/insightface/models/<pack>/` exactly as the public packs
unzip (the layout PuLID and InstantID expect too):

- antelopev2: `scrfd_10g_bnkps.onnx` (detector), `glintr100.onnx` (ArcFace R100, Glint360K)
- buffalo_l:  `det_10g.onnx` (detector), `w600k_r50.onnx` (ArcFace R50, WebFace600K)

The two packs embed into different spaces, so they are separate embedders with separate
indexes. Nothing is ever downloaded; a missing file makes `auto` fall back to dlib.

Thresholds are the commonly used ArcFace operating points (same person above ~0.4 cosine,
unrelated people near 0); they could not be re-measured here because no weights can be
downloaded on our machines.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from characters.faces import DetectedFace, EmbedderInfo, FaceEmbedder, register

DETECT_SIZE = (640, 640)

PACKS = {
    "arcface_antelopev2": ("antelopev2", "scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "arcface_buffalo_l": ("buffalo_l", "det_10g.onnx", "w600k_r50.onnx"),
}


def pack_dir(pack: str) -> Path:
    from django.conf import settings

    return Path(settings.ALKEMY_MODELS_DIR) / "insightface" / "models" / pack


class InsightFaceEmbedder(FaceEmbedder):
    def __init__(self, info: EmbedderInfo, pack: str, detector_file: str, recogniser_file: str) -> None:
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX
        from insightface.model_zoo.scrfd import SCRFD

        directory = pack_dir(pack)
        self.info = info
        self._detector = SCRFD(model_file=str(directory / detector_file))
        self._detector.prepare(ctx_id=-1 if not _cuda() else 0, input_size=DETECT_SIZE, det_thresh=0.5)
        self._recogniser = ArcFaceONNX(model_file=str(directory / recogniser_file))
        self._recogniser.prepare(ctx_id=-1 if not _cuda() else 0)
        self._lock = threading.Lock()

    def analyze(self, image: np.ndarray) -> list[DetectedFace]:
        from insightface.utils import face_align

        height, width = image.shape[:2]
        if min(height, width) * DETECT_SIZE[0] < max(height, width):
            return []  # SCRFD's resize to DETECT_SIZE would leave the short side under one pixel (cv2 raises)
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        with self._lock:
            boxes, keypoints = self._detector.detect(bgr, input_size=DETECT_SIZE, max_num=0)
            faces = []
            for box, kps in zip(boxes, keypoints, strict=True):
                aligned = face_align.norm_crop(bgr, landmark=kps, image_size=self._recogniser.input_size[0])
                vector = np.asarray(self._recogniser.get_feat(aligned), dtype=np.float32).ravel()
                faces.append(
                    DetectedFace(
                        box=tuple(float(v) for v in box[:4]),
                        score=float(box[4]),
                        keypoints=np.asarray(kps, dtype=np.float32),
                        embedding=vector / np.linalg.norm(vector),
                    )
                )
        faces.sort(key=lambda face: face.area, reverse=True)
        return faces


def _cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _register(name: str, pack: str, detector_file: str, recogniser_file: str) -> None:
    info = EmbedderInfo(
        name=name,
        dims=512,
        match_threshold=0.40,
        duplicate_threshold=0.55,
        description=f"insightface {pack}: SCRFD + ArcFace ({recogniser_file}, 512-d)",
    )

    def missing() -> str | None:
        import importlib.util

        if importlib.util.find_spec("insightface") is None or importlib.util.find_spec("onnxruntime") is None:
            return "the insightface and onnxruntime packages (requirements/gpu.txt)"
        for filename in (detector_file, recogniser_file):
            path = pack_dir(pack) / filename
            if not path.is_file():
                return str(path)
        return None

    register(info, lambda: InsightFaceEmbedder(info, pack, detector_file, recogniser_file), missing)


for _name, (_pack, _detector, _recogniser) in PACKS.items():
    _register(_name, _pack, _detector, _recogniser)
