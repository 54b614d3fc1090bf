"""Seeded generation shared by the synthetic builders: split assignment by content hash, deduplication.

A problem's split is decided by a hash of its canonical key (10% of the key space is "test"), not by the seed or
the order of generation, so test problems never appear in any training set of the same generator, whatever the
seed or sizes; a problem is emitted at most once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from r1jax.errors import DataError

TEST_PERMILLE = 100  # share of the key space that belongs to the test split


def split_of(kind: str, key: Hashable) -> str:
    digest = hashlib.sha256(f"{kind}:{key!r}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "little") % 1000 < TEST_PERMILLE else "train"


def fill_splits(
    kind: str,
    seed: int,
    sizes: dict[str, int],
    draw: Callable[[np.random.Generator], Any],
    max_attempts: int | None = None,
) -> dict[str, list]:
    """Call ``draw(rng) -> (key, example) | None`` until every split has its size; examples keep draw order."""
    rng = np.random.default_rng([seed, int.from_bytes(kind.encode(), "little")])
    out: dict[str, list] = {s: [] for s in sizes}
    seen: set = set()
    budget = max_attempts if max_attempts is not None else 50 * sum(sizes.values()) + 10_000
    for _ in range(budget):
        if all(len(out[s]) >= n for s, n in sizes.items()):
            return out
        drawn = draw(rng)
        if drawn is None:
            continue
        key, example = drawn
        split = split_of(kind, key)
        if key in seen or split not in out or len(out[split]) >= sizes[split]:
            continue
        seen.add(key)
        out[split].append(example)
    if all(len(out[s]) >= n for s, n in sizes.items()):
        return out
    have = ", ".join(f"{s} {len(v)}/{sizes[s]}" for s, v in out.items())
    raise DataError(f"{kind}: could not generate enough distinct problems ({have}); widen the ranges or ask for fewer")


def config_name(seed: int, cfg: Any) -> str:
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in type(cfg).OPTIONS}
    digest = hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:8]
    return f"seed{seed}-{digest}"


def check_options(kind: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"{kind}: unknown options {unknown} (have {', '.join(allowed)})")
