"""The ``r1jax`` command line: convert, export, generate (more subcommands register themselves in ``COMMANDS``).

Bad input (a missing path, a corrupt checkpoint, an unknown model type...) prints one line naming the problem and
exits with status 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import math
import sys
import time


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


def _mesh(spec: str):
    """``"fsdp=4,tensor=2"`` -> a mesh over all devices (one clear error for impossible shapes)."""
    from r1jax.errors import ConfigError
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
    return _mesh(spec) if spec else None


def _cmd_train(args) -> int:
    from r1jax import train

    init_distributed(args)
    cfg = train.apply_overrides(train.load_config(args.config), args.set or [])
    mesh_spec = args.mesh or cfg.mesh
    mesh = _mesh(mesh_spec) if mesh_spec else None
    last = train.run(cfg, args.out, mesh=mesh, progress=not args.no_progress, max_steps=args.max_steps)
    shown = {
        k: round(v, 4)
        for k, v in last.items()
        if isinstance(v, float) and k in ("step", "reward/mean", "accuracy", "loss", "kl", "response/length_mean")
    }
    print(f"done: {args.out} {shown}")
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
    for register in COMMANDS:
        register(sub)
    return p


COMMANDS: list = []  # callables(subparsers) that add further subcommands


def main(argv: list[str] | None = None) -> int:
    from r1jax.errors import R1jaxError

    args = build_parser().parse_args(argv)
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


from r1jax import commands, demo  # noqa: E402,F401  (register sample, eval, report, demo)
