"""Evaluation: pass@1 averaged over k samples, maj@k and pass@k, and the sampling shared with ``r1jax sample``.

Small benchmarks (AIME has 30 problems) make one greedy sample per problem a noisy estimate; R1 reports pass@1 as the
mean correctness over k samples per problem (temperature 0.6, top-p 0.95) and maj@k, the correctness of the
majority answer among the k samples.

- ``pass_at_1``: mean over problems of c_i / n_i (c correct among n samples).
- ``pass_at_k``: the unbiased estimator of Chen et al. 2021 (Codex paper), 1 - C(n - c, k) / C(n, k) per problem,
  computed as a stable product, averaged over problems.
- ``maj_at_k``: per problem, the answers extracted from the samples (``answer_key``: the reward functions'
  extraction rules of ``r1jax.rewards.extract``, normalised per task) are counted; samples without an answer do not
  vote; the most frequent answer wins, ties going to the answer seen first; the problem counts as solved when a
  sample with the winning answer was scored correct. No answer at all: not solved.

Correctness is the ``accuracy`` reward (dispatching on the example's ``task``) reaching 1.

Selection over the k samples (tree of agents; ``evaluate(select=SelectConfig(...))``, ``r1jax eval --select``):
accuracy against k of the majority vote, a verifier reward and the model as judge, estimated without bias over
subsets of the samples, beside the oracle pass@k. The selectors and the estimate are ``r1jax.select``; here they
get their inputs: ``verifier_scores`` runs the verifier on ``verifier_view`` (no hidden answer), ``judge_asker``
asks the model greedily.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from r1jax.config import RewardConfig, SamplingConfig
from r1jax.data.templates import build_prompt, chat_messages, prompt_of
from r1jax.data.tokenizer import stop_ids
from r1jax.rewards.accuracy import gsm8k_prediction
from r1jax.rewards.code import extract_program
from r1jax.rewards.extract import extract_answer
from r1jax.select import SelectConfig, majority_pick, selection_curves, selection_markdown, verifier_view
from r1jax.tools import ToolEnv

CORRECT_AT = 1.0 - 1e-6  # a reward at least this is "correct" (countdown gives 0.1 for a well-formed miss)


# --- metrics (pure) -------------------------------------------------------------------------------------------------
def pass_at_k_single(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``c`` correct out of ``n`` samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean unbiased pass@k over problems; ``correct[i]`` lists problem i's per-sample correctness (n_i >= k)."""
    if not correct:
        return float("nan")
    return float(np.mean([pass_at_k_single(len(c), int(sum(bool(x) for x in c)), k) for c in correct]))


def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the share of correct samples (pass@1 averaged over the k samples)."""
    if not correct:
        return float("nan")
    return float(np.mean([np.mean([bool(x) for x in c]) if len(c) else 0.0 for c in correct]))


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Is the majority answer of one problem correct? ``None`` answers abstain; ties go to the first seen."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    pick = majority_pick(answers)
    return pick is not None and any(bool(c) for a, c in zip(answers, correct, strict=True) if a == answers[pick])


def maj_at_k(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of ``majority_vote``."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} problems of answers but {len(correct)} of correctness")
    if not answers:
        return float("nan")
    return float(np.mean([majority_vote(a, c) for a, c in zip(answers, correct, strict=True)]))


def answer_key(
    completion: str, meta: Mapping[str, Any], think_prefilled: bool = False, last_number: bool = False
) -> str | None:
    """The answer a completion gives, normalised for voting, by the task's extraction rules; None if it has none.

    gsm8k: the number the ``accuracy`` reward reads (``gsm8k_prediction``: ``<answer>`` / ``\\boxed`` / ``####``,
    and the last number with ``last_number``) as a reduced fraction string; math: the extracted answer with
    whitespace removed; code: the program the code reward runs, whitespace removed (identical programs vote
    together); countdown and others: the extracted ``<answer>`` / boxed text with whitespace removed.
    """
    if meta.get("task") == "code":
        return "".join(extract_program(completion).split()) or None
    return _answer(completion, meta, think_prefilled, last_number)


def answer_text(
    completion: str, meta: Mapping[str, Any], think_prefilled: bool = False, last_number: bool = False
) -> str | None:
    """The answer as a reader (the judge) sees it: for code the extracted program as written, else ``answer_key``."""
    if meta.get("task") == "code":
        return extract_program(completion).strip() or None
    return _answer(completion, meta, think_prefilled, last_number)


def _answer(completion: str, meta: Mapping[str, Any], think_prefilled: bool, last_number: bool) -> str | None:
    """``answer_key`` for the tasks whose answer is a value (gsm8k, math, countdown, ...)."""
    if meta.get("task", "math") == "gsm8k":
        value = gsm8k_prediction(completion, think_prefilled, last_number)
        return None if value is None else str(value)
    answer, _ = extract_answer(completion, think_prefilled)
    if answer is None:
        return None
    return "".join(answer.split()) or None


def metrics_markdown(metrics: Mapping[str, Any], title: str, settings: Mapping[str, Any] | None = None) -> str:
    """A markdown summary of ``evaluate``'s metrics: one table row per metric, then the sampling settings."""
    k = metrics["k"]
    rows = [
        ("pass@1", "mean correctness over the k samples", metrics["pass@1"]),
        (f"maj@{k}", "majority answer correct", metrics[f"maj@{k}"]),
        (f"pass@{k}", "any of k samples correct (unbiased estimator)", metrics[f"pass@{k}"]),
        ("answered", "samples with an extractable answer", metrics["answered_frac"]),
        ("truncated", "samples cut at the token limit", metrics["truncated_frac"]),
    ]
    lines = [f"# {title}", "", f"{metrics['n_problems']} problems, k = {k} samples each.", ""]
    lines += ["| metric | meaning | value |", "|---|---|---|"]
    lines += [f"| {name} | {meaning} | {100 * value:.1f}% |" for name, meaning, value in rows]
    lines.append(f"| length | mean completion tokens | {metrics['length_mean']:.1f} |")
    if settings:
        lines += ["", "Sampling: " + ", ".join(f"{key} = {value}" for key, value in settings.items()) + "."]
    if "selection" in metrics:
        lines += ["", "## Selection over k samples", "", selection_markdown(metrics["selection"]).rstrip()]
    return "\n".join(lines) + "\n"


# --- sampling shared by eval and rejection sampling -----------------------------------------------------------------
def sample_completions(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    k: int,
    sampling: SamplingConfig,
    tools: ToolEnv | None = None,
    template: str = "r1_zero",
    system: str | None = None,
    batch_size: int = 8,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> list[dict]:
    """``k`` completions per example. Returns one dict per example: ``prompt`` (rendered text), ``think_prefilled``,
    ``completions`` (k texts, stop token dropped), ``lengths`` (k token counts), ``ended`` (k bools), ``tool_calls`` (k
    counts). With ``tools`` the samples are multi-turn tool trajectories (``r1jax.tool_rollout.sample_with_tools``):
    a completion holds its tool turns as text, the tools' results included, and ``lengths`` count them too.

    Prompts go through the jitted group sampler (``r1jax.rollout.sample``, one prefill per prompt) in batches of
    ``batch_size``; the last batch is padded with repeats so every call has the same shape. With ``mesh`` they are
    sampled on it, rows split over its data axes.
    """
    from r1jax import rollout, tool_rollout

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    stops = stop_ids(model.cfg, tokenizer)
    rendered = [build_prompt(ex, tokenizer, template, system) for ex in examples]
    ids = [tokenizer.encode(text) for text, _ in rendered]
    params = model.param_dict()
    key = jax.random.key(seed)

    def sample(*args, **kw):
        return rollout.sample(*args, **kw) if tools is None else tool_rollout.sample_with_tools(*args, env=tools, **kw)

    out: list[dict] = []
    for start in range(0, len(examples), batch_size):
        chunk = ids[start : start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - real) if len(examples) > batch_size else chunk
        ro = sample(
            params,
            chunk,
            jax.random.fold_in(key, start),
            cfg=model.cfg,
            sampling=sampling,
            group_size=k,
            stop_ids=stops,
            encode=tokenizer.encode,
            decode=tokenizer.decode,
            mesh=mesh,
        )
        texts = rollout.completion_texts(
            ro,
            tokenizer.decode,
            stop_ids=stops,
            stop_strings=sampling.stop_strings,
            include_stop_str=sampling.include_stop_str,
        )
        lengths, ended = np.asarray(ro.lengths), np.asarray(ro.ended)
        calls = np.asarray(ro.num_calls) if tools is not None else np.zeros(len(lengths), np.int32)
        for i in range(real):
            text, prefilled = rendered[start + i]
            rows = slice(i * k, (i + 1) * k)
            out.append(
                {
                    "prompt": text,
                    "think_prefilled": prefilled,
                    "completions": texts[rows],
                    "lengths": lengths[rows].tolist(),
                    "ended": ended[rows].tolist(),
                    "tool_calls": calls[rows].tolist(),
                }
            )
    return out


def score_samples(
    samples: Sequence[Mapping[str, Any]], examples: Sequence[Mapping[str, Any]], rewards: RewardConfig
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(totals, components) per example: float32[k] weighted rewards and float32[k, f] per-function values, scored
    with ``rewards`` (its ``think_prefilled`` taken from each sample's prompt)."""
    from r1jax.rewards import Scorer

    totals: list[np.ndarray] = [np.zeros(0, np.float32)] * len(samples)
    comps: list[np.ndarray] = [np.zeros((0, len(rewards.functions)), np.float32)] * len(samples)
    for prefilled in (False, True):
        idx = [i for i, s in enumerate(samples) if bool(s["think_prefilled"]) == prefilled]
        if not idx:
            continue
        cfg = RewardConfig(**{**_fields(rewards), "think_prefilled": prefilled})
        texts, metas = [], []
        for i in idx:
            for c, n in zip(samples[i]["completions"], samples[i]["lengths"], strict=True):
                texts.append(c)
                metas.append({**examples[i], "num_tokens": int(n)})
        with Scorer(cfg) as scorer:
            values, _ = scorer.components(texts, metas)
        weights = np.asarray(cfg.weights, np.float32)
        at = 0
        for i in idx:
            n = len(samples[i]["completions"])
            comps[i] = values[at : at + n]
            totals[i] = values[at : at + n] @ weights
            at += n
    return totals, comps


def _fields(cfg: Any) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def verifier_scores(
    samples: Sequence[Mapping[str, Any]], examples: Sequence[Mapping[str, Any]], verifier: str, rewards: RewardConfig
) -> list[np.ndarray]:
    """float32[k] per example: reward function ``verifier`` on each sample, given only ``verifier_view(example)``
    (run like ``rewards``: same workers, timeout and answer rules). With no ``samples``, only checks that the
    verifier can run on those views (one empty completion per task, in-process). A verifier that needs the hidden
    reference is refused with ValueError."""
    cfg = RewardConfig(**{**_fields(rewards), "functions": (verifier,), "weights": (1.0,)})
    views = [verifier_view(ex) for ex in examples]
    try:
        if not samples:
            from r1jax.rewards import Scorer

            first = list({str(v.get("task")): v for v in reversed(views)}.values())
            Scorer(RewardConfig(**{**_fields(cfg), "num_workers": 0})).components([""] * len(first), first)
            return []
        totals, _ = score_samples(samples, views, cfg)
    except ValueError as e:
        raise ValueError(
            f"verifier {verifier!r}: {e}; a verifier sees each problem without its reference answer"
        ) from None
    return totals


JUDGE_PREFILL_CHUNK = 256  # judge prompts are prefilled this many tokens at a time
JUDGE_BATCH_TOKENS = 8192  # prompt tokens per judge batch (the longest prompt's times the rows)


def judge_asker(
    model: Any,
    tokenizer: Any,
    *,
    template: str,
    system: str | None,
    max_new_tokens: int,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[list[str]], list[str]]:
    """``ask(prompts) -> replies``: the model's greedy replies to judge prompts, rendered with the evaluation's
    template; prompts are batched by length (fewer padded shapes to compile) and the replies returned in order.

    A judge prompt lists up to k candidates (k programs run to thousands of tokens), so its memory is bounded: the
    prompt is prefilled in chunks of ``JUDGE_PREFILL_CHUNK`` tokens, and a batch holds at most ``batch_size`` rows
    and ``JUDGE_BATCH_TOKENS`` prompt tokens (at least one row)."""
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, prompt_chunk=JUDGE_PREFILL_CHUNK)

    def ask(prompts: list[str]) -> list[str]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        longest = len(tokenizer.encode(prompts[order[-1]])) if prompts else 1
        rows = max(1, min(batch_size, JUDGE_BATCH_TOKENS // longest))
        out = sample_completions(
            model, tokenizer, [{"prompt": prompts[i]} for i in order], k=1, sampling=sampling, template=template,
            system=system, batch_size=rows, mesh=mesh,
        )  # fmt: skip
        replies = [""] * len(prompts)
        for i, sample in zip(order, out, strict=True):
            replies[i] = sample["completions"][0]
        return replies

    return ask


def evaluate(
    model: Any,
    tokenizer: Any,
    dataset: Sequence[Mapping[str, Any]],
    *,
    k: int = 4,
    temperature: float = 0.6,
    max_new_tokens: int = 1024,
    template: str = "r1_zero",
    system: str | None = None,
    top_p: float = 0.95,
    stop_strings: Sequence[str] = (),
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    rewards: RewardConfig | None = None,
    select: SelectConfig | None = None,
    return_samples: bool = False,
    tools: ToolEnv | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict:
    """Sample ``k`` completions per problem and score them with the ``accuracy`` reward.

    Returns ``{"pass@1", "maj@k", "pass@k", "n_problems", "k", "length_mean", "truncated_frac", "answered_frac"}``
    (``maj@k`` / ``pass@k`` keyed with the actual k, e.g. ``"maj@4"``), plus ``"samples"`` (per problem: prompt,
    completions, answers, correct) when ``return_samples``. Defaults follow R1's evaluation (temperature 0.6, top-p
    0.95). ``rewards`` overrides the scoring config (default: the ``accuracy`` reward alone, in worker processes).
    ``tools``: sample multi-turn tool trajectories with this environment (``sample_completions``); the result then
    has ``"tool_calls_mean"``, tool calls per sample.
    With ``select``, ``"selection"`` holds accuracy against k per selector (``r1jax.select.selection_curves``)
    with the oracle row ``"pass@k (oracle)"`` first. ``mesh``: sample on it (see ``sample_completions``).
    """
    examples = [dataset[i] for i in range(len(dataset) if limit is None else min(limit, len(dataset)))]
    if not examples:
        raise ValueError("no problems to evaluate")
    rewards = rewards or RewardConfig(functions=("accuracy",), weights=(1.0,))
    if select is not None and select.verifier:
        verifier_scores([], examples, select.verifier, rewards)  # refuse a verifier that needs the answer, early
    sampling = SamplingConfig(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop_strings=tuple(stop_strings)
    )
    samples = sample_completions(
        model, tokenizer, examples, k=k, sampling=sampling, template=template, system=system, tools=tools,
        batch_size=batch_size, seed=seed, mesh=mesh,
    )  # fmt: skip
    acc = rewards.functions.index("accuracy") if "accuracy" in rewards.functions else None
    if acc is None:
        raise ValueError("evaluation needs the 'accuracy' reward in rewards.functions")
    _, comps = score_samples(samples, examples, rewards)
    correct = [list(c[:, acc] >= CORRECT_AT) for c in comps]
    answers = [
        [answer_key(t, ex, s["think_prefilled"], rewards.gsm8k_last_number) for t in s["completions"]]
        for s, ex in zip(samples, examples, strict=True)
    ]
    lengths = np.concatenate([s["lengths"] for s in samples])
    ended = np.concatenate([s["ended"] for s in samples])
    result: dict[str, Any] = {
        "pass@1": pass_at_1(correct),
        f"maj@{k}": maj_at_k(answers, correct),
        f"pass@{k}": pass_at_k(correct, k),
        "n_problems": len(examples),
        "k": k,
        "length_mean": float(lengths.mean()),
        "truncated_frac": float(1.0 - ended.mean()),
        "answered_frac": float(np.mean([a is not None for row in answers for a in row])),
    }
    if select is not None:
        scores = verifier_scores(samples, examples, select.verifier, rewards) if select.verifier else None
        ask = shown = None
        if "judge" in select.selectors:
            shown = [  # what the judge reads of each candidate
                [answer_text(t, ex, s["think_prefilled"], rewards.gsm8k_last_number) for t in s["completions"]]
                for s, ex in zip(samples, examples, strict=True)
            ]
            ask = judge_asker(  # one judge prompt per row: batches of as many rows as the sampler's
                model, tokenizer, template=template, system=system, max_new_tokens=select.judge_max_new_tokens,
                batch_size=batch_size * k, mesh=mesh,
            )  # fmt: skip
        problems = [prompt_of(ex) for ex in examples]
        selection = selection_curves(correct, answers, problems, select, verifier_scores=scores, ask=ask, shown=shown)
        oracle = {"pass@k (oracle)": [pass_at_k(correct, size) for size in selection["ks"]]}
        result["selection"] = {**selection, "curves": oracle | selection["curves"]}
    if tools is not None:
        result["tool_calls_mean"] = float(np.mean([c for s in samples for c in s["tool_calls"]]))
    if return_samples:
        result["samples"] = [
            {"prompt": s["prompt"], "completions": s["completions"], "answers": a, "correct": [bool(x) for x in c]}
            for s, a, c in zip(samples, answers, correct, strict=True)
        ]
    return result


def chat_record(example: Mapping[str, Any], completion: str, think_prefilled: bool, system: str | None = None):
    """The ``messages`` of an SFT trace: the prompt's chat turns plus the assistant's reply (with the ``<think>``
    opening that the template pre-filled, so the reply is complete on its own)."""
    reply = ("<think>\n" + completion) if think_prefilled else completion
    return [*chat_messages(example, system), {"role": "assistant", "content": reply}]


def max_total_reward(rewards: RewardConfig) -> float:
    """The highest total ``rewards`` can give: each function at its best end for the sign of its weight."""
    from r1jax.rewards.registry import get

    total = 0.0
    for name, w in zip(rewards.functions, rewards.weights, strict=True):
        spec = get(name)
        total += w * (spec.high if w >= 0 else spec.low)
    return total
