"""Composite reward: weighted sum of registered reward functions, each (function, completion) pair evaluated in the
worker pool with a timeout; failures score ``cfg.floor``."""

from __future__ import annotations

import atexit
import collections
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from r1jax.config import RewardConfig
from r1jax.errors import MetadataError
from r1jax.rewards import code, registry
from r1jax.rewards.outcome import as_scored
from r1jax.rewards.pool import CRASH, ERROR, OK, TIMEOUT, RewardPool


def sanitize(text: Any) -> str:
    """A plain ``str`` that encodes as UTF-8 (lone surrogates become '?')."""
    text = text if isinstance(text, str) else str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


class Scorer:
    """Scores completions with ``cfg``; owns a ``RewardPool`` unless one is passed (or ``cfg.num_workers == 0``)."""

    def __init__(self, cfg: RewardConfig, pool: RewardPool | None = None):
        self.cfg = cfg
        self.specs = [registry.get(name) for name in cfg.functions]
        self._own_pool = pool is None and cfg.num_workers > 0
        self.pool = RewardPool(cfg.num_workers, cfg.memory_mb) if self._own_pool else pool

    def _check_meta(self, metadata: Sequence[Mapping[str, Any]]) -> set[int]:
        """Raise ``MetadataError`` for metadata a function cannot use; returns the functions (indices) that run
        programs in the sandbox for this batch."""
        runs_code = set()
        for j, (name, spec) in enumerate(zip(self.cfg.functions, self.specs, strict=True)):
            for i, meta in enumerate(metadata):
                missing = [k for k in spec.meta_keys if k not in meta]
                if name == "code" or (name == "accuracy" and meta.get("task") == "code"):
                    problem = code.meta_problem(meta)
                    if problem is not None:
                        raise MetadataError(f"metadata[{i}] for reward {name!r}: {problem}")
                    runs_code.add(j)
                    continue
                if name == "accuracy":
                    task = meta.get("task", "math")
                    keys = {
                        "math": ("answer",),
                        "gsm8k": ("answer",),
                        "countdown": ("target", "numbers"),
                        "exact": ("answer",),
                    }.get(task)
                    if keys is None:
                        raise MetadataError(f"metadata[{i}]: unknown task {task!r} for reward 'accuracy'")
                    missing = [k for k in keys if k not in meta]
                if missing:
                    raise MetadataError(f"reward {name!r} needs metadata keys {missing} (missing in metadata[{i}])")
        return runs_code

    def components(
        self, completions: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Per-function values float32[n, k] (k = len(cfg.functions)), clipped to each function's range, and metrics:
        ``rewards/<name>/mean``, ``.../timeouts``, ``.../errors`` (exceptions, crashes, non-finite values), the sums
        of the counts a function returns with its value (``Scored``; the code reward's sandbox outcomes:
        ``rewards/code/sandbox_timeout``, ...) and ``rewards/too_long`` (completions over ``cfg.max_chars``, scored
        ``floor`` without evaluation). Raises ``SandboxUnavailable`` before any work when programs are to run in
        a sandbox this machine cannot make."""
        if len(completions) != len(metadata):
            raise ValueError(f"{len(completions)} completions but {len(metadata)} metadata dicts")
        runs_code = self._check_meta(metadata)
        if runs_code:
            code.check_available(self.cfg)
        cfg = self.cfg
        texts = [sanitize(c) for c in completions]
        too_long = [len(t) > cfg.max_chars for t in texts]
        metas = [dict(m) for m in metadata]
        n, k = len(texts), len(self.specs)
        values = np.full((n, k), cfg.floor, np.float64)
        status = np.full((n, k), OK, object)
        jobs = [(i, j) for i in range(n) if not too_long[i] for j in range(k)]
        tasks = [(self.specs[j].fn, (texts[i], metas[i], cfg)) for i, j in jobs]
        if self.pool is not None:
            outcomes = self.pool.run(tasks, [self.specs[j].timeout_s(metas[i], cfg) for i, j in jobs])
        else:
            outcomes = [_run_inline(fn, args) for fn, args in tasks]
        # the code counts are reported even when every evaluation failed, so a metric's keys do not vary by batch
        counts = [collections.Counter(dict.fromkeys(code.COUNTS, 0) if j in runs_code else {}) for j in range(k)]
        for (i, j), (st, result) in zip(jobs, outcomes, strict=True):
            scored = as_scored(result) if st == OK else None
            if scored is not None:
                counts[j].update(scored.counts)
                if not math.isfinite(scored.value):
                    st = ERROR
            status[i, j] = st
            if st == OK:
                values[i, j] = min(max(scored.value, self.specs[j].low), self.specs[j].high)
        metrics: dict[str, float] = {"rewards/too_long": float(sum(too_long))}
        for j, name in enumerate(cfg.functions):
            metrics[f"rewards/{name}/mean"] = float(values[:, j].mean()) if n else 0.0
            metrics[f"rewards/{name}/timeouts"] = float(np.sum(status[:, j] == TIMEOUT))
            metrics[f"rewards/{name}/errors"] = float(np.sum((status[:, j] == ERROR) | (status[:, j] == CRASH)))
            metrics |= {f"rewards/{name}/{key}": float(v) for key, v in sorted(counts[j].items())}
        return values.astype(np.float32), metrics

    def score(
        self, completions: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Total rewards float32[n] = sum_j weight_j * fn_j, and metrics (``components``' plus mean/std/min/max)."""
        comps, metrics = self.components(completions, metadata)
        total = comps.astype(np.float64) @ np.asarray(self.cfg.weights, np.float64)
        if total.size:
            metrics |= {
                "rewards/mean": float(total.mean()),
                "rewards/std": float(total.std()),
                "rewards/min": float(total.min()),
                "rewards/max": float(total.max()),
            }
        return total.astype(np.float32), metrics

    def close(self) -> None:
        if self._own_pool and self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_inline(fn: Any, args: tuple[Any, ...]) -> tuple[str, Any]:
    try:
        return OK, as_scored(fn(*args))
    except Exception as e:  # same contract as the pool: a failing evaluation is a scored error
        return ERROR, f"{type(e).__name__}: {e}"


_POOLS: dict[tuple[int, int], RewardPool] = {}


def _shared_pool(cfg: RewardConfig) -> RewardPool | None:
    if cfg.num_workers == 0:
        return None
    key = (cfg.num_workers, cfg.memory_mb)
    if key not in _POOLS:
        if not _POOLS:
            atexit.register(close_shared_pools)
        _POOLS[key] = RewardPool(*key)
    return _POOLS[key]


def close_shared_pools() -> None:
    """Stop the worker processes that ``score`` keeps between calls."""
    while _POOLS:
        _POOLS.popitem()[1].close()


def score(
    completions: Sequence[str],
    metadata: Sequence[Mapping[str, Any]],
    cfg: RewardConfig,
    *,
    pool: RewardPool | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Total reward float32[n] of each completion and per-function metrics.

    ``metadata[i]`` holds what the functions read: ``answer`` (accuracy), ``task`` ("math" | "gsm8k" | "countdown" |
    "exact" | "code" for "accuracy"), ``target`` and ``numbers`` (countdown), ``num_tokens`` (overlong), ``language``
    (optional), ``tests`` or ``test`` + ``entry_point`` (+ ``prefix``) (code).
    Without ``pool``, a pool per (num_workers, memory_mb) is started on first use and kept until exit (workers are
    expensive to start); ``close_shared_pools()`` stops them.
    """
    scorer = Scorer(cfg, pool if pool is not None else _shared_pool(cfg))
    return scorer.score(completions, metadata)
