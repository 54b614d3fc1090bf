"""The r1jax transformer: DeepSeek-V2/V3 (MLA + DeepSeekMoE + MTP) and the dense Qwen2/Qwen3/Llama family.

Design choices
- Parameters are declared once, in ``param_specs``: shape, logical axes, initializer, dtype. The Flax NNX module
  ``Transformer`` only holds them; all math lives in pure functions over plain arrays (``forward`` and friends).
- Identical layers are stacked on a leading ``layers`` axis and run with ``jax.lax.scan``: the dense prefix and the MoE
  stack are two scans. Decoding on CPU runs them unstacked, as a Python loop over per-layer buffers
  (``unstack_layers``).
- dtype policy: parameters in ``param_dtype``, matmuls in ``dtype``; norms, softmax, router scores and logits in f32.
- MLA without a cache (training, scoring) expands the latent into per-head keys and values. With a cache, attention
  is *absorbed*: the cache holds only the normed kv latent and the rotated shared rope key (c + p values per token per
  layer, 576 for V3); the k up-projection is folded into the query and the v up-projection into the output.
- RoPE: DeepSeek rotates adjacent pairs (``rope_interleave``); Llama/Qwen rotate halves. YaRN includes DeepSeek's
  mscale softmax correction, applied whenever the config asks for YaRN (as transformers does).
- Causal masking is by cache slot; ``start[b]`` (left padding) masks slots before a sequence begins, so padded and
  unpadded batches give the same results.
- MoE routing replay: ``forward(routes=...)`` runs every MoE layer with given experts (what the sampler chose), gated
  by the current router scores, so a teacher-forced pass routes as the sampler did and the router still learns;
  ``return_routes`` reports the experts each token used.
- Profiles read by component: ``jax.named_scope`` names each block ``layer``, and inside it ``attention`` and
  ``mlp`` or ``moe`` (``moe_round`` for each expert-parallel dispatch round); the final norm and output head are
  ``head``. The names land in the HLO ops' metadata, so a ``jax.profiler`` trace groups its ops by them.

Einsum alphabet: ``b`` batch, ``t`` query positions, ``s`` key positions, ``d`` d_model, ``h`` heads, ``g`` kv heads,
``r`` query heads per kv head, ``q`` q-LoRA rank, ``c`` kv latent rank, ``n`` nope head dim, ``p`` rope head dim,
``v`` value head dim, ``k`` head dim (GQA), ``e`` experts, ``f`` ffw hidden, ``V`` vocab, ``T`` flattened tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from r1jax import expert_parallel, moe, sharding
from r1jax.cache import Cache
from r1jax.config import DENSE_LAYERS, MOE_LAYERS, AttentionImpl, ModelConfig, RopeConfig, RopeType

Params = dict[str, Any]
LAYER_STACKS = {DENSE_LAYERS: False, MOE_LAYERS: True}  # stack name -> MoE blocks; run in this order
RESIDUAL = ("batch", "seq", None)  # the residual stream's logical axes (sequence parallel over tensor on a mesh)
# ModelConfig.remat_policy -> what a rematerialised layer saves for its backward pass besides its input. Both keep
# the expert-parallel rows (``expert_parallel.EXPERT_ROWS``): recomputing them would repeat the all-to-alls. "dots":
# the projection outputs too (each ``linear``'s result, ``PROJ``; with an adapter the adapted sum, not the base and
# low-rank products it is made of), so the backward recomputes only norms, activations, softmaxes and the adapters'
# small x @ a. On CPU this also beats saving everything (no remat), whose scanned residual stacks XLA:CPU zero-fills,
# writes and re-slices. Saving the adapters' inner products as well (every matmul output) holds more activations and
# is no faster (docs/performance.md, "LoRA GRPO against TRL + PEFT").
PROJ = "proj"
_KEEP_ROWS = jax.checkpoint_policies.save_only_these_names(expert_parallel.EXPERT_ROWS)
REMAT_POLICIES = {
    "full": _KEEP_ROWS,
    "dots": jax.checkpoint_policies.save_only_these_names(PROJ, expert_parallel.EXPERT_ROWS),
}


# --- parameter declarations ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # normal | ones | zeros
    dtype: str | None = None  # None: the config's param_dtype

    def stacked(self, n: int) -> ParamSpec:
        return dataclasses.replace(self, shape=(n, *self.shape), axes=("layers", *self.axes))


def _norm(dim: int, axis: str | None = None) -> ParamSpec:
    return ParamSpec((dim,), (axis,), "ones")


def _mla_specs(cfg: ModelConfig) -> dict:
    d, h, c, p, n, v = cfg.d_model, cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_dim, cfg.qk_nope_dim, cfg.v_head_dim
    specs = {
        "kv_a": ParamSpec((d, c + p), ("embed", "kv_lora")),
        "kv_norm": _norm(c, "kv_lora"),
        "kv_b": ParamSpec((c, h, n + v), ("kv_lora", "heads", None)),
        "o": ParamSpec((h, v, d), ("heads", None, "embed")),
    }
    if cfg.q_lora_rank is None:
        specs["q"] = ParamSpec((d, h, n + p), ("embed", "heads", None))
    else:
        specs["q_a"] = ParamSpec((d, cfg.q_lora_rank), ("embed", "q_lora"))
        specs["q_norm"] = _norm(cfg.q_lora_rank, "q_lora")
        specs["q_b"] = ParamSpec((cfg.q_lora_rank, h, n + p), ("q_lora", "heads", None))
    return specs


def _gqa_specs(cfg: ModelConfig) -> dict:
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_size
    specs = {
        "q": ParamSpec((d, h, k), ("embed", "heads", None)),
        "k": ParamSpec((d, g, k), ("embed", "kv_heads", None)),
        "v": ParamSpec((d, g, k), ("embed", "kv_heads", None)),
        "o": ParamSpec((h, k, d), ("heads", None, "embed")),
    }
    if cfg.qkv_bias:
        specs |= {
            "q_bias": ParamSpec((h, k), ("heads", None), "zeros"),
            "k_bias": ParamSpec((g, k), ("kv_heads", None), "zeros"),
            "v_bias": ParamSpec((g, k), ("kv_heads", None), "zeros"),
        }
    if cfg.o_bias:
        specs["o_bias"] = ParamSpec((d,), ("embed",), "zeros")
    if cfg.qk_norm:
        specs |= {"q_norm": _norm(k), "k_norm": _norm(k)}
    return specs


def _mlp_specs(d: int, f: int, bias: bool = False) -> dict:
    specs = {
        "gate": ParamSpec((d, f), ("embed", "ffw")),
        "up": ParamSpec((d, f), ("embed", "ffw")),
        "down": ParamSpec((f, d), ("ffw", "embed")),
    }
    if bias:
        specs |= {
            "gate_bias": ParamSpec((f,), ("ffw",), "zeros"),
            "up_bias": ParamSpec((f,), ("ffw",), "zeros"),
            "down_bias": ParamSpec((d,), ("embed",), "zeros"),
        }
    return specs


def _moe_specs(cfg: ModelConfig) -> dict:
    d, e, f = cfg.d_model, cfg.n_experts, cfg.moe_ffw
    specs = {
        "router": ParamSpec((d, e), ("embed", None), dtype="float32"),
        "router_bias": ParamSpec((e,), (None,), "zeros", dtype="float32"),
        "experts": {
            "gate": ParamSpec((e, d, f), ("experts", "embed", "expert_ffw")),
            "up": ParamSpec((e, d, f), ("experts", "embed", "expert_ffw")),
            "down": ParamSpec((e, f, d), ("experts", "expert_ffw", "embed")),
        },
    }
    if cfg.n_shared_experts:
        specs["shared"] = _mlp_specs(d, f * cfg.n_shared_experts)
    return specs


def _block_specs(cfg: ModelConfig, moe_layer: bool) -> dict:
    return {
        "attn_norm": _norm(cfg.d_model, "embed"),
        "attn": _mla_specs(cfg) if cfg.is_mla else _gqa_specs(cfg),
        "mlp_norm": _norm(cfg.d_model, "embed"),
        "mlp": _moe_specs(cfg) if moe_layer else _mlp_specs(cfg.d_model, cfg.ffw, cfg.mlp_bias),
    }


def _stack(tree: dict, n: int) -> dict:
    return jax.tree.map(lambda s: s.stacked(n), tree, is_leaf=lambda x: isinstance(x, ParamSpec))


def param_specs(cfg: ModelConfig, *, mtp: bool = False) -> dict:
    """The whole parameter tree as nested dicts of ``ParamSpec``; ``mtp`` adds the multi-token-prediction module."""
    d = cfg.d_model
    specs: dict = {"embed": ParamSpec((cfg.vocab_size, d), ("vocab", "embed"))}
    if cfg.n_dense_layers:
        specs[DENSE_LAYERS] = _stack(_block_specs(cfg, moe_layer=False), cfg.n_dense_layers)
    if cfg.n_moe_layers:
        specs[MOE_LAYERS] = _stack(_block_specs(cfg, moe_layer=True), cfg.n_moe_layers)
    specs["final_norm"] = _norm(d, "embed")
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((d, cfg.vocab_size), ("embed", "vocab"))
    if mtp and cfg.n_mtp_layers:
        mtp_block = {
            "enorm": _norm(d, "embed"),
            "hnorm": _norm(d, "embed"),
            "eh_proj": ParamSpec((2 * d, d), (None, "embed")),
            "block": _block_specs(cfg, moe_layer=cfg.is_moe),
            "head_norm": _norm(d, "embed"),
        }
        specs["mtp"] = _stack(mtp_block, cfg.n_mtp_layers)
    return specs


def _init_leaf(spec: ParamSpec, key: jax.Array, cfg: ModelConfig, std: float) -> jax.Array:
    dtype = jnp.dtype(spec.dtype or cfg.param_dtype)
    if spec.init == "ones":
        return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)


def init_params(cfg: ModelConfig, key: jax.Array, *, mtp: bool = False, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) matrices, unit norms, zero biases) as a plain nested dict."""
    specs = param_specs(cfg, mtp=mtp)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [_init_leaf(s, k, cfg, std) for s, k in zip(leaves, keys, strict=True)])


# --- the NNX holder -----------------------------------------------------------------------------------------------
class _Group(nnx.Module):
    """A named group of parameters (one level of the ``param_specs`` tree)."""


def _build(tree: dict, values: dict) -> _Group:
    group = _Group()
    for name, spec in tree.items():
        if isinstance(spec, ParamSpec):
            setattr(group, name, nnx.Param(values[name], axes=spec.axes))
        else:
            setattr(group, name, _build(spec, values[name]))
    return group


class Transformer(nnx.Module):
    """Holds the parameters of ``param_specs(cfg)``; ``model(tokens)`` -> f32 logits [b, t, V].

    ``hf_config`` is the source checkpoint's HF ``config.json`` (what ``export_hf`` starts from; empty for a random
    model) and ``tokenizer_files`` maps file names (``tokenizer.json``, ``tokenizer_config.json``, ...) to their text.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        *,
        hf_config: Mapping[str, Any] | None = None,
        tokenizer_files: Mapping[str, str] | None = None,
    ):
        self.cfg = cfg
        self.hf_config: dict[str, Any] = dict(hf_config or {})
        self.tokenizer_files: dict[str, str] = dict(tokenizer_files or {})
        self.params = _build(param_specs(cfg, mtp="mtp" in params), params)

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, *, mtp: bool = False, mesh=None) -> Transformer:
        """``init_params`` from ``seed``; with ``mesh`` each parameter is created sharded by the rules table (the
        same values: the random stream does not depend on the sharding)."""
        out = None if mesh is None else sharding.param_shardings(param_specs(cfg, mtp=mtp), mesh)
        return cls(cfg, jax.jit(lambda k: init_params(cfg, k, mtp=mtp), out_shardings=out)(jax.random.key(seed)))

    def param_dict(self) -> Params:
        """The parameters as a plain nested dict of arrays (what the pure functions take)."""
        return nnx.to_pure_dict(nnx.state(self.params, nnx.Param))

    def __call__(self, tokens: jax.Array, **kw) -> jax.Array:
        return forward(self.param_dict(), jnp.asarray(tokens, jnp.int32), self.cfg, **kw)[0]


# --- adapted and quantised weights ------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A frozen weight plus a trainable low-rank update (``r1jax.lora`` builds them): it stands for
    ``base + scale * a @ b``, with ``a`` [*in, r] and ``b`` [r, *out] (``n_in`` input axes; leading layer or expert
    axes are shared by all three). ``base`` is an array or a qwix ``QArray`` (the QLoRA base)."""

    base: Any
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata={"static": True})
    n_in: int = dataclasses.field(metadata={"static": True})


def is_quantized(w: Any) -> bool:
    return hasattr(w, "qvalue") and hasattr(w, "scale")  # a qwix QArray (imported only where one exists)


def dense(w: Any) -> jax.Array:
    """The plain array a weight stands for: a quantised base dequantised (in its scale's dtype), a low-rank update
    added (computed in f32, cast to the base's dtype)."""
    if isinstance(w, LoraWeight):
        base = dense(w.base)
        lead = w.a.ndim - w.n_in - 1  # layer / expert axes
        k, r = math.prod(w.a.shape[lead:-1]), w.a.shape[-1]
        a = w.a.reshape(*w.a.shape[:lead], k, r).astype(jnp.float32)
        b = w.b.reshape(*w.b.shape[:lead], r, -1).astype(jnp.float32)
        return (base.astype(jnp.float32) + w.scale * (a @ b).reshape(base.shape)).astype(base.dtype)
    if is_quantized(w):
        import qwix

        return qwix.dequantize(w)
    return w


# --- building blocks ------------------------------------------------------------------------------------------------
def linear(x: jax.Array, w: Any, n_in: int = 1, out_dtype=None) -> jax.Array:
    """``x[..., *in] @ w[*in, *out]`` -> [..., *out] (``in`` = the last ``n_in`` axes of x) as ONE 2-D matmul in x's
    dtype. Written this way, not as an einsum with batch axes, because XLA:CPU lays out the backward pass of
    ``btd,df->btf`` with a transposed copy of every activation gradient (a slower MLP backward); on TPU the reshapes
    are free. A ``LoraWeight`` runs unmerged: ``x @ base + scale * (x @ a) @ b``; a quantised weight is
    dequantised into the matmul. The result is named ``PROJ`` (what the "dots" remat policy saves)."""
    if isinstance(w, LoraWeight):
        y = _matmul(x, w.base, n_in, out_dtype)
        y = y + (w.scale * _matmul(_matmul(x, w.a, n_in), w.b)).astype(y.dtype)
    else:
        y = _matmul(x, w, n_in, out_dtype)
    return checkpoint_name(y, PROJ)


def _matmul(x: jax.Array, w: Any, n_in: int = 1, out_dtype=None) -> jax.Array:
    w = dense(w)
    lead, out = x.shape[: x.ndim - n_in], w.shape[n_in:]
    k = math.prod(w.shape[:n_in])
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1).astype(x.dtype), preferred_element_type=out_dtype)
    return y.reshape(*lead, *out)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, scaled by ``w`` and cast back to the input dtype (as HF does)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * y).astype(x.dtype)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies f32[dim // 2] and the cos/sin scale (YaRN's attention factor, 1 otherwise)."""
    inv = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if rope.type == RopeType.LINEAR:
        return inv / rope.factor, 1.0
    if rope.type == RopeType.LLAMA3:
        old = rope.original_max_position
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / rope.low_freq_factor, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        mid = (wavelen >= old / rope.high_freq_factor) & (wavelen <= old / rope.low_freq_factor)
        return np.where(mid, (1 - smooth) * scaled / rope.factor + smooth * scaled, scaled).astype(np.float32), 1.0
    if rope.type == RopeType.YARN:

        def corr_dim(rot: float) -> float:
            return dim * math.log(rope.original_max_position / (rot * 2 * math.pi)) / (2 * math.log(rope.theta))

        low, high = corr_dim(rope.beta_fast), corr_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low if high != low else 1e-3), 0, 1)
        extrapolate = 1 - ramp
        inv = (inv / rope.factor) * (1 - extrapolate) + inv * extrapolate
        if rope.attention_factor is not None:
            scale = rope.attention_factor
        elif rope.mscale and rope.mscale_all_dim:
            scale = _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
        else:
            scale = _yarn_mscale(rope.factor)
        return inv.astype(np.float32), float(scale)
    return inv, 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk head dim), times DeepSeek's YaRN mscale^2 when the config asks for YaRN with ``mscale_all_dim``."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.is_mla and cfg.rope.type == RopeType.YARN and cfg.rope.mscale_all_dim:
        scale *= _yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim) ** 2
    return scale


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotate ``x[b, t, ..., p]`` by ``positions[b, t]``: adjacent pairs if ``rope_interleave``, else halves.

    Interleaved inputs come out de-interleaved (evens then odds) — the same for queries and keys, so scores match.
    """
    inv, scale = rope_frequencies(cfg.rope, x.shape[-1])
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    angles = angles.reshape(*angles.shape[:2], *([1] * (x.ndim - 3)), angles.shape[-1])
    cos, sin = jnp.cos(angles) * scale, jnp.sin(angles) * scale
    xf = x.astype(jnp.float32)
    if cfg.rope_interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = jnp.split(xf, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention: q[b,t,h,k], k[b,s,g,k], v[b,s,g,v], mask bool[b,t,s] -> [b,t,h,v].

    Softmax in f32; rows with no visible key (padding) give zeros, not NaN. One query per row (decode) is a
    multiply-reduce over the cache as laid out, not a batched matmul that first transposes it to [b, g, s, k].
    """
    b, t, h, _ = q.shape
    g = k.shape[2]
    if t == 1:
        qg = q.reshape(b, 1, g, h // g, q.shape[-1])  # [b, 1, g, r, k] against k[b, s, g, 1, k]
        scores = jnp.sum(qg.astype(jnp.float32) * k[:, :, :, None].astype(jnp.float32), -1) * scale  # [b, s, g, r]
        m = mask[:, 0, :, None, None]
        probs = jax.nn.softmax(jnp.where(m, scores, -jnp.inf), axis=1)
        probs = jnp.where(m, probs, 0.0)
        out = jnp.sum(probs[..., None] * v[:, :, :, None].astype(jnp.float32), axis=1)  # [b, g, r, v]
        return out.reshape(b, 1, h, v.shape[-1]).astype(q.dtype)
    qg = q.reshape(b, t, g, h // g, q.shape[-1])
    scores = jnp.einsum("btgrk,bsgk->bgrts", qg, k, preferred_element_type=jnp.float32) * scale
    m = mask[:, None, None]
    probs = jax.nn.softmax(jnp.where(m, scores, -jnp.inf), axis=-1)
    probs = jnp.where(m, probs, 0.0).astype(v.dtype)
    return jnp.einsum("bgrts,bsgv->btgrv", probs, v).reshape(b, t, h, v.shape[-1])


def on_mesh(kernel: Callable, args: tuple, axes: tuple, out_axes: tuple) -> jax.Array:
    """``kernel(*args)`` under ``shard_map`` over the current mesh, each argument split by its logical ``axes``
    (None: replicated), so a Pallas kernel (which XLA cannot partition) runs on each device's shard; without a mesh,
    just the call."""
    mesh = sharding.current_mesh()
    if mesh is None:
        return kernel(*args)

    def spec(a, ax):
        return None if a is None else sharding.logical_to_spec(ax, a.shape, mesh)

    in_specs = tuple(spec(a, ax) for a, ax in zip(args, axes, strict=True))
    out_spec = spec(jax.eval_shape(kernel, *args), out_axes)
    return jax.shard_map(kernel, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


def _flash(q, k, v, segment_ids, scale):
    """The Pallas flash kernel; on a mesh per device, batch over the data axes and heads over ``tensor``."""
    from r1jax.kernels import flash_attention

    mesh = sharding.current_mesh()
    heads = ("batch", None, "heads", None)
    if mesh is not None and sharding.logical_to_spec(heads, q.shape, mesh) != sharding.logical_to_spec(
        ("batch", None, "kv_heads", None), k.shape, mesh
    ):  # kv heads split unlike the query heads: one kv head per query head
        k, v = (jnp.repeat(a, q.shape[2] // k.shape[2], axis=2) for a in (k, v))

    def kernel(q, k, v, segment_ids):
        return flash_attention(q, k, v, causal=True, segment_ids=segment_ids, sm_scale=scale)

    return on_mesh(kernel, (q, k, v, segment_ids), (heads, heads, heads, ("batch", None)), heads)


def self_attention(q, k, v, positions: jax.Array, segment_ids, cfg: ModelConfig) -> jax.Array:
    """Causal self-attention over the sequence (packed segments kept apart): the Pallas flash kernel when
    ``attention_impl == pallas``, else XLA."""
    scale = softmax_scale(cfg)
    if cfg.attention_impl == AttentionImpl.PALLAS:
        return _flash(q, k, v, segment_ids, scale)
    segs = None if segment_ids is None else (segment_ids, segment_ids)
    return attend(q, k, v, _mask(positions, positions, None, segs), scale)


def write_rows(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """``buf[b, S, ...]`` with ``new[b, t, ...]`` written at slots ``index[b] ..`` of each row (a cache update: every
    row has its own write position, as the slots of ``r1jax.rollout``'s decode pool do)."""
    write = lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0)  # noqa: E731
    return jax.vmap(write)(buf, new.astype(buf.dtype), index)


def _mask(positions_q: jax.Array, positions_k: jax.Array, valid_k: jax.Array | None, segs) -> jax.Array:
    """Causal mask bool[b, t, s] from slot indices; ``valid_k`` bool[b, s]; ``segs`` (q_seg[b,t], k_seg[b,s])."""
    m = positions_k[:, None, :] <= positions_q[:, :, None]
    if valid_k is not None:
        m &= valid_k[:, None, :]
    if segs is not None:
        m &= segs[0][:, :, None] == segs[1][:, None, :]
    return m


# --- attention -------------------------------------------------------------------------------------------------------
def _mla_qkv(p: Params, x: jax.Array, positions: jax.Array, cfg: ModelConfig):
    """MLA projections -> q_nope[b,t,h,n], q_rope[b,t,h,p] (rotated), latent[b,t,c] (normed), k_rope[b,t,p]."""
    if "q" in p:
        q = linear(x, p["q"])
    else:
        qa = rms_norm(linear(x, p["q_a"]), p["q_norm"], cfg.rms_norm_eps)
        q = linear(qa, p["q_b"])
    q_nope, q_rope = q[..., : cfg.qk_nope_dim], q[..., cfg.qk_nope_dim :]
    kv = linear(x, p["kv_a"])
    latent = rms_norm(kv[..., : cfg.kv_lora_rank], p["kv_norm"], cfg.rms_norm_eps)
    k_rope = apply_rope(kv[..., cfg.kv_lora_rank :], positions, cfg)
    return q_nope, apply_rope(q_rope, positions, cfg), latent, k_rope


@jax.named_scope("attention")
def mla_attention(p: Params, x: jax.Array, positions: jax.Array, segment_ids, cfg: ModelConfig) -> jax.Array:
    """Training/scoring MLA over the sequence itself: latent expanded to per-head keys and values."""
    q_nope, q_rope, latent, k_rope = _mla_qkv(p, x, positions, cfg)
    kv = linear(latent, p["kv_b"])
    k_nope, v = kv[..., : cfg.qk_nope_dim], kv[..., cfg.qk_nope_dim :]
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3], cfg.qk_rope_dim))], -1)
    out = self_attention(jnp.concatenate([q_nope, q_rope], -1), k, v, positions, segment_ids, cfg)
    return linear(out, p["o"], 2)


def _mla_decode_step(q_lat, q_rope, lat_cache, rope_cache, slots, valid_k, cfg: ModelConfig) -> jax.Array:
    """One decode token (t == 1) with the Pallas absorbed-MLA kernel: sequence b attends to cache slots
    ``[start[b], slots[b, 0]]``, start being its first valid slot (a row with none attends to nothing)."""
    from r1jax.kernels import mla_decode

    lengths = slots[:, 0].astype(jnp.int32) + 1
    starts = jnp.where(valid_k.any(axis=1), jnp.argmax(valid_k, axis=1).astype(jnp.int32), lengths)

    def kernel(q_lat, q_rope, lat_cache, rope_cache, lengths, starts):
        return mla_decode(q_lat, q_rope, lat_cache, rope_cache, lengths, starts=starts, sm_scale=softmax_scale(cfg))

    q_axes, cache_axes = ("batch", "heads", None), ("batch", None, None)
    args = (q_lat[:, 0], q_rope[:, 0], lat_cache, rope_cache, lengths, starts)
    out = on_mesh(kernel, args, (q_axes, q_axes, cache_axes, cache_axes, ("batch",), ("batch",)), q_axes)
    return out[:, None]


@jax.named_scope("attention")
def mla_attention_cached(p: Params, x, positions, layer_cache: dict, slots, valid_k, cfg: ModelConfig):
    """Absorbed MLA against the compressed cache; writes this step's latent and rope key at each row's ``slots``."""
    q_nope, q_rope, latent, k_rope = _mla_qkv(p, x, positions, cfg)
    lat_cache = write_rows(layer_cache["latent"], latent, slots[:, 0])
    rope_cache = write_rows(layer_cache["rope"], k_rope, slots[:, 0])
    kv_b = dense(p["kv_b"])  # folded into the query and the output: needed as one array
    w_uk = kv_b[..., : cfg.qk_nope_dim].astype(x.dtype)  # [c, h, n]
    w_uv = kv_b[..., cfg.qk_nope_dim :].astype(x.dtype)  # [c, h, v]
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w_uk)
    if cfg.attention_impl == AttentionImpl.PALLAS and x.shape[1] == 1:
        out_lat = _mla_decode_step(
            q_lat, q_rope, lat_cache.astype(x.dtype), rope_cache.astype(x.dtype), slots, valid_k, cfg
        )
    else:
        scores = jnp.einsum("bthc,bsc->bhts", q_lat, lat_cache.astype(x.dtype), preferred_element_type=jnp.float32)
        scores += jnp.einsum("bthp,bsp->bhts", q_rope, rope_cache.astype(x.dtype), preferred_element_type=jnp.float32)
        s_idx = jnp.arange(lat_cache.shape[1])[None]
        mask = _mask(slots, jnp.broadcast_to(s_idx, (x.shape[0], s_idx.shape[1])), valid_k, None)[:, None]
        probs = jax.nn.softmax(jnp.where(mask, scores * softmax_scale(cfg), -jnp.inf), axis=-1)
        probs = jnp.where(mask, probs, 0.0)
        safe_latent = jnp.where(valid_k[..., None], lat_cache, 0).astype(jnp.float32)
        out_lat = jnp.einsum("bhts,bsc->bthc", probs, safe_latent).astype(x.dtype)
    out = jnp.einsum("bthc,chv->bthv", out_lat, w_uv)
    return linear(out, p["o"], 2), {"latent": lat_cache, "rope": rope_cache}


def _gqa_qkv(p: Params, x: jax.Array, positions: jax.Array, cfg: ModelConfig):
    dt = x.dtype
    q = linear(x, p["q"])
    k = linear(x, p["k"])
    v = linear(x, p["v"])
    if "q_bias" in p:
        q, k, v = q + p["q_bias"].astype(dt), k + p["k_bias"].astype(dt), v + p["v_bias"].astype(dt)
    if "q_norm" in p:
        q, k = rms_norm(q, p["q_norm"], cfg.rms_norm_eps), rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, positions, cfg), apply_rope(k, positions, cfg), v


def _gqa_out(p: Params, out: jax.Array) -> jax.Array:
    y = linear(out, p["o"], 2)
    return y + p["o_bias"].astype(y.dtype) if "o_bias" in p else y


@jax.named_scope("attention")
def gqa_attention(p: Params, x: jax.Array, positions: jax.Array, segment_ids, cfg: ModelConfig) -> jax.Array:
    q, k, v = _gqa_qkv(p, x, positions, cfg)
    return _gqa_out(p, self_attention(q, k, v, positions, segment_ids, cfg))


@jax.named_scope("attention")
def gqa_attention_cached(p: Params, x, positions, layer_cache: dict, slots, valid_k, cfg: ModelConfig):
    q, k, v = _gqa_qkv(p, x, positions, cfg)
    k_cache = write_rows(layer_cache["k"], k, slots[:, 0])
    v_cache = write_rows(layer_cache["v"], v, slots[:, 0])
    s_idx = jnp.broadcast_to(jnp.arange(k_cache.shape[1])[None], (x.shape[0], k_cache.shape[1]))
    # no NaN can sit in the cache: it starts zeroed and ``attend`` writes zeros, not NaN, for fully masked rows
    mask = _mask(slots, s_idx, valid_k, None)
    out = attend(q, k_cache.astype(x.dtype), v_cache.astype(x.dtype), mask, softmax_scale(cfg))
    return _gqa_out(p, out), {"k": k_cache, "v": v_cache}


# --- feed-forward ----------------------------------------------------------------------------------------------------
@jax.named_scope("mlp")
def mlp(p: Params, x: jax.Array) -> jax.Array:
    """SwiGLU: down(silu(gate x) * up x)."""
    dt = x.dtype
    gate = linear(x, p["gate"])
    up = linear(x, p["up"])
    if "gate_bias" in p:
        gate, up = gate + p["gate_bias"].astype(dt), up + p["up_bias"].astype(dt)
    y = linear(jax.nn.silu(gate) * up, p["down"])
    return y + p["down_bias"].astype(dt) if "down_bias" in p else y


@jax.named_scope("moe")
def moe_layer(
    p: Params, x: jax.Array, cfg: ModelConfig, load_mask: jax.Array | None = None, routes: jax.Array | None = None
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """DeepSeekMoE: routed experts (dropless) plus shared experts. Returns (y, (expert load f32[e], experts used
    int32[b, t, k])); ``routes`` int32[b, t, k] replays recorded experts (``moe.route``)."""
    route = lambda xb, rb: moe.route(xb, p["router"], p["router_bias"], cfg, rb)  # noqa: E731
    weights, idx = jax.vmap(route)(x, routes)  # [b, t, k]
    experts = {k: dense(w) for k, w in p["experts"].items()}  # grouped matmuls take plain arrays (one layer's)
    y = expert_parallel.routed_experts(x, weights, idx, experts, cfg.dispatch_slack).astype(x.dtype)
    if "shared" in p:
        y = y + mlp(p["shared"], x)
    return y, (moe.expert_load(idx, cfg.n_experts, None if load_mask is None else load_mask.reshape(-1)), idx)


# --- blocks and the model --------------------------------------------------------------------------------------------
def _ffn(p: Params, h: jax.Array, cfg: ModelConfig, moe_block: bool, load_mask=None, routes=None):
    """The block's feed-forward -> (y, (expert load f32[e], experts used int32[b, t, k]; a dense MLP has zero load
    and None))."""
    if moe_block:
        return moe_layer(p["mlp"], h, cfg, load_mask, routes)
    return mlp(p["mlp"], h), (jnp.zeros((max(cfg.n_experts, 1),), jnp.float32), None)


@jax.named_scope("layer")
def block(
    p: Params, x: jax.Array, positions, segment_ids, cfg: ModelConfig, moe_block: bool, load_mask=None, routes=None
):
    """Pre-norm residual block without a cache. Returns (x, (expert load over the tokens in ``load_mask``, experts
    used)) as ``_ffn``; ``routes`` int32[b, t, k] replays recorded experts in an MoE block."""
    attn = mla_attention if cfg.is_mla else gqa_attention
    a = attn(p["attn"], rms_norm(x, p["attn_norm"], cfg.rms_norm_eps), positions, segment_ids, cfg)
    x = sharding.constrain(x + a, RESIDUAL)
    y, moe_out = _ffn(p, rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps), cfg, moe_block, load_mask, routes)
    return x + y, moe_out


@jax.named_scope("layer")
def block_cached(
    p: Params, x, positions, layer_cache, slots, valid_k, cfg: ModelConfig, moe_block: bool, load_mask=None, routes=None
):
    """``block`` against a KV cache. Returns (x, (expert load, experts used), updated layer cache)."""
    attn = mla_attention_cached if cfg.is_mla else gqa_attention_cached
    a, layer_cache = attn(
        p["attn"], rms_norm(x, p["attn_norm"], cfg.rms_norm_eps), positions, layer_cache, slots, valid_k, cfg
    )
    x = x + a
    y, moe_out = _ffn(p, rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps), cfg, moe_block, load_mask, routes)
    return x + y, moe_out, layer_cache


def unstack_layers(tree: dict) -> dict:
    """``params`` or ``cache.layers`` with each layer stack split into a tuple of per-layer trees.

    Decoding on CPU runs the layers of an unstacked tree as a Python loop: XLA:CPU copies every weight slice a
    ``scan`` reads (the whole model, once per token), while separate per-layer buffers feed the matmuls directly.
    """
    return {
        name: tuple(jax.tree.map(lambda a, i=i: a[i], v) for i in range(jax.tree.leaves(v)[0].shape[0]))
        if name in LAYER_STACKS
        else v
        for name, v in tree.items()
    }


def _scan_stack(fn: Callable, x: jax.Array, stacked: Params, cfg: ModelConfig, xs_extra: tuple = ()):
    """Run ``fn(layer_params, x, *extras) -> (x, (ys, layer_out))`` over the leading layer axis, ``extras`` being
    each layer's slice of ``xs_extra`` (trees stacked on the layer axis, tuples of per-layer trees, or None).

    Stacked params run under ``lax.scan``, which stacks ys and layer outputs. A tuple of per-layer trees
    (``unstack_layers``) runs as a Python loop that stacks the ys and returns the layer outputs (per-layer cache
    buffers) as a tuple."""
    body = jax.checkpoint(fn, policy=REMAT_POLICIES[cfg.remat_policy]) if cfg.remat else fn
    if isinstance(stacked, tuple):
        ys, outs = [], []
        for i, lp in enumerate(stacked):
            x, (y, out) = body(lp, x, *(None if e is None else e[i] for e in xs_extra))
            ys.append(y)
            outs.append(out)
        return x, (jax.tree.map(lambda *a: jnp.stack(a), *ys), tuple(outs))

    def step(carry, xs):
        lp, extra = xs
        carry, ys = body(lp, carry, *extra)
        return sharding.constrain(carry, RESIDUAL), ys

    return jax.lax.scan(step, x, (stacked, xs_extra))


def forward(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: Cache | None = None,
    return_hidden: bool = False,
    load_mask: jax.Array | None = None,
    routes: jax.Array | None = None,
    return_routes: bool = False,
) -> tuple[jax.Array, dict]:
    """Logits f32[b, t, V] for ``tokens`` int32[b, t], and aux outputs.

    Without ``cache``: positions default to 0..t-1; ``segment_ids`` int32[b, t] restricts attention to equal ids
    (packed sequences). With ``cache``: row i's tokens are written at slots ``cache.index[i] ..``; positions default to
    ``slot - cache.start``. ``routes`` int32[n_moe_layers, b, t, k] replays recorded experts (routing replay: each
    token's experts in each MoE layer, in the MoE stack's order) instead of selecting them. aux: ``expert_load``
    f32[n_moe_layers, e] of the experts used (None without MoE layers), ``cache`` (updated; None without one),
    ``hidden`` (pre-norm last hidden state, when ``return_hidden``), ``routes`` (the experts used, int32[n_moe_layers,
    b, t, k] or None without MoE layers, when ``return_routes``). ``load_mask`` bool[b, t] restricts the expert load
    to real tokens.
    """
    b, t = tokens.shape
    want = (cfg.n_moe_layers, b, t, cfg.experts_per_token)
    if routes is not None and (not cfg.n_moe_layers or tuple(routes.shape) != want):
        raise ValueError(f"routes must be int32{list(want)} for a model with MoE layers, got {routes.shape}")
    dt = jnp.dtype(cfg.dtype)
    x = sharding.constrain(params["embed"].astype(dt)[tokens], RESIDUAL)
    if cache is None:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        step = lambda lp, h, lc, r, m: _uncached_step(lp, h, r, positions, segment_ids, cfg, m, load_mask)  # noqa: E731
    else:
        slots = cache.index[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        if positions is None:
            positions = slots - cache.start[:, None]
        s_idx = jnp.arange(cache.max_len, dtype=jnp.int32)[None]
        valid_k = (s_idx >= cache.start[:, None]) & (s_idx < cache.index[:, None] + t)
        step = lambda lp, h, lc, r, m: _cached_step(  # noqa: E731
            lp, h, lc, r, positions, slots, valid_k, cfg, m, load_mask
        )
    moe_outs, layers = {}, {}
    for name, is_moe in LAYER_STACKS.items():
        if name in params:
            fn = lambda lp, h, lc, r, m=is_moe: step(lp, h, lc, r, m)  # noqa: E731
            xs = (None if cache is None else cache.layers[name], routes if is_moe else None)
            x, (moe_outs[name], layers[name]) = _scan_stack(fn, x, params[name], cfg, xs)
    load, used = moe_outs.get(MOE_LAYERS, (None, None))
    aux: dict = {"expert_load": load}
    aux["cache"] = None if cache is None else dataclasses.replace(cache, layers=layers, index=cache.index + t)
    if return_hidden:
        aux["hidden"] = x
    if return_routes:
        aux["routes"] = used
    return logits_from_hidden(params, x, cfg), aux


def _uncached_step(lp, h, routes, positions, segment_ids, cfg, is_moe, load_mask):
    h, moe_out = block(lp, h, positions, segment_ids, cfg, is_moe, load_mask, routes)
    return h, (moe_out, None)


def _cached_step(lp, h, lc, routes, positions, slots, valid_k, cfg, is_moe, load_mask):
    h, moe_out, lc = block_cached(lp, h, positions, lc, slots, valid_k, cfg, is_moe, load_mask, routes)
    return h, (moe_out, lc)


@jax.named_scope("head")
def logits_from_hidden(params: Params, x: jax.Array, cfg: ModelConfig, norm: jax.Array | None = None) -> jax.Array:
    """Final norm and output head (tied to the embedding when ``tie_embeddings``) -> f32 logits. On a mesh the
    sequence is gathered first: the head is split over ``vocab`` (``tensor``), the sequence no longer."""
    x = sharding.constrain(x, ("batch", None, None))
    x = rms_norm(x, params["final_norm"] if norm is None else norm, cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    logits = linear(x, head, out_dtype=jnp.float32)
    return sharding.constrain(logits, ("batch", None, "vocab"))


def mtp_logits(
    params: Params, hidden: jax.Array, tokens: jax.Array, cfg: ModelConfig, positions=None, segment_ids=None
) -> jax.Array:
    """Multi-token prediction (DeepSeek-V3 section 2.2), depth D = n_mtp_layers.

    Module k combines the previous depth's hidden state at position i with the embedding of token i+k:
    ``h' = block(eh_proj([enorm(embed(t_{i+k+1})); hnorm(h_i)]))`` and predicts token i+k+2 through the shared head
    (k = 0 .. D-1). Returns f32[D, b, t-D, V]: logits at depth k for positions 0 .. t-D-1. ``positions`` /
    ``segment_ids`` [b, t] (packed rows) are the main forward's: each module attends within its segment.
    """
    depth = cfg.n_mtp_layers
    b, t = tokens.shape
    n = t - depth
    h = hidden[:, :n]
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)) if positions is None else positions[:, :n]
    segment_ids = None if segment_ids is None else segment_ids[:, :n]
    out = []
    for k in range(depth):
        p = jax.tree.map(lambda a, k=k: a[k], params["mtp"])
        emb = params["embed"].astype(h.dtype)[tokens[:, k + 1 : k + 1 + n]]
        cat = jnp.concatenate(
            [rms_norm(emb, p["enorm"], cfg.rms_norm_eps), rms_norm(h, p["hnorm"], cfg.rms_norm_eps)], -1
        )
        h = linear(cat, p["eh_proj"])
        h, _ = block(p["block"], h, positions, segment_ids, cfg, cfg.is_moe)
        out.append(logits_from_hidden(params, h, cfg, norm=p["head_norm"]))
    return jnp.stack(out)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) f32[...] from logits [..., V]: ``log_softmax(logits)[target]``, value for value.

    The target is picked with a one-hot mask rather than a gather, so the gradient is the elementwise
    ``g * (onehot - softmax)`` that fuses with the head's backward instead of a zero [..., V] buffer plus a scatter.
    """
    logits = logits.astype(jnp.float32)
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    hit = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None].astype(jnp.int32)
    picked = jnp.sum(jnp.where(hit, shifted, 0.0), axis=-1)
    return picked - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))


def mtp_mask(loss_mask: jax.Array, segment_ids: jax.Array | None, depth: int) -> jax.Array:
    """f32[D, b, t - D]: where depth k's prediction at position i counts. It predicts ``targets[i + k + 1]`` (the
    token k + 2 after ``tokens[i]``), which counts when the loss mask has it and, in packed rows, when it lies in
    position i's own example."""
    n = loss_mask.shape[1] - depth
    out = []
    for k in range(depth):
        m = loss_mask[:, k + 1 : k + 1 + n] != 0
        if segment_ids is not None:
            m = m & (segment_ids[:, :n] == segment_ids[:, k + 1 : k + 1 + n]) & (segment_ids[:, :n] > 0)
        out.append(m)
    return jnp.stack(out).astype(jnp.float32)


def mtp_loss(
    params: Params,
    hidden: jax.Array,
    tokens: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    cfg: ModelConfig,
    *,
    positions=None,
    segment_ids=None,
    counts: jax.Array | None = None,
) -> jax.Array:
    """(1 / D) sum_k of depth k's cross-entropy, the V3 MTP loss before its weight lambda (0.3, later 0.1).

    ``tokens`` / ``targets`` [b, t] are the main model's inputs and next tokens (``targets[i] = tokens[i + 1]``);
    ``mask`` is ``mtp_mask``'s; ``counts`` f32[D] the normaliser of each depth (default: the mask's sums; under
    gradient accumulation pass the whole batch's, so the micro-batch losses sum to the batch loss)."""
    depth = cfg.n_mtp_layers
    logits = mtp_logits(params, hidden, tokens, cfg, positions, segment_ids)
    n = tokens.shape[1] - depth
    counts = jnp.sum(mask, axis=(1, 2)) if counts is None else counts
    total = jnp.zeros((), jnp.float32)
    for k in range(depth):
        nll = jnp.where(mask[k] != 0, -token_logprobs(logits[k], targets[:, k + 1 : k + 1 + n]), 0.0)
        total = total + jnp.sum(nll) / jnp.maximum(counts[k], 1.0)
    return total / depth
