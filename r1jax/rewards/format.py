"""Format rewards for the R1-Zero template ``<think> reasoning </think> <answer> answer </answer>``.

With ``cfg.think_prefilled`` the prompt already ends with ``<think>`` (as DeepSeek-R1's chat template does), so
the completion starts inside the think block and must contain no ``<think>`` of its own; forgetting this makes
every completion fail the format check (the "pre-fill trap").

Reward hacking is scored as follows: any tag more than once (several answer blocks, nested think blocks) -> 0 for
all three functions; answer text outside the tags -> 0 for ``format_strict``, allowed by ``format_soft``; empty
reasoning -> 0 for ``format_strict``, allowed by ``format_soft``; empty answer -> 0 for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from r1jax.config import RewardConfig
from r1jax.rewards.extract import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def _expected_counts(think_prefilled: bool) -> tuple[int, int, int, int]:
    return (0 if think_prefilled else 1, 1, 1, 1)


def _layout(text: str, think_prefilled: bool) -> tuple[str, str, str, str, str] | None:
    """(before_think, think, between, answer, after) when every tag appears exactly as expected and in order."""
    counts = tuple(text.count(t) for t in _TAGS)
    if counts != _expected_counts(think_prefilled):
        return None
    if think_prefilled:
        before, think_start = "", 0
    else:
        i = text.find(THINK_OPEN)
        before, think_start = text[:i], i + len(THINK_OPEN)
    tc = text.find(THINK_CLOSE)
    ao = text.find(ANSWER_OPEN)
    ac = text.find(ANSWER_CLOSE)
    if not think_start <= tc < ao < ac:
        return None
    return (
        before,
        text[think_start:tc],
        text[tc + len(THINK_CLOSE) : ao],
        text[ao + len(ANSWER_OPEN) : ac],
        text[ac + len(ANSWER_CLOSE) :],
    )


def format_strict(completion: str, meta: Mapping[str, Any], cfg: RewardConfig) -> float:
    """1.0 iff the completion is exactly ``<think> R </think> <answer> A </answer>``: each tag once, in order, only
    whitespace outside the blocks, R and A not blank; else 0.0."""
    parts = _layout(completion, cfg.think_prefilled)
    if parts is None:
        return 0.0
    before, think, between, answer, after = parts
    ok = not before.strip() and not between.strip() and not after.strip() and think.strip() and answer.strip()
    return 1.0 if ok else 0.0


def format_soft(completion: str, meta: Mapping[str, Any], cfg: RewardConfig) -> float:
    """1.0 iff each tag appears exactly once, in order, and the answer is not blank; other text is tolerated."""
    parts = _layout(completion, cfg.think_prefilled)
    return 1.0 if parts is not None and parts[3].strip() else 0.0


def tag_count(completion: str, meta: Mapping[str, Any], cfg: RewardConfig) -> float:
    """Shaping reward in [0, 1]: 0.25 per tag present exactly as often as expected (once; ``<think>`` zero times
    when pre-filled), but 0.0 as soon as any tag appears more often than expected."""
    expected = _expected_counts(cfg.think_prefilled)
    counts = [completion.count(t) for t in _TAGS]
    if any(c > e for c, e in zip(counts, expected, strict=True)):
        return 0.0
    return 0.25 * sum(c == e for c, e in zip(counts, expected, strict=True))
