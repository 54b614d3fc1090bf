"""Safetensors reading and writing with numpy memory maps, validated before anything is allocated.

A file is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}`` and the raw
data. Reading checks the header length against the file size, every tensor's byte range against the data section and
its shape/dtype against its byte count, so a truncated or corrupt file is a clear ``CheckpointError``, never a giant
allocation or a garbage array. Tensors are memory-mapped and read one at a time (streaming).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from r1jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """A validated, memory-mapped safetensors file: ``names()``, ``shape(name)``, ``get(name) -> np.ndarray``."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > min(MAX_HEADER, size - 8):
                    raise CheckpointError(f"{path}: corrupt safetensors header size {n} for a file of {size} bytes")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header")
        header.pop("__metadata__", None)
        self._base = 8 + n
        data_len = size - self._base
        self._entries = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}") from None
            if not 0 <= begin <= end <= data_len:
                raise CheckpointError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
            if int(np.prod(shape)) * dtype.itemsize != end - begin or any(s < 0 for s in shape):
                raise CheckpointError(f"{path}: tensor {name!r} shape {shape} does not match its byte size")
            self._entries[name] = (dtype, shape, begin)
        self._mmap = np.memmap(path, np.uint8, mode="r") if size > self._base else np.zeros(0, np.uint8)

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin = self._entries[name]
        count = int(np.prod(shape))
        start = self._base + begin
        return self._mmap[start : start + count * dtype.itemsize].view(dtype).reshape(shape)


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file (C order, little endian)."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())


def iter_checkpoint_files(directory: str) -> Iterator[tuple[str, list[str]]]:
    """(file, tensor names) for a HF directory: ``model.safetensors.index.json`` or every ``*.safetensors``."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index") from None
        root = os.path.realpath(directory)
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            full = os.path.realpath(os.path.join(directory, str(fname)))
            if os.path.dirname(full) != root:
                raise CheckpointError(f"{index}: entry {name!r} points outside the checkpoint directory ({fname})")
            by_file.setdefault(full, []).append(name)
        for full, names in by_file.items():
            if not os.path.exists(full):
                raise CheckpointError(f"{index}: shard {os.path.basename(full)} is missing")
            yield full, names
        return
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        pickles = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
        if pickles:
            raise CheckpointError(
                f"{directory}: only pickle weights ({pickles[0]}); r1jax never unpickles — convert them to "
                "safetensors with a trusted tool first"
            )
        raise CheckpointError(f"{directory}: no *.safetensors weights found")
    for fname in files:
        full = os.path.join(directory, fname)
        yield full, SafetensorsFile(full).names()
