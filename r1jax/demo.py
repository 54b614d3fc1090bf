"""``r1jax demo``: DeepSeek-R1's pipeline in miniature, from scratch, on a CPU, with no download.

1. Cold start: a tiny DeepSeek-V3-style model (MLA + MoE with a shared expert, ``configs/demo.py``) is trained by
   SFT on generated reasoning traces for two-digit addition, written the way R1 answers
   (``<think>7+5=12 4+8+1=13</think> <answer>132</answer>``: column addition with the carries).
   The SFT is deliberately short, so the model solves only part of the held-out problems.
2. Reasoning RL: GRPO with the rule-based rewards (accuracy + strict format) on training prompts.
3. Distillation: rejection sampling from the RL model on training prompts (kept: correct and well formed), then SFT
   of a smaller dense Qwen2-style student from scratch on those traces.
4. Evaluation of every stage on the same held-out test problems (never seen in training): pass@1 of one greedy
   completion per problem (temperature 0), scored by the ``accuracy`` reward.

Everything lands in ``out_dir``: ``data/`` (the generated problems and traces), one run directory per stage
(``sft/``, ``grpo/``, ``distill/``: checkpoints, ``metrics.jsonl``, ``report/`` with plots), ``distill_data/``
(the rejection-sampled traces), ``summary.json`` (``sft_pass@1``, ``grpo_pass@1``, ``distill_pass@1``, ``minutes``
and per-stage details), ``report.md`` and ``pass_at_1.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1jax.errors import R1jaxError

STAGE_DIRS = ("data", "sft", "grpo", "distill_data", "distill", "report")


# --- the task ---------------------------------------------------------------------------------------------------------
def addition_prompt(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def addition_trace(a: int, b: int) -> str:
    """The worked solution: one ``x+y(+1)=s`` step per column, least significant first, then the answer."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
        carry = s // 10
    return f"<think>{' '.join(steps)}</think> <answer>{a + b}</answer>"


def addition_example(a: int, b: int) -> dict:
    return {"prompt": addition_prompt(a, b), "completion": addition_trace(a, b), "answer": str(a + b), "task": "gsm8k"}


def make_addition_data(
    out: str | os.PathLike, *, n_train: int, n_test: int, seed: int = 0, digits: int = 3
) -> dict[str, int]:
    """Write ``{train,test}.jsonl`` of ``digits``-digit additions to ``out``: disjoint (``a + b`` and ``b + a`` count
    as one problem), deterministic in ``seed``. Returns the split sizes."""
    lo, hi = 10 ** (digits - 1), 10**digits
    if n_train + n_test > (hi - lo) * (hi - lo + 1) // 2:
        raise ValueError(f"only {(hi - lo) * (hi - lo + 1) // 2} distinct {digits}-digit problems")
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, int]] = set()
    splits: dict[str, list[dict]] = {"test": [], "train": []}
    for split, n in (("test", n_test), ("train", n_train)):
        while len(splits[split]) < n:
            a, b = (int(x) for x in rng.integers(lo, hi, size=2))
            key = (min(a, b), max(a, b))
            if key in seen:
                continue
            seen.add(key)
            splits[split].append(addition_example(a, b))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {k: len(v) for k, v in splits.items()}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- stages -----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """How big each stage is. The defaults are the ``make demo`` run; tests shrink them."""

    sft_steps: int | None = None  # None: the preset's
    grpo_steps: int | None = None
    distill_steps: int | None = None
    n_train: int = 3_800  # of the 4,095 distinct two-digit problems
    n_test: int = 200
    digits: int = 2  # operand length
    eval_batch: int = 100  # prompts per sampler call when evaluating (one compiled shape)
    distill_prompts: int = 512  # training prompts the RL model answers for rejection sampling
    distill_samples: int = 4  # completions per prompt
    distill_temperature: float = 0.7
    distill_keep: str = "correct"  # "all": keep every sample (tests, where the teacher solves nothing yet)
    seed: int = 0
    overrides: tuple[tuple[str, str], ...] = ()  # (stage, "key=value") config overrides, stage sft|grpo|distill


def _stage_config(stage: str, plan: DemoPlan, *, data: str, init: str | None, steps: int | None, preset=None):
    """Preset ``preset`` (default ``demo_{stage}``) with the plan's data, init, steps, seed and overrides."""
    from r1jax import train
    from r1jax.overrides import apply_overrides

    cfg = train.load_config(preset or f"demo_{stage}")
    sets = [f"data.name={data}", f"seed={plan.seed}"]
    if init is not None:
        sets.append(f"init={init}")
    if steps is not None:
        sets += [f"steps={steps}", f"checkpoint.every={steps}"]
        if cfg.optim.decay_steps:
            warm = min(cfg.optim.warmup_steps, steps // 4)
            sets += [f"optim.warmup_steps={warm}", f"optim.decay_steps={max(steps - warm, 1)}"]
    sets += [kv for name, kv in plan.overrides if name == stage]
    return apply_overrides(cfg, sets)


def _train(cfg, run_dir: Path, progress: bool) -> dict:
    from r1jax import train

    t0 = time.perf_counter()
    last = train.run(cfg, str(run_dir), progress=progress)
    return {"run_dir": str(run_dir), "steps": cfg.steps, "train_s": round(time.perf_counter() - t0, 1), "last": last}


def _evaluate(run_dir: Path, test: list[dict], plan: DemoPlan, max_new_tokens: int) -> dict:
    """Greedy pass@1 of the model in ``run_dir`` on the held-out problems."""
    import r1jax
    from r1jax.config import RewardConfig
    from r1jax.configs.demo import TEMPLATE
    from r1jax.data.tokenizer import ByteTokenizer
    from r1jax.evaluate import evaluate

    t0 = time.perf_counter()
    model = r1jax.load(str(run_dir))
    metrics = evaluate(
        model, ByteTokenizer(), test, k=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
        template=TEMPLATE, batch_size=plan.eval_batch, seed=plan.seed,
        rewards=RewardConfig(functions=("accuracy",), weights=(1.0,), num_workers=0),
    )  # fmt: skip
    metrics["eval_s"] = round(time.perf_counter() - t0, 1)
    return metrics


def _rejection_sample(run_dir: Path, prompts: list[dict], out: Path, plan: DemoPlan, grpo_cfg) -> dict:
    """R1 stage 3 in miniature: ``distill_samples`` completions per prompt from the RL model, kept when they earn the
    full accuracy + format reward; written as ``out/train.jsonl`` SFT traces."""
    import r1jax
    from r1jax.commands import trace_records, write_jsonl_atomic
    from r1jax.config import SamplingConfig
    from r1jax.data.tokenizer import ByteTokenizer
    from r1jax.evaluate import max_total_reward, sample_completions, score_samples

    t0 = time.perf_counter()
    model = r1jax.load(str(run_dir))
    sampling = SamplingConfig(temperature=plan.distill_temperature, max_new_tokens=grpo_cfg.sampling.max_new_tokens)
    samples = sample_completions(
        model, ByteTokenizer(), prompts, k=plan.distill_samples, sampling=sampling, template=grpo_cfg.data.template,
        batch_size=min(64, len(prompts)), seed=plan.seed + 1,
    )  # fmt: skip
    totals, _ = score_samples(samples, prompts, grpo_cfg.rewards)
    best = max_total_reward(grpo_cfg.rewards)
    records = trace_records(prompts, samples, totals, best=best, keep=plan.distill_keep, chat=False)
    out.mkdir(parents=True, exist_ok=True)
    n = write_jsonl_atomic(str(out / "train.jsonl"), records)
    total = len(prompts) * plan.distill_samples
    return {"kept": n, "sampled": total, "kept_frac": n / total, "sample_s": round(time.perf_counter() - t0, 1)}


def _params(run_dir: Path) -> int:
    import jax

    import r1jax

    return int(sum(x.size for x in jax.tree.leaves(r1jax.load(str(run_dir)).param_dict())))


# --- the pipeline -----------------------------------------------------------------------------------------------------
def fresh_output(out_dir: str, stage_dirs) -> Path:
    """``out_dir`` ready for a new demo: its stage directories and summary from an earlier run removed."""
    out = Path(out_dir)
    for name in stage_dirs:
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    return out


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    minutes_budget: float = 15.0,
    *,
    plan: DemoPlan | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run the whole pipeline into ``out_dir`` (stage directories of an earlier demo there are replaced) and return
    the summary that is also written to ``out_dir/summary.json``. ``minutes_budget`` is the wall time the run is meant
    to fit; the summary says whether it did."""
    plan = plan or DemoPlan()
    t_start = time.perf_counter()
    out = fresh_output(out_dir, STAGE_DIRS)

    def elapsed() -> float:
        return (time.perf_counter() - t_start) / 60

    data = out / "data"
    sizes = make_addition_data(data, n_train=plan.n_train, n_test=plan.n_test, seed=plan.seed, digits=plan.digits)
    test = _read_jsonl(data / "test.jsonl")
    log(f"[demo] data: {sizes['train']} train / {sizes['test']} held-out test problems in {data}")

    stages: dict[str, Any] = {}

    log("[demo] 1/4 cold-start SFT of the V3-style teacher (MLA + MoE) on generated traces")
    sft_cfg = _stage_config("sft", plan, data=str(data), init=None, steps=plan.sft_steps)
    grpo_cfg = _stage_config("grpo", plan, data=str(data), init=str(out / "sft"), steps=plan.grpo_steps)
    max_len = grpo_cfg.sampling.max_new_tokens  # every evaluation decodes as far as GRPO samples
    stages["sft"] = _train(sft_cfg, out / "sft", progress)
    stages["sft"]["eval"] = _evaluate(out / "sft", test, plan, max_len)
    log(f"[demo]     sft pass@1 {stages['sft']['eval']['pass@1']:.3f} ({elapsed():.1f} min)")

    log("[demo] 2/4 GRPO (accuracy + format rewards) from the SFT model")
    stages["grpo"] = _train(grpo_cfg, out / "grpo", progress)
    stages["grpo"]["eval"] = _evaluate(out / "grpo", test, plan, max_len)
    log(f"[demo]     grpo pass@1 {stages['grpo']['eval']['pass@1']:.3f} ({elapsed():.1f} min)")

    log("[demo] 3/4 rejection sampling from the GRPO model, SFT of a dense student")
    train_rows = _read_jsonl(data / "train.jsonl")
    rng = np.random.default_rng(plan.seed + 2)
    picked = rng.choice(len(train_rows), size=min(plan.distill_prompts, len(train_rows)), replace=False)
    prompts = [{k: train_rows[i][k] for k in ("prompt", "answer", "task")} for i in sorted(picked)]
    sampled = _rejection_sample(out / "grpo", prompts, out / "distill_data", plan, grpo_cfg)
    log(f"[demo]     kept {sampled['kept']} of {sampled['sampled']} samples ({elapsed():.1f} min)")
    if sampled["kept"] == 0:
        raise R1jaxError("rejection sampling kept no trace: the GRPO model solved none of the training prompts")
    distill_cfg = _stage_config("distill", plan, data=str(out / "distill_data"), init=None, steps=plan.distill_steps)
    if sampled["kept"] < distill_cfg.sft_batch_size:  # a weak teacher: smaller batches rather than no student
        distill_cfg = dataclasses.replace(distill_cfg, sft_batch_size=sampled["kept"])
    stages["distill"] = {**_train(distill_cfg, out / "distill", progress), "rejection_sampling": sampled}
    stages["distill"]["eval"] = _evaluate(out / "distill", test, plan, max_len)
    log(f"[demo]     distill pass@1 {stages['distill']['eval']['pass@1']:.3f} ({elapsed():.1f} min)")

    log("[demo] 4/4 reports")
    from r1jax.report import machine, write_report

    for name in ("sft", "grpo", "distill"):
        stages[name]["report"] = str(write_report(out / name))
        stages[name]["params"] = _params(out / name)
        stages[name]["last"] = {k: v for k, v in stages[name]["last"].items() if isinstance(v, int | float)}

    minutes = elapsed()
    summary = {
        "sft_pass@1": stages["sft"]["eval"]["pass@1"],
        "grpo_pass@1": stages["grpo"]["eval"]["pass@1"],
        "distill_pass@1": stages["distill"]["eval"]["pass@1"],
        "grpo_gain_points": 100 * (stages["grpo"]["eval"]["pass@1"] - stages["sft"]["eval"]["pass@1"]),
        "minutes": round(minutes, 2),
        "minutes_budget": minutes_budget,
        "within_budget": minutes <= minutes_budget,
        "eval": {"n_problems": len(test), "k": 1, "temperature": 0.0, "metric": "greedy pass@1, accuracy reward"},
        "task": f"{plan.digits}-digit addition over bytes, R1 format <think> column sums </think> <answer> N </answer>",
        "machine": machine(),
        "stages": stages,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    _write_report(out, summary)
    log(table(summary))
    if minutes > minutes_budget:
        log(f"[demo] warning: {minutes:.1f} min exceeds the {minutes_budget:g}-minute budget")
    return summary


SEED_KEYS = ("sft_pass@1", "grpo_pass@1", "distill_pass@1", "grpo_gain_points")
GAIN_TARGET_POINTS = 10.0  # GRPO over the cold start, on every seed


def run_seeds(
    out_dir: str | os.PathLike, seeds: Sequence[int], minutes_budget: float = 15.0, *, plan: DemoPlan | None = None,
    progress: bool = True, log=print,
) -> dict:  # fmt: skip
    """The demo once per seed into ``out_dir/seed_<s>`` (the seed sets the problems drawn, the initialisation, the
    data order and the sampler's stream), then the table across seeds in ``out_dir/seeds.json`` and ``seeds.md``:
    every stage's pass@1 and GRPO's gain over SFT per seed, with their mean and minimum."""
    plan = plan or DemoPlan()
    runs = {s: run_demo(Path(out_dir) / f"seed_{s}", minutes_budget, plan=dataclasses.replace(plan, seed=s),
                        progress=progress, log=log) for s in seeds}  # fmt: skip
    table = {
        k: {"per_seed": {s: r[k] for s, r in runs.items()}, "mean": float(np.mean([r[k] for r in runs.values()])),
            "min": float(min(r[k] for r in runs.values()))}
        for k in SEED_KEYS
    }  # fmt: skip
    summary = {
        "seeds": list(seeds),
        "table": table,
        "gain_target_points": GAIN_TARGET_POINTS,
        "every_seed_meets_target": table["grpo_gain_points"]["min"] >= GAIN_TARGET_POINTS,
        "minutes": {s: r["minutes"] for s, r in runs.items()},
        "machine": runs[seeds[0]]["machine"],
    }
    Path(out_dir, "seeds.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    Path(out_dir, "seeds.md").write_text(seed_table(summary) + "\n")
    log(seed_table(summary))
    return summary


def seed_table(summary: dict) -> str:
    """The across-seeds table as Markdown: one row per seed, then the mean and the minimum."""
    t, seeds = summary["table"], summary["seeds"]
    lines = ["| seed | SFT | GRPO | distill | GRPO - SFT (points) | minutes |", "|---|---|---|---|---|---|"]
    for s in seeds:
        v = [100 * t[k]["per_seed"][s] for k in SEED_KEYS[:3]]
        lines.append(f"| {s} | {v[0]:.1f}% | {v[1]:.1f}% | {v[2]:.1f}% | {t['grpo_gain_points']['per_seed'][s]:+.1f} | "
                     f"{summary['minutes'][s]:.1f} |")  # fmt: skip
    for stat in ("mean", "min"):
        v = [100 * t[k][stat] for k in SEED_KEYS[:3]]
        lines.append(f"| {stat} | {v[0]:.1f}% | {v[1]:.1f}% | {v[2]:.1f}% | {t['grpo_gain_points'][stat]:+.1f} | |")
    m = summary["machine"]
    lines.append(f"\n{m['cpus']} x {m['cpu_model']}, 1-minute load {m['load_avg_1m']}; GRPO gain target "
                 f"{summary['gain_target_points']:+.0f} points on every seed: "
                 f"{'met' if summary['every_seed_meets_target'] else 'not met'}")  # fmt: skip
    return "\n".join(lines)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def table(summary: dict) -> str:
    """The compact stage table printed at the end of the demo (and put in ``report.md``)."""
    rows = [("stage", "model", "params", "steps", "train s", "pass@1")]
    names = {"sft": "V3-style MoE", "grpo": "V3-style MoE", "distill": "Qwen2-style dense"}
    for name, st in summary["stages"].items():
        rows.append(
            (name, names[name], f"{st['params'] / 1e6:.2f}M", str(st["steps"]), f"{st['train_s']:.0f}",
             f"{st['eval']['pass@1']:.3f}")
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"GRPO over SFT: {summary['grpo_gain_points']:+.1f} points; {summary['minutes']:.1f} min "
        f"(greedy pass@1 on {summary['eval']['n_problems']} held-out problems)"
    )
    return "\n".join(lines)


def _write_report(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["stages"])
    values = [100 * summary["stages"][n]["eval"]["pass@1"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    bars = ax.bar(names, values, color=["#7a9cc6", "#2b6cb0", "#9ac47a"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("held-out pass@1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("R1 in miniature: addition")
    fig.tight_layout()
    fig.savefig(out / "pass_at_1.png")
    plt.close(fig)
    sampled = summary["stages"]["distill"]["rejection_sampling"]
    lines = [
        "# r1jax demo",
        "",
        f"Task: {summary['task']}. Metric: {summary['eval']['metric']} on {summary['eval']['n_problems']} held-out "
        f"problems. Wall time {summary['minutes']:.1f} min on {summary['machine']['cpus']} CPUs.",
        "",
        "```",
        table(summary),
        "```",
        "",
        f"Rejection sampling kept {sampled['kept']} of {sampled['sampled']} samples for the student.",
        "",
        "![pass@1](pass_at_1.png)",
        "",
        "Training curves: " + ", ".join(f"[{n}]({n}/report/summary.md)" for n in names),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
