"""Expert parallelism: routed experts split over the ``expert`` mesh axis, tokens moved to them by all-to-all.

``routed_experts`` is a drop-in for ``r1jax.moe.routed_experts``. Without a mesh (or with ``expert`` of size 1) it
is that function; under ``jax.set_mesh`` with ``expert > 1`` it runs inside ``jax.shard_map`` over the whole mesh:

1. every device routes its own tokens (batch is split over ``data``/``fsdp``/``expert``) and sorts its T_l * k
   assignments by expert, hence by destination shard (expert // experts_per_shard);
2. **dispatch**: an ``all_to_all`` over ``expert`` sends each destination its assignments (token rows + local expert
   ids) in a padded chunk of C rows;
3. the receiving device sorts what it got by local expert and runs the SwiGLU experts as grouped matmuls
   (``moe.grouped_matmul``), padding rows last and outside every group (they come out zero);
4. **combine**: the reverse ``all_to_all`` returns each result row to the device and slot it came from, which
   weights it by its gate and scatter-adds it into its token; with ``expert_ffw`` split over ``tensor`` the partial
   sums are ``psum``-ed over ``tensor`` once, on the [T_l, d] output.

Dropless, with no capacity factor: a token's k experts are distinct, so one device sends at most
``C = T_l * min(k, experts_per_shard)`` rows to one destination, and the buffers are [n_expert_shards, C, d] — the
worst case, never a guess. Rows past a chunk's fill are padding. ``jax.lax.ragged_all_to_all`` would send only the
filled rows, but XLA:CPU (jax 0.10.2) does not implement it ("HLO opcode ragged-all-to-all is not supported"), so the
tested path here is the padded one; its cost is n_expert_shards x the routed activations in the dispatch buffers
(see ``configs/v3_671b.py`` for what that means at scale).

Expert weights enter the shard_map split over ``expert`` (and ``tensor`` on expert_ffw) but whole along ``embed``:
XLA all-gathers their fsdp shards before the layer and reduce-scatters their gradients after it, as FSDP does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from r1jax import moe, sharding

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def enabled(n_experts: int) -> bool:
    """True when a mesh is set whose ``expert`` axis splits ``n_experts``."""
    mesh = sharding.current_mesh()
    if mesh is None or EXPERT_AXIS not in mesh.axis_names:
        return False
    n_ep = mesh.shape[EXPERT_AXIS]
    return n_ep > 1 and n_experts % n_ep == 0


def routed_experts(x: jax.Array, weights: jax.Array, idx: jax.Array, p: dict) -> jax.Array:
    """Dropless SwiGLU experts for ``x[T, d]`` routed by ``idx[T, k]`` with gates ``weights[T, k]`` -> [T, d].

    Same contract as ``moe.routed_experts``; expert-parallel all-to-all dispatch when ``enabled``.
    """
    n_exp = p["gate"].shape[0]
    if not enabled(n_exp):
        return moe.routed_experts(x, weights, idx, p)
    mesh = sharding.current_mesh()
    n_tok, d = x.shape
    f = p["gate"].shape[-1]
    tok_spec = sharding.logical_to_spec(("batch", None), (n_tok, d), mesh)
    if EXPERT_AXIS not in sharding.spec_axes(tok_spec):  # tokens not split over expert shards: nothing to exchange
        return moe.routed_experts(x, weights, idx, p)
    gate_spec = sharding.logical_to_spec(("experts", None, "expert_ffw"), (n_exp, d, f), mesh)
    down_spec = PartitionSpec(gate_spec[0], gate_spec[2], None)
    tensor_split = TENSOR_AXIS in sharding.spec_axes(gate_spec)
    fn = jax.shard_map(
        lambda xl, wl, il, g, u, dn: _dispatch_compute_combine(xl, wl, il, g, u, dn, n_exp, tensor_split),
        in_specs=(tok_spec, tok_spec, tok_spec, gate_spec, gate_spec, down_spec),
        out_specs=tok_spec,
    )
    return fn(x, weights, idx, p["gate"], p["up"], p["down"])


def dispatch_capacity(tokens_per_shard: int, k: int, experts_per_shard: int) -> int:
    """Rows one device may send to one expert shard: each token's k experts are distinct (dropless worst case)."""
    return tokens_per_shard * min(k, experts_per_shard)


def _dispatch_compute_combine(x, weights, idx, w_gate, w_up, w_down, n_exp: int, tensor_split: bool):
    """Per-device body: x[T_l, d], idx/weights [T_l, k]; experts [E_l, d, f_l] for this device's expert shard."""
    n_tok, k = idx.shape
    n_ep = jax.lax.axis_size(EXPERT_AXIS)
    e_local = n_exp // n_ep
    cap = dispatch_capacity(n_tok, k, e_local)
    dt = x.dtype

    # 1. sort assignments by expert (so by destination shard); slot of each within its destination's chunk
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    expert = flat[order]
    token = order // k
    dest = expert // e_local
    counts = jnp.bincount(dest, length=n_ep)
    slot = jnp.arange(flat.shape[0]) - (jnp.cumsum(counts) - counts)[dest]

    # 2. dispatch: padded chunks [n_ep, cap, d]; padding rows carry the sentinel local expert id e_local
    send = jnp.zeros((n_ep, cap, x.shape[1]), dt).at[dest, slot].set(x[token])
    send_ids = jnp.full((n_ep, cap), e_local, jnp.int32).at[dest, slot].set(expert % e_local)
    recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)
    recv_ids = jax.lax.all_to_all(send_ids, EXPERT_AXIS, 0, 0, tiled=True)

    # 3. grouped matmuls over this shard's experts, padding rows last
    rows = recv.reshape(n_ep * cap, -1)
    ids = recv_ids.reshape(-1)
    by_expert = jnp.argsort(ids, stable=True)
    sizes = jnp.bincount(ids, length=e_local + 1)[:e_local].astype(jnp.int32)
    xs = rows[by_expert]
    gate = moe.grouped_matmul(xs, w_gate.astype(dt), sizes)
    up = moe.grouped_matmul(xs, w_up.astype(dt), sizes)
    ys = moe.grouped_matmul(jax.nn.silu(gate) * up, w_down.astype(dt), sizes)
    y = jnp.zeros_like(ys).at[by_expert].set(ys).reshape(n_ep, cap, -1)

    # 4. combine: results go back to where they came from, weighted by their gates, summed per token
    back = jax.lax.all_to_all(y, EXPERT_AXIS, 0, 0, tiled=True)
    gates = weights.reshape(-1)[order].astype(dt)
    out = jnp.zeros((n_tok, x.shape[1]), dt).at[token].add(back[dest, slot] * gates[:, None])
    return jax.lax.psum(out, TENSOR_AXIS) if tensor_split else out
