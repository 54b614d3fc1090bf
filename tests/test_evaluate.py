"""Evaluation metrics against hand computations, answer keys per task, and ``evaluate``'s aggregation over scripted
samples (the sampler itself runs in tests/test_sample_cmd.py)."""

from math import comb

import numpy as np
import pytest

from r1jax import evaluate as ev
from r1jax.config import RewardConfig


def test_pass_at_k_matches_the_combinatorial_definition():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1.0 - comb(n - c, k) / comb(n, k)
                np.testing.assert_allclose(ev.pass_at_k_single(n, c, k), want, rtol=1e-12, atol=1e-15)
    # by hand: n=4, c=1, k=2 -> 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert ev.pass_at_k_single(4, 1, 2) == pytest.approx(0.5)
    assert ev.pass_at_k_single(4, 0, 4) == 0.0 and ev.pass_at_k_single(4, 1, 4) == 1.0
    # pass@1 of the estimator is c / n
    assert ev.pass_at_k_single(5, 2, 1) == pytest.approx(0.4)
    correct = [[True, False, False, False], [True, True, False, False], [False] * 4]
    assert ev.pass_at_k(correct, 2) == pytest.approx((0.5 + (1 - 1 / 6) + 0.0) / 3)
    assert ev.pass_at_1(correct) == pytest.approx((0.25 + 0.5 + 0.0) / 3)
    with pytest.raises(ValueError):
        ev.pass_at_k_single(2, 3, 1)
    with pytest.raises(ValueError):
        ev.pass_at_k_single(2, 1, 3)


def test_majority_vote_by_hand():
    # "7" twice beats "8" once; the correct flags follow the answers
    assert ev.majority_vote(["7", "8", "7", None], [True, False, True, False])
    assert not ev.majority_vote(["8", "8", "7", None], [False, False, True, False])
    # abstentions do not vote, even when they are the most common
    assert ev.majority_vote([None, None, None, "7"], [False, False, False, True])
    assert not ev.majority_vote([None, None], [False, False])
    # a tie goes to the answer seen first
    assert ev.majority_vote(["7", "8", "8", "7"], [True, False, False, True])
    assert not ev.majority_vote(["8", "7", "7", "8"], [False, True, True, False])
    answers = [["7", "8", "7", None], ["8", "8", "7", None], [None] * 4]
    correct = [[True, False, True, False], [False, False, True, False], [False] * 4]
    assert ev.maj_at_k(answers, correct) == pytest.approx(1 / 3)


def test_answer_keys_follow_the_reward_extraction():
    g = {"task": "gsm8k", "answer": "72"}
    assert ev.answer_key("<think>x</think> <answer>72</answer>", g) == "72"
    assert ev.answer_key("<think>x</think> <answer>$1,234.0</answer>", g) == "1234"
    assert ev.answer_key("so \\boxed{3/6}", g) == "1/2"
    assert ev.answer_key("work\n#### 72\nmore", g) == "72"
    assert ev.answer_key("<think>unclosed 72", g) is None
    assert ev.answer_key("<answer>1</answer><answer>2</answer>", g) is None  # hedging
    assert ev.answer_key("reasoning 72</think><answer>72</answer>", g, think_prefilled=True) == "72"
    assert ev.answer_key("4 + 68 = 72", g) is None  # a bare number counts only with the last-number fallback
    assert ev.answer_key("4 + 68 = 72.", g, last_number=True) == "72"
    m = {"task": "math", "answer": "\\frac{1}{2}"}
    assert ev.answer_key("\\boxed{\\frac{1}{2}}", m) == ev.answer_key("\\boxed{ \\frac{1}{2} }", m)
    c = {"task": "countdown", "target": 6, "numbers": [1, 2, 3]}
    assert ev.answer_key("<answer> 1 + 2 + 3 </answer>", c) == "1+2+3"


def test_evaluate_aggregates_scripted_samples(monkeypatch):
    data = [
        {"prompt": "p0", "answer": "7", "task": "gsm8k"},
        {"prompt": "p1", "answer": "5", "task": "gsm8k"},
    ]
    scripted = {
        "p0": ["<answer>7</answer>", "<answer>8</answer>", "<answer>7</answer>", "nothing"],
        "p1": ["<answer>4</answer>", "<answer>4</answer>", "<answer>5</answer>", "<answer>6</answer>"],
    }

    def fake_sample(model, tokenizer, examples, *, k, sampling, template, system, batch_size, seed, tools, mesh):
        assert k == 4 and sampling.temperature == 0.6 and sampling.top_p == 0.95 and tools is None
        return [
            {"prompt": ex["prompt"], "think_prefilled": False, "completions": scripted[ex["prompt"]],
             "lengths": [3, 3, 3, 5], "ended": [True, True, True, False]}
            for ex in examples
        ]  # fmt: skip

    monkeypatch.setattr(ev, "sample_completions", fake_sample)
    rewards = RewardConfig(functions=("accuracy",), weights=(1.0,), num_workers=0)
    out = ev.evaluate(None, None, data, k=4, max_new_tokens=8, template="plain", rewards=rewards, return_samples=True)
    assert out["samples"][0]["correct"] == [True, False, True, False]
    assert out["samples"][1]["answers"] == ["4", "4", "5", "6"]
    assert out["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert out["maj@4"] == pytest.approx(0.5)  # p0: "7" wins (right); p1: "4" wins (wrong)
    want_pass4 = (ev.pass_at_k_single(4, 2, 4) + ev.pass_at_k_single(4, 1, 4)) / 2
    assert out["pass@4"] == pytest.approx(want_pass4)
    assert out["n_problems"] == 2 and out["k"] == 4
    assert out["truncated_frac"] == pytest.approx(0.25) and out["length_mean"] == pytest.approx(3.5)
    assert out["answered_frac"] == pytest.approx(7 / 8)
    assert ev.evaluate(None, None, data, k=4, limit=1, template="plain", rewards=rewards)["n_problems"] == 1


def test_max_total_reward():
    assert ev.max_total_reward(RewardConfig()) == 2.0  # accuracy + strict format
    assert ev.max_total_reward(RewardConfig(functions=("accuracy", "overlong"), weights=(1.0, 1.0))) == 1.0
    assert ev.max_total_reward(RewardConfig(functions=("accuracy", "overlong"), weights=(2.0, -1.0))) == 3.0


def test_metrics_markdown_table():
    metrics = {"pass@1": 0.375, "maj@4": 0.5, "pass@4": 0.75, "n_problems": 2, "k": 4, "length_mean": 3.5,
               "truncated_frac": 0.25, "answered_frac": 0.875}  # fmt: skip
    md = ev.metrics_markdown(metrics, "m on d (test)", {"temperature": 0.6})
    lines = md.splitlines()
    assert lines[0] == "# m on d (test)" and "2 problems, k = 4 samples each." in lines
    assert "| pass@1 | mean correctness over the k samples | 37.5% |" in lines
    assert "| maj@4 | majority answer correct | 50.0% |" in lines
    assert "| pass@4 | any of k samples correct (unbiased estimator) | 75.0% |" in lines
    assert "| truncated | samples cut at the token limit | 25.0% |" in lines
    assert "| length | mean completion tokens | 3.5 |" in lines and lines[-1] == "Sampling: temperature = 0.6."
