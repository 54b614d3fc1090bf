"""Safetensors reading and writing, validated before anything is allocated, one tensor region at a time.

A file is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}`` and the raw
data. Reading checks the header length against the file size, every tensor's byte range against the data section and
its shape/dtype against its byte count, so a truncated or corrupt file is a clear ``CheckpointError``, never a giant
allocation or a garbage array. A read copies one tensor (or a range of its rows) into a fresh array with ``readinto``:
no memory map stays behind, so the process holds only the tensors it keeps. Writing streams too: the header is known
up front and the data arrives piece by piece (``StreamWriter``, ``write_sharded``).
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
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
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
INDEX = "model.safetensors.index.json"
_CHUNK = 1 << 30  # bytes per read/write call (Linux moves at most ~2 GiB per call)


class SafetensorsFile:
    """A validated safetensors file: ``names()``, ``dtype(name)``, ``shape(name)``, ``read(name, rows)``."""

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
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}") from None
            if not 0 <= begin <= end <= data_len:
                raise CheckpointError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
            if math.prod(shape) * dtype.itemsize != end - begin or any(s < 0 for s in shape):
                raise CheckpointError(f"{path}: tensor {name!r} shape {shape} does not match its byte size")
            self._entries[name] = (dtype, shape, begin)

    def names(self) -> list[str]:
        return list(self._entries)

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor ``name`` (or its rows ``[start, stop)`` along the first axis) as a fresh array."""
        dtype, shape, begin = self._entries[name]
        start, stop = rows if rows is not None else (0, shape[0] if shape else 1)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        out = np.empty((stop - start, *shape[1:]) if shape else (), dtype)
        _read_into(self.path, self._base + begin + start * row_bytes, out)
        return out

    def get(self, name: str) -> np.ndarray:
        return self.read(name)


def _read_into(path: str, offset: int, out: np.ndarray) -> None:
    buf = memoryview(out.reshape(-1).view(np.uint8))
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            done = 0
            while done < len(buf):
                n = f.readinto(buf[done : done + _CHUNK])
                if not n:
                    raise CheckpointError(f"{path}: file ends inside a tensor (truncated while reading?)")
                done += n
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


class StreamWriter:
    """A safetensors file whose layout ``[(name, dtype, shape)]`` is known up front; ``write`` appends the data of
    the tensors in layout order, in pieces of any size (each piece within one tensor, of that tensor's dtype)."""

    def __init__(self, path: str, layout: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict | None = None):
        self.path = path
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._todo: list[tuple[str, np.dtype, int]] = []
        for name, dtype, shape in layout:
            nbytes = _nbytes(dtype, shape)
            header[name] = {
                "dtype": NAMES[np.dtype(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._todo.append((name, np.dtype(dtype), nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._left = self._todo[0][2] if self._todo else 0
        self._pos = 0
        self._fd = self._guard(lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        self._put(memoryview(struct.pack("<Q", len(blob)) + blob))

    def _guard(self, fn):
        try:
            return fn()
        except OSError as e:
            reason = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "write failed"
            raise CheckpointError(f"{self.path}: {reason} ({e.strerror or e})") from None

    def write(self, a: np.ndarray) -> None:
        while self._pos < len(self._todo) and self._left == 0:
            self._pos += 1
            self._left = self._todo[self._pos][2] if self._pos < len(self._todo) else 0
        if self._pos >= len(self._todo):
            raise ValueError(f"{self.path}: more data than the layout holds")
        name, dtype, _ = self._todo[self._pos]
        if a.dtype != dtype or a.nbytes > self._left:
            raise ValueError(f"{self.path}: piece {a.dtype}{list(a.shape)} does not fit tensor {name!r} ({dtype})")
        self._put(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
        self._left -= a.nbytes

    def _put(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += self._guard(lambda d=done: os.write(self._fd, data[d : d + _CHUNK]))

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close the file; on a clean exit, also check that the whole layout was written."""
        fd, self._fd = self._fd, None
        if fd is not None:
            self._guard(lambda: os.close(fd))
        left = self._left + sum(t[2] for t in self._todo[self._pos + 1 :])
        if exc_type is None and left:
            raise ValueError(f"{self.path}: {left} bytes of the layout were never written")


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file (C order, little endian)."""
    with StreamWriter(path, [(k, a.dtype, a.shape) for k, a in tensors.items()], metadata) as w:
        for a in tensors.values():
            w.write(a)


def shard_names(layout: list[tuple[str, np.dtype, tuple[int, ...]]], shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of tensor names, each at most ``shard_bytes`` unless one tensor alone is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, dtype, shape in layout:
        nbytes = _nbytes(dtype, shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_sharded(
    directory: str,
    layout: list[tuple[str, np.dtype, tuple[int, ...]]],
    pieces: Iterable[np.ndarray],
    *,
    shard_bytes: int,
    metadata: dict | None = None,
    progress: str | None = None,
) -> None:
    """Stream ``pieces`` (the tensors' data in layout order) into ``model[-i-of-n].safetensors`` files of at most
    ``shard_bytes`` each plus ``model.safetensors.index.json``; ``progress`` names a tqdm bar (tensors, bytes/s)."""
    groups = shard_names(layout, shard_bytes)
    by_name = {name: (dtype, shape) for name, dtype, shape in layout}
    n = len(groups)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(_nbytes(d, s) for _, d, s in layout)
    it = iter(pieces)
    with _bar(progress, total) as bar:
        done = 0
        for fname, names in zip(files, groups, strict=True):
            with StreamWriter(os.path.join(directory, fname), [(k, *by_name[k]) for k in names], metadata) as w:
                for k in names:
                    need = _nbytes(*by_name[k])
                    while need > 0:
                        a = next(it)
                        w.write(a)
                        need -= a.nbytes
                        bar.update(a.nbytes)
                    done += 1
                    bar.set_postfix_str(f"{done}/{len(layout)} tensors", refresh=False)
    if next(it, None) is not None:
        raise ValueError(f"{directory}: more data than the layout holds")
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: f for f, g in zip(files, groups, strict=True) for k in g},
    }
    path = os.path.join(directory, INDEX)
    try:
        Path(path).write_text(json.dumps(index, indent=2))
    except OSError as e:
        raise CheckpointError(f"{path}: write failed ({e.strerror})") from None


def _nbytes(dtype, shape) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _bar(desc: str | None, total: int):
    """A tqdm bar over bytes (shown on a terminal only); a silent stand-in without ``desc``."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        dynamic_ncols=True,
        disable=None if desc else True,
    )


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
