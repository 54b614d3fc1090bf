"""Name -> reward function table. A reward function is ``fn(completion: str, meta: Mapping, cfg: RewardConfig) ->
float`` (or a ``Scored``: the value with counts reported as metrics) with documented bounds; it must be a
module-level function so worker processes can import it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from r1jax.config import RewardConfig
from r1jax.rewards.accuracy import accuracy, gsm8k_accuracy, math_accuracy
from r1jax.rewards.code import code_reward, code_timeout_s
from r1jax.rewards.countdown import countdown_reward
from r1jax.rewards.format import format_soft, format_strict, tag_count
from r1jax.rewards.language import language_consistency
from r1jax.rewards.length import overlong_penalty
from r1jax.rewards.outcome import Scored

RewardFn = Callable[[str, Mapping[str, Any], RewardConfig], float | Scored]
TimeoutFn = Callable[[Mapping[str, Any], RewardConfig], float]


def default_timeout_s(meta: Mapping[str, Any], cfg: RewardConfig) -> float:
    return cfg.timeout_s


def accuracy_timeout_s(meta: Mapping[str, Any], cfg: RewardConfig) -> float:
    return code_timeout_s(meta, cfg) if meta.get("task") == "code" else cfg.timeout_s


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """A registered reward: the function, its value range, the metadata keys it reads, and the reward pool's
    deadline for one evaluation (``timeout_s(meta, cfg)``; ``cfg.timeout_s`` unless the work depends on the
    example, as running its tests does)."""

    fn: RewardFn
    low: float
    high: float
    meta_keys: tuple[str, ...] = ()
    timeout_s: TimeoutFn = default_timeout_s


REGISTRY: dict[str, RewardSpec] = {
    "accuracy": RewardSpec(accuracy, 0.0, 1.0, timeout_s=accuracy_timeout_s),  # meta["task"] dispatches
    "math_accuracy": RewardSpec(math_accuracy, 0.0, 1.0, ("answer",)),
    "gsm8k_accuracy": RewardSpec(gsm8k_accuracy, 0.0, 1.0, ("answer",)),
    "countdown": RewardSpec(countdown_reward, 0.0, 1.0, ("target", "numbers")),
    "format_strict": RewardSpec(format_strict, 0.0, 1.0),
    "format_soft": RewardSpec(format_soft, 0.0, 1.0),
    "tag_count": RewardSpec(tag_count, 0.0, 1.0),
    "language": RewardSpec(language_consistency, 0.0, 1.0),
    "overlong": RewardSpec(overlong_penalty, -1.0, 0.0, ("num_tokens",)),
    "code": RewardSpec(code_reward, 0.0, 1.0, timeout_s=code_timeout_s),  # keys checked by code.meta_problem
}


def register(name: str, fn: RewardFn, low: float, high: float, meta_keys: tuple[str, ...] = ()) -> None:
    """Add a reward function under ``name`` (refuses to overwrite an existing one)."""
    if name in REGISTRY:
        raise ValueError(f"reward {name!r} is already registered")
    if getattr(fn, "__qualname__", "<lambda>") != getattr(fn, "__name__", None) or fn.__name__ == "<lambda>":
        raise ValueError("reward functions must be module-level functions (workers import them by name)")
    if not low <= high:
        raise ValueError(f"need low <= high, got {low}, {high}")
    REGISTRY[name] = RewardSpec(fn, float(low), float(high), tuple(meta_keys))


def get(name: str) -> RewardSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(REGISTRY)}") from None
