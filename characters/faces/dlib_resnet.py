"""dlib's face recogniser (ResNet, 150x150 chip → 128-d) run in numpy instead of dlib.

Why: the `dlib-bin` wheel is built without BLAS, so dlib's own convolutions take ~0.1 s a face on one
core, most of an enrolment. The same network as matrix products (im2col + numpy's OpenBLAS sgemm) takes
a fraction of that. The weights are read from the very file dlib loads
(`dlib_face_recognition_resnet_model_v1.dat`): dlib serialises each layer as its name string followed
by its settings as dlib integers and its parameters as raw little-endian float32 tensors, input layer
first. The layout is the one of dlib's `dnn_face_recognition_ex.cpp`:

    input 150x150 RGB, (x - mean) / 256 → con 7x7/2 32 → affine → relu → max_pool 3x3/2
    → 14 residual blocks: [con 3x3 → affine → relu → con 3x3 → affine] + shortcut → relu; the first
      block of each wider level strides 2 and its shortcut is a 2x2/2 average pool of its input
      (32 → 64 → 128 → 256 → 256 channels)
    → global average → fc 128 (no bias)

`add_prev` adds tensors of different sizes as dlib does: the result has the larger of each dimension,
missing elements count as zero. `tests/test_enrolment.py` checks the descriptors equal dlib's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

#: dlib's `input_rgb_image_sized` defaults: per-channel means subtracted, then divided by 256
INPUT_MEAN = np.array([122.782, 117.001, 104.298], dtype=np.float32)
CHIP_SIZE = 150

_LAYER = re.compile(rb"\x01.(con_4|affine_|relu_110|max_pool_2|avg_pool_2|add_prev_111|fc_2)", re.S)


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def int(self) -> int:
        control = self.data[self.pos]
        size = control & 0x0F
        value = int.from_bytes(self.data[self.pos + 1 : self.pos + 1 + size], "little")
        self.pos += 1 + size
        return -value if control & 0x80 else value

    def string(self) -> str:
        length = self.int()
        text = self.data[self.pos : self.pos + length].decode("latin-1")
        self.pos += length
        return text

    def tensor(self) -> np.ndarray:
        if self.int() != 2:
            raise ValueError("unexpected dlib tensor version")
        shape = [self.int() for _ in range(4)]
        count = int(np.prod(shape))
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos)
        self.pos += 4 * count
        return values.astype(np.float32)


@dataclass
class _Conv:
    weights: np.ndarray  # (k*kh*kw, filters): columns of the im2col product, k-major like dlib's filters
    bias: np.ndarray
    size: int
    stride: int
    padding: int


def _read_layers(path: Path) -> list[tuple]:
    data = Path(path).read_bytes()
    layers = []
    for match in _LAYER.finditer(data):
        reader = _Reader(data, match.start())
        kind = reader.string()
        if kind == "con_4":
            params = reader.tensor()
            filters, rows, cols = reader.int(), reader.int(), reader.int()
            stride_y, stride_x, pad_y, pad_x = reader.int(), reader.int(), reader.int(), reader.int()
            if rows != cols or stride_y != stride_x or pad_y != pad_x:
                raise ValueError("unexpected convolution shape")
            channels = (params.size - filters) // (filters * rows * cols)
            weights = params[: filters * channels * rows * cols].reshape(filters, channels * rows * cols)
            layers.append(("con", _Conv(np.ascontiguousarray(weights.T), params[-filters:].copy(), rows, stride_y,
                                        pad_y)))  # fmt: skip
        elif kind == "affine_":
            params = reader.tensor()
            half = params.size // 2
            layers.append(("affine", params[:half].copy(), params[half:].copy()))
        elif kind in ("max_pool_2", "avg_pool_2"):
            rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.int() for _ in range(6))
            layers.append((kind[:-2], rows, stride_y, pad_y))
        elif kind == "fc_2":
            outputs, inputs = reader.int(), reader.int()
            params = reader.tensor()
            layers.append(("fc", params[: inputs * outputs].reshape(inputs, outputs).copy()))
        else:
            layers.append((kind.rstrip("_0123456789"),))
    return layers


def _conv(x: np.ndarray, conv: _Conv) -> np.ndarray:
    """x: (H, W, C) → (H', W', filters), dlib's cross-correlation with zero padding."""
    if conv.padding:
        p = conv.padding
        x = np.pad(x, ((p, p), (p, p), (0, 0)))
    windows = sliding_window_view(x, (conv.size, conv.size), axis=(0, 1))[:: conv.stride, :: conv.stride]
    rows, cols = windows.shape[:2]
    columns = windows.reshape(rows * cols, -1)  # (positions, C*kh*kw): C-major, as dlib orders its filters
    return (columns @ conv.weights + conv.bias).reshape(rows, cols, -1)


def _pool(x: np.ndarray, size: int, stride: int, padding: int, reduce) -> np.ndarray:
    if padding:
        raise ValueError("padded pooling is not used by this network")
    windows = sliding_window_view(x, (size, size), axis=(0, 1))[::stride, ::stride]
    return reduce(windows, axis=(3, 4))


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """dlib's `add_prev`: the larger of each dimension, missing elements zero."""
    if a.shape == b.shape:
        return a + b
    out = np.zeros(tuple(max(s, t) for s, t in zip(a.shape, b.shape, strict=True)), dtype=np.float32)
    out[: a.shape[0], : a.shape[1], : a.shape[2]] += a
    out[: b.shape[0], : b.shape[1], : b.shape[2]] += b
    return out


class FaceRecogniser:
    """`descriptor(chip)`: the 128-d descriptor dlib's `compute_face_descriptor` gives for a 150x150 RGB
    chip (as `dlib.get_face_chip(image, shape, 150, 0.25)` cuts it)."""

    def __init__(self, model_file: Path) -> None:
        self.layers = _read_layers(model_file)
        kinds = [layer[0] for layer in self.layers]
        if kinds.count("con") != 29 or kinds.count("add_prev") != 14 or kinds[-1] != "fc":
            raise ValueError(f"{model_file} is not the dlib ResNet face recogniser this module knows")

    def descriptor(self, chip: np.ndarray) -> np.ndarray:
        x = (np.asarray(chip, dtype=np.float32) - INPUT_MEAN) / 256.0
        block_input = None  # the input of the current residual block (dlib's tag1)
        shortcut = None  # its pooled copy in a down block (skip1 → avg_pool)
        for index, layer in enumerate(self.layers):
            kind = layer[0]
            if kind == "con":
                if block_input is None and index > 0 and self.layers[index - 1][0] in ("max_pool", "relu"):
                    block_input = x  # the first con of a block (the stem's con has no block)
                x = _conv(x, layer[1])
            elif kind == "affine":
                x = x * layer[1] + layer[2]
            elif kind == "relu":
                x = np.maximum(x, 0)
            elif kind == "max_pool":
                x = _pool(x, layer[1], layer[2], layer[3], np.max)
            elif kind == "avg_pool" and layer[1] == 0:  # avg_pool_everything (a 0x0 window)
                x = x.mean(axis=(0, 1), keepdims=True)
            elif kind == "avg_pool":  # a down block: x is the block's output (tag2), pool its input
                shortcut = _pool(block_input, layer[1], layer[2], layer[3], np.mean)
            elif kind == "add_prev":
                x = _add(x, shortcut if shortcut is not None else block_input)
                block_input = shortcut = None
            elif kind == "fc":
                return x.mean(axis=(0, 1)) @ layer[1]
        raise ValueError("the network ended without its fc layer")


class OnnxFaceRecogniser(FaceRecogniser):
    """The same network, the same weights, run by onnxruntime on one thread (its convolution kernels are
    several times faster than numpy's im2col + sgemm on these shapes: bench/README.md, "Enrolment"). The
    ONNX graph is encoded here from the layers `FaceRecogniser` reads (`_OnnxGraph`): nothing is written
    or downloaded, and the `onnx` package (seconds to import) is not needed. Each `affine` is folded into
    the convolution before it (dlib's network always pairs them); `add_prev` pads the smaller operand with
    zeros at the end of each dimension, as dlib does. `tests/test_enrolment.py` checks the descriptors
    equal dlib's."""

    def __init__(self, model_file: Path) -> None:
        super().__init__(model_file)
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1  # one request, one core
        self._session = onnxruntime.InferenceSession(
            _OnnxGraph(self.layers).model(), options, providers=["CPUExecutionProvider"]
        )

    def descriptor(self, chip: np.ndarray) -> np.ndarray:
        x = (np.asarray(chip, dtype=np.float32) - INPUT_MEAN) / 256.0
        return self._session.run(None, {"chip": np.ascontiguousarray(x.transpose(2, 0, 1)[None])})[0][0]


# --- a minimal ONNX (protobuf) encoder: just the messages and fields this graph uses ----------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 fields: two's complement, as protobuf encodes negative numbers
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


_FLOAT, _INT64 = 1, 7  # TensorProto.DataType
_ATTRIBUTE_INTS = 7  # AttributeProto.AttributeType


def _tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims (1), data_type (2), name (8), raw_data (9, little-endian)."""
    data_type = {np.dtype("float32"): _FLOAT, np.dtype("int64"): _INT64}[array.dtype]
    dims = b"".join(_int(1, d) for d in array.shape)
    return (
        dims
        + _int(2, data_type)
        + _bytes(8, name)
        + _bytes(9, np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())
    )


def _value_info(name: str, shape: tuple[int, ...]) -> bytes:
    """ValueInfoProto: name (1), type (2): TypeProto.tensor_type (1) {elem_type (1), shape (2) {dim (1)
    {dim_value (1)}}}."""
    dims = b"".join(_bytes(1, _int(1, d)) for d in shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, _int(1, _FLOAT) + _bytes(2, dims)))


class _OnnxGraph:
    """Encodes dlib's ResNet (the layers `_read_layers` returns) as an ONNX model for onnxruntime, tracking
    each tensor's (channels, height, width) to pad `add_prev`'s operands."""

    def __init__(self, layers: list[tuple]) -> None:
        self.layers = layers
        self.nodes: list[bytes] = []
        self.weights: list[bytes] = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def constant(self, array: np.ndarray) -> str:
        name = self._name("w")
        self.weights.append(_tensor(name, array))
        return name

    def node(self, op: str, inputs: list[str], **ints: list[int]) -> str:
        """NodeProto: input (1), output (2), op_type (4), attribute (5) {name (1), ints (8), type (20)}."""
        output = self._name("t")
        attributes = b"".join(
            _bytes(5, _bytes(1, key) + b"".join(_int(8, v) for v in values) + _int(20, _ATTRIBUTE_INTS))
            for key, values in ints.items()
        )
        self.nodes.append(b"".join(_bytes(1, i) for i in inputs) + _bytes(2, output) + _bytes(4, op) + attributes)
        return output

    def padded(self, name: str, shape: tuple, target: tuple) -> str:
        if shape == target:
            return name
        ends = [0, *(t - s for s, t in zip(shape, target, strict=True))]
        return self.node("Pad", [name, self.constant(np.array([0, 0, 0, 0, *ends], dtype=np.int64))])

    def model(self) -> bytes:
        layers, index = self.layers, 0
        current, shape = "chip", (3, CHIP_SIZE, CHIP_SIZE)  # (C, H, W)
        block_input = shortcut = None  # (name, shape), as in `FaceRecogniser.descriptor`
        while True:
            layer, kind = layers[index], layers[index][0]
            if kind == "con":
                if block_input is None and index > 0 and layers[index - 1][0] in ("max_pool", "relu"):
                    block_input = (current, shape)
                conv = layer[1]
                filters = conv.weights.shape[1]
                kernel = conv.weights.T.reshape(filters, -1, conv.size, conv.size)
                bias = conv.bias
                if layers[index + 1][0] == "affine":  # fold it in
                    scale, shift = layers[index + 1][1], layers[index + 1][2]
                    kernel, bias = kernel * scale[:, None, None, None], bias * scale + shift
                    index += 1
                p = conv.padding
                inputs = [current, self.constant(kernel.astype(np.float32)), self.constant(bias.astype(np.float32))]
                current = self.node("Conv", inputs, kernel_shape=[conv.size] * 2, strides=[conv.stride] * 2,
                                    pads=[p] * 4)  # fmt: skip
                shape = (filters, *((d + 2 * p - conv.size) // conv.stride + 1 for d in shape[1:]))
            elif kind == "affine":  # not after a convolution: not in this network
                raise ValueError("an affine layer without its convolution")
            elif kind == "relu":
                current = self.node("Relu", [current])
            elif kind == "max_pool":
                current = self.node("MaxPool", [current], kernel_shape=[layer[1]] * 2, strides=[layer[2]] * 2)
                shape = (shape[0], *((d - layer[1]) // layer[2] + 1 for d in shape[1:]))
            elif kind == "avg_pool" and layer[1] == 0:
                current, shape = self.node("GlobalAveragePool", [current]), (shape[0], 1, 1)
            elif kind == "avg_pool":
                name, (c, h, w) = block_input
                pooled = self.node("AveragePool", [name], kernel_shape=[layer[1]] * 2, strides=[layer[2]] * 2)
                shortcut = (pooled, (c, *((d - layer[1]) // layer[2] + 1 for d in (h, w))))
            elif kind == "add_prev":
                other_name, other_shape = shortcut if shortcut is not None else block_input
                target = tuple(max(a, b) for a, b in zip(shape, other_shape, strict=True))
                current = self.node(
                    "Add", [self.padded(current, shape, target), self.padded(other_name, other_shape, target)]
                )
                shape, block_input, shortcut = target, None, None
            elif kind == "fc":
                current = self.node("MatMul", [self.node("Flatten", [current]), self.constant(layer[1])])
                break
            index += 1
        graph = (
            b"".join(_bytes(1, n) for n in self.nodes)
            + _bytes(2, "dlib_face_recognition_resnet_v1")
            + b"".join(_bytes(5, w) for w in self.weights)
            + _bytes(11, _value_info("chip", (1, 3, CHIP_SIZE, CHIP_SIZE)))
            + _bytes(12, _value_info(current, (1, self.layers[-1][1].shape[1])))
        )
        # ModelProto: ir_version (1), graph (7), opset_import (8) {domain (1), version (2)}
        return _int(1, 8) + _bytes(7, graph) + _bytes(8, _bytes(1, "") + _int(2, 17))
