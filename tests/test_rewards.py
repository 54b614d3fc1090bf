"""Reward functions on hand-written tables, the Countdown parser's bounds, and the worker pool under hostile input."""

import math
import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1jax.config import RewardConfig
from r1jax.rewards import (
    REGISTRY,
    ExpressionError,
    RewardPool,
    Scorer,
    countdown_reward,
    evaluate,
    extract_answer,
    find_boxed,
    format_soft,
    format_strict,
    gsm8k_accuracy,
    language_consistency,
    math_accuracy,
    overlong_penalty,
    parse_number,
    sanitize,
    tag_count,
)
from r1jax.rewards.pool import CRASH, ERROR, OK, TIMEOUT

CFG = RewardConfig()
PRE = RewardConfig(think_prefilled=True)

# --- extraction -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,want",
    [
        (r"\boxed{5}", ["5"]),
        (r"\boxed{\frac{1}{2}} and \boxed{x^{2}}", [r"\frac{1}{2}", "x^{2}"]),
        (r"\boxed{\{1, 2\}}", [r"\{1, 2\}"]),
        (r"\boxed{a{b{c}}d}", ["a{b{c}}d"]),
        (r"\boxed {7}", ["7"]),
        (r"\boxed 42 rest", ["42"]),
        (r"\fbox{3}", ["3"]),
        (r"\boxed{unclosed", []),
        (r"\boxedx{1}", []),
        (r"\boxed{\boxed{1}}", [r"\boxed{1}", "1"]),
    ],
)
def test_find_boxed(text, want):
    assert find_boxed(text) == want


@pytest.mark.parametrize(
    "text,prefilled,want",
    [
        ("<think>r</think><answer> 42 </answer>", False, ("42", "tag")),
        (r"<think>r</think><answer>so \boxed{42}</answer>", False, ("42", "boxed")),
        (r"<think>\boxed{1}</think> final \boxed{2}", False, ("2", "boxed")),  # only after </think>
        (r"<think>\boxed{1} never closed", False, (None, "none")),  # truncated reasoning
        (r"reasoning \boxed{1} no close", True, (None, "none")),  # pre-filled, still thinking
        (r"reasoning</think> \boxed{3}", True, ("3", "boxed")),
        (r"reasoning</think> \boxed{3}", False, ("3", "boxed")),  # implicit pre-fill
        ("<answer>1</answer><answer>2</answer>", False, (None, "none")),  # several blocks
        (r"<answer>1</answer> \boxed{2}", False, ("1", "tag")),  # box outside the block ignored
        ("<answer>1", False, (None, "none")),
        (r"\boxed{1} or \boxed{2}", False, (None, "none")),  # hedging
        (r"\boxed{2} so \boxed{ 2 }", False, ("2", "boxed")),
        ("plain text", False, (None, "none")),
    ],
)
def test_extract_answer(text, prefilled, want):
    assert extract_answer(text, prefilled) == want


@pytest.mark.parametrize(
    "span,want",
    [("1,234", 1234), ("$72.00", 72), ("72.0", 72), ("-3", -3), ("3/4", 0.75), (r"\frac{3}{4}", 0.75),
     ("The answer is 18.", 18), (r"\$1,000,000", 1000000), ("50%", 50), ("abc", None), ("1" * 100, None)],
)  # fmt: skip
def test_parse_number(span, want):
    got = parse_number(span)
    assert (got is None) if want is None else (got == want)


# --- accuracy ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion,gold,want",
    [
        (r"<think>r</think><answer>\frac{1}{2}</answer>", "0.5", 1.0),
        (r"<think>r</think><answer>\boxed{0.5}</answer>", r"\frac12", 1.0),
        (r"<think>r</think> The answer is $\boxed{\{2, 1\}}$", r"\{1,2\}", 1.0),
        (r"<think>r</think><answer>(0, 1]</answer>", "(0,1]", 1.0),
        (r"<think>r</think><answer>[0, 1]</answer>", "(0,1]", 0.0),
        (r"<think>r</think><answer>x = 3</answer>", "3", 1.0),
        (r"<think>r</think><answer>\sqrt{2}</answer>", r"2^{1/2}", 1.0),
        (r"<think>r</think><answer>3</answer>", r"\boxed{4}", 0.0),
        (r"<think>\boxed{4}</think><answer>3</answer>", "4", 0.0),  # answer in reasoning does not count
        (r"<think>r</think>\boxed{4} \boxed{3}", "4", 0.0),  # hedging
        ("<think>r</think><answer>4</answer><answer>4</answer>", "4", 0.0),
        ("<think>r</think><answer></answer>", "4", 0.0),
        ("<think>4 4 4", "4", 0.0),
    ],
)
def test_math_accuracy(completion, gold, want):
    assert math_accuracy(completion, {"answer": gold}, CFG) == want


def test_math_accuracy_prefilled():
    assert math_accuracy(r"reasoning </think> \boxed{7}", {"answer": "7"}, PRE) == 1.0
    assert math_accuracy(r"reasoning \boxed{7}", {"answer": "7"}, PRE) == 0.0


@pytest.mark.parametrize(
    "completion,gold,want,last",
    [
        ("<answer>1,234</answer>", "#### 1234", 1.0, False),
        ("<answer>$72.00</answer>", "72", 1.0, False),
        (r"\boxed{72.0}", "72", 1.0, False),
        ("So the total is\n#### 18", "Natalia sold ... #### 18", 1.0, False),
        ("<answer>The answer is 18 apples</answer>", "18", 1.0, False),
        ("<answer>17</answer>", "18", 0.0, False),
        ("Total 5 + 13 = 18", "18", 0.0, False),
        ("Total 5 + 13 = 18", "18", 1.0, True),
        ("<answer>18</answer><answer>18</answer>", "18", 0.0, True),  # no fallthrough after a hack
        ("<answer>18", "18", 0.0, True),
    ],
)
def test_gsm8k_accuracy(completion, gold, want, last):
    cfg = RewardConfig(gsm8k_last_number=last)
    assert gsm8k_accuracy(completion, {"answer": gold}, cfg) == want


# --- format -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion,strict,soft,count",
    [
        ("<think> steps </think> <answer> 4 </answer>", 1.0, 1.0, 1.0),
        ("<think>\nsteps\n</think>\n<answer>\n4\n</answer>\n", 1.0, 1.0, 1.0),
        ("<think></think><answer>4</answer>", 0.0, 1.0, 1.0),  # empty reasoning
        ("<think>s</think><answer> </answer>", 0.0, 0.0, 1.0),  # empty answer
        ("<think>s</think> it is 4 <answer>4</answer>", 0.0, 1.0, 1.0),  # text between blocks
        ("<think>s</think><answer>4</answer> and also 5", 0.0, 1.0, 1.0),  # answer outside tags
        ("<think>s</think><answer>4</answer><answer>5</answer>", 0.0, 0.0, 0.0),  # two answer blocks
        ("<think>a<think>b</think></think><answer>4</answer>", 0.0, 0.0, 0.0),
        ("<answer>4</answer><think>s</think>", 0.0, 0.0, 1.0),  # wrong order
        ("<think>s</think>", 0.0, 0.0, 0.5),
        ("4", 0.0, 0.0, 0.0),
    ],
)
def test_format_rewards(completion, strict, soft, count):
    assert format_strict(completion, {}, CFG) == strict
    assert format_soft(completion, {}, CFG) == soft
    assert tag_count(completion, {}, CFG) == count


def test_format_prefilled_think():
    good = "steps </think> <answer> 4 </answer>"
    assert format_strict(good, {}, PRE) == format_soft(good, {}, PRE) == tag_count(good, {}, PRE) == 1.0
    assert format_strict("<think> steps </think> <answer> 4 </answer>", {}, PRE) == 0.0  # second <think>
    assert format_strict(good, {}, CFG) == 0.0  # the pre-fill trap: template/config mismatch scores 0


# --- countdown --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer,want",
    [
        ("(3 + 5) * 2", 1.0),
        ("2 * (5 + 3) = 16", 1.0),
        ("(5+3)×2", 1.0),
        ("3 + 5 * 2", 0.1),  # 13
        ("(3 + 5) * 2 * 1", 0.1),  # 1 is not available
        ("16", 0.1),  # numbers not all used
        ("(3 + 5) * 2 + 2 - 2", 0.1),  # 2 used three times
        ("-(3 - 5) * 8", 0.0),  # unary minus is not allowed
        ("(3 + 5) * 2 = 17 + 1", 0.0),  # right-hand side must be a number
        ("__import__('os').system('true')", 0.0),
        ("((3 + 5) * 2", 0.0),
    ],
)
def test_countdown(answer, want):
    meta = {"target": 16, "numbers": [3, 5, 2]}
    assert countdown_reward(f"<think>t</think><answer>{answer}</answer>", meta, CFG) == want


def test_countdown_division_and_at_most_once():
    meta = {"target": 4, "numbers": [8, 2, 7]}
    comp = "<answer>8 / 2</answer>"
    assert countdown_reward(comp, meta, CFG) == 0.1  # TinyZero: every number exactly once
    assert countdown_reward(comp, meta, RewardConfig(countdown_exact_use=False)) == 1.0
    assert countdown_reward("<answer>8 / (2 - 2)</answer>", meta, CFG) == 0.0


@pytest.mark.parametrize(
    "expr", ["9**9**9**9", "(" * 40 + "1" + ")" * 40, "1" * 13, "+".join(["1"] * 100), "1 " * 200, "2^3", "1e9"]
)
def test_countdown_parser_bounds(expr):
    with pytest.raises(ExpressionError):
        evaluate(expr)


def test_countdown_magnitude_bound():
    with pytest.raises(ExpressionError):
        evaluate("*".join(["999999999999"] * 18))
    assert evaluate("(1 + 2) * 3 / 4") == (pytest.approx(2.25), [1, 2, 3, 4])


# --- language, length -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion,lang,want",
    [
        ("<think>we add the numbers</think><answer>3</answer>", "en", 1.0),
        ("<think>we add 两个 numbers</think>", "en", 0.6),  # 3 Latin words, 2 Han characters
        ("<think>我们 add</think>", "zh", 2 / 3),
        (r"<think>\frac{1}{2} is half</think>", "en", 1.0),  # LaTeX commands are not words
        ("<think>   </think><answer>3</answer>", "en", 0.0),
        ("no think block at all", "en", 1.0),
        ("Привет world", "ru", 0.5),
    ],
)
def test_language_consistency(completion, lang, want):
    assert language_consistency(completion, {"language": lang}, CFG) == pytest.approx(want)


@pytest.mark.parametrize("tokens,want", [(0, 0.0), (768, 0.0), (800, -0.125), (1024, -1.0), (1025, -1.0)])
def test_overlong_penalty(tokens, want):
    cfg = RewardConfig(overlong_max_tokens=1024, overlong_buffer_tokens=256)
    assert overlong_penalty("", {"num_tokens": tokens}, cfg) == pytest.approx(want)


# --- pool and scorer --------------------------------------------------------------------------------------------------


def _sleep_forever(*args):
    time.sleep(1000)
    return 1.0


def _die(*args):
    os._exit(3)


def _allocate(*args):
    return float(len(bytearray(4 << 30)))


def _ok(*args):
    return 0.5


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, memory_mb=512) as p:
        yield p


def test_pool_survives_timeouts_crashes_and_memory_bombs(pool):
    assert pool.run([(_ok, ())] * 2, timeout_s=120.0) == [(OK, 0.5)] * 2  # workers up (slow on a loaded machine)
    tasks = [(_ok, ()), (_sleep_forever, ()), (_die, ()), (_allocate, ()), (_ok, ()), (_ok, ())]
    t0 = time.monotonic()
    out = pool.run(tasks, timeout_s=3.0)
    assert time.monotonic() - t0 < 60
    assert [s for s, _ in out] == [OK, TIMEOUT, CRASH, ERROR, OK, OK]
    assert "MemoryError" in out[3][1]
    assert pool.run([(_ok, ())] * 4, timeout_s=5.0) == [(OK, 0.5)] * 4  # replaced workers still serve


ALL = tuple(n for n in REGISTRY if n != "code")  # code runs sandboxed programs: tests/test_code_reward.py
BOUNDS_LO = sum(min(REGISTRY[n].low, 0.0) for n in ALL)
BOUNDS_HI = sum(REGISTRY[n].high for n in ALL)


@pytest.fixture(scope="module")
def scorer(pool):
    cfg = RewardConfig(functions=ALL, weights=(1.0,) * len(ALL), timeout_s=2.0, max_chars=300_000)
    return Scorer(cfg, pool=pool)


def _meta(i):
    return {"answer": "4", "target": 16, "numbers": [3, 5, 2], "num_tokens": 900 + i, "language": "en"}


def _check(scorer, completions):
    t0 = time.monotonic()
    rewards, metrics = scorer.score(completions, [_meta(i) for i in range(len(completions))])
    tasks = len(completions) * len(ALL)
    assert time.monotonic() - t0 < 10 + tasks * scorer.cfg.timeout_s / 2
    assert rewards.shape == (len(completions),) and rewards.dtype == np.float32
    assert np.all(np.isfinite(rewards))
    assert np.all((rewards >= BOUNDS_LO) & (rewards <= BOUNDS_HI))
    assert all(math.isfinite(v) for v in metrics.values())
    return rewards, metrics


def test_scorer_weights_and_metrics(scorer):
    good = "<think>add</think> <answer>(3 + 5) * 2</answer>"
    rewards, metrics = _check(scorer, [good, "nonsense"])
    comps, _ = scorer.components([good], [_meta(0)])
    np.testing.assert_allclose(rewards[0], comps[0].sum(), rtol=1e-6)
    assert metrics["rewards/countdown/mean"] == 0.5 and metrics["rewards/format_strict/timeouts"] == 0


def test_scorer_rejects_missing_metadata():
    with pytest.raises(ValueError, match="num_tokens"):
        Scorer(RewardConfig(functions=("overlong",), weights=(1.0,), num_workers=0)).score(["x"], [{}])
    with pytest.raises(ValueError, match="unknown task"):
        Scorer(RewardConfig(functions=("accuracy",), weights=(1.0,), num_workers=0)).score(["x"], [{"task": "chess"}])


HOSTILE = [
    r"<think>x</think><answer>\boxed{9^{9^{9^{9}}}}</answer>",
    "<answer>9**9**9**9</answer>",
    "<answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>",
    r"<think>x</think>" + r"\boxed{" * 20000,
    r"\boxed{4}" * 20000,
    "<think>" * 10000 + "</answer>" * 10000,
    "<answer>" + "1" * 100_000 + "</answer>",
    "bad \ud800 surrogate <answer>4</answer>",
    "x" * 1_000_000,  # over max_chars: floor without evaluation
    r"<answer>\frac{" * 3000 + "</answer>",
]


def test_hostile_strings(scorer):
    rewards, metrics = _check(scorer, HOSTILE)
    assert metrics["rewards/too_long"] == 1.0


_FRAGMENTS = st.sampled_from(
    ["<think>", "</think>", "<answer>", "</answer>", r"\boxed{", "{", "}", "9^{9^{9^{9}}}", "9**9**9**9", "(", ")",
     r"\frac{", "####", "4", "16", "3+5", "*", "/", " ", "\n", "\ud800", "我", "=", "$", r"\sqrt", "1e999999"]
)  # fmt: skip
_HOSTILE_TEXT = st.one_of(
    st.lists(_FRAGMENTS, max_size=60).map("".join),
    st.tuples(_FRAGMENTS, st.integers(1, 3000)).map(lambda t: t[0] * t[1]),
    st.text(max_size=200),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_HOSTILE_TEXT, min_size=1, max_size=4))
def test_generated_hostile_strings(scorer, completions):
    _check(scorer, completions)


def test_sanitize():
    assert sanitize("a\ud800b") == "a?b"
    assert sanitize(5) == "5"


def _random_hostile(rng: np.random.Generator) -> str:
    fragments = ["<think>", "</think>", "<answer>", "</answer>", r"\boxed{", "{", "}", "9^{9^{9^{9}}}", "9**9**9**9",
                 "(", ")", r"\frac{", "####", "4", "16", "3+5", "*", "/", " ", "\n", "\ud800", "我", "=", "$",
                 r"\sqrt", "1e999999", "10^{10^{10}}", "((3+5)*2)"]  # fmt: skip
    if rng.random() < 0.2:
        return fragments[rng.integers(len(fragments))] * int(rng.integers(1, 5000))
    return "".join(fragments[i] for i in rng.integers(0, len(fragments), int(rng.integers(0, 80))))


def test_two_thousand_adversarial_completions(scorer):
    """2,000 generated adversarial completions through every reward function: all finite, within the composite
    bounds, and the batch finishes in bounded time (per-completion timeouts, replaced workers)."""
    rng = np.random.default_rng(0)
    completions = [_random_hostile(rng) for _ in range(2000)]
    t0 = time.monotonic()
    rewards, metrics = _check(scorer, completions)
    assert time.monotonic() - t0 < 600
    assert rewards.shape == (2000,)
