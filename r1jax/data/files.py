"""Reading dataset files: JSONL and Parquet records checked field by field, with ``DataError`` naming the file and
line; content fingerprints of source files; where GSM8K lives by default.

The TFDS builders (``r1jax.data.builders``) and the loaders (``r1jax.data.datasets``) both read through these.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from r1jax.errors import DataError


def read_jsonl(
    path: str | os.PathLike, required: Sequence[str] = (), any_of: Sequence[str] = ()
) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line; ``DataError`` naming ``path:line`` for bytes that are not
    UTF-8, invalid JSON, a non-object line, a missing ``required`` field or none of ``any_of``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            check_fields(record, required, any_of, f"{path}:{lineno}")
            yield lineno, record


def read_parquet(
    path: str | os.PathLike, required: Sequence[str] = (), any_of: Sequence[str] = ()
) -> Iterator[tuple[int, dict]]:
    """``(row number from 1, record)`` for every row of a Parquet file (needs ``pyarrow``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for row, record in enumerate(rows, 1):
        check_fields(record, required, any_of, f"{path}:row {row}")
        yield row, record


def check_fields(record: Mapping[str, Any], required: Sequence[str], any_of: Sequence[str], where: str) -> None:
    missing = [k for k in required if record.get(k) is None]
    if missing:
        have = ", ".join(sorted(record)) or "none"
        raise DataError(f"{where}: missing field {', '.join(repr(k) for k in missing)} (fields: {have})")
    if any_of and not any(record.get(k) for k in any_of):
        have = ", ".join(sorted(record)) or "none"
        raise DataError(f"{where}: needs one of {' or '.join(repr(k) for k in any_of)} (fields: {have})")


def read_records(
    path: str | os.PathLike, required: Sequence[str] = (), any_of: Sequence[str] = ()
) -> Iterator[tuple[int, dict]]:
    """JSONL or Parquet by extension."""
    if str(path).endswith(".parquet"):
        return read_parquet(path, required, any_of)
    return read_jsonl(path, required, any_of)


def fingerprint(paths: Iterable[str | os.PathLike], *extra: object) -> str:
    """Short content hash of files (and any extra values): names a prepared copy so an edited source is rebuilt."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    for x in extra:
        h.update(repr(x).encode() + b"\0")
    return h.hexdigest()[:12]


def default_gsm8k_dir() -> Path:
    """``$R1JAX_GSM8K_DIR``, else ``shared/data/gsm8k`` beside the repository checkout."""
    env = os.environ.get("R1JAX_GSM8K_DIR")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data" / "gsm8k"
