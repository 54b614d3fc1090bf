"""DeepSeekMoE: router variants and dropless routed experts.

Einsum alphabet as in ``model.py``; here ``T`` is flattened tokens (b*t) and ``a`` is routed assignments (T*k).

Routers (all scores in float32):
- softmax "greedy" (V2): top-k of softmax scores.
- softmax "group_limited_greedy" (V2): experts split into ``n_group`` groups; keep the ``topk_group`` groups with the
  highest max score; top-k among the kept experts (dropped experts score 0.0, as transformers masks them).
- sigmoid "noaux_tc" (V3): selection uses ``sigmoid + e_score_correction_bias``; a group's score is the sum of its two
  best biased scores; dropped groups get -inf; gate weights are the *unbiased* sigmoid scores of the chosen experts.
Then optionally ``w /= sum(w)`` (norm_topk_prob) and ``w *= routed_scaling_factor``. Routing replay (R3): given
recorded experts, ``route`` skips the selection and gates them by the current scores, so a teacher-forced pass uses
the sampler's experts while the router still gets gradients.

Experts are dropless: assignments are sorted by expert and run through a grouped matmul (``grouped_matmul``:
``jax.lax.ragged_dot``, tiled on CPU), so no token is ever dropped and no capacity factor exists. Expert loads are
returned for auxiliary-loss-free balancing.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig, Scoring, TopkMethod


def route(
    x: jax.Array, w_router: jax.Array, bias: jax.Array, cfg: ModelConfig, idx: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Router for tokens ``x[T, d]`` -> (weights f32[T, k], expert indices int32[T, k]).

    ``idx`` int32[T, k] replays recorded experts (routing replay: the experts the sampler chose) instead of selecting
    them; the weights are still this call's scores of those experts, normalised as usual, so gradients reach
    ``w_router`` through them.
    """
    logits = jnp.einsum("Td,de->Te", x.astype(jnp.float32), w_router.astype(jnp.float32))
    scores = jax.nn.sigmoid(logits) if cfg.scoring == Scoring.SIGMOID else jax.nn.softmax(logits, axis=-1)
    if idx is None:
        idx = _select(scores, bias, cfg)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx.astype(jnp.int32)


def _select(scores: jax.Array, bias: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The ``cfg.topk_method`` choice of experts from router scores f32[T, e] -> indices [T, k]."""
    n_tok, n_exp, k = scores.shape[0], cfg.n_experts, cfg.experts_per_token
    grouped = (n_tok, cfg.n_group, n_exp // cfg.n_group)
    if cfg.topk_method == TopkMethod.GREEDY:
        return jax.lax.top_k(scores, k)[1]
    if cfg.topk_method == TopkMethod.GROUP_LIMITED_GREEDY:
        group_score = scores.reshape(grouped).max(-1)
        keep = _group_mask(group_score, cfg.topk_group, grouped)
        return jax.lax.top_k(jnp.where(keep, scores, 0.0), k)[1]
    # NOAUX_TC: the bias steers selection only
    choice = scores + bias.astype(jnp.float32)
    group_score = jax.lax.top_k(choice.reshape(grouped), 2)[0].sum(-1)
    keep = _group_mask(group_score, cfg.topk_group, grouped)
    return jax.lax.top_k(jnp.where(keep, choice, -jnp.inf), k)[1]


def _group_mask(group_score: jax.Array, topk_group: int, grouped: tuple[int, int, int]) -> jax.Array:
    """Boolean [T, e]: experts whose group is among the ``topk_group`` best groups."""
    _, gidx = jax.lax.top_k(group_score, topk_group)
    kept = jnp.zeros(group_score.shape, bool).at[jnp.arange(grouped[0])[:, None], gidx].set(True)
    return jnp.broadcast_to(kept[:, :, None], grouped).reshape(grouped[0], -1)


def _tile_layout(group_sizes: jax.Array, m: int, tile: int):
    """Rows sorted by group, laid out so that each group starts at a tile boundary: (destination row of each of the
    ``m`` rows, out of range for rows past the last group; number of tiles; the group of each tile)."""
    g = group_sizes.shape[0]
    n_tiles = -(-m // tile) + g  # each group wastes less than one tile
    ends = jnp.cumsum(group_sizes)
    tiles = -(-group_sizes // tile)
    tile_ends = jnp.cumsum(tiles)
    rows = jnp.arange(m)
    group = jnp.searchsorted(ends, rows, side="right")  # g for rows past the last group (padding)
    valid = group < g
    group = jnp.minimum(group, g - 1)
    dest = (tile_ends - tiles)[group] * tile + rows - (ends - group_sizes)[group]
    dest = jnp.where(valid, dest, n_tiles * tile)  # out of range: dropped on the way in, zero on the way out
    tile_group = jnp.minimum(jnp.searchsorted(tile_ends, jnp.arange(n_tiles), side="right"), g - 1)
    return dest, n_tiles, tile_group


def _to_tiles(x: jax.Array, dest: jax.Array, n_tiles: int, tile: int) -> jax.Array:
    return jnp.zeros((n_tiles * tile, x.shape[1]), x.dtype).at[dest].set(x, mode="drop").reshape(n_tiles, tile, -1)


def _tiled_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
    """``ragged_dot`` as tiles: each group's rows are moved to start at a tile boundary, every tile is multiplied by
    its group's matrix (a batched matmul over tiles), and the rows are moved back. Work: at most ``m + g x tile``
    rows instead of the g x m of a dense fallback."""
    dest, n_tiles, tile_group = _tile_layout(group_sizes, x.shape[0], tile)
    buf = _to_tiles(x, dest, n_tiles, tile)
    out = jnp.einsum("tik,tkn->tin", buf, w[tile_group], preferred_element_type=jnp.float32).astype(x.dtype)
    return out.reshape(n_tiles * tile, -1).at[dest].get(mode="fill", fill_value=0)


def _tiled_group_outer(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
    """Per-group ``x_g^T dy_g`` -> [g, k, n] (the weight gradient of a grouped matmul) as tiles: a batched matmul
    over tiles, summed into their groups. Work: at most ``m + g x tile`` rows (a ragged contraction is lowered
    densely over every group by XLA:TPU, g x the work); memory: one [k, n] float32 block per tile."""
    dest, n_tiles, tile_group = _tile_layout(group_sizes, x.shape[0], tile)
    xs, dys = _to_tiles(x, dest, n_tiles, tile), _to_tiles(dy, dest, n_tiles, tile)
    per_tile = jnp.einsum("tik,tin->tkn", xs, dys, preferred_element_type=jnp.float32)
    return jnp.zeros((group_sizes.shape[0], *per_tile.shape[1:]), jnp.float32).at[tile_group].add(per_tile)


WEIGHT_GRAD_TILE = 512  # rows per tile of the weight gradient: < 512 padding rows per group, [k, n] f32 per tile


def _megablox_group_outer(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, interpret: bool = False) -> jax.Array:
    """Per-group ``x_g^T dy_g`` -> f32 [g, k, n] by the TPU grouped-matmul kernel (Pallas megablox ``tgmm``: each
    tile of rows visits only its groups); ``_tiled_group_outer`` where the shapes do not tile."""
    (m, k), n = x.shape, dy.shape[1]
    tiling = (min(m, 512), min(k, 512), min(n, 512))
    if m % tiling[0] or k % 128 or n % 128:
        return _tiled_group_outer(x, dy, group_sizes, WEIGHT_GRAD_TILE)
    megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")  # the package's gmm shadows it
    return megablox.tgmm(x.T, dy, group_sizes, jnp.float32, tiling=tiling, interpret=interpret)


def _group_outer(x: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Per-group ``x_g^T dy_g`` -> f32 [g, k, n]: the megablox kernel on TPU, tiles elsewhere."""
    return jax.lax.platform_dependent(
        x,
        dy,
        group_sizes,
        tpu=_megablox_group_outer,
        default=lambda *a: _tiled_group_outer(*a, tile=WEIGHT_GRAD_TILE),
    )


@jax.custom_vjp
def _ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``jax.lax.ragged_dot`` whose weight gradient is ``_group_outer``; the input gradient is a ragged_dot."""
    return jax.lax.ragged_dot(x, w, group_sizes)


def _ragged_dot_fwd(x, w, group_sizes):
    return jax.lax.ragged_dot(x, w, group_sizes), (x, w, group_sizes)


def _ragged_dot_bwd(res, dy):
    x, w, group_sizes = res
    dx = jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), group_sizes)
    dw = _group_outer(x, dy, group_sizes).astype(w.dtype)
    return dx.astype(x.dtype), dw, None


_ragged_dot.defvjp(_ragged_dot_fwd, _ragged_dot_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tile: int = 64) -> jax.Array:
    """``jax.lax.ragged_dot(x[m, k], w[g, k, n], group_sizes[g])``: rows sorted by group, rows past
    ``sum(group_sizes)`` give zeros. TPU and GPU lower ``ragged_dot`` natively, but its weight gradient (a ragged
    contraction) densely over every group, so that gradient is ``_group_outer`` (``_ragged_dot``); on CPU
    ``ragged_dot`` is computed densely over every group (g x the work), so the CPU lowering uses
    ``_tiled_grouped_matmul``. The choice is made per lowering platform, so a TPU program compiled on a CPU host
    still gets ``ragged_dot``."""
    return jax.lax.platform_dependent(
        x,
        w,
        group_sizes,
        cpu=lambda *a: _tiled_grouped_matmul(*a, tile=tile),
        default=_ragged_dot,
    )


def routed_experts(x: jax.Array, weights: jax.Array, idx: jax.Array, p: dict) -> jax.Array:
    """Dropless SwiGLU experts: ``x[T, d]`` routed by ``idx[T, k]`` with gate ``weights[T, k]`` -> [T, d].

    ``p`` holds ``gate``/``up`` [e, d, f] and ``down`` [e, f, d].
    """
    n_tok, k = idx.shape
    n_exp = p["gate"].shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat, length=n_exp).astype(jnp.int32)
    xs = x[token]
    gate = grouped_matmul(xs, p["gate"].astype(x.dtype), group_sizes)
    up = grouped_matmul(xs, p["up"].astype(x.dtype), group_sizes)
    y = grouped_matmul(jax.nn.silu(gate) * up, p["down"].astype(x.dtype), group_sizes)
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    return jnp.zeros((n_tok, x.shape[-1]), y.dtype).at[token].add(y)


def expert_load(idx: jax.Array, n_experts: int, token_mask: jax.Array | None = None) -> jax.Array:
    """Tokens routed to each expert, f32[e] (input to auxiliary-loss-free bias balancing); ``token_mask`` [T]
    leaves padding out."""
    weights = None if token_mask is None else jnp.repeat(token_mask.astype(jnp.float32), idx.shape[-1])
    return jnp.bincount(idx.reshape(-1), weights=weights, length=n_experts).astype(jnp.float32)


def balance_bias(bias: jax.Array, load: jax.Array, gamma: float) -> jax.Array:
    """Auxiliary-loss-free balancing (DeepSeek-V3 section 2.1.2): move each expert's selection bias by ``gamma``
    against the sign of its load's deviation from the mean load. ``bias`` and ``load`` are [..., e]."""
    return bias - gamma * jnp.sign(load - load.mean(-1, keepdims=True))
