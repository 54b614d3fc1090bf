"""The optimiser side of both training stages (SFT and GRPO): the learning-rate schedule, AdamW with a stored moment
dtype, the frozen MoE router bias and its aux-loss-free update, optimiser-state shardings, and the one
accumulate-and-apply step both stages take.

``accumulate_and_apply`` is the step: gradients of a loss summed over micro-batches (each micro-batch's loss is
normalised by the whole batch's count, so the sum is the batch's gradient), global-norm clipping and AdamW
(``make_optimizer``), then the router-bias update from the batch's expert loads. A non-finite loss or gradient
skips the step with ``lax.cond``: a branch, not a select over every parameter and both moments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from r1jax import lora, moe
from r1jax.config import ModelConfig, OptimConfig
from r1jax.model import MOE_LAYERS, Params
from r1jax.sharding import commit

Array = jax.Array


def lr_schedule(opt: OptimConfig) -> optax.Schedule:
    """Linear warmup (lr * (i + 1) / warmup_steps, so the first step is not wasted), then cosine decay over
    ``decay_steps`` to ``lr * min_lr_ratio`` (or constant when ``decay_steps == 0``)."""

    def schedule(count):
        i = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (i + 1.0) / opt.warmup_steps) if opt.warmup_steps else 1.0
        if not opt.decay_steps:
            return opt.lr * warm
        t = jnp.clip((i - opt.warmup_steps) / opt.decay_steps, 0.0, 1.0)
        cos = opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * t))
        return opt.lr * warm * cos

    return schedule


def path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_router_bias(path) -> bool:
    return "router_bias" in path_names(path)


def scale_by_adam_stored_as(dtype, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's bias-corrected m / (sqrt(v) + eps) computed in f32, with both moments stored in ``dtype`` (optax's
    ``mu_dtype`` covers only the first)."""

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, dtype)  # noqa: E731
        return optax.ScaleByAdamState(
            jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
        )

    def update(grads, state, params=None):
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), grads, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), grads, state.nu)
        count = optax.safe_int32_increment(state.count)
        c1, c2 = 1 - b1 ** f32(count), 1 - b2 ** f32(count)
        updates = jax.tree.map(lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), mu, nu, grads)
        store = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)  # noqa: E731
        return updates, optax.ScaleByAdamState(count, store(mu), store(nu))

    return optax.GradientTransformation(init, update)


def make_optimizer(opt: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping + AdamW (decay on matrices only); the router bias is frozen (its updates are zero: it is
    moved by ``moe.balance_bias`` after each step instead)."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if is_router_bias(p) else "train", params)

    def decay_mask(params):
        def decays(path, _):
            last = path_names(path)[-1]
            return not ("norm" in last or "bias" in last)

        return jax.tree_util.tree_map_with_path(decays, params)

    if opt.moment_dtype == "float32":
        adamw = optax.adamw(lr_schedule(opt), opt.b1, opt.b2, opt.eps, weight_decay=opt.weight_decay, mask=decay_mask)
    else:
        adamw = optax.chain(
            scale_by_adam_stored_as(jnp.dtype(opt.moment_dtype), opt.b1, opt.b2, opt.eps),
            optax.add_decayed_weights(opt.weight_decay, decay_mask),
            optax.scale_by_learning_rate(lr_schedule(opt)),
        )
    train = optax.chain(optax.clip_by_global_norm(opt.max_grad_norm), adamw) if opt.max_grad_norm else adamw
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def stop_router_bias(params: Params) -> Params:
    return jax.tree_util.tree_map_with_path(lambda p, x: jax.lax.stop_gradient(x) if is_router_bias(p) else x, params)


def update_router_bias(params: Params, load: Array | None, gamma: float) -> Params:
    """Aux-loss-free balancing: move the MoE router bias [L, e] against each expert's load deviation (``load`` is
    the global load f32[L, e] of the batch just trained on)."""
    if load is None or not gamma or MOE_LAYERS not in params:
        return params
    mlp = params[MOE_LAYERS]["mlp"]
    new_mlp = {**mlp, "router_bias": moe.balance_bias(mlp["router_bias"], load, gamma).astype(mlp["router_bias"].dtype)}
    return {**params, MOE_LAYERS: {**params[MOE_LAYERS], "mlp": new_mlp}}


def opt_shardings(opt_state: Any, params: Params, cfg: ModelConfig, mesh: Mesh):
    """Optimiser-state shardings: moments like their parameters (matched by dict-key path and shape), everything else
    (step counts) replicated. Fixed shardings keep the update from recompiling when XLA would pick equivalent but
    differently spelled ones."""
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_path = {}
    for path, sh in jax.tree_util.tree_flatten_with_path(lora.shardings(params, cfg, mesh))[0]:
        by_path[tuple(path_names(path))] = sh
    shapes = {tuple(path_names(p)): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def pick(path, leaf):
        names = path_names(path)  # a parameter's path is a suffix (adapters' and quantised leaves' fields too)
        for i in range(len(names)):
            key = tuple(names[i:])
            if key in by_path and shapes[key] == leaf.shape:
                return by_path[key]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def init_opt_state(optimizer: optax.GradientTransformation, params: Params, cfg: ModelConfig, mesh: Mesh | None):
    """The optimiser state of ``params``' trainable part, placed as the update returns it: on ``mesh``, moments
    sharded like their parameters (``opt_shardings``); without one, committed to the device (``sharding.commit``)."""
    train = lora.partition(params)[0]
    if mesh is None:
        return commit(jax.jit(optimizer.init)(train))
    out = opt_shardings(jax.eval_shape(optimizer.init, train), params, cfg, mesh)
    return jax.jit(optimizer.init, out_shardings=out)(train)


def split_micro(x: Array | None, k: int) -> Array | None:
    """[n, ...] -> [k, n // k, ...]: micro-batch j holds rows j, j + k, j + 2k, ... (with rows split over the data
    axes, every device keeps its own rows)."""
    return None if x is None else jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def reduce_metrics(ms: dict[str, Array], weights: Array, *, extensive: tuple[str, ...] = ()) -> dict[str, Array]:
    """Metrics of k parts (micro- or mini-batches), each [k] -> one value: sums for the ``extensive`` names, extremes
    for ``ratio/min`` / ``ratio/max``, means weighted by ``weights`` [k] (summing to 1) for the rest."""
    out = {}
    for name, v in ms.items():
        if name in extensive:
            out[name] = jnp.sum(v)
        elif name == "ratio/min":
            out[name] = jnp.min(v)
        elif name == "ratio/max":
            out[name] = jnp.max(v)
        else:
            out[name] = jnp.sum(v * weights)
    return out


LossFn = Callable[[Params, Any], tuple[Array, tuple[dict[str, Array], Array | None]]]


def accumulate_and_apply(
    loss_fn: LossFn,
    train: Params,
    frozen: Params | None,
    opt_state: Any,
    micro: Any,
    *,
    optimizer: optax.GradientTransformation,
    router_bias_gamma: float,
) -> tuple[Params, Any, dict[str, Array], dict[str, Array]]:
    """One optimiser step over micro-batches (``micro``: a tree with a leading micro-batch axis k).

    ``loss_fn(train, mb)`` -> (loss, (metrics, expert load f32[L, e] or None)), its loss already divided by the
    whole batch's normaliser. Gradients reach ``train`` only (``lora.partition``: the adapters, or every parameter);
    one micro-batch takes its gradients directly, more are summed in a ``lax.scan``. The router-bias update is off
    with a frozen base (its router bias is part of the base). Returns (params = train updated and combined with
    ``frozen``, optimiser state, per-micro-batch metrics [k], ``{"loss", "grad_norm", "finite", "load"}``).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(mb):
        (loss, (metrics, load)), grads = grad_fn(train, mb)
        return grads, load, loss, metrics

    if jax.tree.leaves(micro)[0].shape[0] == 1:  # no zero-filled accumulators
        grads, load, loss, metrics = one(jax.tree.map(lambda x: x[0], micro))
        losses, per_micro = loss[None], jax.tree.map(lambda x: x[None], metrics)
    else:

        def body(acc, mb):
            grads, load, loss, metrics = one(mb)
            acc_grads, acc_load = acc
            return (jax.tree.map(jnp.add, acc_grads, grads), None if load is None else acc_load + load), (loss, metrics)

        load_shape = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro))[1]
        zero_load = None if load_shape is None else jnp.zeros(load_shape.shape, jnp.float32)
        zeros = (jax.tree.map(jnp.zeros_like, train), zero_load)
        (grads, load), (losses, per_micro) = jax.lax.scan(body, zeros, micro)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(jnp.sum(losses))
    gamma = 0.0 if frozen is not None else router_bias_gamma

    def apply(_):
        updates, new_opt_state = optimizer.update(grads, opt_state, train)
        new_params = lora.combine(optax.apply_updates(train, updates), frozen)
        return update_router_bias(new_params, load, gamma), new_opt_state

    params, opt_state = jax.lax.cond(finite, apply, lambda _: (lora.combine(train, frozen), opt_state), None)
    stats = {"loss": jnp.sum(losses), "grad_norm": grad_norm, "finite": finite, "load": load}
    return params, opt_state, per_micro, stats


def steps_taken(opt_state: Any) -> Array:
    """Optimiser steps taken so far (the count every stateful transformation keeps; all equal)."""
    return optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]
