"""Read a safetensors file's header (and single small tensors) without any third-party parser.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON
(`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}`), then the raw
tensor data. Parsing it ourselves lets uploads be checked before anything trusts the bytes: a pickle, a zip
(torch.save) or a truncated file is refused from its first bytes, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

#: a real LoRA header is a few hundred KB at most; this bounds what we read before trusting the file
MAX_HEADER_BYTES = 64 * 1024 * 1024
#: LoRA weights are 2-D (linear) or 4-D (conv); torch refuses more than a few dozen dimensions anyway
MAX_DIMS = 8
#: elements of one tensor, zero-sized dimensions counted as 1: keeps torch's sizes and strides in int64
#: (a shape like [0, 10**20] holds no data, so its byte count alone cannot refuse it)
MAX_ELEMENTS = 2**40
_SURROGATE = re.compile("[\ud800-\udfff]")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class NotSafetensors(ValueError):
    """The bytes are not a well-formed safetensors file (the message says what they look like instead)."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data section (after the header)
    end: int


@dataclass
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # absolute offset of the data section
    source: bytes | memoryview | Path

    def read_tensor(self, name: str) -> torch.Tensor:
        """One tensor's values (used for the small `.alpha` scalars only; weights stay unread)."""
        entry = self.tensors[name]
        start, length = self.data_start + entry.begin, entry.end - entry.begin
        if isinstance(self.source, Path):
            with self.source.open("rb") as handle:
                handle.seek(start)
                raw = handle.read(length)
        else:
            raw = bytes(self.source[start : start + length])
        if not raw:
            return torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
        return torch.frombuffer(bytearray(raw), dtype=DTYPES[entry.dtype]).reshape(entry.shape).clone()

    def meta_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor as an empty tensor on the meta device: shapes and dtypes, no data read."""
        return {
            name: torch.empty(entry.shape, dtype=DTYPES[entry.dtype], device="meta")
            for name, entry in self.tensors.items()
        }


def describe_foreign_bytes(head: bytes) -> str:
    """A human guess at what a non-safetensors file is, from its first bytes."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (a .ckpt/.pt/.bin checkpoint)"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (a torch.save .pt/.ckpt checkpoint or an archive)"
    if head[:2] == b"\x1f\x8b":
        return "a gzip archive"
    if head[:1] in (b"{", b"["):
        return "a JSON document"
    return "not a safetensors file"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true/false are not sizes


def _short(value) -> str:
    """A value from the header for a message: never the repr of a hostile nested structure."""
    if isinstance(value, tuple) and all(_is_int(d) for d in value):
        text = str(list(value))
    elif isinstance(value, str):
        text = repr(value)
    else:
        return f"of type {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def read_header(source: bytes | memoryview | Path, size: int) -> SafetensorsHeader:
    """Parse and check the header of `source` (`size` bytes in all); raise NotSafetensors when malformed."""
    if isinstance(source, Path):
        with source.open("rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            raw = handle.read(length) if 2 <= length <= min(MAX_HEADER_BYTES, size - 8) else b""
    else:
        head = bytes(source[:8])
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        raw = bytes(source[8 : 8 + length]) if 2 <= length <= min(MAX_HEADER_BYTES, size - 8) else b""

    if len(head) < 8 or not raw:
        raise NotSafetensors(f"The file is {describe_foreign_bytes(head)}, not safetensors.")
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise NotSafetensors("The safetensors header is nested too deeply.") from None
    except ValueError:  # bad UTF-8, bad JSON, or an integer of thousands of digits
        raise NotSafetensors(f"The file is {describe_foreign_bytes(head)}, not safetensors.") from None
    if not isinstance(header, dict):
        raise NotSafetensors("The safetensors header is not a JSON object.")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NotSafetensors("The safetensors __metadata__ is not an object of strings.")
    # "\ud800" escapes decode to lone surrogates, which no UTF-8 response (or the safetensors library) can hold
    if any(_SURROGATE.search(text) for text in (*header, *metadata, *metadata.values())):
        raise NotSafetensors("The safetensors header holds a lone UTF-16 surrogate, which is not text.")
    data_size = size - 8 - length
    tensors: dict[str, TensorEntry] = {}
    for name, value in header.items():
        try:
            dtype, shape, (begin, end) = value["dtype"], tuple(value["shape"]), value["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise NotSafetensors(f"The safetensors entry {name!r} is malformed.") from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise NotSafetensors(f"Tensor {name!r} has an unsupported dtype {_short(dtype)}.")
        if not (
            isinstance(value["shape"], list)
            and len(shape) <= MAX_DIMS
            and all(_is_int(d) and d >= 0 for d in shape)
            and math.prod(max(d, 1) for d in shape) <= MAX_ELEMENTS
        ):
            raise NotSafetensors(f"Tensor {name!r} has an invalid shape {_short(shape)}.")
        if not (_is_int(begin) and _is_int(end) and 0 <= begin <= end <= data_size):
            raise NotSafetensors(f"Tensor {name!r} points outside the file (truncated upload?).")
        count = math.prod(shape)
        if (end - begin) != count * DTYPES[dtype].itemsize:
            raise NotSafetensors(f"Tensor {name!r} has {end - begin} bytes for shape {list(shape)} {dtype}.")
        tensors[name] = TensorEntry(dtype, shape, begin, end)
    return SafetensorsHeader(tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + length, source)
