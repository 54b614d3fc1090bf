"""``Scored``: a reward value together with counts of what happened while computing it (reported as metrics)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Scored:
    """What a reward function may return instead of a plain float: its ``value`` and ``counts`` (non-negative
    numbers by name, e.g. how many sandboxed tests timed out), which the scorer sums over completions into
    ``rewards/<function>/<name>``."""

    value: float
    counts: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", float(self.value))
        object.__setattr__(self, "counts", {str(k): float(v) for k, v in self.counts.items()})
        bad = {k: v for k, v in self.counts.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"counts must be finite and >= 0, got {bad}")


def as_scored(result: float | Scored) -> Scored:
    """A reward function's return value as ``Scored`` (a plain number has no counts)."""
    return result if isinstance(result, Scored) else Scored(float(result))
