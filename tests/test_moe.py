"""The CPU grouped matmul (tiles per group) against a per-group numpy reference and jax.lax.ragged_dot: values and
gradients, empty groups, groups larger than a tile, padding rows past the groups; the TPU/GPU ragged_dot with its
tiled weight gradient against ragged_dot's own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import moe
from r1jax.moe import _tiled_grouped_matmul, grouped_matmul


def _reference(x, w, sizes):
    out = np.zeros((x.shape[0], w.shape[2]), np.float64)
    start = 0
    for g, n in enumerate(sizes):
        out[start : start + n] = x[start : start + n].astype(np.float64) @ w[g].astype(np.float64)
        start += n
    return out  # rows past sum(sizes): zero


@pytest.mark.parametrize("sizes", [[5, 0, 17, 3], [0, 0, 40, 0], [1, 1, 1, 1], [9, 12, 0, 6]])
@pytest.mark.parametrize("tile", [4, 8])
def test_grouped_matmul_matches_the_per_group_product(sizes, tile, monkeypatch):
    m = 40  # [9, 12, 0, 6] leaves 13 padding rows
    kx, kw, kg = jax.random.split(jax.random.key(sum(sizes) + tile), 3)
    x = jax.random.normal(kx, (m, 6))
    w = jax.random.normal(kw, (4, 6, 5))
    gs = jnp.asarray(sizes, jnp.int32)
    want = _reference(np.asarray(x), np.asarray(w), sizes)
    np.testing.assert_allclose(_tiled_grouped_matmul(x, w, gs, tile), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(grouped_matmul, static_argnames="tile")(x, w, gs, tile=tile), want, rtol=1e-5,
                               atol=1e-5)  # fmt: skip

    ct = jax.random.normal(kg, (m, 5))

    def loss(fn, x, w):
        return jnp.sum(fn(x, w) * ct)

    ours = jax.grad(lambda x, w: loss(lambda a, b: grouped_matmul(a, b, gs, tile=tile), x, w), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda x, w: loss(lambda a, b: jax.lax.ragged_dot(a, b, gs), x, w), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    # the TPU/GPU path: ragged_dot forward, its weight gradient by tiles (lowered on CPU here, tile as given)
    monkeypatch.setattr(moe, "WEIGHT_GRAD_TILE", tile)
    tpu = jax.grad(lambda x, w: loss(lambda a, b: moe._ragged_dot(a, b, gs), x, w), argnums=(0, 1))(x, w)
    for a, b in zip(tpu, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [[300, 0, 212, 400], [0, 0, 1024, 0]])
def test_tpu_weight_gradient_kernel_matches_the_tiles(sizes):
    """megablox ``tgmm`` (interpreted on CPU), as the TPU weight gradient runs it: rows past the groups count for
    nothing."""
    m, k, n = 1024, 256, 128
    x = jax.random.normal(jax.random.key(0), (m, k))
    dy = jax.random.normal(jax.random.key(1), (m, n))
    gs = jnp.asarray(sizes, jnp.int32)
    want = moe._tiled_group_outer(x, dy, gs, 64)
    np.testing.assert_allclose(moe._megablox_group_outer(x, dy, gs, interpret=True), want, rtol=1e-5, atol=1e-4)
