"""Prove a preset fits a TPU slice without a TPU: AOT-compile its train and decode steps for a TPU topology.

    JAX_PLATFORMS=cpu python tools/aot_compile.py v3_671b [--topology v5p:8x16x16] [--reduced] [--step train|decode]
    JAX_PLATFORMS=cpu python tools/aot_compile.py v3_671b:v6e_1024        # a variant: a function in the module
    python tools/aot_compile.py r1_distill_qwen_7b:h200 --estimate          # GPU: memory arithmetic, no compile

``CONFIG`` is a module in ``configs/`` (or a path to one) with ``model()``, ``mesh()``, ``batch()`` and optionally
``decode()``, ``TOPOLOGY``, ``SLICES`` (multi-slice over DCN) and ``MOMENT_DTYPE`` (AdamW moments, default f32);
``CONFIG:VARIANT`` calls the module's function ``VARIANT()`` for an object with the same attributes. libtpu compiles
deviceless against ``jax.experimental.topologies``; nothing runs.

Train step: the GRPO policy update the trainer runs (``r1jax.grpo.update_minibatch``: clipped surrogate + k3 KL
over teacher-forced log-probs, gradient accumulation over micro-batches, clipping, AdamW, router-bias update), with
params and optimiser state donated. The run is the preset's ``train()`` (a ``TrainConfig``) or, for a variant without
one, R1's recipe at the variant's shapes (``configs.r1.r1_on``): ``batch()`` sequences per micro-batch.
Decode step: the slot engine's decode loop (``r1jax.rollout.decode``), one token per slot per step against the
compressed (MLA) or GQA KV cache of its pool (``batch`` slots of ``cache_len`` tokens, each with its own position).

Figures, per device: argument / output / temp / alias bytes from ``memory_analysis()``; total = argument + output +
temp - alias; ``fits`` = total <= 90% of HBM. FLOPs and bytes accessed: XLA's cost analysis counts a ``while``
(scan) body once, so the compiled figures are completed with (layers - 1) x those of one layer compiled alone, per
stack (train: the layer's forward, its remat recompute and its backward, as the scan runs them; said in the output as
``flops_method``). ``--reduced`` compiles one layer per stack and extrapolates memory linearly (state bytes per layer
from the shardings, plus the per-layer saved residual), for presets whose full compile takes too long.
Expert-parallel dispatch (``r1jax.expert_parallel``) runs in rounds, a ``while`` whose trip count R depends on the
routing: the compiled figures hold one round per MoE layer, so (R - 1) x one round compiled alone is added, with R
the expected rounds of a Monte-Carlo of balanced routing (``expected_rounds``; ``dispatch`` in the output, with the
MFU at more rounds in ``mfu_if_rounds``).
Roofline step time = max(FLOPs / peak, bytes accessed / HBM bandwidth). Communication: the bytes of every collective's
result in the compiled HLO (all-gather, reduce-scatter, all-reduce, all-to-all, ragged all-to-all: its whole
receive buffer, collective-permute; loop bodies completed per layer and round like FLOPs) over the chip's ICI
bandwidth, ``comm_s``. Step estimate = max(roofline, comm_s) (collectives fully overlapped with compute: optimistic;
DCN between slices is not modelled separately).
MFU = model FLOPs (6 x active params x tokens for training, the output head counted on completion tokens only, as
the update computes it; 2 x active params per token for decode) / (chips x peak x step estimate).

``--estimate`` (any device, e.g. ``h200``): no compile; per-device state from the shardings, plus remat residuals,
logits (bf16, f32 log-softmax and its gradient), one layer's attention scores and MLP intermediates.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from r1jax import expert_parallel, lora, moe, rollout, sharding
from r1jax.cache import Cache, layer_shapes
from r1jax.config import LoraConfig, ModelConfig, TrainConfig
from r1jax.grpo import TrainBatch, update_minibatch
from r1jax.model import (
    DENSE_LAYERS,
    MOE_LAYERS,
    REMAT_POLICIES,
    RESIDUAL,
    ParamSpec,
    block,
    block_cached,
    param_specs,
)
from r1jax.optim import make_optimizer, opt_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# per chip: HBM bytes, bf16 peak FLOP/s, HBM bytes/s, ICI bytes/s (public spec sheets; ICI: all links, one way)
CHIPS = {
    "v4": (32e9, 275e12, 1.2e12, 300e9),
    "v5e": (16e9, 197e12, 0.82e12, 200e9),
    "v5p": (95e9, 459e12, 2.765e12, 600e9),
    "v6e": (32e9, 918e12, 1.64e12, 448e9),
    "h200": (141e9, 989e12, 4.8e12, 450e9),  # dense bf16; NVLink 900 GB/s both ways
}
FIT_FRACTION = 0.9  # a config fits when its bytes per chip are at most this fraction of HBM


def load_preset(name: str):
    """A config module by name (``configs/NAME.py``) or path; ``NAME:VARIANT`` calls the module's ``VARIANT()``."""
    name, _, variant = name.partition(":")
    path = name if name.endswith(".py") else os.path.join(ROOT, "configs", f"{name}.py")
    if not os.path.exists(path):
        known = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
        raise SystemExit(f"no config {name!r}; known: {known}")
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:  # a shipped config: imported as part of its package (they share helpers)
        mod = importlib.import_module(f"r1jax.configs.{name}")
    if not variant:
        return mod
    if not callable(getattr(mod, variant, None)):
        raise SystemExit(f"config {name!r} has no variant {variant!r}")
    return getattr(mod, variant)()


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def _abstract(specs, cfg: ModelConfig, shardings, dtype=None):
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype or s.dtype or cfg.param_dtype), sharding=sh),
        specs,
        shardings,
        is_leaf=_is_spec,
    )


def _adapted(params, specs, cfg: ModelConfig, lcfg: LoraConfig, mesh):
    """Abstract parameters with ``lcfg``'s adapters attached (``r1jax.lora.attach`` traced, nothing computed) and
    their shardings."""
    adapted = jax.eval_shape(lambda p: lora.attach(p, lcfg, cfg, jax.random.key(0)), params)
    psh = sharding.param_shardings(lora.specs_like(adapted, specs), mesh)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), adapted, psh), psh


# --- steps -----------------------------------------------------------------------------------------------------------
def train_config(preset, cfg: ModelConfig) -> TrainConfig:
    """The preset's GRPO run (its ``train()``), else R1's recipe at its shapes (``configs.r1.r1_on``)."""
    if hasattr(preset, "train"):
        return preset.train()
    from r1jax.configs.r1 import r1_on

    return r1_on(cfg, preset.mesh(), preset.batch(), moment_dtype=getattr(preset, "MOMENT_DTYPE", "float32"))


def train_shape(tc: TrainConfig) -> dict[str, int]:
    """The policy update's input: a mini-batch of prompts + completions, accumulated over micro-batches."""
    prompt, completion = tc.data.max_prompt_tokens, tc.grpo.max_completion_len
    return {
        "batch": tc.micro_batch,
        "seq_len": prompt + completion,
        "minibatch": tc.grpo.minibatch_size,
        "prompt_len": prompt,
        "completion_len": completion,
        "accum": tc.grad_accum_steps,
    }


def _layer_specs(cfg: ModelConfig, stack: str):
    specs = param_specs(cfg)[stack]
    return jax.tree.map(lambda s: dataclasses.replace(s, shape=s.shape[1:], axes=s.axes[1:]), specs, is_leaf=_is_spec)


# --- compiles --------------------------------------------------------------------------------------------------------
def compile_train(cfg: ModelConfig, mesh, tc: TrainConfig):
    """``r1jax.grpo.update_minibatch`` — the GRPO policy update the trainer runs: a mini-batch of
    ``tc.grpo.minibatch_size`` rows in micro-batches of ``tc.micro_batch``, clipped surrogate + k3 KL, the optimiser
    of ``tc.optim`` (AdamW, moments in ``moment_dtype``), router-bias update; params and optimiser state donated."""
    specs = param_specs(cfg)
    psh = sharding.param_shardings(specs, mesh)
    params = _abstract(specs, cfg, psh)
    if tc.lora.enabled:  # the frozen base in the compute dtype, adapters and their optimiser state
        params, psh = _adapted(params, specs, cfg, tc.lora, mesh)
    tx = make_optimizer(tc.optim)
    opt = jax.eval_shape(tx.init, lora.partition(params)[0])
    osh = opt_shardings(opt, params, cfg, mesh)
    opt = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), opt, osh)
    shape = train_shape(tc)
    n, p, t = shape["minibatch"], shape["prompt_len"], shape["completion_len"]

    def rows(*dims, dtype=jnp.float32):
        return jax.ShapeDtypeStruct((n, *dims), dtype, sharding=sharding.batch_sharding(mesh, (n, *dims)))

    g = tc.grpo
    batch = TrainBatch(
        prompt_tokens=rows(p, dtype=jnp.int32),
        prompt_start=rows(dtype=jnp.int32),
        tokens=rows(t, dtype=jnp.int32),
        mask=rows(t),
        advantages=rows(),
        sampler_logp=rows(t),
        old_logp=rows(t) if g.num_iterations > 1 or g.num_minibatches > 1 else None,
        ref_logp=rows(t) if g.kl_coef > 0 else None,
    )
    fn = partial(update_minibatch, cfg=tc, model_cfg=cfg, micro_batch=tc.micro_batch, mesh=mesh)
    with jax.set_mesh(mesh):
        return jax.jit(fn, out_shardings=(psh, osh, None), donate_argnums=(0, 1)).lower(params, opt, batch).compile()


def _cache_abstract(cfg: ModelConfig, mesh, batch: int, cache_len: int):
    dt = jnp.dtype(cfg.dtype)
    layers = {}
    for stack, n in _stacks(cfg).items():
        layers[stack] = {}
        for k, shape in layer_shapes(cfg, batch, cache_len).items():
            full = (n, *shape)
            spec = sharding.logical_to_spec(("layers", "batch", *[None] * (len(shape) - 1)), full, mesh)
            layers[stack][k] = jax.ShapeDtypeStruct(full, dt, sharding=NamedSharding(mesh, spec))
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.batch_sharding(mesh, (batch,)))
    return Cache(layers=layers, index=rows, start=rows)


def _pool_abstract(cfg: ModelConfig, mesh, slots: int, cache_len: int) -> rollout.Pool:
    """The slot engine's pool (``r1jax.rollout.Pool``): ``slots`` slots over the batch axes, each with a cache of
    ``cache_len`` tokens and a token buffer as long."""

    def rows(*dims, dtype):
        return jax.ShapeDtypeStruct((slots, *dims), dtype, sharding=sharding.batch_sharding(mesh, (slots, *dims)))

    return rollout.Pool(
        cache=_cache_abstract(cfg, mesh, slots, cache_len),
        logits=rows(cfg.vocab_size, dtype=jnp.float32),
        keys=rows(*rollout.KEY_SHAPE, dtype=jnp.uint32),
        count=rows(dtype=jnp.int32),
        budget=rows(dtype=jnp.int32),
        done=rows(dtype=jnp.bool_),
        ended=rows(dtype=jnp.bool_),
        window=rows(1, dtype=jnp.int32),
        tokens=rows(cache_len, dtype=jnp.int32),
        logp=rows(cache_len, dtype=jnp.float32),
        routes=None,
    )


def compile_decode(cfg: ModelConfig, mesh, batch: int, cache_len: int):
    """The slot engine's jitted decode loop (``r1jax.rollout.decode``: sample, write, one cached forward per step,
    the pool donated) for ``batch`` slots; XLA's cost analysis counts one step of its loop."""
    specs = param_specs(cfg)
    psh = sharding.param_shardings(specs, mesh)
    params = _abstract(specs, cfg, psh, dtype=cfg.dtype)  # serving weights in the compute dtype
    pool = _pool_abstract(cfg, mesh, batch, cache_len)
    rep = NamedSharding(mesh, PartitionSpec())
    scalar = partial(jax.ShapeDtypeStruct, sharding=rep)
    args = (scalar((1,), jnp.int32), scalar((0, 1), jnp.int32), scalar((), jnp.int32), scalar((), jnp.bool_))
    with jax.set_mesh(mesh):
        return rollout.decode.lower(params, pool, *args, cfg=cfg, mesh=mesh).compile()


_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|reduce-scatter|ragged-all-to-all|all-to-all|collective-permute)"
    r"(?:-start)?\("
)
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64|f8e4m3fn|f8e5m2)\[([0-9,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2}


def collective_bytes(hlo_text: str) -> float:
    """Bytes of the results of the collectives in a compiled module's HLO (the largest array of an async tuple)."""
    total = 0.0
    for m in _COLLECTIVE.finditer(hlo_text):
        sizes = [
            _ITEMSIZE.get(dt, 4 if dt[-2:] == "32" else 8) * float(np.prod([int(x) for x in dims.split(",") if x]))
            for dt, dims in _ARRAY.findall(m.group(1))
        ]
        total += max(sizes, default=0.0)
    return total


def _block_flops(
    cfg: ModelConfig, mesh, stack: str, kind: str, batch: int, seq: int, lcfg: LoraConfig | None = None
) -> tuple[float, float, float]:
    """FLOPs, collective bytes and bytes accessed of one layer of ``stack`` (train: forward, remat recompute and
    backward as the scan runs them, the backward for the adapters alone with ``lcfg``; decode: one cached step)."""
    moe_block = stack == MOE_LAYERS
    specs = _layer_specs(cfg, stack)
    psh = sharding.param_shardings(specs, mesh)
    dt = jnp.dtype(cfg.dtype)
    residual = NamedSharding(mesh, sharding.logical_to_spec(RESIDUAL, (batch, seq, cfg.d_model), mesh))
    x = jax.ShapeDtypeStruct((batch, seq, cfg.d_model), dt, sharding=residual)  # as the layer scan carries it
    pos_sh = sharding.batch_sharding(mesh, (batch, seq))
    pos = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=pos_sh)
    if kind == "train":
        params = _abstract(specs, cfg, psh)
        if lcfg is not None and lcfg.enabled:  # one layer of the adapted stack
            plain = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype or cfg.param_dtype)),
                                 param_specs(cfg), is_leaf=_is_spec)  # fmt: skip
            stacked = jax.eval_shape(lambda p: lora.attach(p, lcfg, cfg, jax.random.key(0)), plain)[stack]
            one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked)
            layer_sh = sharding.param_shardings(lora.specs_like(one, specs), mesh)
            params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), one, layer_sh)
        fn = partial(block, segment_ids=None, cfg=cfg, moe_block=moe_block)
        fn = jax.checkpoint(fn, policy=REMAT_POLICIES[cfg.remat_policy]) if cfg.remat else fn

        def f(p, h, positions):  # the output stays live (it feeds the next layer): forward, remat recompute, backward
            train, frozen = lora.partition(p)
            out, vjp = jax.vjp(lambda t, h: fn(lora.combine(t, frozen), h, positions)[0], train, h)
            return out, vjp(jnp.ones_like(out))

        args = (params, x, pos)
    else:
        params = _abstract(specs, cfg, psh, dtype=cfg.dtype)
        cache_len = seq
        x = jax.ShapeDtypeStruct((batch, 1, cfg.d_model), dt, sharding=sharding.batch_sharding(mesh, (batch, 1, 1)))
        pos = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=sharding.batch_sharding(mesh, (batch, 1)))
        lc = {
            k: jax.ShapeDtypeStruct(
                s,
                dt,
                sharding=NamedSharding(mesh, sharding.logical_to_spec(("batch",) + (None,) * (len(s) - 1), s, mesh)),
            )
            for k, s in layer_shapes(cfg, batch, cache_len).items()
        }
        valid = jax.ShapeDtypeStruct((batch, cache_len), jnp.bool_, sharding=sharding.batch_sharding(mesh, (batch, 1)))

        def f(p, h, positions, lc, valid_k):
            return block_cached(p, h, positions, lc, positions, valid_k, cfg, moe_block)[0]

        args = (params, x, pos, lc, valid)
    with jax.set_mesh(mesh):
        exe = jax.jit(f).lower(*args).compile()
    cost = exe.cost_analysis() or {}
    return float(cost.get("flops", 0.0)), collective_bytes(exe.as_text()), float(cost.get("bytes accessed", 0.0))


def _dispatch_shapes(cfg: ModelConfig, mesh, tokens: tuple[int, int]) -> dict | None:
    """The expert-parallel dispatch of a [b, t] batch of routed tokens on ``mesh`` (``r1jax.expert_parallel``), or
    None when the routed experts run without it."""
    if not cfg.is_moe:
        return None
    lay = expert_parallel.layout(tokens, cfg.n_experts, cfg.d_model, cfg.moe_ffw, mesh)
    if lay is None:
        return None
    t_l, k, n_ep = lay.tokens, cfg.experts_per_token, lay.n_shards
    e_local = cfg.n_experts // n_ep
    return {
        "expert_axes": list(lay.group),
        "tokens_per_device": t_l,
        "devices": sharding.shard_count(lay.tok_spec, mesh) * lay.split_size,  # devices dispatching distinct tokens
        "expert_shards": n_ep,
        "slack": cfg.dispatch_slack,
        "round_rows": expert_parallel.round_rows(t_l, k, n_ep, e_local, cfg.dispatch_slack),
        "worst_case_rows": expert_parallel.dispatch_capacity(t_l, k, e_local, n_ep),
        "mean_rows": t_l * k,  # rows an expert shard receives from its group, on average
    }


def expected_rounds(cfg: ModelConfig, shapes: dict, trials: int = 4, seed: int = 0) -> dict:
    """Monte-Carlo of the dispatch rounds R of one MoE layer under balanced routing: iid Gaussian router logits
    through the model's router (``moe.route``, zero correction bias, group-limited top-k as configured), so every
    expert is equally likely; R = max over expert shards of ceil(rows it receives from its group / round_rows), as
    the ``pmax`` in ``r1jax.expert_parallel`` makes it. DeepSeek-V3's auxiliary-loss-free bias balancing steers
    routing towards this; a skewed batch needs more rounds (see ``mfu_if_rounds``)."""
    t_l, n_src, n_ep = shapes["tokens_per_device"], shapes["devices"], shapes["expert_shards"]
    e = cfg.n_experts
    e_local, groups = e // n_ep, max(1, n_src // n_ep)
    block = n_ep * t_l  # the tokens of one group, routed at once

    @jax.jit
    def busiest(key):  # the most rows one expert shard of a group receives
        logits = jax.random.normal(key, (block, e))
        _, idx = moe.route(logits, jnp.eye(e), jnp.zeros(e), cfg)
        return jnp.bincount((idx // e_local).reshape(-1), length=n_ep).max()

    keys = iter(jax.random.split(jax.random.key(seed), trials * groups))
    peaks = [max(int(busiest(next(keys))) for _ in range(groups)) for _ in range(trials)]
    rounds = [-(-p // shapes["round_rows"]) for p in peaks]
    return {
        "rounds_expected": float(np.mean(rounds)),
        "rounds_seen": sorted(set(rounds)),
        "busiest_shard_over_mean": float(np.mean(peaks) / shapes["mean_rows"]),
        "rounds_method": f"Monte-Carlo, {trials} layers x {groups} groups of {n_ep} devices x {t_l} tokens: balanced "
        "routing (iid router logits through the model's router, every expert equally likely), R = max over expert "
        "shards of ceil(rows received / round_rows)",
    }


def _dispatch_round_cost(
    cfg: ModelConfig, mesh, kind: str, tokens: tuple[int, int], shapes: dict
) -> tuple[float, float, float]:
    """FLOPs, collective bytes and bytes accessed of the dispatch rounds one MoE layer runs per extra round
    (``r1jax.expert_parallel.dispatch_round``, compiled alone at the layer's shapes): train = the forward loop's,
    and the backward loop's bodies (a round's forward under ``jax.vjp`` and its transpose; the remat recompute keeps
    the rows, ``expert_parallel.EXPERT_ROWS``, and runs no rounds); decode = one forward round."""
    d, e, f, k = cfg.d_model, cfg.n_experts, cfg.moe_ffw, cfg.experts_per_token
    lay = expert_parallel.layout(tokens, e, d, f, mesh)
    n_ep, cap = lay.n_shards, shapes["round_rows"]
    dt = jnp.dtype(cfg.dtype)
    down_spec = PartitionSpec(lay.gate_spec[0], lay.gate_spec[2], None)
    everywhere = PartitionSpec(mesh.axis_names)  # per-device arrays: one block per device
    round_fn = partial(expert_parallel.dispatch_round, cap=cap, e_local=e // n_ep, axis=lay.group)

    def body(r, token, local, counts, x, wg, wu, wd):
        plan = (token, local, counts)
        out = jnp.sum(round_fn(r[0] + 1, plan, x, wg, wu, wd))
        if kind == "train":  # a distinct round index: XLA cannot merge the forwards
            y, vjp = jax.vjp(partial(round_fn, r[0], plan), x, wg, wu, wd)
            out = out + sum(jnp.sum(c) for c in vjp(y))
        return out[None]

    a, n_dev = lay.tokens * k, mesh.size
    sds = jax.ShapeDtypeStruct

    def rows(n, *dims, dtype=jnp.int32):
        return sds((n_dev * n, *dims), dtype, sharding=NamedSharding(mesh, everywhere))

    args = (
        rows(1),
        rows(a),
        rows(a),
        rows(n_ep, n_ep),
        rows(lay.tokens, d, dtype=dt),
        sds((e, d, f), dt, sharding=NamedSharding(mesh, lay.gate_spec)),
        sds((e, d, f), dt, sharding=NamedSharding(mesh, lay.gate_spec)),
        sds((e, f, d), dt, sharding=NamedSharding(mesh, down_spec)),
    )
    specs = tuple(a.sharding.spec for a in args)
    fn = jax.shard_map(body, in_specs=specs, out_specs=everywhere, check_vma=False)
    with jax.set_mesh(mesh):
        exe = jax.jit(fn).lower(*args).compile()
    cost = exe.cost_analysis() or {}
    return float(cost.get("flops", 0.0)), collective_bytes(exe.as_text()), float(cost.get("bytes accessed", 0.0))


def _stacks(cfg: ModelConfig) -> dict[str, int]:
    """Layers per stack (``model.LAYER_STACKS``), for the stacks the model has."""
    return {k: n for k, n in ((DENSE_LAYERS, cfg.n_dense_layers), (MOE_LAYERS, cfg.n_moe_layers)) if n}


def reduced_config(cfg: ModelConfig) -> ModelConfig:
    """At most one layer per stack (dense prefix, MoE stack)."""
    if cfg.is_moe:
        d = min(cfg.n_dense_layers, 1)
        return cfg.replace(n_layers=d + min(cfg.n_moe_layers, 1), first_k_dense=d)
    return cfg.replace(n_layers=1)


def active_params(cfg: ModelConfig) -> float:
    """Parameters a token touches in matmuls (routed experts: k of e), including the output head."""
    total = 0.0
    for path, s in jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=_is_spec)[0]:
        keys = jax.tree_util.keystr(path)
        n = float(np.prod(s.shape))
        if "'embed'" in keys and keys.startswith("['embed']"):
            continue  # a gather, not a matmul
        if "'experts'" in keys:
            n *= cfg.experts_per_token / cfg.n_experts
        total += n
    return total


def _state_bytes(specs, cfg: ModelConfig, mesh, kind: str, moment_dtype: str = "float32") -> float:
    """Per-device bytes of a ``param_specs`` (sub)tree: train = params, grads and two moments; decode = params."""
    out = 0.0
    for s in jax.tree.leaves(specs, is_leaf=_is_spec):
        spec = sharding.logical_to_spec(s.axes, s.shape, mesh)
        n = float(np.prod(s.shape)) / sharding.shard_count(spec, mesh)
        if kind == "train":
            out += n * (2 * jnp.dtype(s.dtype or cfg.param_dtype).itemsize + 2 * jnp.dtype(moment_dtype).itemsize)
        else:
            out += n * jnp.dtype(cfg.dtype).itemsize
    return out


def _lora_state_bytes(cfg: ModelConfig, lcfg: LoraConfig, mesh, moment_dtype: str) -> float:
    """Per-device training state with adapters: the frozen base as ``lora.attach`` stores it (compute dtype or
    quantised), the adapters with their gradients and two moments."""
    plain = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype or cfg.param_dtype)),
                         param_specs(cfg), is_leaf=_is_spec)  # fmt: skip
    adapted = jax.eval_shape(lambda p: lora.attach(p, lcfg, cfg, jax.random.key(0)), plain)
    specs = lora.specs_like(adapted, param_specs(cfg))

    def per_device(x, s):  # elements this device holds, and their bytes as stored
        spec = sharding.logical_to_spec(s.axes, s.shape, mesh)
        n = float(np.prod(s.shape)) / sharding.shard_count(spec, mesh)
        return n, n * jax.dtypes.itemsize_bits(x.dtype) / 8

    moments = 2 * jnp.dtype(moment_dtype).itemsize
    (train, frozen), (train_specs, frozen_specs) = lora.partition(adapted), lora.partition(specs)
    pairs = lambda a, s: zip(jax.tree.leaves(a), jax.tree.leaves(s, is_leaf=_is_spec), strict=True)  # noqa: E731
    out = sum(per_device(x, s)[1] for x, s in pairs(frozen, frozen_specs))
    for x, s in pairs(train, train_specs):
        n, stored = per_device(x, s)
        out += 2 * stored + n * moments  # weights, gradients, two moments
    return out


def _state_bytes_per_layer(cfg: ModelConfig, mesh, stack: str, kind: str, moment_dtype: str = "float32") -> float:
    return _state_bytes(_layer_specs(cfg, stack), cfg, mesh, kind, moment_dtype)


def _saved_per_layer(cfg: ModelConfig, mesh, stack: str, b: int, t: int) -> float:
    """Bytes one device keeps per rematerialised layer: its block of the [b, t, d] residual stream (sequence
    parallel) and, for an expert-parallel MoE layer, its [T_l x k, d] expert rows (``expert_parallel.EXPERT_ROWS``)."""
    item = jnp.dtype(cfg.dtype).itemsize
    spec = sharding.logical_to_spec(RESIDUAL, (b, t, cfg.d_model), mesh)
    saved = b * t * cfg.d_model * item / sharding.shard_count(spec, mesh)
    lay = expert_parallel.layout((b, t), cfg.n_experts, cfg.d_model, cfg.moe_ffw, mesh) if cfg.is_moe else None
    if stack == MOE_LAYERS and lay is not None:
        saved += lay.tokens * cfg.experts_per_token * cfg.d_model * item
    return saved


def _local(mesh, n: int) -> int:
    """Rows of a batch of ``n`` one device holds."""
    return n // sharding.shard_count(sharding.batch_sharding(mesh, (n,)).spec, mesh)


def estimate(
    cfg: ModelConfig, mesh, chip: str, shape: dict, moment_dtype: str = "float32", lcfg: LoraConfig | None = None
) -> dict:
    """Training bytes per device without compiling (see the module docstring); for devices libtpu cannot target.
    ``lcfg``: LoRA (the frozen base, adapters and their state; activations as for full fine-tuning)."""
    hbm = CHIPS[chip][0]
    b, t = _local(mesh, shape["batch"]), shape["seq_len"]
    ax = dict(mesh.shape)
    tp = ax.get("tensor", 1)
    act = jnp.dtype(cfg.dtype).itemsize
    parts = {
        "state": _lora_state_bytes(cfg, lcfg, mesh, moment_dtype)
        if lcfg is not None and lcfg.enabled
        else _state_bytes(param_specs(cfg), cfg, mesh, "train", moment_dtype),
        "remat_residuals": cfg.n_layers * b * t * cfg.d_model * act,
        "logits": b * t * (cfg.vocab_size // tp) * (act + 4 + 4),
        "attention_scores": b * max(cfg.n_heads // tp, 1) * t * t * 4 * 2,
        "mlp": b * t * (max(cfg.ffw, cfg.moe_ffw * cfg.experts_per_token) // tp) * act * 4,
    }
    total = sum(parts.values())
    per_param = 4 if lcfg is not None and lcfg.enabled else 6
    return {
        "step": "train",
        "shape": shape,
        "memory_method": "arithmetic (no compile)",
        "parts_bytes": {k: int(v) for k, v in parts.items()},
        "total_bytes": int(total),
        "hbm_bytes": int(hbm),
        "hbm_fraction": total / hbm,
        "fits": bool(total <= FIT_FRACTION * hbm),
        "model_flops": per_param * active_params(cfg) * shape["batch"] * t,
        "ideal_step_s": per_param * active_params(cfg) * shape["batch"] * t / (mesh.size * CHIPS[chip][1]),
    }


def analyse(kind: str, cfg: ModelConfig, mesh, chip: str, shape: dict, reduced: bool, tc: TrainConfig | None = None):
    """Compile one step and read its memory, FLOPs and collectives (see the module docstring). ``tc``: the GRPO run
    whose policy update is compiled (``kind == "train"``)."""
    hbm, peak, bw, ici = CHIPS[chip]
    n_chips = mesh.size
    compiled_cfg = reduced_config(cfg) if reduced else cfg
    moment_dtype = tc.optim.moment_dtype if tc is not None else "float32"
    accum = 1
    t0 = time.time()
    if kind == "train":
        exe = compile_train(compiled_cfg, mesh, tc)
        b, t, accum = shape["batch"], shape["seq_len"], shape["accum"]
    else:
        exe = compile_decode(compiled_cfg, mesh, shape["batch"], shape["cache_len"])
        b, t = shape["batch"], shape["cache_len"]
    compile_s = time.time() - t0
    mem = exe.memory_analysis()
    cost = exe.cost_analysis() or {}
    arg, out, temp, alias = (
        mem.argument_size_in_bytes,
        mem.output_size_in_bytes,
        mem.temp_size_in_bytes,
        mem.alias_size_in_bytes,
    )
    total = arg + out + temp - alias
    flops = float(cost.get("flops", 0.0))
    flops_compiled = flops
    comm = collective_bytes(exe.as_text())
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    extra_bytes = 0.0
    for stack, n_full in _stacks(cfg).items():
        n_compiled = _stacks(compiled_cfg)[stack]
        lcfg = tc.lora if tc is not None else None
        layer_flops, layer_comm, layer_bytes = _block_flops(compiled_cfg, mesh, stack, kind, b, t, lcfg)
        flops += (n_full - 1) * layer_flops
        comm += (n_full - 1) * layer_comm
        bytes_accessed += (n_full - 1) * layer_bytes
        if reduced and n_full > n_compiled:
            per_layer = _state_bytes_per_layer(cfg, mesh, stack, kind, moment_dtype)
            if kind == "train":  # saved per layer (remat): the residual stream, the expert-parallel rows
                per_layer += _saved_per_layer(cfg, mesh, stack, b, t)
            else:  # the layer's KV cache
                per_layer += _local(mesh, b) * t * sum(np.prod(s[2:]) for s in layer_shapes(cfg, 1, 1).values()) * 2
            extra_bytes += (n_full - n_compiled) * per_layer
    total += extra_bytes
    # expert-parallel dispatch: XLA counts the rounds loop once; the step runs R rounds per MoE layer
    tokens = (b, t if kind == "train" else 1)  # the routed tokens of one layer
    dispatch = _dispatch_shapes(cfg, mesh, tokens)
    per_round = (0.0, 0.0, 0.0)
    if dispatch is not None:
        dispatch.update(expected_rounds(cfg, dispatch))
        per_round = tuple(cfg.n_moe_layers * c for c in _dispatch_round_cost(cfg, mesh, kind, tokens, dispatch))
        keys = ("round_flops_per_device", "round_collective_bytes_per_device", "round_bytes_accessed_per_device")
        dispatch.update(zip(keys, per_round, strict=True))
        dispatch["round_cost_method"] = (
            "one round compiled alone (dispatch_round: all-to-all, grouped matmuls, all-to-all back; train: the "
            "forward, remat and backward loop bodies) x MoE layers; the compiled step holds one round, so "
            "(rounds_expected - 1) x this is added per micro-batch"
        )
    tokens = b * accum * (t if kind == "train" else 1)
    if kind == "train":  # the policy update applies the output head to completion positions only
        head = cfg.d_model * cfg.vocab_size
        body = active_params(cfg) - (0 if cfg.tie_embeddings else head)
        per_param = 4 if tc is not None and tc.lora.enabled else 6  # LoRA: no weight gradients of the frozen base
        model_flops = per_param * (body * tokens + head * b * accum * shape["completion_len"])
    else:
        model_flops = 2 * active_params(cfg) * tokens

    def timing(rounds: float) -> dict:
        """The step at ``rounds`` dispatch rounds per MoE layer; the micro-batch loop (a scan) runs ``accum``
        times."""
        extra = [max(rounds - 1, 0.0) * c for c in per_round]
        f, c, by = (accum * (x + dx) for x, dx in zip((flops, comm, bytes_accessed), extra, strict=True))
        step_s = max(f / peak, by / bw)
        est_s = max(step_s, c / ici)
        return {
            "flops_per_device": f,
            "bytes_accessed_per_device": by,
            "collective_bytes_per_device": c,
            "roofline_step_s": step_s,
            "comm_s": c / ici,
            "step_estimate_s": est_s,
            "mfu_roofline": model_flops / (n_chips * peak * step_s) if step_s else None,
            "mfu_estimate": model_flops / (n_chips * peak * est_s) if est_s else None,
        }

    rounds = dispatch["rounds_expected"] if dispatch else 1.0
    main = timing(rounds)
    if dispatch is not None:
        dispatch["mfu_if_rounds"] = {
            f"{r:g}": timing(r)["mfu_estimate"] for r in sorted({rounds + 1, 2 * rounds}) if r != rounds
        }
    return {
        "step": kind,
        "shape": shape,
        "moment_dtype": moment_dtype if kind == "train" else None,
        "layers_compiled": compiled_cfg.n_layers,
        "layers": cfg.n_layers,
        "memory_method": "extrapolated linearly from one layer per stack" if reduced else "exact (full compile)",
        "argument_bytes": arg,
        "output_bytes": out,
        "temp_bytes": temp,
        "alias_bytes": alias,
        "total_bytes": int(total),
        "hbm_bytes": int(hbm),
        "hbm_fraction": total / hbm,
        "fits": bool(total <= FIT_FRACTION * hbm),
        "flops_per_device": main["flops_per_device"],
        "flops_compiled_raw": flops_compiled,
        "flops_method": "(compiled + (layers-1) x one layer compiled alone, per stack + (rounds_expected - 1) x "
        "the dispatch rounds) x micro-batches (loop bodies count once)",
        "dispatch": dispatch,
        **{k: v for k, v in main.items() if k != "flops_per_device"},
        "model_flops": model_flops,
        "compile_s": round(compile_s, 1),
    }


def run(
    preset,
    topology: str | None = None,
    step: str = "both",
    reduced: bool = False,
    name: str = "",
    slices: int | None = None,
    only_estimate: bool = False,
) -> dict:
    """Compile ``preset`` (a module or namespace with model/mesh/batch[/decode/TOPOLOGY/SLICES/MOMENT_DTYPE]) for
    ``topology`` (``slices`` copies of it over DCN), or with ``only_estimate`` just do the memory arithmetic."""
    topology = topology or preset.TOPOLOGY
    slices = slices or getattr(preset, "SLICES", 1)
    moment_dtype = getattr(preset, "MOMENT_DTYPE", "float32")
    chip = topology.split(":")[0]
    cfg = preset.model()
    if only_estimate or chip not in ("v4", "v5e", "v5p", "v6e"):
        mesh = sharding.abstract_mesh(preset.mesh())
        result = {"config": name, "topology": topology, "chips": mesh.size, "mesh": dict(mesh.shape)}
        result["params"] = float(sum(np.prod(s.shape) for s in jax.tree.leaves(param_specs(cfg), is_leaf=_is_spec)))
        result["active_params"] = active_params(cfg)
        lcfg = train_config(preset, cfg).lora
        result["steps"] = [estimate(cfg, mesh, chip, preset.batch(), moment_dtype, lcfg)]
        return result
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # deviceless: other processes may hold libtpu too
    from jax.experimental import topologies

    kw = {"num_slices": slices} if slices > 1 else {}
    devices = topologies.get_topology_desc(topology, platform="tpu", **kw).devices
    mesh = sharding.make_mesh(preset.mesh(), devices=devices)
    result = {"config": name, "topology": topology, "slices": slices, "chips": len(devices), "mesh": dict(mesh.shape)}
    result["params"] = float(sum(np.prod(s.shape) for s in jax.tree.leaves(param_specs(cfg), is_leaf=_is_spec)))
    result["active_params"] = active_params(cfg)
    steps = []
    if step in ("train", "both"):
        tc = train_config(preset, cfg)
        steps.append(analyse("train", cfg, mesh, chip, train_shape(tc), reduced, tc))
    if step in ("decode", "both") and hasattr(preset, "decode"):
        decode_cfg = cfg.replace(remat=False, param_dtype=cfg.dtype)
        steps.append(analyse("decode", decode_cfg, mesh, chip, preset.decode(), reduced))
    result["steps"] = steps
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="configs/ module name or path")
    ap.add_argument("--topology", default=None, help="e.g. v5p:8x16x16 (default: the preset's TOPOLOGY)")
    ap.add_argument("--step", choices=("train", "decode", "both"), default="both")
    ap.add_argument("--reduced", action="store_true", help="one layer per stack, memory extrapolated")
    ap.add_argument("--slices", type=int, default=None, help="copies of the topology over DCN (default: SLICES or 1)")
    ap.add_argument("--estimate", action="store_true", help="memory arithmetic only, no compile (GPUs)")
    args = ap.parse_args(argv)
    result = run(
        load_preset(args.config),
        args.topology,
        args.step,
        args.reduced,
        name=args.config,
        slices=args.slices,
        only_estimate=args.estimate,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
