"""insightface: SCRFD detection with 5 keypoints and a 512-d ArcFace embedding.

Model files live in `$ALKEMY_MODELS_DIR/insightface/models/<pack>/` exactly as the public packs
unzip (the layout PuLID and InstantID expect too):

- antelopev2: `scrfd_10g_bnkps.onnx` (detector), `glintr100.onnx` (ArcFace R100, Glint360K)
- buffalo_l:  `det_10g.onnx` (detector), `w600k_r50.onnx` (ArcFace R50, WebFace600K)

The two packs embed into different spaces, so they are separate embedders with separate
indexes. Nothing is ever downloaded; a missing file makes `auto` fall back to dlib.

Like PuLID and InstantID, which embed the ID photo after shrinking it, a photo is analysed at
PuLID's ID-image size (`EMBED_LONG_SIDE`, Lanczos, never enlarged; `images.shrink_long_side`);
boxes and keypoints are mapped back to the photo's own pixels. InstantID's demo resizes to a
1280-px long side instead; one stored embedding serves both methods, so it follows the default
method (PuLID). Each embedding's raw length (`DetectedFace.raw_norm`) is kept: both pipelines
feed insightface's raw `embedding`, not the unit vector the registry stores and searches.

A pack folder holding `TEST_PACK_MARKER` is a tiny test pack (`generation/tiny/antelopev2.py`):
it loads when named in `ALKEMY_FACE_EMBEDDER`, and `auto` never picks it.

Thresholds are the commonly used ArcFace operating points (same person above ~0.4 cosine,
unrelated people near 0); they could not be re-measured here because no weights can be
downloaded on our machines.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from characters.faces import DetectedFace, EmbedderInfo, FaceEmbedder, register
from characters.faces.images import shrink_long_side

DETECT_SIZE = (640, 640)
#: PuLID's ID image (`resize_numpy_image_long(id_image, 1024)`) before insightface sees it
EMBED_LONG_SIDE = 1024
#: beside the ONNX files of a tiny test pack: `auto` passes such a pack by
TEST_PACK_MARKER = "alkemy_test_pack.json"

PACKS = {
    "arcface_antelopev2": ("antelopev2", "scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "arcface_buffalo_l": ("buffalo_l", "det_10g.onnx", "w600k_r50.onnx"),
}


def pack_dir(pack: str) -> Path:
    from django.conf import settings

    return pack_dir_in(Path(settings.ALKEMY_MODELS_DIR), pack)


def pack_dir_in(models_dir: Path, pack: str) -> Path:
    """Where insightface packs unzip (and PuLID and InstantID look): `<models>/insightface/models/<pack>`."""
    return models_dir / "insightface" / "models" / pack


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

        small, (scale_x, scale_y) = shrink_long_side(image, EMBED_LONG_SIDE)
        height, width = small.shape[:2]
        if min(height, width) * DETECT_SIZE[0] < max(height, width):
            return []  # SCRFD's resize to DETECT_SIZE would leave the short side under one pixel (cv2 raises)
        bgr = np.ascontiguousarray(small[:, :, ::-1])
        with self._lock:
            boxes, keypoints = self._detector.detect(bgr, input_size=DETECT_SIZE, max_num=0)
            faces = []
            for box, kps in zip(boxes, keypoints, strict=True):
                aligned = face_align.norm_crop(bgr, landmark=kps, image_size=self._recogniser.input_size[0])
                vector = np.asarray(self._recogniser.get_feat(aligned), dtype=np.float32).ravel()
                raw_norm = float(np.linalg.norm(vector))
                # back to the photo's pixels: box edges scale, keypoints are pixel centres (cv2.resize's mapping)
                x1, y1, x2, y2 = (float(v) for v in box[:4])
                points = (np.asarray(kps, dtype=np.float64) + 0.5) / (scale_x, scale_y) - 0.5
                faces.append(
                    DetectedFace(
                        box=(x1 / scale_x, y1 / scale_y, x2 / scale_x, y2 / scale_y),
                        score=float(box[4]),
                        keypoints=points.astype(np.float32),
                        embedding=vector / raw_norm,
                        raw_norm=raw_norm,
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

    def not_for_auto() -> str | None:
        marker = pack_dir(pack) / TEST_PACK_MARKER
        return f"{marker.parent} is a tiny test pack" if marker.is_file() else None

    register(info, lambda: InsightFaceEmbedder(info, pack, detector_file, recogniser_file), missing, not_for_auto)


for _name, (_pack, _detector, _recogniser) in PACKS.items():
    _register(_name, _pack, _detector, _recogniser)
