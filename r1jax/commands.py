"""CLI subcommands ``sample`` (rejection sampling into SFT traces), ``eval`` (pass@1 / maj@k / pass@k) and ``report``
(plots and a summary of a run's metrics), added to the parser by ``add_parsers``; and the ``--mesh`` / multi-host
flags every command that runs a model shares.

``r1jax sample MODEL --data NAME_OR_PATH --samples k --keep correct|all --out traces.jsonl`` is R1's stage-3
rejection sampling: k completions per prompt, scored by the rule-based rewards (``--rewards``, default accuracy +
strict format); ``--keep correct`` keeps the samples whose total reward reaches the maximum the reward functions can
give. Each output line is ``{"prompt", "completion", "reward", "answer", "correct", "task"}`` plus ``messages`` (the
chat turns with the assistant reply) under ``data.template=chat``; the file is written to a temporary sibling and
renamed, so a crash never leaves a partial file under the final name.

The problems and the sampling are the ``data.*`` (``DataConfig``) and ``sampling.*`` (``SamplingConfig``) fields,
set with ``--set key=value`` and type-checked like ``r1jax train --set`` (``r1jax.overrides``): e.g. ``--set
data.split=test --set sampling.temperature=0.7``. ``--data``, ``--split``, ``--template``, ``--system``,
``--options``, ``--data-dir``, ``--temperature``, ``--top-p`` and ``--max-new-tokens`` are shorthands for the
``--set`` keys of ``SHORTHANDS``. A key the command does not read is refused.

With ``--tools search[,python]`` (``--corpus``, ``--max-turns``) both commands sample multi-turn tool trajectories
(``r1jax.tool_rollout``): completions keep their tool turns as text, results included (SFT on such traces masks
the results out of the loss when the run sets ``tools.tools``), and ``eval`` reports ``tool_calls_mean``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from r1jax.config import DataConfig, SamplingConfig
from r1jax.errors import ConfigError, R1jaxError
from r1jax.overrides import apply_overrides, config_keys


# --- the mesh, for every command that runs a model --------------------------------------------------------------------
def mesh_from_spec(spec: str):
    """``"fsdp=4,tensor=2"`` -> a mesh over all devices (one clear error for impossible shapes)."""
    from r1jax.sharding import make_mesh

    try:
        shape = {k.strip(): int(v) for k, v in (part.split("=") for part in spec.split(","))}
        return make_mesh(shape)
    except ValueError as e:
        raise ConfigError(f"--mesh {spec}: {e}") from None


def add_mesh_args(p: argparse.ArgumentParser, default_help: str) -> None:
    """``--mesh`` and the multi-host flags, for every command that runs a model."""
    p.add_argument(
        "--mesh",
        default=None,
        help=f"device mesh, e.g. data=2,fsdp=4 (axes: data, fsdp, tensor, expert); {default_help}",
    )
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    p.add_argument("--coordinator", default=None, help="with --distributed: HOST:PORT (default: detected)")
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed (default: detected)")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed (default: detected)")


def init_distributed(args) -> None:
    """Join the multi-host job when ``--distributed``: TPU pods and SLURM detect the coordinator and the process ids;
    elsewhere (e.g. several processes on one host) pass them. CPU processes talk over gloo."""
    if not args.distributed:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def model_mesh(args, run_mesh: str = ""):
    """The mesh a command runs on: ``--mesh``, else ``run_mesh`` (a config's), else none (one device)."""
    init_distributed(args)
    spec = args.mesh or run_mesh
    return mesh_from_spec(spec) if spec else None


# --- data and sampling settings ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """What ``sample`` and ``eval`` take from ``--set``: the problems (``data.*``) and the sampling (``sampling.*``).
    ``data.name`` has no default here: a command without it is refused."""

    data: DataConfig = DataConfig(name="")
    sampling: SamplingConfig = SamplingConfig()


# the defaults of each command (R1's evaluation: temperature 0.6, top-p 0.95, on the test split)
DEFAULTS = {
    "sample": SampleSettings(),
    "eval": SampleSettings(DataConfig(name="", split="test"), SamplingConfig(temperature=0.6, top_p=0.95)),
}
_DATA_KEYS = ("data.name", "data.split", "data.source", "data.data_dir", "data.template", "data.system", "data.options")
# the keys each command reads (``evaluate`` samples with temperature, top-p, length and stop strings only)
SETTABLE = {
    "sample": (*_DATA_KEYS, *(f"sampling.{f.name}" for f in dataclasses.fields(SamplingConfig))),
    "eval": (*_DATA_KEYS, "sampling.temperature", "sampling.top_p", "sampling.max_new_tokens", "sampling.stop_strings"),
}
# flag -> the --set key it stands for
SHORTHANDS = {
    "--data": "data.name",
    "--split": "data.split",
    "--data-dir": "data.data_dir",
    "--template": "data.template",
    "--system": "data.system",
    "--options": "data.options",
    "--temperature": "sampling.temperature",
    "--top-p": "sampling.top_p",
    "--max-new-tokens": "sampling.max_new_tokens",
}


def settings(command: str, args) -> SampleSettings:
    """The data and sampling settings of ``command`` (``sample`` | ``eval``): its defaults, then the shorthand flags,
    then ``--set`` in order (a later value of a key wins). ``ConfigError`` for a key the command does not read, a
    value that does not parse, or no ``data.name``."""
    flags = [(key, getattr(args, flag[2:].replace("-", "_"))) for flag, key in SHORTHANDS.items()]
    sets = [(key, value) for key, value in flags if value is not None] + list(args.set or [])
    base = DEFAULTS[command]
    known = set(config_keys(base))
    groups = {k.rpartition(".")[0] for k in SETTABLE[command]}  # "data", "sampling": apply_overrides explains them
    for item in sets:
        key = item[0] if isinstance(item, tuple) else item.partition("=")[0].strip()
        if key in known and key not in SETTABLE[command] and key not in groups:
            raise ConfigError(f"{key}: r1jax {command} does not use it (it reads {', '.join(SETTABLE[command])})")
    cfg = apply_overrides(base, sets)
    if not cfg.data.name:
        raise ConfigError(f"r1jax {command}: which problems? pass --data NAME_OR_PATH (or --set data.name=...)")
    return cfg


def _add_model_data_args(p, command: str) -> None:
    p.add_argument("model", help="HF directory, .gguf file or r1jax checkpoint / run directory")
    keys = ", ".join(SETTABLE[command])
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"e.g. sampling.temperature=0.7; keys: {keys}")
    d = DEFAULTS[command]
    helps = {
        "--data": "dataset name (gsm8k, math, countdown, arithmetic, search_qa, humaneval) or a file/dir",
        "--split": f"default {d.data.split}",
        "--data-dir": "where named datasets are prepared (TFDS data_dir)",
        "--template": f"r1_zero | chat | plain | a '{{prompt}}' string (default {d.data.template})",
        "--system": "system prompt (replaces the template's preamble)",
        "--options": "generated datasets' options, e.g. min_digits=1,max_digits=2",
        "--temperature": f"default {d.sampling.temperature:g}",
        "--top-p": f"default {d.sampling.top_p:g}",
        "--max-new-tokens": f"default {d.sampling.max_new_tokens}",
    }
    for flag, key in SHORTHANDS.items():
        p.add_argument(flag, default=None, metavar=key.split(".")[1].upper(), help=f"--set {key}=...; {helps[flag]}")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--tools", default="", help="tools the model may call, e.g. search,python (multi-turn)")
    p.add_argument("--corpus", default=None, help="the search tool's corpus: a .jsonl of {id, title, text}")
    p.add_argument("--max-turns", type=int, default=4, help="tool calls executed per sample (with --tools)")
    p.add_argument("--last-number", action="store_true", help="GSM8K-style answers: accept the last number when "
                   "there are no answer tags, \\boxed{} or ####")  # fmt: skip
    add_mesh_args(p, "default: the run's mesh when MODEL is a run directory, else one device")


def _load(args, data: DataConfig):
    import r1jax
    from r1jax.data.datasets import load_dataset
    from r1jax.data.tokenizer import for_model

    mesh = model_mesh(args, _run_mesh(args.model))
    model = r1jax.load(args.model, dtype=args.dtype, mesh=mesh)
    dataset = load_dataset(
        data.name, data.split, data_dir=data.data_dir, seed=args.seed, source=data.source, **data.option_dict()
    )
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    return model, for_model(model.cfg, model.tokenizer_files), [dataset[i] for i in range(n)], mesh


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


def _cmd_sample(args) -> int:
    from r1jax.evaluate import max_total_reward, sample_completions, score_samples

    cfg = settings("sample", args)
    rewards = _reward_config(args.rewards, args.reward_weights, args.last_number)
    tools = _tools(args, cfg.sampling)
    model, tok, examples, mesh = _load(args, cfg.data)
    t0 = time.time()
    try:
        samples = sample_completions(
            model, tok, examples, k=args.samples, sampling=cfg.sampling, template=cfg.data.template,
            system=cfg.data.system, tools=tools, batch_size=args.batch_size, seed=args.seed, mesh=mesh,
        )  # fmt: skip
        totals, _ = score_samples(samples, examples, rewards)
    except ValueError as e:  # bad template, metadata the rewards need, ...
        raise R1jaxError(str(e)) from None
    records = trace_records(
        examples, samples, totals, best=max_total_reward(rewards), keep=args.keep,
        chat=cfg.data.template == "chat", system=cfg.data.system,
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

    cfg = settings("eval", args)
    sampling, data = cfg.sampling, cfg.data
    tools = _tools(args, sampling)
    select = _select_config(args)
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise R1jaxError(f"--out {args.out}: its parent directory does not exist")
    model, tok, examples, mesh = _load(args, data)
    try:
        metrics = evaluate(
            model, tok, examples, k=args.k, temperature=sampling.temperature, max_new_tokens=sampling.max_new_tokens,
            template=data.template, system=data.system, top_p=sampling.top_p, stop_strings=sampling.stop_strings,
            batch_size=args.batch_size, seed=args.seed, rewards=_reward_config("accuracy", None, args.last_number),
            select=select, tools=tools, mesh=mesh,
        )  # fmt: skip
    except ValueError as e:
        raise R1jaxError(str(e)) from None
    if not _writes():
        return 0
    if args.out:
        title = f"{args.model} on {data.name} ({data.split})"
        shown = {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_new_tokens": sampling.max_new_tokens,
        }
        os.makedirs(args.out, exist_ok=True)
        write_text_atomic(os.path.join(args.out, "eval.json"), json.dumps({**metrics, **shown}, indent=2) + "\n")
        write_text_atomic(os.path.join(args.out, "eval.md"), metrics_markdown(metrics, title, shown))
        if select is not None:
            short = f"{os.path.basename(os.path.normpath(args.model))} on {data.name} ({data.split})"  # fits a plot
            plot_selection(metrics["selection"], os.path.join(args.out, "selection.png"), short)
    print(json.dumps(metrics))
    return 0


def _cmd_report(args) -> int:
    from r1jax.report import write_report

    print(write_report(args.run_dir))
    return 0


def add_parsers(sub) -> None:
    """Add ``sample``, ``eval`` and ``report`` to the ``r1jax`` subparsers."""
    s = sub.add_parser("sample", help="rejection sampling: k completions per prompt, scored, kept -> SFT JSONL")
    _add_model_data_args(s, "sample")
    s.add_argument("--samples", type=int, default=4, help="completions per prompt")
    s.add_argument("--keep", choices=("correct", "all"), default="correct")
    s.add_argument("--out", required=True, help="output .jsonl")
    s.add_argument("--rewards", default="accuracy,format_strict", help="comma-separated reward functions")
    s.add_argument("--reward-weights", default=None, help="comma-separated weights (default: all 1)")
    s.set_defaults(fn=_cmd_sample)

    e = sub.add_parser("eval", help="pass@1 (mean over k samples), maj@k and pass@k; prints one JSON line")
    _add_model_data_args(e, "eval")
    e.add_argument("--k", type=int, default=4, help="samples per problem")
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
