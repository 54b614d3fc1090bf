"""Absorbed multi-head latent attention (MLA) decode: one new token per sequence against a latent KV cache.

Algorithm: DeepSeek-V2 (arXiv:2405.04434) section 2.1.3 "weight absorption" and the FlashMLA decode kernel.
W_UK is folded into the query and W_UV into the output projection, so every query head of a sequence attends
to the SAME compressed cache: `score[h, j] = sm_scale * (q_latent[h] . latent[j] + q_rope[h] . rope[j])`,
`out[h] = sum_j softmax_j(score[h])[j] * latent[j]` over positions `start <= j < length`. All heads of a
sequence are one matrix tile, so the cache is read once per sequence, not once per head: the kernel is
bandwidth bound.

Split-KV (flash-decoding): the positions of each sequence are cut into `num_splits` contiguous ranges, each
handled by an independent program that writes an unnormalised partial (output, log-sum-exp); a small jnp
combine step merges them. Splits keep all cores busy when the batch is small.

Masking: positions >= length and (optional `starts`, for left-padded caches) positions < start are excluded
with `where` on the scores AND on the latent rows before the probability-weighted sum, so stale or NaN cache
entries outside a sequence's range never reach the output (0 * NaN would). Blocks wholly outside the range are
neither computed nor (on TPU) fetched; a split entirely before the start contributes nothing. An empty range
(length 0, or start >= length) gives zeros.

Shapes: q_latent `[b, h, c]`, q_rope `[b, h, p]`, latent_cache `[b, s, c]`, rope_cache `[b, s, p]`,
lengths int32 `[b]`, optional starts int32 `[b]` (default 0) -> `[b, h, c]` in q_latent's dtype;
DeepSeek-V3: c = 512, p = 64, h = 128 / tensor-parallel degree. Any s (the last block
may be partial). Forward only (decode is not differentiated).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._common import (
    GPU_SMEM_LIMIT,
    NUM_LANES,
    next_pow2,
    pad_axis,
    per_platform,
    pick_num_stages,
    resolve_interpret,
    resolve_kind,
    round_up,
)

__all__ = ["MLADecodeBlockSizes", "mla_decode", "mla_decode_reference"]

_NT = (((1,), (1,)), ((), ()))
_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class MLADecodeBlockSizes:
    """`block_k` cache positions per step; `num_splits` KV ranges per sequence (None: enough to fill the chip).

    On TPU `block_k` must be a multiple of 8 (sublanes) unless it covers the whole cache; on GPU a power of two.
    On GPU the pipelined cache tiles must fit in shared memory (`gpu_smem_bytes`); a compiled call with a
    configuration estimated past the H100/H200 limit raises ValueError instead of failing inside Triton.
    `num_stages=None` on GPU picks the deepest pipeline (<= 3) that fits.
    """

    block_k: int = 128
    num_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        if not isinstance(self.block_k, int) or self.block_k < 8 or self.block_k & (self.block_k - 1):
            raise ValueError(f"MLADecodeBlockSizes.block_k must be a power of two >= 8, got {self.block_k!r}")
        for name in ("num_splits", "num_warps", "num_stages"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or val < 1):
                raise ValueError(f"MLADecodeBlockSizes.{name} must be a positive int or None, got {val!r}")

    @classmethod
    def default(cls, kind: str) -> MLADecodeBlockSizes:
        if kind == "gpu":
            # DeepSeek-V3 sizes, 16 heads: 3 pipelined [32, 576] bf16 cache tiles, ~128 KiB of shared memory.
            return cls(block_k=32, num_splits=None, num_warps=4, num_stages=None)
        return cls(block_k=512, num_splits=None)

    def gpu_smem_bytes(self, h: int, c: int, p: int, itemsize: int = 2, s: int | None = None, stages=None) -> int:
        """Estimated shared memory of one GPU program (bytes), an upper bound on what Triton allocates.

        `stages` (default `num_stages`, else 3) pipelined cache tiles `[block_k, c + p]`, the query tiles
        `[h, c + p]` and one f32 `[h, block_k]` score tile for layout conversion; h, c, p padded as the kernel
        pads them, block_k clipped to the cache length `s` when given. On H200 block_k=64 with 3 stages at
        h=16, c=512, p=64 (bf16) asked for 233472 bytes; this estimate gives 243712 for it.
        """
        bk = self.block_k if s is None else min(self.block_k, max(16, next_pow2(s)))
        stages = stages or self.num_stages or 3
        hp, cp, pp = max(16, next_pow2(h)), next_pow2(c), next_pow2(p)
        return stages * bk * (cp + pp) * itemsize + hp * (cp + pp) * itemsize + hp * bk * 4


def _num_splits(bs: MLADecodeBlockSizes, b: int, nblocks: int, kind: str) -> int:
    if bs.num_splits is not None:
        return max(1, min(bs.num_splits, nblocks))
    target = 2 * 132 if kind == "gpu" else 4  # programs to fill an H100/H200, or the TensorCores of a TPU chip
    return max(1, min(nblocks, -(-target // b)))


def _online_update(s, lat_safe, m_prev, l_prev, acc_prev):
    """One online-softmax step on scores s [h, bk] (masked with -inf) and latent rows [bk, c]."""
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, :1])
    alpha = jnp.exp(m_prev - m_safe)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    p = p.astype(lat_safe.dtype)
    pv = jnp.dot(p, lat_safe, preferred_element_type=jnp.float32, precision=_precision(p.dtype))
    return m_new, l_new, acc_prev * alpha[:, :1] + pv


def _precision(dtype):
    # Explicit, so a global `jax_default_matmul_precision` cannot force bf16 tiles onto an unsupported path.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _scores(ql, qr, lat, rp, k_start, start, length, sm_scale):
    s = lax.dot_general(ql, lat, _NT, preferred_element_type=jnp.float32, precision=_precision(ql.dtype))
    s += lax.dot_general(qr, rp, _NT, preferred_element_type=jnp.float32, precision=_precision(qr.dtype))
    s = s * sm_scale
    cols = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    rows = k_start + lax.broadcasted_iota(jnp.int32, (lat.shape[0], 1), 0)
    lat_safe = jnp.where((rows >= start) & (rows < length), lat, jnp.zeros_like(lat))
    return jnp.where((cols >= start) & (cols < length), s, _NEG_INF), lat_safe


def _finish(m, l, acc):
    empty = l == 0.0
    out = acc * jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    lse = jnp.where(empty, _NEG_INF, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out, lse


# ------------------------------------------------------------------------------------------------ TPU (Mosaic)


def _tpu_kernel(
    lens_ref, starts_ref, ql_ref, qr_ref, lat_ref, rp_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, sm_scale, bk, nps
):
    bi, si, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length, start = lens_ref[bi], starts_ref[bi]
    k_start = (si * nps + j) * bk

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((k_start < length) & (k_start + bk > start))
    def _body():
        s, lat_safe = _scores(ql_ref[...], qr_ref[...], lat_ref[...], rp_ref[...], k_start, start, length, sm_scale)
        m, l, acc = _online_update(s, lat_safe, m_sc[...], l_sc[...], acc_sc[...])
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    @pl.when(j == nps - 1)
    def _end():
        out, lse = _finish(m_sc[...][:, :1], l_sc[...][:, :1], acc_sc[...])
        o_ref[...] = out
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _tpu_partials(q_latent, q_rope, latent, rope, lengths, starts, sm_scale, bs, interpret):
    b, h, c = q_latent.shape
    s, p = latent.shape[1], rope.shape[-1]
    bk = min(bs.block_k, round_up(s, 8))
    nblocks = -(-s // bk)
    ns = _num_splits(bs, b, nblocks, "tpu")
    nps = -(-nblocks // ns)

    def kv_index(bi, si, j, lens_ref, starts_ref):
        # Do not fetch blocks outside [start, length): skipped steps repeat a neighbouring block (no new DMA).
        last = jnp.maximum((lens_ref[bi] + bk - 1) // bk - 1, 0)
        first = jnp.minimum(starts_ref[bi] // bk, last)
        return bi, jnp.minimum(jnp.clip(si * nps + j, first, last), nblocks - 1), 0

    q_spec = lambda d: pl.BlockSpec((None, h, d), lambda bi, si, j, *_: (bi, 0, 0))  # noqa: E731
    out_spec = lambda d: pl.BlockSpec((None, None, h, d), lambda bi, si, j, *_: (bi, si, 0, 0))  # noqa: E731
    from jax.experimental.pallas import tpu as pltpu

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, ns, nps),
        in_specs=[q_spec(c), q_spec(p), pl.BlockSpec((None, bk, c), kv_index), pl.BlockSpec((None, bk, p), kv_index)],
        out_specs=[out_spec(c), out_spec(NUM_LANES)],
        scratch_shapes=[
            pltpu.VMEM((h, NUM_LANES), jnp.float32),
            pltpu.VMEM((h, NUM_LANES), jnp.float32),
            pltpu.VMEM((h, c), jnp.float32),
        ],
    )
    o, lse = pl.pallas_call(
        functools.partial(_tpu_kernel, sm_scale=sm_scale, bk=bk, nps=nps),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, ns, h, c), jnp.float32),
            jax.ShapeDtypeStruct((b, ns, h, NUM_LANES), jnp.float32),
        ],
        compiler_params=None
        if interpret
        else pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(
            flops=2 * b * h * s * (2 * c + p),
            transcendentals=b * h * s,
            bytes_accessed=int(latent.size * latent.dtype.itemsize + rope.size * rope.dtype.itemsize),
        ),
        name="mla_decode",
    )(lengths, starts, q_latent, q_rope, latent, rope)
    return o, lse[..., 0]


# ------------------------------------------------------------------------------------------------ GPU (Triton)


def _gpu_kernel(lens_ref, starts_ref, ql_ref, qr_ref, lat_ref, rp_ref, o_ref, lse_ref, *, sm_scale, bk, nps):
    si = pl.program_id(1)
    length, start = lens_ref[0], starts_ref[0]
    ql, qr = ql_ref[...], qr_ref[...]
    h, c = ql.shape
    lo = jnp.maximum(si * nps, start // bk)  # blocks wholly before the start are skipped
    hi = jnp.minimum(si * nps + nps, (length + bk - 1) // bk)

    def body(j, carry):
        k_start = j * bk
        sl = pl.ds(pl.multiple_of(k_start, bk), bk)
        s, lat_safe = _scores(ql, qr, lat_ref[sl, :], rp_ref[sl, :], k_start, start, length, sm_scale)
        return _online_update(s, lat_safe, *carry)

    carry = (
        jnp.full((h, 1), _NEG_INF, jnp.float32),
        jnp.zeros((h, 1), jnp.float32),
        jnp.zeros((h, c), jnp.float32),
    )
    m, l, acc = lax.fori_loop(lo, hi, body, carry)
    out, lse = _finish(m, l, acc)
    o_ref[...] = out
    lse_ref[...] = lse[:, 0]


def _gpu_partials(q_latent, q_rope, latent, rope, lengths, starts, sm_scale, bs, interpret):
    b, h, c = q_latent.shape
    s, p = latent.shape[1], rope.shape[-1]
    bk = min(bs.block_k, max(16, next_pow2(s)))
    sp = round_up(s, bk)
    # Triton tiles are powers of two (>= 16 rows for tensor cores): pad heads / dims / the cache tail if needed.
    hp, cp, pp = max(16, next_pow2(h)), next_pow2(c), next_pow2(p)
    ql = pad_axis(pad_axis(q_latent, 1, hp), 2, cp)
    qr = pad_axis(pad_axis(q_rope, 1, hp), 2, pp)
    lat = pad_axis(pad_axis(latent, 1, sp), 2, cp)
    rp = pad_axis(pad_axis(rope, 1, sp), 2, pp)
    nblocks = sp // bk
    ns = _num_splits(bs, b, nblocks, "gpu")
    nps = -(-nblocks // ns)
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        isz = latent.dtype.itemsize

        def smem(stages):
            return bs.gpu_smem_bytes(h, c, p, isz, s=s, stages=stages)

        stages = bs.num_stages or pick_num_stages(smem)
        if smem(stages) > GPU_SMEM_LIMIT:
            raise ValueError(
                f"MLADecodeBlockSizes(block_k={bs.block_k}, num_stages={stages}) needs ~{smem(stages)} bytes of "
                f"shared memory for h={h}, c={c}, p={p} ({latent.dtype}); the GPU limit is {GPU_SMEM_LIMIT}: "
                "use a smaller block_k or num_stages"
            )
        params = pltriton.CompilerParams(num_warps=bs.num_warps or 4, num_stages=stages)
    o, lse = pl.pallas_call(
        functools.partial(_gpu_kernel, sm_scale=sm_scale, bk=bk, nps=nps),
        grid=(b, ns),
        in_specs=[
            pl.BlockSpec((1,), lambda bi, si: (bi,)),
            pl.BlockSpec((1,), lambda bi, si: (bi,)),
            pl.BlockSpec((None, hp, cp), lambda bi, si: (bi, 0, 0)),
            pl.BlockSpec((None, hp, pp), lambda bi, si: (bi, 0, 0)),
            pl.BlockSpec((None, sp, cp), lambda bi, si: (bi, 0, 0)),
            pl.BlockSpec((None, sp, pp), lambda bi, si: (bi, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, hp, cp), lambda bi, si: (bi, si, 0, 0)),
            pl.BlockSpec((None, None, hp), lambda bi, si: (bi, si, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, ns, hp, cp), jnp.float32),
            jax.ShapeDtypeStruct((b, ns, hp), jnp.float32),
        ],
        compiler_params=params,
        interpret=interpret,
        name="mla_decode",
    )(lengths, starts, ql, qr, lat, rp)
    return o[:, :, :h, :c], lse[:, :, :h]


def _combine(o, lse):
    """Merges split partials: o [b, n, h, c] (each normalised within its split), lse [b, n, h]."""
    m = jnp.max(lse, axis=1, keepdims=True)
    w = jnp.exp(lse - jnp.where(m == _NEG_INF, 0.0, m))  # exp(-inf) = 0 for empty splits
    denom = jnp.sum(w, axis=1)
    num = jnp.einsum("bnh,bnhc->bhc", w, o)
    return num / jnp.where(denom == 0.0, 1.0, denom)[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_sizes", "kind"))
def _mla_decode(q_latent, q_rope, latent_cache, rope_cache, lengths, starts, *, sm_scale, interpret, block_sizes, kind):
    b, h, c = q_latent.shape
    s = latent_cache.shape[1]
    if latent_cache.shape != (b, s, c) or q_rope.shape[:2] != (b, h):
        raise ValueError(f"incompatible shapes q_latent {q_latent.shape}, latent {latent_cache.shape}")
    if rope_cache.shape != (b, s, q_rope.shape[-1]) or lengths.shape != (b,):
        raise ValueError(f"incompatible shapes q_rope {q_rope.shape}, rope {rope_cache.shape}, lengths {lengths.shape}")
    if starts is not None and starts.shape != (b,):
        raise ValueError(f"incompatible shapes starts {starts.shape}, lengths {lengths.shape}")
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s)
    starts = jnp.zeros_like(lengths) if starts is None else jnp.clip(starts.astype(jnp.int32), 0, s)
    bs = block_sizes or MLADecodeBlockSizes.default(kind)
    fn = _gpu_partials if kind == "gpu" else _tpu_partials
    o, lse = fn(q_latent, q_rope, latent_cache, rope_cache, lengths, starts, float(sm_scale), bs, interpret)
    return _combine(o, lse).astype(q_latent.dtype)


def mla_decode(
    q_latent: jax.Array,
    q_rope: jax.Array,
    latent_cache: jax.Array,
    rope_cache: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float,
    starts: jax.Array | None = None,
    interpret: bool | None = None,
    block_sizes: MLADecodeBlockSizes | None = None,
    kind: str | None = None,
) -> jax.Array:
    """Absorbed-MLA decode attention; see the module docstring. Returns `[b, h, c]` in q_latent's dtype.

    Sequence b attends to cache positions `[starts[b], lengths[b])`; `starts=None` means 0.
    """
    run = functools.partial(_mla_decode, sm_scale=float(sm_scale), block_sizes=block_sizes)
    args = (q_latent, q_rope, latent_cache, rope_cache, lengths, starts)
    if interpret is None and kind is None:
        return per_platform(run, *args)
    interp = resolve_interpret(interpret)
    return run(*args, interpret=interp, kind=resolve_kind(kind, interp))


def mla_decode_reference(
    q_latent: jax.Array,
    q_rope: jax.Array,
    latent_cache: jax.Array,
    rope_cache: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float,
    starts: jax.Array | None = None,
) -> jax.Array:
    """Plain-jnp absorbed-MLA decode with the same masking (NaN-safe outside `[starts, lengths)`)."""
    s = latent_cache.shape[1]
    pos = jnp.arange(s)[None, :]
    valid = pos < lengths[:, None]  # [b, s]
    if starts is not None:
        valid &= pos >= starts[:, None]
    lat = jnp.where(valid[..., None], latent_cache, 0)
    rope = jnp.where(valid[..., None], rope_cache, 0)
    scores = jnp.einsum("bhc,bsc->bhs", q_latent, lat, preferred_element_type=jnp.float32)
    scores += jnp.einsum("bhp,bsp->bhs", q_rope, rope, preferred_element_type=jnp.float32)
    scores = jnp.where(valid[:, None, :], scores * sm_scale, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(valid[:, None, :], jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bhs,bsc->bhc", p.astype(lat.dtype), lat, preferred_element_type=jnp.float32)
    return out.astype(q_latent.dtype)
