"""Checkpoint IO measured with the real CLI (convert, load in one process, export) on a V3-style fp8 checkpoint.

The checkpoint is generated with numpy, tensor by tensor (no torch, so a ~0.7B-parameter one takes seconds): V3's
layout at smaller widths — MLA with q-LoRA, a dense first layer, routed + shared experts, the MTP layer (with its
private embedding / head copies, as V3 ships them), e4m3 weights with 128x128 ``weight_scale_inv`` blocks (ue8m0
power-of-two scales with ``--ue8m0``), bf16 for the rest, many shards with ``model.safetensors.index.json``.

Each step runs in its own subprocess; its peak RSS (``peak_rss.measure``, the child's alone) is compared with
a child that only imports the same modules (the interpreter + JAX baseline):

    python tools/bench_checkpoint.py                      # ~0.7B parameters under /tmp/r1jax-bench-ckpt, all steps
    python tools/bench_checkpoint.py --layers 2 --experts 8   # smaller
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import peak_rss

# Linear weights that stay bf16 in DeepSeek's fp8 release: embedding, head, router, the MTP projection.
NOT_FP8 = ("embed_tokens", "lm_head", "mlp.gate.weight", "eh_proj", "shared_head.head")


def v3_config(*, hidden: int, layers: int, experts: int, vocab: int, ue8m0: bool = False) -> dict:
    """A HF ``config.json`` of a DeepSeek-V3-style model: V3's head dimensions, narrower and shallower."""
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    if ue8m0:
        quant["scale_fmt"] = "ue8m0"
    return {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": hidden * 11 // 4,
        "moe_intermediate_size": hidden // 2,
        "num_hidden_layers": layers,
        "num_nextn_predict_layers": 1,
        "first_k_dense_replace": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": hidden * 3 // 8,
        "kv_lora_rank": hidden // 4,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": min(8, experts // 2),
        "n_group": 4 if experts % 4 == 0 else 1,
        "topk_group": 2 if experts % 4 == 0 else 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
        "quantization_config": quant,
    }


def _fp8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    bits = rng.integers(0, 256, shape, dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] ^= 1  # no NaN codes (e4m3fn NaN is S.1111.111)
    return bits.view(ml_dtypes.float8_e4m3fn)


def hf_tensors(hf_cfg: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """``(key, HF shape, fp8?)`` of every tensor of the checkpoint, in V3's order, the MTP layer's copies included."""
    from r1jax import hf
    from r1jax.model import param_specs
    from r1jax.param_source import leaves

    cfg = hf.config_from_hf(hf_cfg)
    specs = dict(leaves(param_specs(cfg, mtp=True)))
    out = []
    for e in hf.entries(cfg, mtp=True):
        shape = hf.hf_shape(e, specs[e.path].shape[len(e.index) :])
        out.append((e.key, shape, len(shape) == 2 and not any(s in e.key for s in NOT_FP8 + ("norm",))))
    for k in range(cfg.n_mtp_layers):
        i = cfg.n_layers + k
        out += [(f"model.layers.{i}.embed_tokens.weight", (cfg.vocab_size, cfg.d_model), False)]
        out += [(f"model.layers.{i}.shared_head.head.weight", (cfg.vocab_size, cfg.d_model), False)]
    return out


def write_fp8_checkpoint(out_dir: str, hf_cfg: dict, *, shard_bytes: int = 64 << 20, seed: int = 0) -> int:
    """Write the checkpoint (random weights, one tensor in memory at a time); returns its parameter count."""
    from r1jax.safetensors_io import INDEX, StreamWriter, shard_names

    rng = np.random.default_rng(seed)
    ue8m0 = hf_cfg["quantization_config"].get("scale_fmt") == "ue8m0"
    layout, fp8 = [], set()
    for key, shape, is_fp8 in hf_tensors(hf_cfg):
        layout.append((key, np.dtype(ml_dtypes.float8_e4m3fn if is_fp8 else ml_dtypes.bfloat16), shape))
        if is_fp8:
            fp8.add(key)
            layout.append((key + "_scale_inv", np.dtype(np.float32), (-(-shape[0] // 128), -(-shape[1] // 128))))
    groups = shard_names(layout, shard_bytes)
    by_name = {k: (d, s) for k, d, s in layout}
    os.makedirs(out_dir, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        with StreamWriter(os.path.join(out_dir, fname), [(k, *by_name[k]) for k in names]) as w:
            for k in names:
                dtype, shape = by_name[k]
                if k in fp8:
                    w.write(_fp8(rng, shape))
                elif k.endswith("_scale_inv"):  # ~ N(0, 0.02) weights: max |w| / 448
                    s = rng.uniform(2e-5, 2e-4, shape).astype(np.float32)
                    w.write(np.exp2(np.round(np.log2(s))).astype(np.float32) if ue8m0 else s)
                elif "norm" in k:
                    w.write((1 + 0.1 * rng.standard_normal(shape, np.float32)).astype(dtype))
                else:
                    w.write((0.02 * rng.standard_normal(shape, np.float32)).astype(dtype))
        weight_map |= dict.fromkeys(names, fname)
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    return sum(math.prod(s) for k, _, s in layout if not k.endswith("_scale_inv"))


def measure(argv: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of ``argv`` in a fresh child (``peak_rss.measure``: no parent's memory counted)."""
    return peak_rss.measure(argv, dict(os.environ, JAX_PLATFORMS="cpu"))


PY = [sys.executable, "-c"]
BASELINE = "import r1jax.checkpoint, r1jax.cli, r1jax.param_source"
LOAD = "import sys, jax, r1jax; jax.block_until_ready(r1jax.load(sys.argv[1]).param_dict())"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/r1jax-bench-ckpt")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=80)
    ap.add_argument("--ue8m0", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--keep", action="store_true", help="keep the converted and exported directories")
    args = ap.parse_args()

    src, ckpt, out = (os.path.join(args.dir, n) for n in ("hf_fp8", "ckpt", "hf_out"))
    hf_cfg = v3_config(hidden=args.hidden, layers=args.layers, experts=args.experts, vocab=args.vocab, ue8m0=args.ue8m0)
    meta = os.path.join(src, "bench.json")
    if not (os.path.exists(meta) and json.loads(Path(meta).read_text())["config"] == hf_cfg):
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.time()
        n = write_fp8_checkpoint(src, hf_cfg, shard_bytes=args.shard_mb << 20)
        Path(meta).write_text(json.dumps({"config": hf_cfg, "params": n}))
        print(f"generated {src}: {n / 1e9:.3f}B parameters in {time.time() - t0:.1f}s", file=sys.stderr)
    from r1jax import hf
    from r1jax.model import param_specs
    from r1jax.param_source import nbytes

    f32 = nbytes(param_specs(hf.config_from_hf(hf_cfg), mtp=True), "float32")  # what r1jax holds (with MTP)
    n = f32 // 4
    disk_in = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
    shards = sum(f.endswith(".safetensors") for f in os.listdir(src))
    largest = max(math.prod(s) for _, s, _ in hf_tensors(hf_cfg))

    rows = []
    base_dt, base = measure([*PY, BASELINE])
    rows.append(("imports only (baseline)", base_dt, base))
    shutil.rmtree(ckpt, ignore_errors=True)
    dt, rss = measure([sys.executable, "-m", "r1jax", "convert", src, ckpt, "--dtype", args.dtype, "--mtp"])
    out_bytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    rows.append((f"convert -> {args.dtype} (--mtp)", dt, rss))
    convert_bps = disk_in / max(dt - base_dt, 1e-9)  # the conversion itself, without the interpreter's start
    dt, rss = measure([*PY, LOAD, ckpt])
    rows.append(("load in 1 process (r1jax.load, CPU)", dt, rss))
    shutil.rmtree(out, ignore_errors=True)
    dt, rss = measure([sys.executable, "-m", "r1jax", "export", ckpt, out])
    rows.append(("export -> HF safetensors", dt, rss))
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)

    gb = 1 << 30
    print(f"\ncheckpoint: {n / 1e9:.3f}B parameters (with MTP), {shards} shards, {disk_in / gb:.2f} GiB on disk")
    print(
        f"float32 model {f32 / gb:.2f} GiB, half of it {f32 / 2 / gb:.2f} GiB; "
        f"{args.dtype} output {out_bytes / gb:.2f} GiB"
    )
    print(f"largest tensor {largest / 1e6:.1f}M elements ({largest * 4 / 2**20:.0f} MiB as float32)\n")
    print("| step | time (s) | peak RSS (GiB) | above baseline (GiB) |")
    print("|---|---|---|---|")
    for name, dt, rss in rows:
        print(f"| {name} | {dt:.1f} | {rss / gb:.2f} | {(rss - base) / gb:.2f} |")
    print(f"\nconvert read {convert_bps / 2**20:.0f} MiB/s of fp8 input (time above the baseline's)")
    print(
        json.dumps(
            {
                "params": n,
                "disk_in": disk_in,
                "out_bytes": out_bytes,
                "f32_bytes": f32,
                "convert_in_bytes_per_s": convert_bps,
                "rows": [{"step": r[0], "seconds": r[1], "peak_rss": r[2]} for r in rows],
            }
        )
    )


if __name__ == "__main__":
    main()
