"""Length shaping: DAPO's soft overlong punishment (DAPO section 3.4), measured in tokens."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from r1jax.config import RewardConfig


def overlong_penalty(completion: str, meta: Mapping[str, Any], cfg: RewardConfig) -> float:
    """Penalty in [-1, 0] from ``meta["num_tokens"]`` (completion length in tokens).

    With L_max = ``cfg.overlong_max_tokens`` and L_cache = ``cfg.overlong_buffer_tokens``:
    0 for |y| <= L_max - L_cache; (L_max - L_cache - |y|) / L_cache inside the buffer; -1 beyond L_max.
    """
    n = int(meta["num_tokens"])
    lmax, cache = cfg.overlong_max_tokens, cfg.overlong_buffer_tokens
    if n <= lmax - cache:
        return 0.0
    if n > lmax:
        return -1.0
    return (lmax - cache - n) / cache
