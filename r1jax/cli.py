"""The ``r1jax`` command line: convert, export, generate, train and demo here; sample, eval and report from
``r1jax.commands``.

Bad input (a missing path, a corrupt checkpoint, an unknown model type...) prints one line naming the problem and
exits with status 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from r1jax import commands
from r1jax.commands import add_mesh_args, init_distributed, model_mesh
from r1jax.overrides import apply_overrides


def _cmd_convert(args) -> int:
    from r1jax.checkpoint import convert
    from r1jax.model import param_specs
    from r1jax.param_source import leaves

    t0 = time.time()
    cfg = convert(args.src, args.out, dtype=args.dtype, mtp=args.mtp)
    n = sum(math.prod(spec.shape) for _, spec in leaves(param_specs(cfg, mtp=args.mtp)))
    print(f"wrote {args.out}: {cfg.arch.value}, {n / 1e6:.1f}M parameters ({time.time() - t0:.1f}s)")
    return 0


def _cmd_export(args) -> int:
    from r1jax.checkpoint import export_adapter, export_hf, load, lora_run
    from r1jax.errors import CheckpointError
    from r1jax.param_source import open_source

    if args.adapter:
        export_adapter(args.ckpt, args.out)
    elif lora_run(args.ckpt) is not None:
        if not args.merged:
            raise CheckpointError(
                f"{args.ckpt}: a LoRA run: pass --merged (the HF model, adapters merged) or --adapter (a PEFT adapter)"
            )
        export_hf(load(args.ckpt), args.out, dtype=args.dtype, progress=True)
    else:
        export_hf(open_source(args.ckpt), args.out, dtype=args.dtype, progress=True)
    print(f"wrote {args.out}")
    return 0


def _cmd_generate(args) -> int:
    from r1jax.checkpoint import load
    from r1jax.data.tokenizer import for_model, stop_ids
    from r1jax.errors import CheckpointError
    from r1jax.rollout import generate

    mesh = model_mesh(args)
    model = load(args.model, dtype=args.dtype, mesh=mesh)
    try:
        tok = for_model(model.cfg, model.tokenizer_files)
    except CheckpointError as e:
        raise CheckpointError(f"{args.model}: {e}") from None
    text = args.prompt
    if tok.chat_template and not args.raw:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    ids = tok.encode(text)
    stops = stop_ids(model.cfg, tok)
    t0 = time.time()
    out = generate(
        model,
        [ids],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_ids=stops,
        mesh=mesh,
    )[0]
    dt = time.time() - t0
    print(tok.decode(out))
    print(f"[{len(ids)} prompt tokens, {len(out)} new tokens, {dt:.1f}s including compilation]", file=sys.stderr)
    return 0


def _cmd_train(args) -> int:
    from r1jax import train

    init_distributed(args)
    cfg = apply_overrides(train.load_config(args.config), args.set or [])
    mesh_spec = args.mesh or cfg.mesh
    mesh = commands.mesh_from_spec(mesh_spec) if mesh_spec else None
    last = train.run(cfg, args.out, mesh=mesh, progress=not args.no_progress, max_steps=args.max_steps)
    shown = {
        k: round(v, 4)
        for k, v in last.items()
        if isinstance(v, float) and k in ("step", "reward/mean", "accuracy", "loss", "kl", "response/length_mean")
    }
    print(f"done: {args.out} {shown}")
    return 0


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct seeds, e.g. 0,1,2")
    return seeds


def _cmd_demo(args) -> int:
    from r1jax.errors import ConfigError

    if args.task != "search" and args.model != "byte":
        raise ConfigError("--model picks the search demo's model (--task search); the addition demo's is byte-level")
    if args.seeds and args.task == "search":
        raise ConfigError("--seeds runs the addition demo; the search demo takes one --seed")
    if args.task == "search":
        from r1jax.search_demo import MODELS, SearchPlan, run_search_demo

        out = args.out or MODELS[args.model][1]
        plan = SearchPlan(sft_steps=args.sft_steps, grpo_steps=args.grpo_steps, seed=args.seed, model=args.model)
        run_search_demo(out, args.minutes_budget, plan=plan, progress=not args.no_progress)
    else:
        from r1jax.demo import DemoPlan, run_demo, run_seeds

        out = args.out or "runs/demo"
        plan = DemoPlan(
            sft_steps=args.sft_steps, grpo_steps=args.grpo_steps, distill_steps=args.distill_steps, seed=args.seed
        )
        if args.seeds:
            run_seeds(out, args.seeds, args.minutes_budget, plan=plan, progress=not args.no_progress)
            print(f"wrote {os.path.join(out, 'seeds.json')}", file=sys.stderr)
            return 0
        run_demo(out, args.minutes_budget, plan=plan, progress=not args.no_progress)
    print(f"wrote {os.path.join(out, 'summary.json')}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1jax", description="DeepSeek-R1 training stack on JAX")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="HF directory or .gguf file -> r1jax checkpoint")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float32"], help="stored dtype (default: float32 for HF/GGUF)"
    )
    c.add_argument("--mtp", action="store_true", help="also convert the multi-token-prediction module")
    c.set_defaults(fn=_cmd_convert)

    e = sub.add_parser("export", help="r1jax checkpoint, training run (or any loadable model) -> HF directory")
    e.add_argument("ckpt")
    e.add_argument("out")
    e.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    kind = e.add_mutually_exclusive_group()
    kind.add_argument("--merged", action="store_true", help="a LoRA run: the HF model with its adapters merged")
    kind.add_argument("--adapter", action="store_true", help="a LoRA run: its adapters as a PEFT adapter directory")
    e.set_defaults(fn=_cmd_export)

    g = sub.add_parser("generate", help="generate text from a prompt (chat template applied when present)")
    g.add_argument("--model", required=True, help="HF directory, .gguf file or r1jax checkpoint")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default=None)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_mesh_args(g, "default: one device")
    g.set_defaults(fn=_cmd_generate)
    t = sub.add_parser("train", help="train (sft or grpo stage) into a run directory; re-run to resume")
    t.add_argument("config", help="preset name in configs/ or a .py file defining config()")
    t.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, tb/)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. grpo.group_size=16")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resumable)")
    t.add_argument("--no-progress", action="store_true")
    add_mesh_args(t, "default: the config's mesh")
    t.set_defaults(fn=_cmd_train)
    commands.add_parsers(sub)

    d = sub.add_parser("demo", help="R1 in miniature: cold-start SFT -> GRPO -> distillation -> evaluation, on CPU")
    d.add_argument(
        "--task",
        choices=("addition", "search"),
        default="addition",
        help="addition: the R1 pipeline (default); search: two-hop questions answered with BM25 search in the loop",
    )
    d.add_argument("--out", default=None, help="output directory (default runs/demo, runs/demo_search or "
                   "runs/demo_search_smollm2; its stage directories are replaced)")  # fmt: skip
    d.add_argument("--model", choices=("byte", "smollm2"), default="byte",
                   help="search: byte (the 0.86M demo model from scratch, default) or smollm2 (SmolLM2-135M-Instruct "
                   "fine-tuned; output default runs/demo_search_smollm2)")  # fmt: skip
    d.add_argument("--minutes-budget", type=float, default=15.0)
    d.add_argument("--sft-steps", type=int, default=None, help="override the preset's step count")
    d.add_argument("--grpo-steps", type=int, default=None)
    d.add_argument("--distill-steps", type=int, default=None, help="addition only")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        metavar="S,S,...",
        help="addition: one demo per seed into OUT/seed_S and the table across them in OUT/seeds.md",
    )
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=_cmd_demo)
    return p


# commands whose training step loops keep host memory mapped across steps (r1jax.host_memory)
_LOOP_COMMANDS = frozenset({"train"})


def main(argv: list[str] | None = None) -> int:
    from r1jax.errors import R1jaxError

    args = build_parser().parse_args(argv)
    if args.command in _LOOP_COMMANDS:
        from r1jax.host_memory import retain_host_memory

        retain_host_memory()
    try:
        return args.fn(args) or 0
    except R1jaxError as e:
        print(f"r1jax: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"r1jax: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("r1jax: interrupted", file=sys.stderr)
        return 130
