"""CLI subcommands ``sample`` (rejection sampling into SFT traces), ``eval`` (pass@1 / maj@k / pass@k) and ``report``
(plots and a summary of a run's metrics), registered in ``r1jax.cli.COMMANDS``.

``r1jax sample MODEL --data NAME_OR_PATH --samples k --keep correct|all --out traces.jsonl`` is R1's stage-3
rejection sampling: k completions per prompt, scored by the rule-based rewards (``--rewards``, default accuracy +
strict format); ``--keep correct`` keeps the samples whose total reward reaches the maximum the reward functions can
give. Each output line is ``{"prompt", "completion", "reward", "answer", "correct", "task"}`` plus ``messages`` (the
chat turns with the assistant reply) under ``--template chat``; the file is written to a temporary sibling and
renamed, so a crash never leaves a partial file under the final name.

With ``--tools search[,python]`` (``--corpus``, ``--max-turns``) both commands sample multi-turn tool trajectories
(``r1jax.tool_rollout``): completions keep their tool turns as text, results included (SFT on such traces masks
the results out of the loss when the run sets ``tools.tools``), and ``eval`` reports ``tool_calls_mean``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from r1jax.errors import R1jaxError


def _add_model_data_args(p, default_template: str = "r1_zero") -> None:
    p.add_argument("model", help="HF directory, .gguf file or r1jax checkpoint / run directory")
    p.add_argument(
        "--data",
        required=True,
        help="dataset name (gsm8k, math, countdown, arithmetic, search_qa, humaneval) or a file/dir",
    )
    p.add_argument("--split", default="train")
    p.add_argument("--data-dir", default=None, help="where named datasets are prepared (TFDS data_dir)")
    p.add_argument("--template", default=default_template, help="r1_zero | chat | plain | a '{prompt}' string")
    p.add_argument("--system", default=None, help="system prompt (replaces the template's preamble)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--options", default="", help="generated datasets' options, e.g. min_digits=1,max_digits=2")
    p.add_argument("--tools", default="", help="tools the model may call, e.g. search,python (multi-turn)")
    p.add_argument("--corpus", default=None, help="the search tool's corpus: a .jsonl of {id, title, text}")
    p.add_argument("--max-turns", type=int, default=4, help="tool calls executed per sample (with --tools)")
    p.add_argument("--last-number", action="store_true", help="GSM8K-style answers: accept the last number when "
                   "there are no answer tags, \\boxed{} or ####")  # fmt: skip
    from r1jax.cli import add_mesh_args

    add_mesh_args(p, "default: the run's mesh when MODEL is a run directory, else one device")


def _load(args):
    import r1jax
    from r1jax.cli import model_mesh
    from r1jax.config import DataConfig
    from r1jax.data.datasets import load_dataset
    from r1jax.data.tokenizer import for_model

    try:
        options = DataConfig(options=args.options).option_dict()
    except ValueError as e:
        raise R1jaxError(f"--options: {e}") from None
    mesh = model_mesh(args, _run_mesh(args.model))
    model = r1jax.load(args.model, dtype=args.dtype, mesh=mesh)
    data = load_dataset(args.data, args.split, data_dir=args.data_dir, seed=args.seed, **options)
    n = len(data) if args.limit is None else min(args.limit, len(data))
    return model, for_model(model.cfg, model.tokenizer_files), [data[i] for i in range(n)], mesh


def _writes() -> bool:
    """Whether this process writes the outputs: the first one of a multi-host job (all computed the same)."""
    import jax

    return jax.process_index() == 0


def _run_mesh(path: str) -> str:
    """The mesh a training run directory was trained on (its ``train_config.json``), or ""."""
    config = os.path.join(path, "train_config.json")
    if not os.path.isfile(config):
        return ""
    with open(config) as f:
        return json.load(f).get("mesh", "")


def _tools(args, sampling):
    """The tool environment of ``--tools`` / ``--corpus`` / ``--max-turns``; None without ``--tools``."""
    from r1jax.config import ToolConfig
    from r1jax.tools import build_tools

    names = tuple(s.strip() for s in args.tools.split(",") if s.strip())
    if not names:
        return None
    try:
        cfg = ToolConfig(tools=names, corpus=args.corpus, max_turns=args.max_turns)
    except ValueError as e:
        raise R1jaxError(f"--tools/--max-turns: {e}") from None
    return build_tools(cfg, forbidden=sampling.stop_strings)


def _reward_config(names: str, weights: str | None, last_number: bool = False):
    from r1jax.config import RewardConfig
    from r1jax.rewards.registry import get

    functions = tuple(s.strip() for s in names.split(",") if s.strip())
    try:
        w = tuple(float(x) for x in weights.split(",")) if weights else (1.0,) * len(functions)
        for name in functions:
            get(name)
        return RewardConfig(functions=functions, weights=w, gsm8k_last_number=last_number)
    except ValueError as e:
        raise R1jaxError(f"--rewards/--reward-weights: {e}") from None


def trace_records(
    examples: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    totals: Sequence[Sequence[float]],
    *,
    best: float,
    keep: str,
    chat: bool,
    system: str | None = None,
) -> Iterable[dict]:
    """The JSONL records of ``r1jax sample``: one per completion, only those reaching ``best`` when ``keep ==
    "correct"``."""
    from r1jax.evaluate import chat_record

    for ex, s, rewards in zip(examples, samples, totals, strict=True):
        for text, r in zip(s["completions"], rewards, strict=True):
            correct = bool(float(r) >= best - 1e-6)
            if keep == "correct" and not correct:
                continue
            rec = {
                "prompt": s["prompt"],
                "completion": text,
                "reward": float(r),
                "answer": ex.get("answer"),
                "correct": correct,
                "task": ex.get("task"),
            }
            if chat:
                rec["messages"] = chat_record(ex, text, bool(s["think_prefilled"]), system)
            yield rec


def _write_atomic(path: str, chunks: Iterable[str]) -> int:
    """Write ``chunks`` to a temporary file beside ``path``, fsync, rename; returns the number of chunks."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise R1jaxError(f"{path}: directory {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n


def write_jsonl_atomic(path: str, records: Iterable[Mapping[str, Any]]) -> int:
    """Write ``records`` as JSON lines, atomically (nothing half-written on failure); returns the count."""
    return _write_atomic(path, (json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


def write_text_atomic(path: str, text: str) -> None:
    _write_atomic(path, [text])


def _sampling(args, temperature: float):
    from r1jax.config import SamplingConfig

    try:
        return SamplingConfig(temperature=temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    except ValueError as e:
        raise R1jaxError(str(e)) from None


def _cmd_sample(args) -> int:
    from r1jax.evaluate import max_total_reward, sample_completions, score_samples

    rewards = _reward_config(args.rewards, args.reward_weights, args.last_number)
    sampling = _sampling(args, args.temperature)
    tools = _tools(args, sampling)
    model, tok, examples, mesh = _load(args)
    t0 = time.time()
    try:
        samples = sample_completions(
            model, tok, examples, k=args.samples, sampling=sampling, template=args.template, system=args.system,
            tools=tools, batch_size=args.batch_size, seed=args.seed, mesh=mesh,
        )  # fmt: skip
        totals, _ = score_samples(samples, examples, rewards)
    except ValueError as e:  # bad template, metadata the rewards need, ...
        raise R1jaxError(str(e)) from None
    records = trace_records(
        examples, samples, totals, best=max_total_reward(rewards), keep=args.keep, chat=args.template == "chat",
        system=args.system,
    )  # fmt: skip
    if not _writes():
        return 0
    n = write_jsonl_atomic(args.out, records)
    total = sum(len(s["completions"]) for s in samples)
    print(
        f"wrote {args.out}: {n} of {total} samples ({len(examples)} prompts x {args.samples}, keep={args.keep}, "
        f"{time.time() - t0:.1f}s)",
        file=sys.stderr,
    )
    return 0


def _select_config(args):
    """The ``SelectConfig`` of ``r1jax eval --select ...`` (None without ``--select``)."""
    from r1jax.select import SelectConfig

    if not args.select:
        return None
    try:
        if args.verifier is not None:
            _reward_config(args.verifier, None)  # an unknown name is refused like --rewards
        return SelectConfig(
            selectors=tuple(s.strip() for s in args.select.split(",") if s.strip()), verifier=args.verifier,
            subsets=args.subsets, judge_subsets=min(args.judge_subsets, args.subsets),
            judge_max_new_tokens=args.judge_max_new_tokens, seed=args.seed,
        )  # fmt: skip
    except ValueError as e:
        raise R1jaxError(f"--select: {e}") from None


def _cmd_eval(args) -> int:
    from r1jax.evaluate import evaluate, metrics_markdown
    from r1jax.select import plot_selection

    tools = _tools(args, _sampling(args, args.temperature))
    select = _select_config(args)
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise R1jaxError(f"--out {args.out}: its parent directory does not exist")
    model, tok, examples, mesh = _load(args)
    try:
        metrics = evaluate(
            model, tok, examples, k=args.k, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
            template=args.template, system=args.system, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
            rewards=_reward_config("accuracy", None, args.last_number), select=select, tools=tools, mesh=mesh,
        )  # fmt: skip
    except ValueError as e:
        raise R1jaxError(str(e)) from None
    if not _writes():
        return 0
    if args.out:
        title = f"{args.model} on {args.data} ({args.split})"
        settings = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
        os.makedirs(args.out, exist_ok=True)
        write_text_atomic(os.path.join(args.out, "eval.json"), json.dumps({**metrics, **settings}, indent=2) + "\n")
        write_text_atomic(os.path.join(args.out, "eval.md"), metrics_markdown(metrics, title, settings))
        if select is not None:
            plot_selection(metrics["selection"], os.path.join(args.out, "selection.png"), title)
    print(json.dumps(metrics))
    return 0


def _cmd_report(args) -> int:
    from r1jax.report import write_report

    print(write_report(args.run_dir))
    return 0


def register(sub) -> None:
    s = sub.add_parser("sample", help="rejection sampling: k completions per prompt, scored, kept -> SFT JSONL")
    _add_model_data_args(s)
    s.add_argument("--samples", type=int, default=4, help="completions per prompt")
    s.add_argument("--keep", choices=("correct", "all"), default="correct")
    s.add_argument("--out", required=True, help="output .jsonl")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--rewards", default="accuracy,format_strict", help="comma-separated reward functions")
    s.add_argument("--reward-weights", default=None, help="comma-separated weights (default: all 1)")
    s.set_defaults(fn=_cmd_sample)

    e = sub.add_parser("eval", help="pass@1 (mean over k samples), maj@k and pass@k; prints one JSON line")
    _add_model_data_args(e)
    e.set_defaults(split="test", top_p=0.95)
    e.add_argument("--k", type=int, default=4, help="samples per problem")
    e.add_argument("--temperature", type=float, default=0.6)
    e.add_argument("--out", default=None, help="directory for eval.json and eval.md (a markdown table)")
    e.add_argument("--select", default=None, help="choose one answer of the k per problem and report accuracy "
                   "against k (+ selection.png): comma-separated majority, verifier, judge")  # fmt: skip
    e.add_argument("--verifier", default=None, help="the verifier selector's reward function (sees no hidden answer)")
    e.add_argument("--subsets", type=int, default=32, help="subsets of size k' < k averaged per problem")
    e.add_argument("--judge-subsets", type=int, default=4, help="of those, how many the model judges (a call each)")
    e.add_argument("--judge-max-new-tokens", type=int, default=16)
    e.set_defaults(fn=_cmd_eval)

    r = sub.add_parser("report", help="plots and summary.md from RUN_DIR/metrics.jsonl into RUN_DIR/report/")
    r.add_argument("run_dir")
    r.set_defaults(fn=_cmd_report)


def _register() -> None:
    from r1jax.cli import COMMANDS

    if register not in COMMANDS:
        COMMANDS.append(register)


_register()
