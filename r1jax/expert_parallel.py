"""Expert parallelism: routed experts split over mesh axes, tokens moved to them by all-to-all in rounds.

``routed_experts`` is a drop-in for ``r1jax.moe.routed_experts``. Without a mesh (or when no mesh axis splits the
experts) it is that function; under ``jax.set_mesh`` it runs inside ``jax.shard_map`` over the whole mesh. Which axes
split the experts is the rules table's ``experts`` noun: ``expert`` x ``tensor`` where that divides them, so every
device holds whole experts (V3 on 2048 chips: 256 experts over expert 16 x tensor 8, two per chip) and the ``tensor``
axis is used as expert parallelism, not to split each expert's ffw (which would make every device of a tensor group
move all the group's tokens and psum [T, d] partial sums). ``Layout`` says how one layer splits:

1. every device takes its own tokens: the batch is split over ``data``/``fsdp``/``expert`` and, sequence parallel,
   over ``tensor`` (``model.RESIDUAL``); tokens still replicated over an axis of the group (e.g. a decode step of
   one token) are split locally (``Layout.split``, padded; padding routes nowhere) and all-gathered afterwards;
2. it sorts its T_l * k assignments by expert, hence by destination shard (expert // experts_per_shard), and the
   group (the devices of the all-to-all) all-gathers its [source, destination] row counts;
3. **dispatch in rounds** by ragged all-to-all (``ragged_exchange``): a destination shard receives what its
   sources send it in source order, C = ``round_rows`` = ceil(T_l * k x slack) rows per round (``slack`` x the
   mean a shard receives); round r moves the rows at positions [r C, (r + 1) C) of that order, each source's
   contiguous part of it, into a [C, d] receive buffer (unfilled rows carry the sentinel local expert id);
4. the receiving device sorts what it got by local expert and runs the SwiGLU experts as grouped matmuls
   (``moe.grouped_matmul``), unfilled rows last and outside every group (they come out zero);
5. **combine**: the reverse ragged all-to-all returns each result row to its position in its source's list;
   after the last round each row is weighted by its gate and added into its token (with ``expert_ffw`` split over
   ``tensor``, where ``tensor`` does not divide the experts, the partial sums are ``psum``-ed once).

Dropless: rounds continue until every assignment is delivered. The round count R is what the most
loaded shard needs, ``dispatch_rounds`` = max ceil(received / C), made equal on every device by a ``pmax`` over the
mesh (the collectives in the loop must match). Under balanced routing — what DeepSeek-V3's auxiliary-loss-free bias
balancing steers towards — what a shard receives from a whole group varies little (V3 on 2048 chips: the busiest of
128 shards gets 1.05x the mean), so R is 1 with a 25% slack; a skewed batch costs more rounds, never dropped
tokens. (A padded all-to-all of [n_shards, C, d] buffers has to size C by the busiest (source, destination) pair
instead: 1.9x its 32-row mean for V3.) XLA:CPU does not implement ``ragged_all_to_all`` ("HLO opcode
ragged-all-to-all is not supported"), so on CPU ``ragged_exchange`` emulates its semantics with a padded
``all_to_all`` and a scatter (tested against the collective's documented example); TPU and GPU lower the collective.

The rounds are a ``while_loop`` with a data-dependent trip count, which reverse-mode cannot differentiate. The
routed experts have a custom VJP (``_expert_parallel``): its residuals are the inputs and each device's expert rows
(``EXPERT_ROWS``, kept by the model's remat policies, so a layer's recompute runs no rounds), and its backward is
one loop over the same rounds recomputing each under ``jax.vjp`` (``sum_over_rounds_vjp``; the ragged all-to-alls
transpose to ragged all-to-alls). XLA counts a loop body once in its cost analysis, so a compiled program's FLOPs and
collective bytes hold one round (``tools/aot_compile.py`` scales them by an expected R). In profiles and HLO
metadata a round's ops sit under the name scope ``moe_round``.

Expert weights enter the shard_map split over the group but whole along ``embed``: XLA all-gathers their fsdp shards
before the layer and reduce-scatters their gradients after it, as FSDP does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from r1jax import moe, sharding

TENSOR_AXIS = "tensor"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one MoE layer's routed experts and tokens split over a mesh.

    ``group``: the mesh axes that split the experts (the rules table's ``experts`` noun), in shard order; the
    all-to-alls run over them. ``split``: the group axes the tokens are replicated over (``tensor``: activations
    are whole on it); each device takes its own 1/``split_size`` of the tokens, so no row is dispatched twice, and
    the outputs are all-gathered over them after the combine. ``tokens``: tokens per device after that split
    (padded to a multiple of ``split_size``; padding rows are never dispatched). ``ffw_split``: ``expert_ffw``
    is split over ``tensor`` (only when ``tensor`` is not in the group): partial sums are ``psum``-ed.
    """

    group: tuple[str, ...]
    split: tuple[str, ...]
    n_shards: int
    split_size: int
    tokens: int
    ffw_split: bool
    tok_spec: PartitionSpec
    gate_spec: PartitionSpec


TOKEN_AXES = {1: ("batch",), 2: ("batch", "seq")}  # tokens [T] or [b, t]: their logical axes


def layout(tokens: int | tuple[int, ...], n_exp: int, d: int, f: int, mesh) -> Layout | None:
    """The expert-parallel layout of ``tokens`` (a count T, or the shape (b, t) of a sequence-parallel batch) and
    ``n_exp`` experts on ``mesh``, or None when the experts are not split (no mesh, or no axis of the ``experts``
    rule divides them)."""
    if mesh is None:
        return None
    lead = (tokens,) if isinstance(tokens, int) else tuple(tokens)
    gate_spec = sharding.logical_to_spec(("experts", None, "expert_ffw"), (n_exp, d, f), mesh)
    group = tuple(sharding.spec_axes(PartitionSpec(gate_spec[0])))
    if not group:
        return None
    tok_spec = sharding.logical_to_spec((*TOKEN_AXES[len(lead)], None), (*lead, d), mesh)
    split = tuple(a for a in group if a not in sharding.spec_axes(tok_spec))
    split_size = math.prod(mesh.shape[a] for a in split)
    t_l = math.prod(lead) // sharding.shard_count(tok_spec, mesh)
    return Layout(
        group=group,
        split=split,
        n_shards=math.prod(mesh.shape[a] for a in group),
        split_size=split_size,
        tokens=-(-t_l // split_size),
        ffw_split=TENSOR_AXIS in sharding.spec_axes(PartitionSpec(gate_spec[2])),
        tok_spec=tok_spec,
        gate_spec=gate_spec,
    )


def enabled(n_experts: int) -> bool:
    """True when a mesh is set whose axes split ``n_experts`` (the rules table's ``experts`` noun)."""
    return layout(1, n_experts, 1, 1, sharding.current_mesh()) is not None


def routed_experts(x: jax.Array, weights: jax.Array, idx: jax.Array, p: dict, slack: float = 1.25) -> jax.Array:
    """Dropless SwiGLU experts for ``x[T, d]`` (or ``[b, t, d]``) routed by ``idx[..., k]`` with gates
    ``weights[..., k]`` -> ``x.shape``.

    Same contract as ``moe.routed_experts``; expert-parallel ragged all-to-all dispatch in rounds of
    ``round_rows(..., slack)`` rows per expert shard when the mesh splits the experts (``layout``).
    """
    (d, k), (n_exp, _, f) = (x.shape[-1], idx.shape[-1]), p["gate"].shape
    mesh = sharding.current_mesh()
    lay = layout(x.shape[:-1], n_exp, d, f, mesh)
    if lay is None:
        return moe.routed_experts(*_flat(x, weights, idx), p).reshape(x.shape)
    plan = _Static(lay, n_exp, k, slack)
    return _expert_parallel(plan, x, weights, idx, p["gate"], p["up"], p["down"])


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the expert-parallel call fixes at trace time (hashable: a ``custom_vjp`` non-differentiable argument)."""

    lay: Layout
    n_exp: int
    k: int
    slack: float

    def specs(self) -> tuple[PartitionSpec, ...]:
        """in_specs of (x, weights, idx, gate, up, down)."""
        tok, gate = self.lay.tok_spec, self.lay.gate_spec
        return (tok, tok, tok, gate, gate, PartitionSpec(gate[0], gate[2], None))

    @property
    def e_local(self) -> int:
        return self.n_exp // self.lay.n_shards

    @property
    def cap(self) -> int:
        """Rows an expert shard receives per round (``round_rows``)."""
        return round_rows(self.lay.tokens, self.k, self.lay.n_shards, self.e_local, self.slack)


EXPERT_ROWS = "expert_rows"  # checkpoint name of the expert-parallel residual (the per-assignment expert outputs)
_PER_DEVICE = {"check_vma": False}  # moe._group_outer's TPU kernel is a pallas_call without varying-axes types


def _replicated_over(spec: PartitionSpec) -> tuple[str, ...]:
    return tuple(a for a in sharding.current_mesh().axis_names if a not in sharding.spec_axes(spec))


def _every_device() -> PartitionSpec:
    """A per-device array's spec: the leading axis split over every mesh axis."""
    return PartitionSpec(tuple(sharding.current_mesh().axis_names))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _expert_parallel(plan: _Static, x, weights, idx, w_gate, w_up, w_down):
    """The routed experts under ``shard_map``. Custom VJP: the residuals are the inputs and each device's expert
    output rows (``EXPERT_ROWS``, [T_l x k, d] per device; the model's remat policies keep them). So the forward
    loop of rounds runs once per step: a layer's remat recompute has no use for it, and the backward is one loop
    (``sum_over_rounds_vjp``: each round recomputed under ``jax.vjp``) with no forward loop ahead of it."""
    return _forward_rows(plan, x, weights, idx, w_gate, w_up, w_down)[0]


def _forward_rows(plan: _Static, *args):
    out_specs = (plan.lay.tok_spec, _every_device())
    fn = jax.shard_map(partial(_device_forward, plan), in_specs=plan.specs(), out_specs=out_specs, **_PER_DEVICE)
    return fn(*args)


def _expert_parallel_fwd(plan, *args):
    out, rows = _forward_rows(plan, *args)
    return out, (args, checkpoint_name(rows, EXPERT_ROWS))


def _expert_parallel_bwd(plan, res, ct):
    args, rows = res
    tok, _, _, gate, up, down = plan.specs()
    in_specs = (*plan.specs(), _every_device(), tok)
    out_specs = (tok, tok, gate, up, down)
    fn = jax.shard_map(partial(_device_backward, plan), in_specs=in_specs, out_specs=out_specs, **_PER_DEVICE)
    dx, dw, dg, du, dd = fn(*args, rows, ct)
    return dx, dw, None, dg, du, dd


_expert_parallel.defvjp(_expert_parallel_fwd, _expert_parallel_bwd)


def _prepare(plan: _Static, x, weights, idx):
    """One device's share: ((its tokens xs [T, d], its gates [T * k] in sorted assignment order), (rounds, plan)).
    ``plan`` = (token and local expert of each sorted assignment, the group's [source, destination] row counts);
    every device runs the most rounds any expert shard needs."""
    lay = plan.lay
    xs, weights = _my_tokens(lay, x), _my_tokens(lay, weights)
    idx = _my_tokens(lay, idx, fill=plan.n_exp)  # padding tokens route to no expert: sorted last, sent nowhere
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    expert = flat[order]
    counts = jnp.bincount(expert // plan.e_local, length=lay.n_shards).astype(jnp.int32)  # padding: no shard
    counts = jax.lax.all_gather(counts, lay.group)  # [source, destination] over the group
    n_rounds = jax.lax.pmax(dispatch_rounds(counts.sum(0), plan.cap), tuple(sharding.current_mesh().axis_names))
    consts = (order // plan.k, (expert % plan.e_local).astype(jnp.int32), counts)
    return (xs, weights.reshape(-1)[order]), (n_rounds, consts)


def _round_fn(plan: _Static):
    return partial(dispatch_round, cap=plan.cap, e_local=plan.e_local, axis=plan.lay.group)


def _combine(plan: _Static, rows, gates, token, n_in: int):
    """Each assignment's row [T * k, d / L, L] weighted by its gate and summed into its token -> [n_in, d] (the
    device's input tokens: its share gathered back over ``Layout.split``)."""
    lay = plan.lay
    out = jnp.zeros((lay.tokens, *rows.shape[1:]), rows.dtype).at[token].add(rows * gates[:, None, None])
    out = out.reshape(lay.tokens, -1)
    if lay.ffw_split:
        out = jax.lax.psum(out, TENSOR_AXIS)
    if lay.split:
        out = jax.lax.all_gather(out, lay.split, axis=0, tiled=True)[:n_in]
    return out


def _flat(x, weights, idx):
    d, k = x.shape[-1], idx.shape[-1]
    return x.reshape(-1, d), weights.reshape(-1, k), idx.reshape(-1, k)


def _device_forward(plan: _Static, x, weights, idx, *ws):
    """One device: its tokens [..., d] through dispatch rounds, experts and combine -> (out [..., d], rows)."""
    xf, wf, idf = _flat(x, weights, idx)
    (xs, gates), (n_rounds, consts) = _prepare(plan, xf, wf, idf)
    ws = tuple(w.astype(x.dtype) for w in ws)
    rows = sum_over_rounds(_round_fn(plan), n_rounds, consts, (xs, *ws))
    return _combine(plan, rows, gates.astype(x.dtype), consts[0], xf.shape[0]).reshape(x.shape), rows


def _device_backward(plan: _Static, x, weights, idx, w_gate, w_up, w_down, rows, ct):
    """One device's cotangents of (x, weights, gate, up, down) from the saved rows: the combine's and the
    preparation's VJPs around one backward loop of rounds; each summed over the mesh axes its input is replicated
    over (as ``shard_map``'s own transpose does, the output cotangent divided by the devices it is replicated on)."""
    ct = ct / math.prod(sharding.current_mesh().shape[a] for a in _replicated_over(plan.lay.tok_spec))
    xf, wf, idf = _flat(x, weights, idx)
    prepared, prep_vjp, (n_rounds, consts) = jax.vjp(lambda a, w: _prepare(plan, a, w, idf), xf, wf, has_aux=True)
    ws, cast_vjp = jax.vjp(lambda *w: tuple(a.astype(x.dtype) for a in w), w_gate, w_up, w_down)
    _, combine_vjp = jax.vjp(
        lambda r, g: _combine(plan, r, g.astype(x.dtype), consts[0], xf.shape[0]), rows, prepared[1]
    )
    d_rows, d_gates = combine_vjp(ct.reshape(xf.shape))
    d_xs, *d_ws = sum_over_rounds_vjp(_round_fn(plan), n_rounds, consts, (prepared[0], *ws), d_rows)
    dx, dw = prep_vjp((d_xs, d_gates))
    cts = (dx.reshape(x.shape), dw.reshape(weights.shape), *cast_vjp(tuple(d_ws)))
    over = [_replicated_over(s) for i, s in enumerate(plan.specs()) if i != 2]  # idx has no cotangent
    return tuple(jax.lax.psum(c, axes) if axes else c for c, axes in zip(cts, over, strict=True))


def _my_tokens(lay: Layout, a: jax.Array, fill=0) -> jax.Array:
    """This device's 1/``split_size`` of the rows of ``a`` (its tokens), after padding them with ``fill`` to
    ``lay.tokens`` x ``split_size``."""
    if not lay.split:
        return a
    a = jnp.pad(a, [(0, lay.tokens * lay.split_size - a.shape[0])] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
    return jax.lax.dynamic_slice_in_dim(a, jax.lax.axis_index(lay.split) * lay.tokens, lay.tokens)


def dispatch_capacity(tokens_per_shard: int, k: int, experts_per_shard: int, n_shards: int) -> int:
    """Most rows one expert shard can receive from its group: every token of the group's ``n_shards`` devices sends
    it min(k, experts_per_shard) assignments (a token's k experts are distinct)."""
    return n_shards * tokens_per_shard * min(k, experts_per_shard)


def round_rows(tokens_per_shard: int, k: int, n_shards: int, experts_per_shard: int, slack: float) -> int:
    """Rows an expert shard receives per round, C = ceil(T_l * k * slack): ``slack`` x the mean a shard receives
    from its group, at least 1 and at most ``dispatch_capacity`` (where one round always suffices)."""
    cap = dispatch_capacity(tokens_per_shard, k, experts_per_shard, n_shards)
    return max(1, min(math.ceil(tokens_per_shard * k * slack), cap))


def dispatch_rounds(received, cap: int):
    """Rounds that deliver ``received[n_shards]`` rows to each expert shard, ``cap`` rows per shard and round."""
    return jnp.max(-(-jnp.asarray(received) // cap))


def _zeros(aval) -> jax.Array:
    """Zeros of ``aval``'s shape and dtype, varying over the same manual mesh axes (a loop carry keeps its type)."""
    z = jnp.zeros(aval.shape, aval.dtype)
    missing = _vma(aval) - _vma(jax.typeof(z))
    return jax.lax.pcast(z, tuple(sorted(missing)), to="varying") if missing else z


def _vma(aval) -> frozenset:
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def sum_over_rounds(round_fn: Callable, n_rounds: jax.Array, consts, args: tuple) -> jax.Array:
    """``sum(round_fn(r, consts, *args) for r in range(n_rounds))`` for a traced ``n_rounds``, as a ``while_loop``
    (``args``: float arrays; ``consts``: a pytree of integer arrays). Collectives inside ``round_fn`` must see the
    same ``n_rounds`` on every device they connect.

    Reverse-mode cannot differentiate the loop; ``sum_over_rounds_vjp`` is its backward. The two are separate
    functions, not one ``custom_vjp``, because ``_expert_parallel``'s own custom VJP calls the backward directly: its
    forward keeps the summed rows, so no forward loop runs ahead of the backward one."""

    def body(state):
        r, acc = state
        return r + 1, acc + round_fn(r, consts, *args)

    init = _zeros(jax.eval_shape(round_fn, jnp.int32(0), consts, *args))
    return jax.lax.while_loop(lambda s: s[0] < n_rounds, body, (jnp.int32(0), init))[1]


def sum_over_rounds_vjp(round_fn: Callable, n_rounds: jax.Array, consts, args: tuple, ct: jax.Array) -> tuple:
    """The cotangents of ``args`` given ``ct``, the cotangent of ``sum_over_rounds(round_fn, n_rounds, consts,
    args)``: a second ``while_loop`` over the same rounds that recomputes each round under ``jax.vjp`` and
    accumulates its cotangents in float32 (cast back to each argument's dtype), so the only residuals are the
    inputs, never per-round buffers."""

    def body(state):
        r, acc = state
        _, vjp = jax.vjp(lambda *a: round_fn(r, consts, *a), *args)
        return r + 1, tuple(s + c.astype(s.dtype) for s, c in zip(acc, vjp(ct), strict=True))

    init = tuple(jnp.zeros_like(a, jnp.promote_types(a.dtype, jnp.float32)) for a in args)
    acc = jax.lax.while_loop(lambda s: s[0] < n_rounds, body, (jnp.int32(0), init))[1]
    return tuple(c.astype(a.dtype) for c, a in zip(acc, args, strict=True))


@jax.named_scope("moe_round")
def dispatch_round(r, plan, x, w_gate, w_up, w_down, *, cap: int, e_local: int, axis) -> jax.Array:
    """Round ``r`` on one device: every expert shard receives the rows at positions [r * cap, (r + 1) * cap) of
    what the group sends it (sources in order, each source's run contiguous); returns this device's result rows of
    the round at their positions in its sorted assignment list, [T * k, d / L, L] (``lane_rows``), zero elsewhere.

    ``plan`` = (token [T * k]: the token of each sorted assignment, local [T * k]: its expert's index within its
    shard, counts [n_ep, n_ep]: rows each source sends each destination). ``axis``: the mesh axes of the exchanges
    (``Layout.group``). Rows travel by ``ragged_exchange``: only filled rows move, into a receive buffer of ``cap``
    rows (unfilled rows carry the sentinel local expert id and come out zero). Rows move as [d / L, L] blocks: a
    TPU moves a bf16 row of a [n, d] array as a sliver of (8, 128) tiles, a [d / 128, 128] block as whole tiles.
    """
    token, local, counts = plan
    me = jax.lax.axis_index(axis)
    offset = jnp.cumsum(counts, 0) - counts  # [src, dst]: where src's rows start among what dst receives
    start = jnp.cumsum(counts, 1) - counts  # [src, dst]: where src's run for dst starts in src's sorted list
    lo = jnp.clip(offset, r * cap, (r + 1) * cap)
    size = jnp.clip(offset + counts, r * cap, (r + 1) * cap) - lo  # [src, dst] rows moved this round
    at_src = jnp.where(size > 0, start + lo - offset, 0)  # where they sit in the source's list
    at_dst = jnp.where(size > 0, lo - r * cap, 0)  # and in the destination's receive buffer

    # dispatch: my runs to every destination; receive every source's run for me
    rows = lane_rows(x)[token]
    send = (at_src[me], size[me], at_dst[me], size[:, me])
    recv = ragged_exchange(rows, jnp.zeros((cap, *rows.shape[1:]), rows.dtype), *send, axis=axis)
    recv_ids = ragged_exchange(local, jnp.full((cap,), e_local, local.dtype), *send, axis=axis)

    # grouped matmuls over this shard's experts, unfilled rows last (outside every group: they come out zero); rows
    # are put in expert order and back by gathers (a permutation and its inverse)
    by_expert = jnp.argsort(recv_ids, stable=True)
    sizes = jnp.bincount(recv_ids, length=e_local + 1)[:e_local].astype(jnp.int32)
    xs = recv[by_expert].reshape(cap, -1)
    gate = moe.grouped_matmul(xs, w_gate, sizes)
    up = moe.grouped_matmul(xs, w_up, sizes)
    ys = lane_rows(moe.grouped_matmul(jax.nn.silu(gate) * up, w_down, sizes))
    y = ys[jnp.argsort(by_expert)]

    # combine: every source's rows go back to where they sit in its list
    back = (at_dst[:, me], size[:, me], at_src[:, me], size[me])
    return ragged_exchange(y, jnp.zeros_like(rows), *back, axis=axis)


def ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis) -> jax.Array:
    """``jax.lax.ragged_all_to_all`` over the mesh axes ``axis``: operand rows [input_offsets[j], + send_sizes[j])
    go to device j of the group, landing at its rows [output_offsets[j], + ...); this device's rows from source i
    land at the offset source i chose, recv_sizes[i] of them; other rows of ``output`` are kept. XLA:CPU does not
    implement the collective, so on CPU the same semantics are emulated with a padded ``all_to_all`` (each slice
    padded to the operand's length) and a scatter; the choice is made per lowering platform."""
    args = (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
    return jax.lax.platform_dependent(
        *args,
        cpu=partial(_emulated_ragged_all_to_all, axis=axis),
        default=partial(jax.lax.ragged_all_to_all, axis_name=axis),
    )


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis):
    span = jnp.arange(operand.shape[0])
    tail = (None,) * (operand.ndim - 1)
    rows = jnp.minimum(input_offsets[:, None] + span, operand.shape[0] - 1)
    send = jnp.where((span < send_sizes[:, None])[(..., *tail)], operand[rows], 0)  # [n, operand rows, ...]
    got = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # [n sources, operand rows, ...]
    landing = jax.lax.all_to_all(output_offsets, axis, 0, 0, tiled=True)
    at = jnp.where(span < recv_sizes[:, None], landing[:, None] + span, output.shape[0])  # past the end: dropped
    return output.at[at.reshape(-1)].set(got.reshape(-1, *operand.shape[1:]), mode="drop")


def lane_rows(a: jax.Array) -> jax.Array:
    """[n, d] -> [n, d / L, L] with L = 128 lanes where d allows (else L = d)."""
    lanes = 128 if a.shape[-1] % 128 == 0 else a.shape[-1]
    return a.reshape(a.shape[0], a.shape[-1] // lanes, lanes)
