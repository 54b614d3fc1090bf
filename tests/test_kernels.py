"""Interpret-mode tests of the Pallas kernels against their plain-jnp references (CPU).

Both kernel styles run here: "tpu" (Mosaic-style grid accumulation) and "gpu" (Triton-style in-kernel loops);
on CPU they execute through the Pallas interpreter, so the math of each is checked without an accelerator.
Tiny shapes with 16-wide blocks make every case cross several blocks, with lengths that are not multiples of
the block size.

Tolerances (fixed): f32 forward 2e-5 and gradients 1e-4 absolute+relative -- both sides accumulate in f32 in a
different order over <= 64 terms of O(1) values (measured ~1e-6). bf16: the kernel and the reference both cast
probabilities to bf16 before the PV matmul but round at different points (block-wise rescaling), so they may
differ by a few bf16 ulps (2^-8 relative) on O(1) outputs: 3e-2 forward, 6e-2 gradients, measured against the
f32 reference on the same bf16-rounded inputs.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _import_kernels():
    """`r1jax.kernels` when installed, else the source folder (so the tests also run from a bare checkout)."""
    try:
        import r1jax.kernels as kernels

        return kernels
    except Exception:  # not installed (e.g. a bare checkout on a GPU machine with PYTHONPATH=repo)
        root = pathlib.Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "r1jax_kernels_src", root / "__init__.py", submodule_search_locations=[str(root)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["r1jax_kernels_src"] = mod
        spec.loader.exec_module(mod)
        return mod


K = _import_kernels()
# R1JAX_KERNEL_KINDS=gpu with R1JAX_KERNEL_INTERPRET=0 runs the same grid compiled on a GPU.
_env = __import__("os").environ
KINDS = _env.get("R1JAX_KERNEL_KINDS", "tpu,gpu").split(",")
INTERPRET = _env.get("R1JAX_KERNEL_INTERPRET", "1") != "0"
SMALL = K.BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
TOL = {jnp.float32: (2e-5, 1e-4), jnp.bfloat16: (3e-2, 6e-2)}


def _segments(b, n, key, pad):
    """Packed segments 0,0,..,1,1,..,2 per row, with the last `pad` positions marked -1 (padding)."""
    cuts = jnp.sort(jax.random.randint(key, (b, 2), 1, n - pad), axis=1)
    pos = jnp.arange(n)[None]
    seg = (pos >= cuts[:, :1]).astype(jnp.int32) + (pos >= cuts[:, 1:]).astype(jnp.int32)
    return jnp.where(pos >= n - pad, -1, seg)


# name: (b, t, s, h, h_kv, d_qk, d_v, causal, segments, dtype)
CASES = {
    "mla192_gqa_causal": (1, 40, 40, 4, 2, 192, 128, True, None, jnp.float32),
    "mqa_noncausal_t<s": (2, 24, 40, 2, 1, 64, 64, False, None, jnp.float32),
    "causal_bottom_right_t<s": (1, 20, 45, 2, 2, 32, 32, True, None, jnp.float32),
    "causal_t>s_empty_rows": (1, 40, 24, 2, 1, 32, 32, True, None, jnp.float32),
    "segments_padding_causal": (2, 48, 48, 4, 4, 32, 16, True, "self", jnp.float32),
    "segment_pair_noncausal": (2, 24, 40, 2, 2, 32, 32, False, "pair", jnp.float32),
    "bf16_mla_gqa_segments": (1, 40, 40, 4, 2, 192, 128, True, "self", jnp.bfloat16),
    "bf16_128_noncausal": (1, 33, 33, 2, 2, 128, 128, False, None, jnp.bfloat16),
}


def _inputs(case):
    b, t, s, h, hk, dqk, dv, causal, seg, dtype = case
    ks = jax.random.split(jax.random.key(hash((t, s, h, dqk)) % 2**31), 7)
    q = jax.random.normal(ks[0], (b, t, h, dqk), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, hk, dqk), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, hk, dv), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, t, h, dv), jnp.float32)
    segs = None
    if seg == "self":
        segs = _segments(b, t, ks[4], pad=5)
    elif seg == "pair":
        segs = (_segments(b, t, ks[4], pad=3), _segments(b, s, ks[5], pad=4))
    return q, k, v, do, segs, causal


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(CASES))
def test_flash_attention_matches_reference(name, kind):
    case = CASES[name]
    dtype = case[-1]
    q, k, v, do, segs, causal = _inputs(case)

    def kern(q, k, v):
        return K.flash_attention(
            q, k, v, causal=causal, segment_ids=segs, block_sizes=SMALL, interpret=INTERPRET, kind=kind
        )

    def ref(q, k, v):
        return K.flash_attention_reference(q, k, v, causal=causal, segment_ids=segs)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do)

    up = lambda x: x.astype(jnp.float32)  # noqa: E731  the reference runs in f32 on the same rounded inputs
    out = kern(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape[:3] + v.shape[-1:]
    out_ref = ref(up(q), up(k), up(v))
    fwd_tol, bwd_tol = TOL[dtype]
    assert np.isfinite(_f32(out)).all()
    np.testing.assert_allclose(_f32(out), _f32(out_ref), atol=fwd_tol, rtol=fwd_tol)

    grads = jax.grad(loss(kern), argnums=(0, 1, 2))(q, k, v)
    grads_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(up(q), up(k), up(v))
    for name_, g, g_ref, x in zip("qkv", grads, grads_ref, (q, k, v), strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype, name_
        assert np.isfinite(_f32(g)).all(), f"d{name_} not finite"
        np.testing.assert_allclose(_f32(g), _f32(g_ref), atol=bwd_tol, rtol=bwd_tol, err_msg=f"d{name_}")


@pytest.mark.parametrize("kind", KINDS)
def test_flash_attention_fully_masked_rows_are_zero(kind):
    """Padded queries (segment -1) and queries with no visible key give 0 output and 0 gradients."""
    q, k, v, do, segs, _ = _inputs(CASES["segments_padding_causal"])
    fn = lambda q, k, v: K.flash_attention(  # noqa: E731
        q, k, v, causal=True, segment_ids=segs, block_sizes=SMALL, interpret=INTERPRET, kind=kind
    )
    out, vjp = jax.vjp(fn, q, k, v)
    dq, dk, dv = vjp(do.astype(out.dtype))
    pad_q = np.asarray(segs) < 0
    assert pad_q.any()
    np.testing.assert_array_equal(_f32(out)[pad_q], 0.0)
    np.testing.assert_array_equal(_f32(dq)[pad_q], 0.0)
    np.testing.assert_array_equal(_f32(dk)[pad_q], 0.0)  # padded keys are never attended to
    np.testing.assert_array_equal(_f32(dv)[pad_q], 0.0)


def test_flash_attention_default_api_and_validation():
    q = jnp.ones((1, 8, 2, 16))
    out = K.flash_attention(q, q, q)  # interpret=None: interpreted on CPU
    np.testing.assert_allclose(_f32(out), 1.0, atol=1e-6)
    with pytest.raises(ValueError):
        K.BlockSizes(block_q=24)
    with pytest.raises(ValueError):
        K.flash_attention(q, jnp.ones((1, 8, 3, 16)), jnp.ones((1, 8, 3, 16)))
    with pytest.raises(ValueError):
        K.flash_attention(q, jnp.ones((1, 9, 2, 16)), jnp.ones((1, 9, 2, 16)), segment_ids=jnp.zeros((1, 8), int))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dims", [(192, 128), (128, 128)], ids=["mla192", "d128"])
def test_flash_attention_default_blocks(dims, kind):
    """The per-backend default tiles (not the 16-wide test tiles), several blocks long, bf16, causal GQA."""
    dqk, dv = dims
    q, k, v, do, _, _ = _inputs((1, 260, 260, 4, 2, dqk, dv, True, None, jnp.bfloat16))
    kern = lambda q, k, v: K.flash_attention(q, k, v, causal=True, interpret=INTERPRET, kind=kind)  # noqa: E731
    ref = lambda q, k, v: K.flash_attention_reference(q, k, v, causal=True)  # noqa: E731
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    out, vjp = jax.vjp(kern, q, k, v)
    out_ref, vjp_ref = jax.vjp(ref, up(q), up(k), up(v))
    fwd_tol, bwd_tol = TOL[jnp.bfloat16]
    np.testing.assert_allclose(_f32(out), _f32(out_ref), atol=fwd_tol, rtol=fwd_tol)
    for name_, g, g_ref in zip("qkv", vjp(do.astype(out.dtype)), vjp_ref(do), strict=True):
        assert np.isfinite(_f32(g)).all(), f"d{name_} not finite"
        np.testing.assert_allclose(_f32(g), _f32(g_ref), atol=bwd_tol, rtol=bwd_tol, err_msg=f"d{name_}")


# ---------------------------------------------------------------------------------------------- mla_decode


def _decode_inputs(dtype, b=4, h=4, c=64, p=16, s=50, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    ql = jax.random.normal(ks[0], (b, h, c), jnp.float32).astype(dtype)
    qr = jax.random.normal(ks[1], (b, h, p), jnp.float32).astype(dtype)
    lat = jax.random.normal(ks[2], (b, s, c), jnp.float32).astype(dtype)
    rope = jax.random.normal(ks[3], (b, s, p), jnp.float32).astype(dtype)
    lengths = jnp.array([0, 1, 23, s][:b], jnp.int32)
    return ql, qr, lat, rope, lengths


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mla_decode_matches_reference_and_ignores_nan_past_length(kind, dtype):
    ql, qr, lat, rope, lengths = _decode_inputs(dtype)
    scale = 0.125
    ref = K.mla_decode_reference(*(x.astype(jnp.float32) for x in (ql, qr, lat, rope)), lengths, sm_scale=scale)
    valid = (jnp.arange(lat.shape[1])[None, :] < lengths[:, None])[..., None]
    lat_nan = jnp.where(valid, lat, jnp.nan)
    rope_nan = jnp.where(valid, rope, jnp.nan)
    fwd_tol = TOL[dtype][0]
    outs = {}
    for splits in (1, 3):
        bs = K.MLADecodeBlockSizes(block_k=16, num_splits=splits)
        out = K.mla_decode(
            ql, qr, lat_nan, rope_nan, lengths, sm_scale=scale, block_sizes=bs, interpret=INTERPRET, kind=kind
        )
        assert out.shape == ql.shape and out.dtype == dtype
        assert np.isfinite(_f32(out)).all()
        np.testing.assert_array_equal(_f32(out)[0], 0.0)  # length 0 -> zeros
        np.testing.assert_allclose(_f32(out), _f32(ref), atol=fwd_tol, rtol=fwd_tol)
        outs[splits] = _f32(out)
    # split-KV equals unsplit (only the summation order differs)
    np.testing.assert_allclose(outs[3], outs[1], atol=fwd_tol, rtol=fwd_tol)


@pytest.mark.parametrize("kind", KINDS)
def test_mla_decode_starts_mask_left_padding(kind):
    """`starts` (left-padded caches): positions before the start are masked like those past the length, NaN
    there does not leak, start == length gives zeros; ranges off the block boundaries, splits wholly before
    the start."""
    ql, qr, lat, rope, _ = _decode_inputs(jnp.float32, b=5, s=50, seed=1)
    lengths = jnp.array([50, 23, 40, 17, 9], jnp.int32)
    starts = jnp.array([37, 5, 0, 17, 3], jnp.int32)
    scale = 0.125
    ref = K.mla_decode_reference(ql, qr, lat, rope, lengths, sm_scale=scale, starts=starts)
    pos = jnp.arange(lat.shape[1])[None, :]
    valid = ((pos >= starts[:, None]) & (pos < lengths[:, None]))[..., None]
    lat_nan, rope_nan = jnp.where(valid, lat, jnp.nan), jnp.where(valid, rope, jnp.nan)
    # the reference agrees with plain softmax attention restricted to the range
    row = 1
    sc = (ql[row] @ lat[row, 5:23].T + qr[row] @ rope[row, 5:23].T) * scale
    want = jax.nn.softmax(sc, axis=-1) @ lat[row, 5:23]
    np.testing.assert_allclose(_f32(ref)[row], _f32(want), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(_f32(ref)[3], 0.0)
    for splits in (1, 3):
        bs = K.MLADecodeBlockSizes(block_k=16, num_splits=splits)
        out = K.mla_decode(
            ql,
            qr,
            lat_nan,
            rope_nan,
            lengths,
            sm_scale=scale,
            starts=starts,
            block_sizes=bs,
            interpret=INTERPRET,
            kind=kind,
        )
        assert np.isfinite(_f32(out)).all()
        np.testing.assert_array_equal(_f32(out)[3], 0.0)  # start == length -> zeros
        np.testing.assert_allclose(_f32(out), _f32(ref), atol=2e-5, rtol=2e-5)
    # starts=None is starts=0
    zero = jnp.zeros_like(starts)
    a = K.mla_decode(ql, qr, lat, rope, lengths, sm_scale=scale, starts=zero, interpret=INTERPRET, kind=kind)
    b = K.mla_decode(ql, qr, lat, rope, lengths, sm_scale=scale, interpret=INTERPRET, kind=kind)
    np.testing.assert_allclose(_f32(a), _f32(b), atol=1e-6, rtol=1e-6)


def test_mla_decode_default_api():
    ql, qr, lat, rope, lengths = _decode_inputs(jnp.float32, b=2, s=20)
    out = K.mla_decode(ql, qr, lat, rope, lengths, sm_scale=0.1)
    ref = K.mla_decode_reference(ql, qr, lat, rope, lengths, sm_scale=0.1)
    np.testing.assert_allclose(_f32(out), _f32(ref), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError):
        K.MLADecodeBlockSizes(block_k=100)


@pytest.mark.parametrize("kind", KINDS)
def test_mla_decode_default_blocks(kind):
    """DeepSeek-V3 head sizes with the per-backend default tiles, bf16, lengths off the block boundaries."""
    ql, qr, lat, rope, _ = _decode_inputs(jnp.bfloat16, b=2, h=16, c=512, p=64, s=200, seed=3)
    lengths = jnp.array([77, 200], jnp.int32)
    out = K.mla_decode(ql, qr, lat, rope, lengths, sm_scale=0.04, interpret=INTERPRET, kind=kind)
    up = [x.astype(jnp.float32) for x in (ql, qr, lat, rope)]
    ref = K.mla_decode_reference(*up, lengths, sm_scale=0.04)
    np.testing.assert_allclose(_f32(out), _f32(ref), atol=TOL[jnp.bfloat16][0], rtol=TOL[jnp.bfloat16][0])


def test_mla_decode_gpu_shared_memory_estimate():
    """GPU tiles past the H100/H200 shared memory limit are rejected when lowering, not inside Triton."""
    from jax import export

    limit = 232448
    h, c, p = 16, 512, 64  # DeepSeek-V3 absorbed decode, 16 heads per device
    # block_k=64 x 3 stages asked Triton for 233472 bytes on an H200; the estimate must not undershoot it.
    assert K.MLADecodeBlockSizes(block_k=64, num_stages=3).gpu_smem_bytes(h, c, p) >= 233472
    default = K.MLADecodeBlockSizes.default("gpu")
    assert default.gpu_smem_bytes(h, c, p) <= limit
    assert default.num_stages is None  # picked per shape: 3 stages for 16 heads, 1 for all 128 on one device
    assert K.MLADecodeBlockSizes(block_k=32, num_stages=1).gpu_smem_bytes(128, c, p) <= limit
    assert K.MLADecodeBlockSizes(block_k=64).gpu_smem_bytes(h, c, p, s=16) < 100_000  # clipped to the cache

    spec, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    args = (spec((8, h, c), bf), spec((8, h, p), bf), spec((8, 1024, c), bf), spec((8, 1024, p), bf))
    args += (spec((8,), jnp.int32),)
    allow = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

    def lower(bs):
        fn = lambda *a: K.mla_decode(*a, sm_scale=0.1, interpret=False, kind="gpu", block_sizes=bs)  # noqa: E731
        return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=allow)(*args)

    with pytest.raises(ValueError, match="shared memory"):
        lower(K.MLADecodeBlockSizes(block_k=64, num_stages=3))
    lower(K.MLADecodeBlockSizes(block_k=64, num_stages=2))
    lower(K.MLADecodeBlockSizes(block_k=64))  # num_stages=None: the deepest pipeline that fits


def test_flash_attention_gpu_backward_shared_memory_estimate():
    """Backward tiles past the H100/H200 shared memory limit are rejected when lowering, not inside Triton."""
    from jax import export

    limit = 232448
    B = K.BlockSizes
    # 64 x 64, 4 warps, 3 stages at d 192/128 asked Triton for 294912 bytes on an H200.
    failed = B(block_q_bwd=64, block_k_bwd=64, num_warps=4, num_stages=3)
    assert failed.gpu_bwd_smem_bytes(192, 128) > limit
    # What compiled there: the same tiles at d 128/128 and with 8 warps, and the measured-best defaults.
    assert failed.gpu_bwd_smem_bytes(128, 128) <= limit
    assert B(block_q_bwd=64, block_k_bwd=64, num_warps=8, num_stages=3).gpu_bwd_smem_bytes(192, 128) <= limit
    for dqk, dv in [(192, 128), (128, 128), (64, 64), (128, 256), (256, 256)]:
        assert B.default("gpu", dqk, dv).gpu_bwd_smem_bytes(dqk, dv) <= limit, (dqk, dv)
    assert B.default("gpu", 192, 128) == B(
        block_q=128, block_k=128, block_q_bwd=64, block_k_bwd=128, num_warps=8, num_stages=2
    )
    assert B.default("gpu", 128, 128) == B(
        block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4, num_stages=3
    )
    assert failed.gpu_bwd_smem_bytes(192, 128, t=32, s=32) <= limit  # clipped to a short sequence

    spec, bf, t = jax.ShapeDtypeStruct, jnp.bfloat16, 256
    args = (spec((1, t, 2, 192), bf), spec((1, t, 2, 192), bf), spec((1, t, 2, 128), bf), spec((1, t, 2, 128), bf))
    allow = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

    def lower(bs):
        def bwd(q, k, v, do):
            f = lambda q, k, v: K.flash_attention(q, k, v, causal=True, interpret=False, kind="gpu", block_sizes=bs)  # noqa: E731
            return jax.vjp(f, q, k, v)[1](do)

        return export.export(jax.jit(bwd), platforms=["cuda"], disabled_checks=allow)(*args)

    with pytest.raises(ValueError, match="shared memory"):
        lower(failed)
    lower(B(block_q_bwd=64, block_k_bwd=64, num_warps=8, num_stages=3))
    lower(B(block_q_bwd=64, block_k_bwd=64, num_warps=4))  # num_stages=None: the deepest pipeline that fits


# ------------------------------------------------------------------------------ GPU lowering, without a GPU


def test_triton_kernels_lower_for_cuda():
    """Lowers the GPU (Triton) kernels to Triton IR at production shapes via `jax.export` for CUDA, on CPU.

    Catches what interpret mode accepts but the Pallas->Triton lowering rejects (non power-of-two tiles,
    unsupported ops); PTX compilation itself happens only on a GPU (tools/gpu_check.sh).
    """
    from jax import export

    spec, bf = jax.ShapeDtypeStruct, jnp.bfloat16

    def fwd(q, k, v):
        return K.flash_attention(q, k, v, causal=True, interpret=False, kind="gpu")

    def bwd(q, k, v, do):
        return jax.vjp(fwd, q, k, v)[1](do)

    def seg_bwd(q, k, v, seg, do):
        f = lambda q, k, v: K.flash_attention(q, k, v, segment_ids=seg, causal=False, interpret=False, kind="gpu")  # noqa: E731
        return jax.vjp(f, q, k, v)[1](do)

    def dec(*args):
        return K.mla_decode(*args, sm_scale=0.1, interpret=False, kind="gpu")

    t, h = 4096, 16
    programs = {
        "fwd": (fwd, (spec((1, t, h, 192), bf), spec((1, t, h, 192), bf), spec((1, t, h, 128), bf))),
        "bwd_gqa": (
            bwd,
            (spec((1, t, h, 192), bf), spec((1, t, 4, 192), bf), spec((1, t, 4, 128), bf), spec((1, t, h, 128), bf)),
        ),
        "seg_f32": (
            seg_bwd,
            tuple(
                spec(s, d)
                for s, d in [
                    ((2, 40, 4, 32), jnp.float32),
                    ((2, 40, 2, 32), jnp.float32),
                    ((2, 40, 2, 16), jnp.float32),
                    ((2, 40), jnp.int32),
                    ((2, 40, 4, 16), jnp.float32),
                ]
            ),
        ),
        "mla_decode": (
            dec,
            (
                spec((64, 16, 512), bf),
                spec((64, 16, 64), bf),
                spec((64, 8192, 512), bf),
                spec((64, 8192, 64), bf),
                spec((64,), jnp.int32),
            ),
        ),
    }
    allow = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for name, (fn, args) in programs.items():
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=allow)(*args)
        assert "__gpu$xla.gpu.triton" in exported.mlir_module(), name
