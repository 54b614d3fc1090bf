"""Ahead-of-time TPU compiles of the Pallas kernels through Mosaic, on a CPU-only machine.

Interpret mode accepts block shapes that Mosaic rejects (tiling, layouts, unsupported ops); this test lowers
and compiles the real kernels for v5e, v5p and v6e at production shapes using libtpu's topology descriptions:
flash attention forward and backward (t = 4096, 16 heads, MLA head dims 192/128, bf16, causal), a GQA variant
with segment ids, and absorbed-MLA decode (batch 64 x 16 heads, 8192-entry cache, 512 latent + 64 rope).

Run with JAX_PLATFORMS=cpu; skipped when libtpu is not installed (`pip install "jax[tpu]"`).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'jax[tpu]'); TPU AOT compiles need it", allow_module_level=True)
if os.environ.get("JAX_PLATFORMS", "cpu") != "cpu":
    pytest.skip("TPU AOT compile tests run with JAX_PLATFORMS=cpu", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from test_kernels import K  # noqa: E402  (r1jax.kernels, or the source folder when not installed)

TARGETS = ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"]
B, T, H, DQK, DV = 1, 4096, 16, 192, 128
DEC_B, DEC_H, DEC_S, C, P = 64, 16, 8192, 512, 64


@pytest.fixture(scope="module", params=TARGETS)
def device(request):
    try:
        topo = topologies.get_topology_desc(request.param, platform="tpu")
    except Exception as e:  # an older/newer libtpu may not know a name
        pytest.skip(f"libtpu cannot describe {request.param}: {e}")
    dev = topo.devices[0]
    # Mosaic reads the chip generation from the default device while lowering.
    with jax.default_device(dev):
        yield dev


def _spec(dev, shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(dev))


def _compile(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text(), "the Pallas kernel did not lower through Mosaic"
    return compiled


def _temp_bytes(compiled):
    mem = compiled.memory_analysis()
    return None if mem is None else mem.temp_size_in_bytes


def _fwd(q, k, v):
    return K.flash_attention(q, k, v, causal=True, interpret=False)


def _bwd(q, k, v, do):
    _, vjp = jax.vjp(_fwd, q, k, v)
    return vjp(do)


def test_flash_attention_forward_compiles(device):
    qs = _spec(device, (B, T, H, DQK))
    compiled = _compile(_fwd, qs, qs, _spec(device, (B, T, H, DV)))
    temp = _temp_bytes(compiled)
    assert temp is None or temp < B * H * T * T * 2, "a t x s score matrix reached HBM"


def test_flash_attention_backward_compiles(device):
    qs, vs = _spec(device, (B, T, H, DQK)), _spec(device, (B, T, H, DV))
    compiled = _compile(_bwd, qs, qs, vs, vs)
    temp = _temp_bytes(compiled)
    assert temp is None or temp < B * H * T * T * 2, "a t x s matrix reached HBM in the backward"


def test_flash_attention_gqa_segments_fwd_bwd_compiles(device):
    hk = 4

    def loss(q, k, v, seg):
        out = K.flash_attention(q, k, v, causal=True, segment_ids=seg, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    args = (
        _spec(device, (B, T, H, DQK)),
        _spec(device, (B, T, hk, DQK)),
        _spec(device, (B, T, hk, DV)),
        _spec(device, (B, T), jnp.int32),
    )
    _compile(jax.grad(loss, argnums=(0, 1, 2)), *args)


def test_mla_decode_compiles(device):
    def dec(ql, qr, lat, rope, lengths):
        return K.mla_decode(ql, qr, lat, rope, lengths, sm_scale=0.1, interpret=False)

    args = (
        _spec(device, (DEC_B, DEC_H, C)),
        _spec(device, (DEC_B, DEC_H, P)),
        _spec(device, (DEC_B, DEC_S, C)),
        _spec(device, (DEC_B, DEC_S, P)),
        _spec(device, (DEC_B,), jnp.int32),
    )
    compiled = _compile(dec, *args)
    temp = _temp_bytes(compiled)
    assert temp is None or temp < DEC_B * DEC_S * C * 2, "the latent cache was copied"
