"""A tiny insightface antelopev2 pack: the production face path (`arcface_antelopev2`) under test.

`build_test_models` writes `insightface/models/antelopev2/` with the released file names, in the
real file format, small and fixed rather than trained:

- `scrfd_10g_bnkps.onnx`: an SCRFD-layout detector. Input `input.1` (1, 3, 640, 640) as insightface's
  `SCRFD` feeds it; 9 outputs in SCRFD's order (scores, box distances, keypoint distances for
  strides 8, 16 and 32, two anchors per cell, unbatched: (N, 1), (N, 4), (N, 10)), which is how
  `SCRFD` knows it has keypoints. Strides 8 and 16 score nothing. Every stride-32 anchor scores 0.9
  and encodes the same absolute face, so SCRFD's NMS keeps exactly one: **the face of a centred
  portrait**, computed from the photo's extent in the detector canvas (SCRFD pastes the resized
  photo top-left on black; columns and rows with a non-black pixel are the photo): centre at
  (0.5 W, 0.45 H), side 0.5 min(W, H), the five keypoints where ArcFace's 112-px alignment template
  puts them in that square. Any photo gets that one face, scaled to its size.
- `glintr100.onnx`: an ArcFace-layout recogniser, (N, 3, 112, 112) → (N, 512), normalised by
  insightface as the released file is ((x - 127.5) / 127.5): 8×8 average pooling, the pooled
  pixels centred per face, times a fixed random 588×512 matrix. Not a face recogniser, but a
  deterministic function of the aligned face with a raw length of the order of real ArcFace's
  (≈ 20), so the raw-norm path is exercised.

`alkemy_test_pack.json` beside them marks the pack as a test pack: `ALKEMY_FACE_EMBEDDER=auto` never
picks it, `ALKEMY_FACE_EMBEDDER=arcface_antelopev2` loads it (see `characters/faces/insightface_backend.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: as insightface's SCRFD feeds the released detector
DETECTOR_SIZE = 640
STRIDES = (8, 16, 32)
ANCHORS_PER_CELL = 2
#: ArcFace's 112-px alignment template (insightface `face_align.arcface_dst`)
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
FACE_CENTRE = (0.5, 0.45)  # of the photo's width and height
FACE_SIDE = 0.5  # of the photo's shorter side
FACE_SCORE = 0.9
EMBEDDING_DIMS = 512
POOL = 8  # 112 / 8 = 14 cells per side, 3 * 14 * 14 = 588 inputs
#: ≈ 20 raw length for a typical face
PROJECTION_STD = 0.065


def anchor_centres(stride: int) -> np.ndarray:
    """SCRFD's anchor centres for `stride` on the detector canvas, (N, 2) x, y, in its order."""
    cells = DETECTOR_SIZE // stride
    centres = np.stack(np.mgrid[:cells, :cells][::-1], axis=-1).astype(np.float32)
    centres = (centres * stride).reshape(-1, 2)
    return np.stack([centres] * ANCHORS_PER_CELL, axis=1).reshape(-1, 2)


def portrait_face(width: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """The face the tiny detector finds in a `width` × `height` photo: (box x1 y1 x2 y2, keypoints (5, 2))."""
    side = FACE_SIDE * min(width, height)
    cx, cy = FACE_CENTRE[0] * width, FACE_CENTRE[1] * height
    box = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dtype=np.float32)
    keypoints = np.array([cx, cy], dtype=np.float32) + (ARCFACE_TEMPLATE - 56.0) / 112.0 * side
    return box, keypoints


def write_antelopev2_pack(models_dir: Path) -> Path:
    """Write the tiny pack into `models_dir/insightface/models/antelopev2/`; returns that folder."""
    import onnx

    from characters.faces.insightface_backend import PACKS, TEST_PACK_MARKER, pack_dir_in

    pack, detector_file, recogniser_file = PACKS["arcface_antelopev2"]
    directory = pack_dir_in(Path(models_dir), pack)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(detector_model(), directory / detector_file)
    onnx.save(recogniser_model(), directory / recogniser_file)
    (directory / TEST_PACK_MARKER).write_text(
        json.dumps({"test_pack": True, "built_by": "manage.py build_test_models", "see": __name__}) + "\n"
    )
    return directory


def _model(graph, opset: int = 17):
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="alkemy-tiny")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def detector_model():
    """The SCRFD-layout detector described in the module docstring."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"tiny_{output}", **attrs))
        return output

    # The photo's extent on the canvas: padding is black, (0 - 127.5) / 128 after SCRFD's normalisation.
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    extent = {}
    for axis_name, reduce_axes in (("width", [1, 2]), ("height", [1, 3])):
        peak = node("ReduceMax", ["input.1"], f"{axis_name}_peak", axes=reduce_axes, keepdims=0)  # (1, 640)
        filled = node("Greater", [peak, const(f"{axis_name}_black", -0.99)], f"{axis_name}_filled")
        as_float = node("Cast", [filled], f"{axis_name}_filled_f", to=TensorProto.FLOAT)
        extent[axis_name] = node("ReduceSum", [as_float, "axis1"], axis_name, keepdims=0)
    width, height = extent["width"], extent["height"]  # (1,)
    side = node("Mul", [node("Min", [width, height], "shorter"), const("side_frac", FACE_SIDE)], "side")
    cx = node("Mul", [width, const("cx_frac", FACE_CENTRE[0])], "cx")
    cy = node("Mul", [height, const("cy_frac", FACE_CENTRE[1])], "cy")
    half = node("Mul", [side, const("half", 0.5)], "half_side")

    outputs: dict[str, list[str]] = {"score": [], "bbox": [], "kps": []}
    for stride in STRIDES[:-1]:  # the finer strides find nothing
        for kind, columns in (("score", 1), ("bbox", 4), ("kps", 10)):
            zeros = const(f"{kind}{stride}_c", np.zeros((len(anchor_centres(stride)), columns)))
            outputs[kind].append(node("Identity", [zeros], f"{kind}_{stride}"))

    # Stride 32: every anchor encodes the same face as distances from its own centre, in stride units.
    stride = STRIDES[-1]
    centres = anchor_centres(stride)
    ax, ay = const("anchor_x", centres[:, :1]), const("anchor_y", centres[:, 1:])
    inv = const("inv_stride", 1.0 / stride)

    def distance(a: str, b: str, name: str) -> str:  # (a - b) / stride, broadcast to (N, 1)
        return node("Mul", [node("Sub", [a, b], f"{name}_d"), inv], name)

    x1, y1 = node("Sub", [cx, half], "x1"), node("Sub", [cy, half], "y1")
    x2, y2 = node("Add", [cx, half], "x2"), node("Add", [cy, half], "y2")
    box_columns = [distance(ax, x1, "left"), distance(ay, y1, "top"), distance(x2, ax, "right"),
                   distance(y2, ay, "bottom")]  # fmt: skip
    outputs["bbox"].append(node("Concat", box_columns, f"bbox_{stride}", axis=1))
    kps_columns = []
    for k, (tx, ty) in enumerate((ARCFACE_TEMPLATE - 56.0) / 112.0):
        kx = node("Add", [cx, node("Mul", [side, const(f"kx{k}_frac", tx)], f"kx{k}_off")], f"kx{k}")
        ky = node("Add", [cy, node("Mul", [side, const(f"ky{k}_frac", ty)], f"ky{k}_off")], f"ky{k}")
        kps_columns += [distance(kx, ax, f"kps{k}_x"), distance(ky, ay, f"kps{k}_y")]
    outputs["kps"].append(node("Concat", kps_columns, f"kps_{stride}", axis=1))
    scores = const(f"score{stride}_c", np.full((len(centres), 1), FACE_SCORE))
    outputs["score"].append(node("Identity", [scores], f"score_{stride}"))

    graph_outputs = []
    for kind, width_of in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride, name in zip(STRIDES, outputs[kind], strict=True):
            graph_outputs.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, [len(anchor_centres(stride)), width_of])
            )
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DETECTOR_SIZE, DETECTOR_SIZE])],
        graph_outputs,
        inits,
    )
    return _model(graph)


def recogniser_model(seed: int = 20):
    """The ArcFace-layout recogniser described in the module docstring."""
    from onnx import TensorProto, helper, numpy_helper

    cells = 112 // POOL
    projection = np.random.default_rng(seed).normal(0, PROJECTION_STD, (3 * cells * cells, EMBEDDING_DIMS))
    # node names must not start with Sub/Mul: insightface would take the file for an mxnet export that
    # normalises its own input (it reads the first node names) and skip (x - 127.5) / 127.5
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], name="pool", kernel_shape=[POOL, POOL],
                         strides=[POOL, POOL]),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("ReduceMean", ["flat"], ["flat_mean"], name="face_mean", axes=[1], keepdims=1),
        helper.make_node("Sub", ["flat", "flat_mean"], ["centred"], name="centre"),
        helper.make_node("MatMul", ["centred", "projection"], ["fc1"], name="project"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["None", EMBEDDING_DIMS])],
        [numpy_helper.from_array(projection.astype(np.float32), "projection")],
    )
    return _model(graph)
