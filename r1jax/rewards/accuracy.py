"""Accuracy rewards: math (symbolic equivalence with ``math-verify``), GSM8K (exact numeric match) and short text
answers (normalised exact match).

All return 1.0 for a correct final answer and 0.0 otherwise, including when no answer can be extracted under the
rules of ``r1jax.rewards.extract`` (unclosed reasoning, several ``<answer>`` blocks, disagreeing ``\\boxed{}``).
Metadata key: ``answer`` (the reference; a GSM8K solution string with ``####`` is accepted; for exact match a list
of accepted aliases).
"""

from __future__ import annotations

import functools
import re
import string
import threading
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from r1jax.config import RewardConfig
from r1jax.rewards.extract import extract_answer, find_boxed, gsm8k_gold, parse_number, split_reasoning
from r1jax.rewards.outcome import Scored


def _mv_timeout(cfg_timeout: float) -> int | None:
    # math-verify times out with SIGALRM, which only works on the main thread; the pool's hard kill covers the rest.
    if threading.current_thread() is not threading.main_thread():
        return None
    return max(1, int(cfg_timeout / 3))


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> tuple:
    from math_verify import parse

    text = gsm8k_gold(gold) if "####" in gold else gold.strip()
    if "\\boxed" in text or "$" in text:
        parsed = parse(text, parsing_timeout=timeout)
        if parsed:
            return tuple(parsed)
    return tuple(parse("\\boxed{" + text + "}", parsing_timeout=timeout))


def math_accuracy(completion: str, meta: Mapping[str, Any], cfg: RewardConfig) -> float:
    """1.0 if the extracted answer is mathematically equivalent to ``meta["answer"]`` (math-verify: LaTeX,
    fractions vs decimals, sets, intervals, equations such as ``x=3`` vs ``3``), else 0.0."""
    from math_verify import parse, verify

    gold_text = str(meta["answer"])
    answer, source = extract_answer(completion, cfg.think_prefilled)
    if answer is None:
        return 0.0
    timeout = _mv_timeout(cfg.timeout_s)
    gold = list(_parse_gold(gold_text, timeout))
    if not gold:
        return 0.0
    # A boxed answer is LaTeX; a tag's content may be LaTeX without delimiters ("(0, 1]") or prose with inline math
    # ("the answer is $x = 3$"): try it both ways, correct if either reading verifies.
    readings = ["\\boxed{" + answer + "}"] + ([answer] if source == "tag" else [])
    for text in readings:
        pred = parse(text, parsing_timeout=timeout)
        if pred and verify(gold, pred, timeout_seconds=timeout):
            return 1.0
    return 0.0


def gsm8k_prediction(completion: str, think_prefilled: bool = False, last_number: bool = False) -> Fraction | None:
    """The number a completion answers with under the GSM8K rules, or None.

    Extraction: ``<answer>`` block or ``\\boxed{}`` (rules of ``extract_answer``), else the text after the last
    ``####`` in the answer region, else (only with ``last_number``) the last number of the answer region. Inside the
    extracted span the span itself must be a number, else its last number counts.
    """
    answer, _ = extract_answer(completion, think_prefilled)
    if answer is None:
        _, region = split_reasoning(completion, think_prefilled)
        if region is None or "<answer>" in region or "</answer>" in region or find_boxed(region):
            return None  # a malformed answer block or hedged boxes do not fall through to looser rules
        if "####" in region:
            answer = region[region.rfind("####") + 4 :].strip().split("\n", 1)[0]
        elif last_number:
            answer = region
        else:
            return None
    return parse_number(answer)


def gsm8k_accuracy(completion: str, meta: Mapping[str, Any], cfg: RewardConfig) -> float:
    """1.0 if the extracted number (``gsm8k_prediction``; the last-number fallback with ``cfg.gsm8k_last_number``)
    equals ``meta["answer"]`` exactly (as fractions: "1,234" == "1234", "$72" == "72", "72.0" == "72"), else 0.0."""
    gold = parse_number(gsm8k_gold(str(meta["answer"])))
    if gold is None:
        return 0.0
    pred = gsm8k_prediction(completion, cfg.think_prefilled, cfg.gsm8k_last_number)
    return 1.0 if pred is not None and pred == gold else 0.0


_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match_accuracy(completion: str, meta: Mapping[str, Any], cfg: RewardConfig) -> float:
    """1.0 if the ``<answer>`` block (or single ``\\boxed{}``) equals ``meta["answer"]`` (a string, or a list of
    accepted aliases) after ``normalize_text`` ("the Vexholm." == "vexholm"), else 0.0. An empty reference matches
    nothing."""
    gold = meta["answer"]
    golds = {normalize_text(str(g)) for g in (gold if isinstance(gold, list | tuple) else [gold])} - {""}
    answer, _ = extract_answer(completion, cfg.think_prefilled)
    return 1.0 if answer is not None and normalize_text(answer) in golds else 0.0


def accuracy(completion: str, meta: Mapping[str, Any], cfg: RewardConfig) -> float | Scored:
    """Dispatch on ``meta["task"]``: "math" (default), "gsm8k", "countdown", "exact" or "code" (the sandboxed tests
    of ``r1jax.rewards.code``, which returns its value with counts)."""
    from r1jax.rewards.code import code_reward
    from r1jax.rewards.countdown import countdown_reward

    task = meta.get("task", "math")
    fn = {
        "math": math_accuracy,
        "gsm8k": gsm8k_accuracy,
        "countdown": countdown_reward,
        "exact": exact_match_accuracy,
        "code": code_reward,
    }.get(task)
    if fn is None:
        raise ValueError(f"unknown task {task!r}")
    return fn(completion, meta, cfg)
