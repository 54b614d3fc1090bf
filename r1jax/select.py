"""Tree-of-agents selection: k sampled candidates per problem, one answer chosen, accuracy against k.

Many copies of the model answer a problem and one answer is kept. Three selectors, each a small pure function of one
problem's candidates that returns the index of the chosen candidate (or None: nothing chosen, the problem counts as
unsolved):

- ``majority_pick``: the most frequent extracted answer (``r1jax.evaluate.answer_key``); candidates without an
  answer abstain; ties go to the answer seen first (self-consistency, R1's maj@k).
- ``verifier_pick``: a reward function run on each candidate *without the hidden answer*; among the candidates
  with the best verifier score, the majority answer (ties: first seen); when none of those has an extractable
  answer (a program is its own answer), the first of them. A verifier with no signal therefore degrades to the
  majority vote, never below it by construction of the tie-break.
- ``judge_pick``: the model itself reads the problem and the distinct answers (``judge_options``: first-seen
  order, abstentions left out) in ``judge_prompt`` and names one by its number; ``parse_judge_choice`` reads the
  reply without ever evaluating it. A reply that names no listed candidate, or several (a small model echoes the
  list), falls back to the majority vote over the same candidates and is counted (``judge/unparsed``). With fewer
  than two distinct answers there is nothing to judge and no model call is made.

What a verifier may read. ``verifier_view(example)`` is the only metadata a verifier gets: the fields that hold
the reference answer (``HIDDEN_KEYS``) are removed, and code tests are cut to the visible ones: a HumanEval
``check(candidate)`` keeps its first half of top-level ``assert`` statements (``split_check``; the rest stay
hidden; a check with a single assert shows none, so its verifier only learns whether the program runs), and a list
of stdin/stdout ``tests`` keeps its first half (or ``public_tests`` when the example has them; a single test
shows none, and the code reward refuses the problem). For HumanEval the verifier is ``--verifier code`` (or
``accuracy``, which dispatches to it); a program can pass the visible asserts and fail the hidden ones, which is
what the split measures. A reward that needs a removed field (``accuracy`` on GSM8K or MATH needs ``answer``) is
refused: for such tasks there is no ground-truth-free verifier beyond format rewards and self-consistency (the
majority vote). For Countdown the ``accuracy`` reward *is* a verifier: it checks the equation against the
problem's own numbers and target. Correctness itself is always judged with the full hidden reference. For code,
the answers that vote are the programs with whitespace removed (``answer_key``), and the judge reads each program
as written (``answer_text``).

Accuracy against k without bias (``selection_curves``). With k samples drawn per problem, the accuracy of a
selector at k' <= k is the mean, over problems, of its correctness on uniformly drawn subsets of size k' of that
problem's k samples (sample order kept inside a subset, so first-seen tie-breaks stay those of the draw). All
C(k, k') subsets are used when there are at most ``subsets`` of them (so k' = 1 is exactly pass@1 and k' = k is
exactly the full-sample selection), else ``subsets`` subsets are drawn at random from a seeded generator. Every
subset of k' of the k i.i.d. samples is itself a draw of k' i.i.d. samples, so the average is an unbiased estimate
of the selector's accuracy with k' samples (a U-statistic; drawing subsets only adds variance). The judge, which
costs a model call per subset, is asked about the first ``judge_subsets`` of the same subsets for k' > 1. The
oracle row, ``pass@k'`` (any of the k' samples correct: a verifier that knows the answer; added by
``r1jax.evaluate``), is computed in closed form with the unbiased estimator of ``pass_at_k``: the upper bound of
every selector.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

SELECTORS = ("majority", "verifier", "judge")
HIDDEN_KEYS = ("answer", "solution", "canonical_solution", "solutions")  # reference answers a verifier must not see


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Which selectors ``r1jax eval --select`` runs and how accuracy against k is estimated (module docstring)."""

    selectors: tuple[str, ...] = ("majority",)
    verifier: str | None = None  # a registered reward function, run on ``verifier_view``; required by "verifier"
    subsets: int = 32  # subsets of size k' per problem (all of them when C(k, k') is no more than this)
    judge_subsets: int = 4  # of those, how many the judge is asked about (one greedy model call each)
    judge_max_new_tokens: int = 16  # the judge's reply budget
    seed: int = 0  # draws the random subsets

    def __post_init__(self) -> None:
        object.__setattr__(self, "selectors", tuple(self.selectors))
        unknown = [s for s in self.selectors if s not in SELECTORS]
        if unknown or not self.selectors:
            raise ValueError(f"unknown selector(s) {unknown}: choose from {', '.join(SELECTORS)}")
        if len(set(self.selectors)) != len(self.selectors):
            raise ValueError(f"duplicate selectors: {self.selectors}")
        if ("verifier" in self.selectors) != (self.verifier is not None):
            raise ValueError(
                "the 'verifier' selector and a verifier reward go together (--select verifier --verifier NAME)"
            )
        if self.subsets < 1:
            raise ValueError(f"subsets must be >= 1, got {self.subsets}")
        if not 1 <= self.judge_subsets <= self.subsets:
            raise ValueError(f"need 1 <= judge_subsets <= subsets, got {self.judge_subsets} and {self.subsets}")
        if self.judge_max_new_tokens < 1:
            raise ValueError(f"judge_max_new_tokens must be >= 1, got {self.judge_max_new_tokens}")


# --- selectors (pure) -----------------------------------------------------------------------------------------------
def majority_pick(answers: Sequence[str | None]) -> int | None:
    """Index of the first candidate giving the most frequent answer; None answers abstain; None if all abstain."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(i for i, a in enumerate(answers) if a is not None and votes[a] == top)


def verifier_pick(answers: Sequence[str | None], scores: Sequence[float]) -> int | None:
    """Among the candidates with the best verifier score, the majority answer; the first of them if none answers."""
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answers but {len(scores)} verifier scores")
    if not answers:
        return None
    best = max(scores)
    top = [i for i, s in enumerate(scores) if s == best]
    pick = majority_pick([answers[i] for i in top])
    return top[0 if pick is None else pick]


def judge_options(answers: Sequence[str | None]) -> list[int]:
    """One candidate index per distinct answer, in first-seen order (abstentions left out): what the judge sees."""
    seen: dict[str, int] = {}
    for i, a in enumerate(answers):
        if a is not None and a not in seen:
            seen[a] = i
    return list(seen.values())


def judge_prompt(problem: str, options: Sequence[str]) -> str:
    """The judge's request: the problem, then the candidate answers numbered from 1, then how to reply."""
    listed = "\n".join(  # a multi-line answer (a program) starts on its own line, its layout kept
        f"Candidate {i}:{chr(10) if chr(10) in text else ' '}{text}" for i, text in enumerate(options, 1)
    )
    return (
        f"Several attempts answered this problem.\n\nProblem: {problem}\n\nCandidate answers:\n{listed}\n\n"
        f"Which candidate answer is correct? Reply with 'Candidate N', where N is a number from 1 to {len(options)}."
    )


_LABELLED = re.compile(r"(?:candidate|option|answer|choice)\s*(?:number|no\.?)?\s*[#:(\[]?\s*(\d+)", re.IGNORECASE)
_BRACKETED = re.compile(r"[(\[#](\d+)[)\]]?")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_STATED = re.compile(r"\banswer\s+(?:is|would be|=)\s*:?\s*(-?\d+(?:\.\d+)?)(?![\d.]*\w)", re.IGNORECASE)


def _number_choice(number: str, options: Sequence[str], position_first: bool) -> int | None:
    """The option a stated number names: as a 1-based position in range, or as the answer of exactly one option;
    ``position_first`` says which reading wins when both apply."""
    n = len(options)
    position = int(number) - 1 if number.isdigit() and 1 <= int(number) <= n else None
    same = [i for i, o in enumerate(options) if "".join(str(o).split()) == number]
    value = same[0] if len(same) == 1 else None
    first, second = (position, value) if position_first else (value, position)
    return first if first is not None else second


def parse_judge_choice(reply: str, options: Sequence[str]) -> int | None:
    """The 0-based option the judge's ``reply`` names, or None. Read as text only, never evaluated.

    In order: the labelled numbers ("Candidate 2", "option #2", "answer (2)") in range, when they all name one
    option (a reply naming several, as one that echoes the candidate list, names none); else the first bracketed
    number ("(2)", "[2]", "#2") in range; else a stated answer ("the correct answer is 7") as the answer of exactly
    one option, else as a position; else, when the whole reply (trimmed of spaces and final punctuation) is a
    number, that number as a position if in range, else as an answer equal to exactly one option; else None.
    """
    n = len(options)
    labelled = {int(m.group(1)) for m in _LABELLED.finditer(reply)} & set(range(1, n + 1))
    if labelled:
        return labelled.pop() - 1 if len(labelled) == 1 else None
    for m in _BRACKETED.finditer(reply):
        if 1 <= int(m.group(1)) <= n:
            return int(m.group(1)) - 1
    stated = _STATED.search(reply)
    if stated:
        return _number_choice(stated.group(1), options, position_first=False)
    bare = reply.strip().rstrip(".!").strip()
    return _number_choice(bare, options, position_first=True) if _NUMBER.fullmatch(bare) else None


def judge_pick(answers: Sequence[str | None], reply: str | None) -> tuple[int | None, bool]:
    """``(chosen candidate index, parsed)`` for the judge's ``reply`` over ``judge_options(answers)``.

    ``reply`` None means the judge was not asked (fewer than two distinct answers): the single answer, if any, is
    chosen. A reply naming no option falls back to ``majority_pick`` and returns ``parsed=False``.
    """
    options = judge_options(answers)
    if len(options) < 2 or reply is None:
        return (options[0] if options else None), True
    choice = parse_judge_choice(reply, [answers[i] for i in options])
    if choice is None:
        return majority_pick(answers), False
    return options[choice], True


# --- what a verifier may read ---------------------------------------------------------------------------------------
def split_check(test: str) -> tuple[str, str]:
    """``(visible, hidden)`` versions of a HumanEval test program defining ``check(candidate)``.

    The top-level ``assert`` statements of ``check`` are split: the first half (rounded down) stays in the visible
    program, the rest in the hidden one; every other statement (imports, set-up, loops) is kept in both. Raises
    ValueError when the program defines no ``check``.
    """
    tree = ast.parse(test)
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if not checks:
        raise ValueError("the test program defines no check(candidate)")
    body = checks[0].body
    asserts = [i for i, s in enumerate(body) if isinstance(s, ast.Assert)]
    visible = set(asserts[: len(asserts) // 2])

    def program(keep: Callable[[int], bool]) -> str:
        module = copy.deepcopy(tree)
        target = next(n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check")
        target.body = [s for i, s in enumerate(target.body) if not isinstance(s, ast.Assert) or keep(i)] or [ast.Pass()]
        return ast.unparse(module) + "\n"

    return program(lambda i: i in visible), program(lambda i: i not in visible)


def verifier_view(example: Mapping[str, Any]) -> dict:
    """The example as a verifier may see it: ``HIDDEN_KEYS`` removed, code tests cut to the visible ones."""
    view = {k: v for k, v in example.items() if k not in HIDDEN_KEYS and k != "public_tests"}
    if isinstance(example.get("test"), str) and "check" in example["test"]:
        view["test"] = split_check(example["test"])[0]
    if isinstance(example.get("tests"), list | tuple):
        tests = list(example.get("public_tests") or example["tests"][: len(example["tests"]) // 2])
        view["tests"] = tests
    return view


# --- accuracy against k ---------------------------------------------------------------------------------------------
def ks_up_to(k: int) -> list[int]:
    """1, 2, 4, ... up to ``k``, and ``k`` itself."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ks = [2**i for i in range(k.bit_length()) if 2**i <= k]
    return ks + ([k] if ks[-1] != k else [])


def draw_subsets(k: int, size: int, subsets: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """All size-``size`` subsets of range(k) when there are at most ``subsets``, else ``subsets`` uniform draws
    (indices in sample order)."""
    if math.comb(k, size) <= subsets:
        return list(itertools.combinations(range(k), size))
    return [tuple(sorted(rng.choice(k, size, replace=False).tolist())) for _ in range(subsets)]


def problem_subsets(n_samples: Sequence[int], ks: Sequence[int], subsets: int, seed: int) -> list[dict]:
    """Per problem, ``{k': [subset, ...]}`` for every k' <= its sample count, drawn from one seeded generator."""
    rng = np.random.default_rng(seed)
    return [{size: draw_subsets(n, size, subsets, rng) for size in ks if size <= n} for n in n_samples]


Pick = Callable[[int, tuple[int, ...]], int | None]  # (problem, subset) -> chosen sample index of that problem


def majority_picker(answers: Sequence[Sequence[str | None]]) -> Pick:
    def pick(i: int, subset: tuple[int, ...]) -> int | None:
        j = majority_pick([answers[i][s] for s in subset])
        return None if j is None else subset[j]

    return pick


def verifier_picker(answers: Sequence[Sequence[str | None]], scores: Sequence[Sequence[float]]) -> Pick:
    def pick(i: int, subset: tuple[int, ...]) -> int | None:
        j = verifier_pick([answers[i][s] for s in subset], [float(scores[i][s]) for s in subset])
        return None if j is None else subset[j]

    return pick


def judge_picker(answers: Sequence[Sequence[str | None]], replies: Mapping[tuple[int, tuple[int, ...]], str]) -> Pick:
    """``judge_pick`` with the judge's reply about (problem, subset); a subset not asked about had nothing to judge."""

    def pick(i: int, subset: tuple[int, ...]) -> int | None:
        j, _ = judge_pick([answers[i][s] for s in subset], replies.get((i, subset)))
        return None if j is None else subset[j]

    return pick


def accuracy_curve(
    correct: Sequence[Sequence[bool]], subsets: Sequence[Mapping[int, Sequence[tuple[int, ...]]]], pick: Pick,
    limit: int | None = None,
) -> dict[int, float]:  # fmt: skip
    """``{k': accuracy}``: mean over problems of the mean correctness of ``pick`` over that problem's subsets
    (for k' > 1 the first ``limit`` of them when given; a single candidate needs no model call)."""
    sizes = sorted({size for per in subsets for size in per})
    curve = {}
    for size in sizes:
        per_problem = []
        for i, per in enumerate(subsets):
            if size not in per:
                continue
            chosen = [pick(i, s) for s in per[size][: limit if size > 1 else None]]
            per_problem.append(np.mean([c is not None and bool(correct[i][c]) for c in chosen]))
        curve[size] = float(np.mean(per_problem))
    return curve


def judge_requests(
    problems: Sequence[str],
    answers: Sequence[Sequence[str | None]],
    subsets: Sequence[Mapping],
    limit: int,
    shown: Sequence[Sequence[str | None]] | None = None,
) -> list[tuple[int, tuple[int, ...], str]]:
    """``(problem, subset, judge prompt)`` for every judged subset (the first ``limit`` per k') with at least two
    distinct answers, each (problem, subset) once: the model calls the judge selector needs. ``shown[i][j]``: the
    text the judge reads for candidate j (default its answer; a program keeps its layout there, not in its key)."""
    shown = answers if shown is None else shown
    out: dict[tuple[int, tuple[int, ...]], str] = {}
    for i, per in enumerate(subsets):
        for size in sorted(per):
            for subset in per[size][:limit]:
                options = judge_options([answers[i][s] for s in subset])
                if len(options) >= 2 and (i, subset) not in out:
                    out[(i, subset)] = judge_prompt(problems[i], [shown[i][subset[j]] for j in options])
    return [(i, subset, prompt) for (i, subset), prompt in out.items()]


def selection_curves(
    correct: Sequence[Sequence[bool]],
    answers: Sequence[Sequence[str | None]],
    problems: Sequence[str],
    cfg: SelectConfig,
    *,
    verifier_scores: Sequence[Sequence[float]] | None = None,
    ask: Callable[[list[str]], list[str]] | None = None,
    shown: Sequence[Sequence[str | None]] | None = None,
) -> dict[str, Any]:
    """Accuracy against k for the selectors of ``cfg`` (the caller adds the oracle ``pass@k`` row).

    ``verifier_scores[i][j]``: the verifier's score of sample j of problem i (needed by "verifier"). ``ask``: maps
    judge prompts to the model's replies, one each (needed by "judge"); ``shown``: the candidates' texts in those
    prompts (``judge_requests``). Returns ``{"ks", "curves": {name: [acc per
    k']}, "subsets", "judge_subsets", ...}`` with the judge's ``judge/calls`` and ``judge/unparsed`` counts.
    """
    if not (len(correct) == len(answers) == len(problems)):
        raise ValueError(f"{len(correct)} problems of correctness, {len(answers)} of answers, {len(problems)} texts")
    k = max(len(c) for c in correct)
    ks = ks_up_to(k)
    subsets = problem_subsets([len(c) for c in correct], ks, cfg.subsets, cfg.seed)
    curves: dict[str, list[float]] = {}
    out: dict[str, Any] = {"ks": ks, "curves": curves, "subsets": cfg.subsets}
    for name in cfg.selectors:
        if name == "majority":
            curve = accuracy_curve(correct, subsets, majority_picker(answers))
        elif name == "verifier":
            if verifier_scores is None:
                raise ValueError("the verifier selector needs verifier scores")
            curve = accuracy_curve(correct, subsets, verifier_picker(answers, verifier_scores))
            name = f"verifier ({cfg.verifier})"
        else:
            if ask is None:
                raise ValueError("the judge selector needs a model to ask")
            requests = judge_requests(problems, answers, subsets, cfg.judge_subsets, shown)
            replies = ask([prompt for _, _, prompt in requests]) if requests else []
            if len(replies) != len(requests):
                raise ValueError(f"{len(requests)} judge prompts but {len(replies)} replies")
            by_subset = {(i, s): r for (i, s, _), r in zip(requests, replies, strict=True)}
            curve = accuracy_curve(correct, subsets, judge_picker(answers, by_subset), limit=cfg.judge_subsets)
            unparsed = sum(not judge_pick([answers[i][j] for j in s], r)[1] for (i, s), r in by_subset.items())
            out |= {"judge_subsets": cfg.judge_subsets, "judge/calls": len(requests), "judge/unparsed": unparsed}
            shown = zip(requests[:3], replies[:3], strict=True)
            out["judge_examples"] = [{"prompt": prompt, "reply": reply} for (_, _, prompt), reply in shown]
        curves[name] = [curve[size] for size in ks]
    return out


# --- report ---------------------------------------------------------------------------------------------------------
def selection_markdown(selection: Mapping[str, Any]) -> str:
    """A markdown table of accuracy against k: one row per k', one column per selector, then how it was counted."""
    names = list(selection["curves"])
    lines = ["| k | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row, size in enumerate(selection["ks"]):
        cells = [f"{100 * selection['curves'][name][row]:.1f}%" for name in names]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    note = f"Each k' < k averages {selection['subsets']} subsets of size k' per problem (all of them when fewer exist)"
    if "judge/calls" in selection:
        note += (
            f"; the judge is asked about {selection['judge_subsets']} of them: {selection['judge/calls']} calls, "
            f"{selection['judge/unparsed']} replies unparsed (majority vote instead)"
        )
    return "\n".join(lines) + "\n\n" + note + ".\n"


def plot_selection(selection: Mapping[str, Any], path: str, title: str = "accuracy against k") -> None:
    """A PNG of accuracy (%) against k (log2 axis), one line per selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = selection["ks"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, values in selection["curves"].items():
        style = "--" if "oracle" in name else "-"
        ax.plot(ks, [100 * v for v in values], style, marker="o", label=name, linewidth=1.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
