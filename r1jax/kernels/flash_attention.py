"""Blocked flash attention (training and prefill), forward and backward, for TPU (Mosaic) and GPU (Triton).

Algorithm: FlashAttention-2 (Dao 2023, Alg. 1 forward, Alg. 2 backward). Queries are split into blocks of
`block_q` rows; for each query block the keys/values are visited in blocks of `block_k` with an online softmax
(running max `m`, running sum `l`, float32 accumulator), and the log-sum-exp `lse = m + log l` is saved. The
backward recomputes the probabilities from `lse` block by block (no t x s matrix ever reaches HBM) in two
kernels: dq (loop over key blocks) and dk/dv (loop over query blocks and over the query heads of a group).

Shapes: q `[b, t, h, d_qk]`, k `[b, s, h_kv, d_qk]`, v `[b, s, h_kv, d_v]` -> `[b, t, h, d_v]`.
  * `h % h_kv == 0` (MHA, GQA, MQA); query head `i` reads kv head `i // (h // h_kv)`.
  * `d_qk` may differ from `d_v` (MLA: 192 = 128 nope + 64 rope for q/k, 128 for v); 64/64 and 128/128 too.
  * any t and s: sequences are padded internally to block multiples and padded keys are masked.
  * bf16 or f32 inputs; scores, softmax and accumulators in float32.

Masking conventions:
  * causal: query `i` sees key `j` iff `j <= i + (s - t)`, i.e. queries are aligned to the END of the keys
    (bottom-right; with a KV prefix of length s - t, the t queries are its continuation). Blocks that are fully
    masked are skipped (and on TPU not even fetched).
  * segment_ids: either one int32 `[b, t]` array (self-attention, requires t == s) or a pair
    `(q_segment_ids [b, t], kv_segment_ids [b, s])`. Query i sees key j iff their ids are equal AND the key id is
    >= 0. Negative ids mark padding: a padded key is never attended to, and a query whose id matches no visible
    key (e.g. a padded query with id -1) gets a zero output row and zero gradients, never NaN.

Backends: `interpret=None` interprets on CPU and compiles on TPU (Mosaic kernels with grid accumulation in VMEM
scratch) or GPU (Triton kernels with in-kernel loops over the sequence; the head dim is split into aligned
power-of-two chunks, 192 -> 128 + 64, so no FLOPs are spent on padding).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._common import (
    GPU_SMEM_LIMIT,
    NUM_LANES,
    NUM_SUBLANES,
    next_pow2,
    pad_axis,
    per_platform,
    pick_num_stages,
    pow2_chunks,
    resolve_interpret,
    resolve_kind,
    round_up,
)

__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference"]

_NT = (((1,), (1,)), ((), ()))  # contract the last dims: x @ y.T
_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. Forward: `block_q` x `block_k`; backward: `block_q_bwd` x `block_k_bwd`.

    Blocks are clipped to the (padded) sequence length, so small inputs run as a single block. On TPU a block
    that is smaller than its sequence must be a multiple of 128 (lane width); on GPU blocks are powers of two.
    `num_warps` / `num_stages` only affect the Triton (GPU) kernels; `num_stages=None` picks, per kernel, the
    deepest pipeline (<= 3) whose estimated shared memory fits an H100/H200 (`_gpu_smem_bytes`). A compiled GPU
    backward whose tiles are estimated past the shared-memory limit (`gpu_bwd_smem_bytes`) raises ValueError
    instead of failing inside Triton.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 128
    block_k_bwd: int = 128
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 8 or val & (val - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= 8, got {val!r}")
        for name in ("num_warps", "num_stages"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or val < 1):
                raise ValueError(f"BlockSizes.{name} must be a positive int or None, got {val!r}")

    @classmethod
    def default(cls, kind: str, d_qk: int | None = None, d_v: int | None = None) -> BlockSizes:
        if kind == "gpu":
            # The fastest tiles measured on an H200 (bf16, t=4096, causal) per head-dim class.
            if d_qk is not None and d_qk > 128:  # MLA 192/128
                bs = cls(block_q=128, block_k=128, block_q_bwd=64, block_k_bwd=128, num_warps=8, num_stages=2)
            else:  # GQA 128/128 and smaller
                bs = cls(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4, num_stages=3)
            if d_qk is not None and bs.gpu_bwd_smem_bytes(d_qk, d_v or d_qk) > GPU_SMEM_LIMIT:
                bs = dataclasses.replace(bs, num_stages=None)  # unusual head dims: the deepest pipeline that fits
            return bs
        return cls(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=512)

    def gpu_bwd_smem_bytes(
        self, d_qk: int, d_v: int, itemsize: int = 2, t: int | None = None, s: int | None = None
    ) -> int:
        """Estimated shared memory (bytes) of the larger of the two GPU backward kernels (dq, dk/dv).

        `t` / `s` clip the tiles to the query / key length as the kernels do; `num_stages=None` is resolved
        to the pipeline depth the kernels would pick."""
        bq = _eff_block(self.block_q_bwd, t, "gpu") if t else self.block_q_bwd
        bk = _eff_block(self.block_k_bwd, s, "gpu") if s else self.block_k_bwd
        dvp = next_pow2(max(d_v, 16))
        warps = _gpu_warps(self, d_qk)
        return max(
            _gpu_bwd_smem_bytes(o, i, d_qk, dvp, itemsize, _gpu_bwd_stages(self, o, i, d_qk, dvp, itemsize), warps)
            for o, i in ((bq, bk), (bk, bq))
        )


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static configuration of one call (hashable: it is a jit/custom_vjp static argument)."""

    causal: bool
    sm_scale: float
    interpret: bool
    kind: str
    blocks: BlockSizes


@dataclasses.dataclass(frozen=True)
class _Geom:
    """Static geometry seen by a kernel body."""

    bq: int
    bk: int
    t: int
    s: int
    causal: bool
    has_seg: bool
    kv_pad: bool
    sm_scale: float
    nq: int = 0
    nk: int = 0

    @property
    def offset(self) -> int:
        return self.s - self.t


def _eff_block(block: int, length: int, kind: str) -> int:
    """Clips a block to the sequence: one block of (rounded) length when the sequence is shorter."""
    if kind == "gpu":
        return min(block, max(16, next_pow2(length)))
    return min(block, round_up(length, NUM_SUBLANES))


def _mm(x, y, trans_b: bool = False):
    """x @ y (or x @ y.T) with f32 accumulation; the precision is explicit so a global
    `jax_default_matmul_precision` cannot push bf16 operands onto an f32 path the kernel compilers reject."""
    dims = _NT if trans_b else (((1,), (0,)), ((), ()))
    prec = lax.Precision.HIGHEST if x.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(x, y, dims, preferred_element_type=jnp.float32, precision=prec)


def _mask(rows, cols, qseg, kseg, g: _Geom):
    """Visibility of key `cols` to query `rows` (broadcastable int32 arrays); None when nothing is masked."""
    mask = None
    if g.causal:
        mask = cols <= rows + g.offset
    if g.has_seg:
        seg = (qseg == kseg) & (kseg >= 0)
        mask = seg if mask is None else mask & seg
    elif g.kv_pad and not g.causal:  # causal already hides the padded tail of the keys
        mask = cols < g.s
    return mask


def _last_k_block(q_start, g: _Geom, bq: int, bk: int):
    """Index of the last key block a query block starting at `q_start` can see (causal)."""
    return jnp.maximum(q_start + bq - 1 + g.offset, 0) // bk


def _first_q_block(k_start, g: _Geom, bq: int):
    """Index of the first query block that can see a key block starting at `k_start` (causal)."""
    return jnp.maximum(k_start - g.offset, 0) // bq


# --------------------------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels: grid = (..., reduction axis last), accumulators in VMEM scratch.
# --------------------------------------------------------------------------------------------------------------


def _tpu_fwd_kernel(*refs, g: _Geom):
    if g.has_seg:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
        qs_ref = ks_ref = None
    qi, ki = pl.program_id(2), pl.program_id(3)
    q_start, k_start = qi * g.bq, ki * g.bk

    @pl.when(ki == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def _body():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = _mm(q, k, True) * g.sm_scale
        rows = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        cols = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        qseg = qs_ref[...][:, :1] if g.has_seg else None
        kseg = ks_ref[...][:1, :] if g.has_seg else None
        mask = _mask(rows, cols, qseg, kseg, g)
        if mask is not None:
            s = jnp.where(mask, s, _NEG_INF)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, :1])
        alpha = jnp.exp(m_prev - m_safe)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_new
        pv = _mm(p.astype(v.dtype), v)
        acc_sc[...] = acc_sc[...] * alpha[:, :1] + pv

    if g.causal:
        pl.when(k_start <= q_start + g.bq - 1 + g.offset)(_body)
    else:
        _body()

    @pl.when(ki == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...][:, :1]
        empty = l == 0.0
        inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
        o_ref[...] = (acc_sc[...] * inv).astype(o_ref.dtype)
        lse = jnp.where(empty, jnp.inf, m_sc[...] + jnp.log(jnp.where(empty, 1.0, l_sc[...])))
        lse_ref[...] = lse


def _tpu_dq_kernel(*refs, g: _Geom):
    if g.has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, acc_sc = refs
        qs_ref = ks_ref = None
    qi, ki = pl.program_id(2), pl.program_id(3)
    q_start, k_start = qi * g.bq, ki * g.bk

    @pl.when(ki == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def _body():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _mm(q, k, True) * g.sm_scale
        p = jnp.exp(s - lse_ref[...][:, :1])
        rows = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        cols = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        qseg = qs_ref[...][:, :1] if g.has_seg else None
        kseg = ks_ref[...][:1, :] if g.has_seg else None
        mask = _mask(rows, cols, qseg, kseg, g)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = _mm(do, v, True)
        ds = p * (dp - dl_ref[...][:, :1])
        acc_sc[...] += _mm(ds.astype(k.dtype), k)

    if g.causal:
        pl.when(k_start <= q_start + g.bq - 1 + g.offset)(_body)
    else:
        _body()

    @pl.when(ki == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_sc[...] * g.sm_scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(*refs, g: _Geom):
    # Works on transposed scores sT = k @ q.T ([bk, bq]) so that every matmul is a plain or "x @ y.T" product.
    if g.has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, ks_ref, qs_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
        qs_ref = ks_ref = None
    ki, gi, qi = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    q_start, k_start = qi * g.bq, ki * g.bk

    @pl.when((gi == 0) & (qi == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def _body():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        st = _mm(k, q, True) * g.sm_scale
        pt = jnp.exp(st - lse_ref[...][:1, :])
        cols = k_start + lax.broadcasted_iota(jnp.int32, st.shape, 0)
        rows = q_start + lax.broadcasted_iota(jnp.int32, st.shape, 1)
        qseg = qs_ref[...][:1, :] if g.has_seg else None
        kseg = ks_ref[...][:, :1] if g.has_seg else None
        mask = _mask(rows, cols, qseg, kseg, g)
        if mask is not None:
            pt = jnp.where(mask, pt, 0.0)
        dv_sc[...] += _mm(pt.astype(do.dtype), do)
        dpt = _mm(v, do, True)
        dst = pt * (dpt - dl_ref[...][:1, :])
        dk_sc[...] += _mm(dst.astype(q.dtype), q)

    if g.causal:
        pl.when(k_start <= q_start + g.bq - 1 + g.offset)(_body)
    else:
        _body()

    @pl.when((gi == pl.num_programs(3) - 1) & (qi == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * g.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _cost(b, h, t, s, dqk, dv, causal, matmul_factor, args):
    """Lets XLA schedule around the kernel: matmul FLOPs (x matmul_factor relative to the forward), exps, bytes."""
    frac = 0.5 if causal else 1.0
    flops = int(2 * b * h * t * s * (dqk + dv) * frac * matmul_factor)
    nbytes = int(sum(x.size * x.dtype.itemsize for x in args))
    return pl.CostEstimate(flops=flops, transcendentals=int(b * h * t * s * frac), bytes_accessed=nbytes)


def _tpu_params(semantics, interpret):
    if interpret:
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics)


def _vmem(shape, dtype):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.VMEM(shape, dtype)


def _tpu_prep(q, k, v, qseg, kvseg, cfg: _Cfg, bq: int, bk: int):
    b, t, h, _ = q.shape
    s = k.shape[1]
    tp, sp = round_up(t, bq), round_up(s, bk)
    qt = pad_axis(jnp.swapaxes(q, 1, 2), 2, tp)
    kt = pad_axis(jnp.swapaxes(k, 1, 2), 2, sp)
    vt = pad_axis(jnp.swapaxes(v, 1, 2), 2, sp)
    g = _Geom(
        bq=bq,
        bk=bk,
        t=t,
        s=s,
        causal=cfg.causal,
        has_seg=qseg is not None,
        kv_pad=sp != s,
        sm_scale=cfg.sm_scale,
        nq=tp // bq,
        nk=sp // bk,
    )
    segs = None
    if qseg is not None:
        segs = (pad_axis(qseg.astype(jnp.int32), 1, tp, -1), pad_axis(kvseg.astype(jnp.int32), 1, sp, -1))
    return qt, kt, vt, segs, g


def _tpu_forward(q, k, v, qseg, kvseg, cfg: _Cfg):
    b, t, h, dqk = q.shape
    s, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
    grp = h // hk
    bq = _eff_block(cfg.blocks.block_q, t, "tpu")
    bk = _eff_block(cfg.blocks.block_k, s, "tpu")
    qt, kt, vt, segs, g = _tpu_prep(q, k, v, qseg, kvseg, cfg, bq, bk)
    tp = g.nq * bq

    def kv_index(bi, hi, qi, ki):
        if g.causal:
            ki = jnp.minimum(ki, _last_k_block(qi * bq, g, bq, bk))
        return bi, hi // grp, ki, 0

    in_specs = [
        pl.BlockSpec((None, None, bq, dqk), lambda bi, hi, qi, ki: (bi, hi, qi, 0)),
        pl.BlockSpec((None, None, bk, dqk), kv_index),
        pl.BlockSpec((None, None, bk, dv), kv_index),
    ]
    args = [qt, kt, vt]
    if segs is not None:
        q_lanes = jnp.broadcast_to(segs[0][:, :, None], (b, tp, NUM_LANES))
        kv_sub = jnp.broadcast_to(segs[1][:, None, :], (b, NUM_SUBLANES, g.nk * bk))
        in_specs += [
            pl.BlockSpec((None, bq, NUM_LANES), lambda bi, hi, qi, ki: (bi, qi, 0)),
            pl.BlockSpec((None, NUM_SUBLANES, bk), lambda bi, hi, qi, ki: (bi, 0, kv_index(bi, hi, qi, ki)[2])),
        ]
        args += [q_lanes, kv_sub]
    o, lse = pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, g=g),
        grid=(b, h, g.nq, g.nk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, dv), lambda bi, hi, qi, ki: (bi, hi, qi, 0)),
            pl.BlockSpec((None, None, bq, NUM_LANES), lambda bi, hi, qi, ki: (bi, hi, qi, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, tp, dv), q.dtype),
            jax.ShapeDtypeStruct((b, h, tp, NUM_LANES), jnp.float32),
        ],
        scratch_shapes=[
            _vmem((bq, NUM_LANES), jnp.float32),
            _vmem((bq, NUM_LANES), jnp.float32),
            _vmem((bq, dv), jnp.float32),
        ],
        compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary"), cfg.interpret),
        interpret=cfg.interpret,
        cost_estimate=_cost(b, h, t, s, dqk, dv, cfg.causal, 1.0, args),
        name="flash_attention_fwd",
    )(*args)
    return jnp.swapaxes(o[:, :, :t], 1, 2), lse


def _tpu_backward(q, k, v, qseg, kvseg, o, lse, do, cfg: _Cfg):
    b, t, h, dqk = q.shape
    s, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
    grp = h // hk
    bq = _eff_block(cfg.blocks.block_q_bwd, t, "tpu")
    bk = _eff_block(cfg.blocks.block_k_bwd, s, "tpu")
    qt, kt, vt, segs, g = _tpu_prep(q, k, v, qseg, kvseg, cfg, bq, bk)
    tp, sp = g.nq * bq, g.nk * bk
    dot_ = pad_axis(jnp.swapaxes(do, 1, 2), 2, tp)
    delta = jnp.einsum("bthv,bthv->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    delta = pad_axis(delta, 2, tp)
    lse_col = lse[:, :, :t, :1]
    lse = jnp.broadcast_to(pad_axis(lse_col, 2, tp), (b, h, tp, NUM_LANES))  # fwd may have used another bq
    lse_rows = lse[:, :, :, 0]

    # dq: grid (b, h, q blocks, k blocks).
    def kv_index(bi, hi, qi, ki):
        if g.causal:
            ki = jnp.minimum(ki, _last_k_block(qi * bq, g, bq, bk))
        return bi, hi // grp, ki, 0

    def q_index(bi, hi, qi, ki):
        return bi, hi, qi, 0

    in_specs = [
        pl.BlockSpec((None, None, bq, dqk), q_index),
        pl.BlockSpec((None, None, bk, dqk), kv_index),
        pl.BlockSpec((None, None, bk, dv), kv_index),
        pl.BlockSpec((None, None, bq, dv), q_index),
        pl.BlockSpec((None, None, bq, NUM_LANES), q_index),
        pl.BlockSpec((None, None, bq, NUM_LANES), q_index),
    ]
    args = [qt, kt, vt, dot_, lse, jnp.broadcast_to(delta[..., None], (b, h, tp, NUM_LANES))]
    if segs is not None:
        in_specs += [
            pl.BlockSpec((None, bq, NUM_LANES), lambda bi, hi, qi, ki: (bi, qi, 0)),
            pl.BlockSpec((None, NUM_SUBLANES, bk), lambda bi, hi, qi, ki: (bi, 0, kv_index(bi, hi, qi, ki)[2])),
        ]
        args += [
            jnp.broadcast_to(segs[0][:, :, None], (b, tp, NUM_LANES)),
            jnp.broadcast_to(segs[1][:, None, :], (b, NUM_SUBLANES, sp)),
        ]
    dq = pl.pallas_call(
        functools.partial(_tpu_dq_kernel, g=g),
        grid=(b, h, g.nq, g.nk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bq, dqk), q_index),
        out_shape=jax.ShapeDtypeStruct((b, h, tp, dqk), q.dtype),
        scratch_shapes=[_vmem((bq, dqk), jnp.float32)],
        compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary"), cfg.interpret),
        interpret=cfg.interpret,
        cost_estimate=_cost(b, h, t, s, dqk, dv, cfg.causal, 1.5, args),
        name="flash_attention_dq",
    )(*args)

    # dk, dv: grid (b, h_kv, k blocks, heads in group, q blocks).
    def qh_index(bi, hki, ki, gi, qi):
        if g.causal:
            qi = jnp.minimum(jnp.maximum(qi, _first_q_block(ki * bk, g, bq)), g.nq - 1)
        return bi, hki * grp + gi, qi, 0

    def row_index(bi, hki, ki, gi, qi):
        return qh_index(bi, hki, ki, gi, qi)[:2] + (0, qh_index(bi, hki, ki, gi, qi)[2])

    def k_index(bi, hki, ki, gi, qi):
        return bi, hki, ki, 0

    in_specs = [
        pl.BlockSpec((None, None, bq, dqk), qh_index),
        pl.BlockSpec((None, None, bk, dqk), k_index),
        pl.BlockSpec((None, None, bk, dv), k_index),
        pl.BlockSpec((None, None, bq, dv), qh_index),
        pl.BlockSpec((None, None, NUM_SUBLANES, bq), row_index),
        pl.BlockSpec((None, None, NUM_SUBLANES, bq), row_index),
    ]
    args = [
        qt,
        kt,
        vt,
        dot_,
        jnp.broadcast_to(lse_rows[:, :, None, :], (b, h, NUM_SUBLANES, tp)),
        jnp.broadcast_to(delta[:, :, None, :], (b, h, NUM_SUBLANES, tp)),
    ]
    if segs is not None:
        in_specs += [
            pl.BlockSpec((None, bk, NUM_LANES), lambda bi, hki, ki, gi, qi: (bi, ki, 0)),
            pl.BlockSpec(
                (None, NUM_SUBLANES, bq), lambda bi, hki, ki, gi, qi: (bi, 0, qh_index(bi, hki, ki, gi, qi)[2])
            ),
        ]
        args += [
            jnp.broadcast_to(segs[1][:, :, None], (b, sp, NUM_LANES)),
            jnp.broadcast_to(segs[0][:, None, :], (b, NUM_SUBLANES, tp)),
        ]
    dk, dv_ = pl.pallas_call(
        functools.partial(_tpu_dkv_kernel, g=g),
        grid=(b, hk, g.nk, grp, g.nq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bk, dqk), k_index),
            pl.BlockSpec((None, None, bk, dv), k_index),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hk, sp, dqk), k.dtype),
            jax.ShapeDtypeStruct((b, hk, sp, dv), v.dtype),
        ],
        scratch_shapes=[_vmem((bk, dqk), jnp.float32), _vmem((bk, dv), jnp.float32)],
        compiler_params=_tpu_params(
            ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
            cfg.interpret,
        ),
        interpret=cfg.interpret,
        cost_estimate=_cost(b, h, t, s, dqk, dv, cfg.causal, 2.0, args),
        name="flash_attention_dkv",
    )(*args)
    unt = lambda x, n: jnp.swapaxes(x[:, :, :n], 1, 2)  # noqa: E731
    return unt(dq, t), unt(dk, s), unt(dv_, s)


# --------------------------------------------------------------------------------------------------------------
# GPU (Triton) kernels: grid over (batch, head, block); the sequence loop runs inside the kernel.
# --------------------------------------------------------------------------------------------------------------


def _dot(x, y, g: _Geom, trans_b: bool = False):
    return _mm(x, y, trans_b)


def _gpu_fwd_kernel(*refs, g: _Geom, nc: int):
    q_refs, k_refs = refs[:nc], refs[nc : 2 * nc]
    rest = refs[2 * nc :]
    if g.has_seg:
        v_ref, qs_ref, ks_ref, o_ref, lse_ref = rest
    else:
        v_ref, o_ref, lse_ref = rest
        qs_ref = ks_ref = None
    bq, bk = g.bq, g.bk
    q_start = pl.program_id(2) * bq
    qs = [r[...] for r in q_refs]
    rows = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    qseg = qs_ref[...][:, None] if g.has_seg else None
    dv = v_ref.shape[-1]

    def body(j, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(j * bk, bk)
        sl = pl.ds(start, bk)
        s = _dot(qs[0], k_refs[0][sl, :], g, True)
        for qc, kr in zip(qs[1:], k_refs[1:], strict=True):
            s += _dot(qc, kr[sl, :], g, True)
        s = s * g.sm_scale
        cols = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        kseg = ks_ref[sl][None, :] if g.has_seg else None
        gm = g if masked else dataclasses.replace(g, causal=False, kv_pad=False)
        mask = _mask(rows, cols, qseg, kseg, gm)
        if mask is not None:
            s = jnp.where(mask, s, _NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        l = l * alpha + jnp.sum(p, axis=1)
        v = v_ref[sl, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, g)
        return acc, m_new, l

    lo, mid, hi = _fwd_phases(q_start, g)
    carry = (
        jnp.zeros((bq, dv), jnp.float32),
        jnp.full((bq,), _NEG_INF, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    # Unmasked blocks first, then the (diagonal / padded) blocks that need the position mask.
    acc, m, l = _fwd_loop(body, lo, mid, hi, carry)
    empty = l == 0.0
    inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _fwd_phases(q_start, g: _Geom):
    """Key-block ranges for one query block: [0, mid) never needs the position mask, [mid, hi) may."""
    if g.causal:
        hi = jnp.minimum(g.nk, jnp.maximum(q_start + g.bq + g.offset + g.bk - 1, 0) // g.bk)
        mid = jnp.minimum(jnp.maximum(q_start + g.offset + 1, 0) // g.bk, hi)
        return 0, mid, hi
    if g.kv_pad:
        return 0, g.nk - 1, g.nk
    return 0, g.nk, g.nk


def _fwd_loop(body, lo, mid, hi, carry):
    carry = lax.fori_loop(lo, mid, lambda j, c: body(j, c, False), carry)
    return lax.fori_loop(mid, hi, lambda j, c: body(j, c, True), carry)


def _gpu_dq_kernel(*refs, g: _Geom, nc: int):
    q_refs, k_refs = refs[:nc], refs[nc : 2 * nc]
    rest = refs[2 * nc :]
    if g.has_seg:
        v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref = rest[:6]
        dq_refs = rest[6:]
    else:
        v_ref, do_ref, lse_ref, dl_ref = rest[:4]
        dq_refs = rest[4:]
        qs_ref = ks_ref = None
    bq, bk = g.bq, g.bk
    q_start = pl.program_id(2) * bq
    qs = [r[...] for r in q_refs]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = dl_ref[...][:, None]
    rows = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    qseg = qs_ref[...][:, None] if g.has_seg else None

    def body(j, accs, masked):
        start = pl.multiple_of(j * bk, bk)
        sl = pl.ds(start, bk)
        ks = [kr[sl, :] for kr in k_refs]
        s = _dot(qs[0], ks[0], g, True)
        for qc, kc in zip(qs[1:], ks[1:], strict=True):
            s += _dot(qc, kc, g, True)
        p = jnp.exp(s * g.sm_scale - lse)
        cols = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        kseg = ks_ref[sl][None, :] if g.has_seg else None
        gm = g if masked else dataclasses.replace(g, causal=False, kv_pad=False)
        mask = _mask(rows, cols, qseg, kseg, gm)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = _dot(do, v_ref[sl, :], g, True)
        ds = (p * (dp - delta)).astype(ks[0].dtype)
        return tuple(a + _dot(ds, kc, g) for a, kc in zip(accs, ks, strict=True))

    lo, mid, hi = _fwd_phases(q_start, g)
    accs = tuple(jnp.zeros((bq, r.shape[-1]), jnp.float32) for r in k_refs)
    accs = _fwd_loop(body, lo, mid, hi, accs)
    for r, a in zip(dq_refs, accs, strict=True):
        r[...] = (a * g.sm_scale).astype(r.dtype)


def _gpu_dkv_kernel(*refs, g: _Geom, nc: int):
    q_refs, k_refs = refs[:nc], refs[nc : 2 * nc]
    rest = refs[2 * nc :]
    if g.has_seg:
        v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref = rest[:6]
        outs = rest[6:]
    else:
        v_ref, do_ref, lse_ref, dl_ref = rest[:4]
        outs = rest[4:]
        qs_ref = ks_ref = None
    dk_refs, dv_ref = outs[:nc], outs[nc]
    bq, bk = g.bq, g.bk
    k_start = pl.program_id(2) * bk
    ks = [r[...] for r in k_refs]
    v = v_ref[...]
    cols = k_start + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    kseg = ks_ref[...][:, None] if g.has_seg else None

    def body(i, carry, masked):
        dks, dv = carry
        start = pl.multiple_of(i * bq, bq)
        sl = pl.ds(start, bq)
        qs = [qr[sl, :] for qr in q_refs]
        st = _dot(ks[0], qs[0], g, True)
        for kc, qc in zip(ks[1:], qs[1:], strict=True):
            st += _dot(kc, qc, g, True)
        pt = jnp.exp(st * g.sm_scale - lse_ref[sl][None, :])
        rows = start + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
        qseg = qs_ref[sl][None, :] if g.has_seg else None
        gm = g if masked else dataclasses.replace(g, causal=False, kv_pad=False)
        mask = _mask(rows, cols, qseg, kseg, gm)
        if mask is not None:
            pt = jnp.where(mask, pt, 0.0)
        do = do_ref[sl, :]
        dv = dv + _dot(pt.astype(do.dtype), do, g)
        dpt = _dot(v, do, g, True)
        dst = (pt * (dpt - dl_ref[sl][None, :])).astype(qs[0].dtype)
        dks = tuple(a + _dot(dst, qc, g) for a, qc in zip(dks, qs, strict=True))
        return dks, dv

    carry = (tuple(jnp.zeros(kc.shape, jnp.float32) for kc in ks), jnp.zeros(v.shape, jnp.float32))
    if g.causal:
        # Query blocks before `lo` see nothing of this key block; [lo, mid) straddle the diagonal.
        lo = jnp.minimum(jnp.maximum(k_start - g.offset, 0) // bq, g.nq)
        mid = jnp.minimum(jnp.maximum(k_start + bk - 1 - g.offset + bq - 1, 0) // bq, g.nq)
        carry = lax.fori_loop(lo, mid, lambda i, c: body(i, c, True), carry)
        carry = lax.fori_loop(mid, g.nq, lambda i, c: body(i, c, False), carry)
    else:
        # Non-causal: the padded key rows are zeroed by the mask in the last key block only; a masked pass
        # over all query blocks is simplest and costs one select per element.
        carry = lax.fori_loop(0, g.nq, lambda i, c: body(i, c, g.kv_pad), carry)
    dks, dv = carry
    for r, a in zip(dk_refs, dks, strict=True):
        r[...] = (a * g.sm_scale).astype(r.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_smem_bytes(outer: int, inner: int, dqk: int, dvp: int, itemsize: int, stages: int) -> int:
    """Estimated shared memory of one Triton flash program (bytes): `stages` pipelined tiles of the loop operand
    `[inner, d_qk + d_v]`, the resident tiles `[outer, d_qk + d_v]` and one `[outer, inner]` probability tile.
    Forward / dq: outer = query block, inner = key block; dk/dv: the other way round."""
    return (stages * inner + outer) * (dqk + dvp) * itemsize + outer * inner * itemsize


def _gpu_bwd_smem_bytes(outer: int, inner: int, dqk: int, dvp: int, itemsize: int, stages: int, warps: int) -> int:
    """Estimated shared memory of one Triton backward program (dq: outer = query block, inner = key block; dk/dv:
    the other way round): the pipelined loop tiles `[inner, d_qk + d_v]` and the resident `[outer, d_qk + d_v]`.

    Every streamed tile feeds two matmuls in opposite orientations (k in q.k^T and ds.k; q and do likewise in
    dk/dv). With one warpgroup (<= 4 warps) Hopper's Triton keeps a shared-memory copy per orientation, so the
    pipeline is counted twice: 64 x 64 tiles, 4 warps, 3 stages at d 192/128 asked an H200 for 294912 bytes
    (this gives 286720 > 232448), while 8 warps, and 4 warps at d 128/128 (229376), compiled."""
    copies = 2 if warps <= 4 else 1
    return (copies * stages * inner + outer) * (dqk + dvp) * itemsize


def _gpu_warps(blocks: BlockSizes, dqk: int) -> int:
    return blocks.num_warps or (4 if dqk <= 64 else 8)


def _gpu_bwd_stages(blocks: BlockSizes, outer: int, inner: int, dqk: int, dvp: int, itemsize: int) -> int:
    warps = _gpu_warps(blocks, dqk)
    return blocks.num_stages or pick_num_stages(
        lambda st: _gpu_bwd_smem_bytes(outer, inner, dqk, dvp, itemsize, st, warps)
    )


def _gpu_params(cfg: _Cfg, dqk: int, dvp: int, outer: int, inner: int, itemsize: int, bwd: bool = False):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    warps = _gpu_warps(cfg.blocks, dqk)
    if bwd:
        stages = _gpu_bwd_stages(cfg.blocks, outer, inner, dqk, dvp, itemsize)
        need = _gpu_bwd_smem_bytes(outer, inner, dqk, dvp, itemsize, stages, warps)
        if need > GPU_SMEM_LIMIT:
            raise ValueError(
                f"flash attention backward with {cfg.blocks} needs ~{need} bytes of shared memory for "
                f"d_qk={dqk}, padded d_v={dvp} ({itemsize}-byte elements); the GPU limit is {GPU_SMEM_LIMIT}: "
                "use smaller block_q_bwd / block_k_bwd, fewer num_stages, or num_warps=8"
            )
        return pltriton.CompilerParams(num_warps=warps, num_stages=stages)
    stages = cfg.blocks.num_stages or pick_num_stages(lambda st: _gpu_smem_bytes(outer, inner, dqk, dvp, itemsize, st))
    return pltriton.CompilerParams(num_warps=warps, num_stages=stages)


def _gpu_geom(q, k, qseg, cfg, bq, bk):
    t, s = q.shape[1], k.shape[1]
    tp, sp = round_up(t, bq), round_up(s, bk)
    return _Geom(
        bq=bq,
        bk=bk,
        t=t,
        s=s,
        causal=cfg.causal,
        has_seg=qseg is not None,
        kv_pad=sp != s,
        sm_scale=cfg.sm_scale,
        nq=tp // bq,
        nk=sp // bk,
    )


def _gpu_inputs(q, k, v, qseg, kvseg, g: _Geom):
    tp, sp = g.nq * g.bq, g.nk * g.bk
    dvp = next_pow2(max(v.shape[-1], 16))
    qp = pad_axis(q, 1, tp)
    kp = pad_axis(k, 1, sp)
    vp = pad_axis(pad_axis(v, 3, dvp), 1, sp)
    segs = None
    if qseg is not None:
        segs = (pad_axis(qseg.astype(jnp.int32), 1, tp, -1), pad_axis(kvseg.astype(jnp.int32), 1, sp, -1))
    return qp, kp, vp, segs


def _gpu_forward(q, k, v, qseg, kvseg, cfg: _Cfg):
    b, t, h, dqk = q.shape
    s, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
    grp = h // hk
    bq = _eff_block(cfg.blocks.block_q, t, "gpu")
    bk = _eff_block(cfg.blocks.block_k, s, "gpu")
    g = _gpu_geom(q, k, qseg, cfg, bq, bk)
    qp, kp, vp, segs = _gpu_inputs(q, k, v, qseg, kvseg, g)
    tp, sp, dvp = g.nq * bq, g.nk * bk, vp.shape[-1]
    chunks = pow2_chunks(dqk)
    in_specs, args = [], []
    for off, size in chunks:
        in_specs.append(pl.BlockSpec((None, bq, None, size), lambda bi, hi, qi, c=off // size: (bi, qi, hi, c)))
        args.append(qp)
    for off, size in chunks:
        in_specs.append(pl.BlockSpec((None, sp, None, size), lambda bi, hi, qi, c=off // size: (bi, 0, hi // grp, c)))
        args.append(kp)
    in_specs.append(pl.BlockSpec((None, sp, None, dvp), lambda bi, hi, qi: (bi, 0, hi // grp, 0)))
    args.append(vp)
    if segs is not None:
        in_specs += [
            pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
            pl.BlockSpec((None, sp), lambda bi, hi, qi: (bi, 0)),
        ]
        args += list(segs)
    o, lse = pl.pallas_call(
        functools.partial(_gpu_fwd_kernel, g=g, nc=len(chunks)),
        grid=(b, h, g.nq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, dvp), lambda bi, hi, qi: (bi, qi, hi, 0)),
            pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, dvp), q.dtype),
            jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
        ],
        compiler_params=_gpu_params(cfg, dqk, dvp, bq, bk, q.dtype.itemsize),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*args)
    return o[:, :t, :, :dv], lse


def _gpu_backward(q, k, v, qseg, kvseg, o, lse, do, cfg: _Cfg):
    b, t, h, dqk = q.shape
    s, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
    grp = h // hk
    bq = _eff_block(cfg.blocks.block_q_bwd, t, "gpu")
    bk = _eff_block(cfg.blocks.block_k_bwd, s, "gpu")
    g = _gpu_geom(q, k, qseg, cfg, bq, bk)
    qp, kp, vp, segs = _gpu_inputs(q, k, v, qseg, kvseg, g)
    tp, sp, dvp = g.nq * bq, g.nk * bk, vp.shape[-1]
    dop = pad_axis(pad_axis(do, 3, dvp), 1, tp)
    delta = pad_axis(jnp.einsum("bthv,bthv->bht", o.astype(jnp.float32), do.astype(jnp.float32)), 2, tp)
    lse = pad_axis(lse[:, :, :t], 2, tp)  # the forward may have used another block size
    chunks = pow2_chunks(dqk)
    nc = len(chunks)

    # dq: grid (b, h, q blocks), loop over key blocks.
    in_specs, args = [], []
    for off, size in chunks:
        in_specs.append(pl.BlockSpec((None, bq, None, size), lambda bi, hi, qi, c=off // size: (bi, qi, hi, c)))
        args.append(qp)
    for off, size in chunks:
        in_specs.append(pl.BlockSpec((None, sp, None, size), lambda bi, hi, qi, c=off // size: (bi, 0, hi // grp, c)))
        args.append(kp)
    in_specs += [
        pl.BlockSpec((None, sp, None, dvp), lambda bi, hi, qi: (bi, 0, hi // grp, 0)),
        pl.BlockSpec((None, bq, None, dvp), lambda bi, hi, qi: (bi, qi, hi, 0)),
        pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)),
        pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)),
    ]
    args += [vp, dop, lse, delta]
    if segs is not None:
        in_specs += [
            pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
            pl.BlockSpec((None, sp), lambda bi, hi, qi: (bi, 0)),
        ]
        args += list(segs)
    dqs = pl.pallas_call(
        functools.partial(_gpu_dq_kernel, g=g, nc=nc),
        grid=(b, h, g.nq),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, size), lambda bi, hi, qi: (bi, qi, hi, 0)) for _, size in chunks],
        out_shape=[jax.ShapeDtypeStruct((b, tp, h, size), q.dtype) for _, size in chunks],
        compiler_params=_gpu_params(cfg, dqk, dvp, bq, bk, q.dtype.itemsize, bwd=True),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(*args)
    dq = jnp.concatenate(dqs, axis=-1)[:, :t] if nc > 1 else dqs[0][:, :t]

    # dk, dv per query head: grid (b, h, key blocks), loop over query blocks; groups summed afterwards.
    in_specs, args = [], []
    for off, size in chunks:
        in_specs.append(pl.BlockSpec((None, tp, None, size), lambda bi, hi, ki, c=off // size: (bi, 0, hi, c)))
        args.append(qp)
    for off, size in chunks:
        in_specs.append(pl.BlockSpec((None, bk, None, size), lambda bi, hi, ki, c=off // size: (bi, ki, hi // grp, c)))
        args.append(kp)
    in_specs += [
        pl.BlockSpec((None, bk, None, dvp), lambda bi, hi, ki: (bi, ki, hi // grp, 0)),
        pl.BlockSpec((None, tp, None, dvp), lambda bi, hi, ki: (bi, 0, hi, 0)),
        pl.BlockSpec((None, None, tp), lambda bi, hi, ki: (bi, hi, 0)),
        pl.BlockSpec((None, None, tp), lambda bi, hi, ki: (bi, hi, 0)),
    ]
    args += [vp, dop, lse, delta]
    if segs is not None:
        in_specs += [
            pl.BlockSpec((None, tp), lambda bi, hi, ki: (bi, 0)),
            pl.BlockSpec((None, bk), lambda bi, hi, ki: (bi, ki)),
        ]
        args += list(segs)
    acc_dtype = jnp.float32 if grp > 1 else k.dtype
    outs = pl.pallas_call(
        functools.partial(_gpu_dkv_kernel, g=g, nc=nc),
        grid=(b, h, g.nk),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bk, None, size), lambda bi, hi, ki: (bi, ki, hi, 0)) for _, size in chunks]
        + [pl.BlockSpec((None, bk, None, dvp), lambda bi, hi, ki: (bi, ki, hi, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, sp, h, size), acc_dtype) for _, size in chunks]
        + [jax.ShapeDtypeStruct((b, sp, h, dvp), acc_dtype)],
        compiler_params=_gpu_params(cfg, dqk, dvp, bk, bq, q.dtype.itemsize, bwd=True),
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(*args)
    dk = jnp.concatenate(outs[:nc], axis=-1) if nc > 1 else outs[0]
    dv_ = outs[nc][..., :dv]
    if grp > 1:
        dk = dk.reshape(b, sp, hk, grp, dqk).sum(3)
        dv_ = dv_.reshape(b, sp, hk, grp, dv).sum(3)
    return dq, dk[:, :s].astype(k.dtype), dv_[:, :s].astype(v.dtype)


# --------------------------------------------------------------------------------------------------------------
# custom_vjp and the jitted public wrapper.
# --------------------------------------------------------------------------------------------------------------


def _forward(q, k, v, qseg, kvseg, cfg: _Cfg):
    fn = _gpu_forward if cfg.kind == "gpu" else _tpu_forward
    return fn(q, k, v, qseg, kvseg, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, qseg, kvseg, cfg: _Cfg):
    return _forward(q, k, v, qseg, kvseg, cfg)[0]


def _flash_fwd(q, k, v, qseg, kvseg, cfg: _Cfg):
    o, lse = _forward(q, k, v, qseg, kvseg, cfg)
    return o, (q, k, v, qseg, kvseg, o, lse)


def _flash_bwd(cfg: _Cfg, res, do):
    q, k, v, qseg, kvseg, o, lse = res
    fn = _gpu_backward if cfg.kind == "gpu" else _tpu_backward
    dq, dk, dv = fn(q, k, v, qseg, kvseg, o, lse, do, cfg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _split_segments(segment_ids, t: int, s: int):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        qseg, kvseg = segment_ids
    else:
        if t != s:
            raise ValueError("a single segment_ids array needs t == s; pass (q_segment_ids, kv_segment_ids)")
        qseg = kvseg = segment_ids
    return jnp.asarray(qseg, jnp.int32), jnp.asarray(kvseg, jnp.int32)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "interpret", "block_sizes", "kind"))
def _flash_attention(q, k, v, segment_ids, *, causal, sm_scale, interpret, block_sizes, kind):
    b, t, h, dqk = q.shape
    if k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected 4-d k and v, got {k.shape} and {v.shape}")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != dqk:
        raise ValueError(f"incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if h % k.shape[2]:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {k.shape[2]}")
    qseg, kvseg = _split_segments(segment_ids, t, k.shape[1])
    if qseg is not None and (qseg.shape != (b, t) or kvseg.shape != (b, k.shape[1])):
        raise ValueError(f"segment ids must be [b, t] and [b, s], got {qseg.shape} and {kvseg.shape}")
    scale = 1.0 / math.sqrt(dqk) if sm_scale is None else float(sm_scale)
    cfg = _Cfg(
        causal=bool(causal),
        sm_scale=scale,
        interpret=interpret,
        kind=kind,
        blocks=block_sizes or BlockSizes.default(kind, dqk, v.shape[-1]),
    )
    return _flash(q, k, v, qseg, kvseg, cfg)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    sm_scale: float | None = None,
    interpret: bool | None = None,
    block_sizes: BlockSizes | None = None,
    kind: str | None = None,
) -> jax.Array:
    """Flash attention; see the module docstring for shapes and masking conventions.

    Args:
      q: `[b, t, h, d_qk]`; k: `[b, s, h_kv, d_qk]`; v: `[b, s, h_kv, d_v]`.
      causal: bottom-right aligned causal mask (query i sees keys j <= i + s - t).
      segment_ids: int32 `[b, t]` (self-attention) or `(q_segment_ids [b, t], kv_segment_ids [b, s])`;
        negative ids are padding.
      sm_scale: softmax scale, default `1 / sqrt(d_qk)`.
      interpret: None = interpret on CPU, compile on TPU/GPU (with `kind` None too: chosen per lowering platform).
      block_sizes: tile sizes; default per backend (`BlockSizes.default`).
      kind: force the "tpu" (Mosaic) or "gpu" (Triton) kernels; default from the platform.
    Returns:
      `[b, t, h, d_v]` in q's dtype.
    """
    run = functools.partial(_flash_attention, causal=causal, sm_scale=sm_scale, block_sizes=block_sizes)
    if interpret is None and kind is None:
        return per_platform(run, q, k, v, segment_ids)
    interp = resolve_interpret(interpret)
    return run(q, k, v, segment_ids, interpret=interp, kind=resolve_kind(kind, interp))


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Plain-jnp attention with the same conventions (materialises the t x s scores; for tests)."""
    b, t, h, dqk = q.shape
    s, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dqk) if sm_scale is None else sm_scale
    qg = q.reshape(b, t, hk, h // hk, dqk)
    scores = jnp.einsum("btgjd,bsgd->bgjts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = jnp.ones((b, 1, 1, t, s), bool)
    if causal:
        mask &= (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))[None, None, None]
    qseg, kvseg = _split_segments(segment_ids, t, s)
    if qseg is not None:
        mask &= ((qseg[:, :, None] == kvseg[:, None, :]) & (kvseg[:, None, :] >= 0))[:, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(mask, p, 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bgjts,bsgv->btgjv", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)
