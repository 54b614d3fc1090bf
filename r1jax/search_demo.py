"""``r1jax demo --task search``: a model that cannot know the answers learns to search for them.

The task (``r1jax.data.builders.search_qa``): two-hop questions about invented people, ``What is the city of the
mentor of Qarvel?``, whose facts live only in a generated corpus searched by BM25 (``r1jax.tools.search``). Test
questions are about people no training question mentions, so memorising training answers is worth nothing on them.

1. Cold start: the byte-level V3-style demo model (``configs/demo.py``, ``model="byte"``) is trained from scratch,
   or SmolLM2-135M-Instruct (``configs/smollm2.py``, ``model="smollm2"``, prompted through its chat template) is
   fine-tuned, by SFT on tool-use traces for ``sft_traces`` training questions: ``<think><search>mentor of
   Qarvel</search><information>[3] Qarvel: The mentor of Qarvel is Ostrin.</information><search>city of
   Ostrin</search><information>...</information></think> <answer>Vexholm</answer>``, with the results written
   by the real search tool over the corpus. The ``<information>`` blocks are context, masked out of the loss
   (``tools.tools`` of the SFT preset). Each trace is also cut after each of its calls (``turn_prefixes``): one
   short row per turn, so each query is a target again.
2. GRPO with the tool in the loop (``r1jax.tool_rollout``): the sampler stops at ``</search>``, the tool's result
   is appended with loss and KL mask 0, decoding goes on; rewards accuracy (normalised exact match) + format.
3. Held-out greedy pass@1 of each model with the tool, and of the GRPO model with the tool switched off (it then
   writes its own ``<information>``: what the model answers from memory). Search calls per answer: the result
   blocks in each evaluated completion, and the per-step rollout metrics of GRPO (``metrics.jsonl``).
4. Baseline trained without tool traces (``closed_book``): the same model and recipe on traces that state both
   facts from memory (``<think>The mentor of Qarvel is Ostrin. The city of Ostrin is Vexholm.</think> ...``), the
   same GRPO without the tool, evaluated the same way.

``out_dir`` receives ``data/`` (corpus, questions), ``sft_data/`` and ``closed_sft_data/`` (the traces), run
directories ``sft/``, ``grpo/``, ``closed_sft/``, ``closed_grpo/``, ``summary.json``, ``report.md`` and
``search_calls.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1jax.data.builders.search_qa import fact_text, write_search_qa
from r1jax.errors import R1jaxError

STAGE_DIRS = ("data", "sft_data", "closed_sft_data", "sft", "grpo", "closed_sft", "closed_grpo")
SEARCH = "search"


# --- traces -----------------------------------------------------------------------------------------------------------
def tool_trace(example: Mapping[str, Any], search) -> str:
    """The cold-start completion for ``example``: its two searches, each followed by the result block the tool
    returns for it (``search(query) -> ToolOutput``), then the answer. ``R1jaxError`` when a result does not hold
    the fact the next step needs (the trace would teach the model to answer what it never read)."""
    from r1jax.tools.protocol import syntax_of

    syntax = syntax_of(SEARCH)
    parts = []
    for query, needed in zip(example["queries"], (example["bridge"], example["answer"]), strict=True):
        result = search(query)
        if result.error is not None or needed not in result.text:
            raise R1jaxError(f"search {query!r} does not return {needed!r} (got {result.text!r})")
        parts.append(f"{syntax.call_open}{query}{syntax.call_close}{syntax.result_block(result.text)}")
    return f"<think>{''.join(parts)}</think> <answer>{example['answer']}</answer>"


def turn_prefixes(trace: str) -> list[str]:
    """The trace cut after each of its calls: one cold-start example per turn (each call is a target once more, in
    a short row; the full trace teaches the answer). Copying a name the model has never seen into a query is what
    the tool model must learn, and short rows put many more such copies into a step."""
    import re

    from r1jax.tools.protocol import syntax_of

    return [trace[: m.end()] for m in re.finditer(re.escape(syntax_of(SEARCH).call_close), trace)]


def closed_book_trace(example: Mapping[str, Any]) -> str:
    """The baseline's completion: both facts recalled as reasoning, no tool."""
    (rel, _, _), (attr, _, _) = (q.partition(" of ") for q in example["queries"])
    first = fact_text(example["subject"], rel, example["bridge"])
    second = fact_text(example["bridge"], attr, example["answer"])
    return f"<think>{first} {second}</think> <answer>{example['answer']}</answer>"


def search_calls(completion: str) -> int:
    """Searches the environment answered in a completion (its ``<information>`` result blocks)."""
    from r1jax.tools.protocol import result_spans

    return len(result_spans(completion, (SEARCH,)))


def written_queries(completion: str) -> list[str]:
    """The search queries a completion wrote, in order (``<search>...</search>``, stripped)."""
    import re

    from r1jax.tools.protocol import syntax_of

    syntax = syntax_of(SEARCH)
    pattern = re.escape(syntax.call_open) + "(.*?)" + re.escape(syntax.call_close)
    return [q.strip() for q in re.findall(pattern, completion, flags=re.DOTALL)]


def hop_match(completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> list[float]:
    """Per hop, the share of completions whose i-th query is the example's i-th needed query (case and spacing
    aside): hop 1 copies the subject out of the question, hop 2 the bridge entity out of the first result."""

    def norm(q: str) -> str:
        return " ".join(q.lower().split())

    hops = len(examples[0]["queries"]) if examples else 0
    return [
        float(np.mean([
            len(qs := written_queries(c)) > h and norm(qs[h]) == norm(ex["queries"][h])
            for c, ex in zip(completions, examples, strict=True)
        ]))
        for h in range(hops)
    ]  # fmt: skip


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: Sequence[Mapping]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _sft_record(example: Mapping[str, Any], completion: str) -> dict:
    return {k: example[k] for k in ("prompt", "answer", "task")} | {"completion": completion}


def make_search_data(
    out: str | os.PathLike, *, n_traces: int, seed: int = 0, top_k: int = 1, turns: bool = True, **options
) -> dict:
    """Write the corpus and questions (``data/``) and the cold-start traces for ``n_traces`` training questions
    drawn at random (``sft_data/`` with the tool, ``closed_sft_data/`` without) under ``out``; returns the sizes.
    ``turns``: ``sft_data`` also holds each trace's ``turn_prefixes`` (the training iterator shuffles them in)."""
    from r1jax.tools.search import BM25Search

    out = Path(out)
    sizes = write_search_qa(out / "data", seed=seed, **options)
    train = _read_jsonl(out / "data" / "train.jsonl")
    if not 1 <= n_traces <= len(train):
        raise R1jaxError(f"n_traces must be in [1, {len(train)}] (the training questions), got {n_traces}")
    search = BM25Search.from_file(str(out / "data" / "corpus.jsonl"), top_k=top_k)
    picked = np.random.default_rng([seed, 1]).choice(len(train), size=n_traces, replace=False)
    chosen = [train[int(i)] for i in sorted(picked)]
    rows = []
    for ex in chosen:
        trace = tool_trace(ex, search)
        rows += [_sft_record(ex, t) for t in ([trace, *turn_prefixes(trace)] if turns else [trace])]
    _write_jsonl(out / "sft_data" / "train.jsonl", rows)
    _write_jsonl(out / "closed_sft_data" / "train.jsonl", [_sft_record(ex, closed_book_trace(ex)) for ex in chosen])
    return sizes | {"traces": n_traces, "turn_rows": len(rows) - n_traces}


# --- stages -----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """How big each stage is. The defaults are the ``r1jax demo --task search`` run; tests shrink them."""

    sft_steps: int | None = None  # None: the preset's (demo_search_sft / demo_search_grpo)
    grpo_steps: int | None = None
    sft_traces: int = 4800  # training questions with a cold-start trace (all 4,800)
    data: tuple[tuple[str, int], ...] = ()  # SearchQAConfig options, e.g. (("train_students", 30),)
    n_test: int | None = None  # held-out questions evaluated (None: all 200)
    eval_batch: int = 100  # prompts per sampler call when evaluating
    closed_book: bool = True  # also train and evaluate the baseline without tool traces
    seed: int = 0
    overrides: tuple[tuple[str, str], ...] = ()  # (stage, "key=value"), stage search_sft | search_grpo
    model: str = "byte"  # a key of MODELS: the presets the stages start from

    def __post_init__(self) -> None:
        if self.sft_traces < 1 or self.eval_batch < 1 or (self.n_test is not None and self.n_test < 1):
            raise ValueError("sft_traces, eval_batch and n_test must be >= 1")
        if self.model not in MODELS:
            raise ValueError(f"unknown search demo model {self.model!r}; known: {', '.join(MODELS)}")


# the model -> the prefix of its two presets (PREFIX_sft, PREFIX_grpo) and its default output directory
MODELS = {
    "byte": ("demo_search", "runs/demo_search"),  # the 0.86M byte-level demo model, trained from scratch
    "smollm2": ("smollm2_search", "runs/demo_search_smollm2"),  # SmolLM2-135M-Instruct through its chat template
}


def evaluate_search(run_dir: Path, test: list[dict], plan: SearchPlan, tools, cfg) -> dict:
    """Greedy pass@1 of the model in ``run_dir`` on the held-out questions (exact match, ``r1jax.evaluate``), with
    the tools of ``tools`` (a ``ToolConfig``) in the loop or none, prompted and bounded as the GRPO config ``cfg``
    samples; the search calls the environment ran per answer, and the calls the model wrote (without the tool it
    still writes them, and then its own ``<information>``)."""
    import r1jax
    from r1jax.config import RewardConfig
    from r1jax.data.tokenizer import for_model
    from r1jax.evaluate import evaluate
    from r1jax.tools import build_tools, syntax_of

    t0 = time.perf_counter()
    model = r1jax.load(str(run_dir))
    tok = for_model(model.cfg, dict(model.tokenizer_files), byte_fallback=True)
    env = build_tools(tools) if tools is not None else None
    try:
        m = evaluate(
            model, tok, test, k=1, temperature=0.0, top_p=1.0, max_new_tokens=cfg.sampling.max_new_tokens,
            template=cfg.data.template, system=cfg.data.system, batch_size=plan.eval_batch, seed=plan.seed,
            rewards=RewardConfig(functions=("accuracy",), weights=(1.0,), num_workers=0), return_samples=True,
            tools=env,
        )  # fmt: skip
    finally:
        if env is not None:
            env.close()
    texts = [s["completions"][0] for s in m["samples"]]
    close = syntax_of(SEARCH).call_close
    return {
        "pass@1": m["pass@1"],
        "search_calls_per_answer": m.get("tool_calls_mean", 0.0),
        "written_calls_per_answer": float(np.mean([t.count(close) for t in texts])),
        "hop_match": hop_match(texts, test),
        "answered_frac": m["answered_frac"],
        "n_problems": m["n_problems"],
        "tool": tools is not None,
        "example": {"prompt": test[0]["prompt"], "completion": texts[0], "answer": test[0]["answer"]},
        "eval_s": round(time.perf_counter() - t0, 1),
    }


def calls_over_training(metrics_path: Path, windows: int = 4) -> list[dict]:
    """GRPO's search calls per sample and training reward, averaged over ``windows`` equal spans of steps (from the
    run's ``metrics.jsonl``)."""
    rows = [r for r in _read_jsonl(metrics_path) if "tools/search/calls_per_sample" in r]
    spans = np.array_split(np.arange(len(rows)), min(windows, len(rows)))
    return [
        {
            "steps": f"{int(rows[s[0]]['step'])}-{int(rows[s[-1]]['step'])}",
            "search_calls_per_sample": float(np.mean([rows[i]["tools/search/calls_per_sample"] for i in s])),
            "reward_mean": float(np.mean([rows[i].get("reward/mean", np.nan) for i in s])),
            "accuracy": float(np.mean([rows[i].get("accuracy", np.nan) for i in s])),
        }
        for s in spans
        if len(s)
    ]


def _without_tools(cfg):
    from r1jax.config import ToolConfig

    return dataclasses.replace(cfg, tools=ToolConfig())


def run_search_demo(
    out_dir: str | os.PathLike = "runs/demo_search",
    minutes_budget: float = 15.0,
    *,
    plan: SearchPlan | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run the search miniature into ``out_dir`` (its stage directories are replaced) and return the summary that is
    also written to ``out_dir/summary.json``."""
    from r1jax.demo import _json_default, _params, _stage_config, _train, fresh_output
    from r1jax.report import machine, write_report

    plan = plan or SearchPlan()
    t_start = time.perf_counter()
    out = fresh_output(out_dir, STAGE_DIRS)

    def elapsed() -> float:
        return (time.perf_counter() - t_start) / 60

    corpus = str(out / "data" / "corpus.jsonl")
    prefix = MODELS[plan.model][0]
    sft_cfg = _stage_config("search_sft", plan, data=str(out / "sft_data"), init=None, steps=plan.sft_steps,
                            preset=f"{prefix}_sft")  # fmt: skip
    grpo_cfg = _stage_config("search_grpo", plan, data=str(out / "data"), init=str(out / "sft"),
                             steps=plan.grpo_steps, preset=f"{prefix}_grpo")  # fmt: skip
    tools = dataclasses.replace(grpo_cfg.tools, corpus=corpus)
    sft_cfg = dataclasses.replace(sft_cfg, tools=dataclasses.replace(sft_cfg.tools, corpus=corpus))
    grpo_cfg = dataclasses.replace(grpo_cfg, tools=tools)

    sizes = make_search_data(out, n_traces=plan.sft_traces, seed=plan.seed, top_k=tools.top_k, **dict(plan.data))
    test = _read_jsonl(out / "data" / "test.jsonl")[: plan.n_test]
    log(f"[search] data: {sizes['corpus']} facts, {sizes['train']} train / {sizes['test']} test questions (disjoint "
        f"people), {sizes['traces']} cold-start traces (+ {sizes['turn_rows']} turn prefixes), {len(test)} "
        "evaluated")  # fmt: skip

    stages: dict[str, Any] = {}

    def stage(name: str, cfg, evals: dict) -> None:
        stages[name] = _train(cfg, out / name, progress)
        stages[name]["eval"] = {k: evaluate_search(out / name, test, plan, t, grpo_cfg) for k, t in evals.items()}
        shown = ", ".join(f"{k} {v['pass@1']:.3f}" for k, v in stages[name]["eval"].items())
        log(f"[search]     {name}: pass@1 {shown} ({elapsed():.1f} min)")

    log("[search] 1/3 cold-start SFT on tool-use traces (results masked out of the loss)")
    stage("sft", sft_cfg, {"tool": tools})
    log("[search] 2/3 GRPO with BM25 search in the loop (accuracy + format rewards)")
    stage("grpo", grpo_cfg, {"tool": tools, "no_tool": None})
    if plan.closed_book:
        log("[search] 3/3 baseline without tool traces: the same SFT and GRPO, facts recalled from memory")
        closed_sft = dataclasses.replace(_without_tools(sft_cfg), data=dataclasses.replace(
            sft_cfg.data, name=str(out / "closed_sft_data")))  # fmt: skip
        stage("closed_sft", closed_sft, {"no_tool": None})
        stage("closed_grpo", dataclasses.replace(_without_tools(grpo_cfg), init=str(out / "closed_sft")),
              {"no_tool": None})  # fmt: skip

    for name in stages:
        stages[name]["report"] = str(write_report(out / name))
        stages[name]["params"] = _params(out / name)
        stages[name]["last"] = {k: v for k, v in stages[name]["last"].items() if isinstance(v, int | float)}
    over_training = calls_over_training(out / "grpo" / "metrics.jsonl")
    minutes = elapsed()
    summary = {
        "tool_pass@1": {
            "sft": stages["sft"]["eval"]["tool"]["pass@1"],
            "grpo": stages["grpo"]["eval"]["tool"]["pass@1"],
        },
        "no_tool_pass@1": {n: st["eval"]["no_tool"]["pass@1"] for n, st in stages.items() if "no_tool" in st["eval"]},
        "grpo_gain_points": 100 * (stages["grpo"]["eval"]["tool"]["pass@1"] - stages["sft"]["eval"]["tool"]["pass@1"]),
        "search_calls_over_training": over_training,
        "minutes": round(minutes, 2),
        "minutes_budget": minutes_budget,
        "within_budget": minutes <= minutes_budget,
        "eval": {
            "n_problems": len(test),
            "k": 1,
            "temperature": 0.0,
            "metric": "greedy pass@1, normalised exact match",
        },
        "task": "two-hop questions about invented people; facts only in a BM25-searched corpus; test people unseen",
        "model": plan.model,
        "data": sizes,
        "machine": machine(),
        "stages": stages,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    _write_report(out, summary)
    log(table(summary))
    if minutes > minutes_budget:
        log(f"[search] warning: {minutes:.1f} min exceeds the {minutes_budget:g}-minute budget")
    return summary


_ROWS = (  # (stage, evaluation, what the model is)
    ("sft", "tool", "SFT on tool-use traces"),
    ("grpo", "tool", "+ GRPO with the tool"),
    ("grpo", "no_tool", "the same, tool switched off"),
    ("closed_sft", "no_tool", "SFT without tool traces"),
    ("closed_grpo", "no_tool", "+ GRPO without the tool"),
)


def table(summary: dict) -> str:
    """The result table printed at the end of the demo (and put in ``report.md``)."""
    rows = [("model", "steps", "train s", "search", "pass@1", "calls/answer")]
    for name, kind, what in _ROWS:
        st = summary["stages"].get(name)
        if st is None:
            continue
        e = st["eval"][kind]
        rows.append((what, str(st["steps"]), f"{st['train_s']:.0f}", "on" if e["tool"] else "off",
                     f"{e['pass@1']:.3f}", f"{e['search_calls_per_answer']:.2f}"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    calls = ", ".join(
        f"{w['steps']}: {w['search_calls_per_sample']:.2f}" for w in summary["search_calls_over_training"]
    )
    gain, n = summary["grpo_gain_points"], summary["eval"]["n_problems"]
    lines += [f"GRPO search calls per sample by steps: {calls}",
              f"GRPO over SFT: {gain:+.1f} points; {summary['minutes']:.1f} min (greedy pass@1 on {n} held-out "
              "questions about unseen people)"]  # fmt: skip
    return "\n".join(lines)


def _write_report(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _read_jsonl(out / "grpo" / "metrics.jsonl") if "tools/search/calls_per_sample" in r]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["tools/search/calls_per_sample"] for r in rows], label="search calls / sample")
    ax.plot(steps, [r.get("accuracy", np.nan) for r in rows], label="training accuracy")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("Search in the loop")
    fig.tight_layout()
    fig.savefig(out / "search_calls.png")
    plt.close(fig)
    lines = [
        "# r1jax demo --task search",
        "",
        f"Task: {summary['task']}. Metric: {summary['eval']['metric']} on {summary['eval']['n_problems']} held-out "
        f"questions. Wall time {summary['minutes']:.1f} min on {summary['machine']['cpus']} CPUs.",
        "",
        "```",
        table(summary),
        "```",
        "",
        "![search calls](search_calls.png)",
        "",
        "Training curves: " + ", ".join(f"[{n}]({n}/report/summary.md)" for n in summary["stages"]),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
