"""LoRA and QLoRA: trainable low-rank adapters on a frozen, optionally quantised, base (SFT and GRPO).

The adapter lives in the weight. ``attach`` replaces each targeted projection of the parameter tree by a
``model.LoraWeight`` (base, ``a`` [*in, r], ``b`` [r, *out]), and ``model.linear`` runs it unmerged:
``x @ base + alpha / r * (x @ a) @ b``. The places that need one plain array (the absorbed MLA decode, the routed
experts' grouped matmuls) take ``model.dense(w)`` of one layer. qwix's own LoRA (``qwix.apply_lora_to_model``)
does not fit this model. It intercepts the dot_generals of Flax module calls and names adapters by module path,
while r1jax runs pure functions over a parameter dict, scanned over stacked layers, so there is no per-projection
module to intercept. qwix does the quantisation: ``qwix.quantize`` / ``qwix.dequantize`` (int8 or nf4, one scale
per output channel and block of ``quant_block`` input rows).

What trains and what is stored:
- ``partition(params)`` -> (trainable, frozen): the adapters' ``a`` and ``b``, everything else. The optimiser, its
  state, the gradients and their accumulators see only the trainable part; ``combine`` puts the two together.
  Without adapters the whole tree is trainable (full fine-tuning).
- The GRPO reference is the frozen base with a copy of the trainable part: with adapters that copy is the adapters
  alone (zero ``b`` at the start: exactly the base), so the weights exist once for the policy, the reference and
  the old log-probs.
- A run's checkpoints hold ``adapters(params)`` (plain ``{"a", "b"}`` dicts), not the base: the base is the run's
  ``init``, read again on resume and export.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from r1jax.config import LORA_PROJECTIONS, LoraConfig, LoraQuant, ModelConfig
from r1jax.errors import ConfigError
from r1jax.model import LAYER_STACKS, LoraWeight, ParamSpec, dense, is_quantized, param_specs
from r1jax.sharding import param_shardings

Params = dict[str, Any]
_N_IN = {"o": 2}  # input axes of each projection (the output projection reads heads x head dim)


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def _is_node(x) -> bool:
    return isinstance(x, LoraWeight) or x is None


def projections(specs: dict, *, experts: bool) -> dict[tuple[str, ...], ParamSpec]:
    """Every projection of the layer stacks by parameter path: attention and MLP projections, shared experts, and
    the routed experts with ``experts``."""
    out = {}
    for stack in LAYER_STACKS:
        for path, spec in jax.tree_util.tree_flatten_with_path(specs.get(stack, {}), is_leaf=_is_spec)[0]:
            names = (stack, *(str(k.key) for k in path))
            in_scope = names[-1] in LORA_PROJECTIONS and names[1] in ("attn", "mlp")
            if in_scope and ("experts" not in names or experts):
                out[names] = spec
    return out


def _lead(names: tuple[str, ...]) -> int:
    return 1 + ("experts" in names)  # the layer axis, and the expert axis of routed experts


def targets(found: dict, lora: LoraConfig) -> set[str]:
    """The projection names that get adapters: ``lora.targets``, or every one found when it is empty."""
    return set(lora.targets) if lora.targets else {names[-1] for names in found}


def _check_targets(found: dict, lora: LoraConfig) -> None:
    present = sorted({names[-1] for names in found})
    missing = [t for t in lora.targets if t not in present]
    if missing:
        raise ConfigError(f"lora.targets {missing} match no projection of this model; valid here: {', '.join(present)}")
    for names, spec in found.items():
        if names[-1] not in targets(found, lora):
            continue
        lead, n_in = _lead(names), _N_IN.get(names[-1], 1)
        k, n = math.prod(spec.shape[lead : lead + n_in]), math.prod(spec.shape[lead + n_in :])
        if lora.rank > min(k, n):
            raise ConfigError(
                f"lora.rank={lora.rank} is larger than the projection {'/'.join(names)} ({k} x {n}): at most "
                f"{min(k, n)}"
            )


def _quantize(w: jax.Array, names: tuple[str, ...], lora: LoraConfig):
    """One stored projection quantised: a scale per output channel (and per layer, expert and head), per block of
    ``quant_block`` rows along the last input axis (the whole axis when the block does not divide it)."""
    import qwix

    lead, n_in = _lead(names), _N_IN.get(names[-1], 1)
    axis = lead + n_in - 1
    block = lora.quant_block if w.shape[axis] % lora.quant_block == 0 else w.shape[axis]
    channelwise = [i for i in range(w.ndim) if i != axis]
    return qwix.quantize(w, lora.quant.value, channelwise_axes=channelwise, tiled_axes={axis: block})


def attach(params: Params, lora: LoraConfig, cfg: ModelConfig, key: jax.Array) -> Params:
    """``params`` with adapters on ``lora.targets``: ``a`` uniform in +-1/sqrt(fan_in) (PEFT's default), ``b`` zero,
    both in ``cfg.param_dtype``. The frozen base is stored in the compute dtype ``cfg.dtype`` (a frozen weight needs
    no master copy; parameters declared with their own dtype, the router's, keep it), every projection (routed
    experts included, adapted or not) quantised with ``lora.quant``. Raises ConfigError for a target that matches
    nothing (listing the valid ones) and for a rank larger than a projection."""
    specs = param_specs(cfg, mtp="mtp" in params)
    found = projections(specs, experts=lora.experts)  # what may get adapters
    _check_targets(found, lora)
    chosen = targets(found, lora)
    adapted = dict(params)
    layout = tuple((names, spec.shape, _lead(names), _N_IN.get(names[-1], 1)) for names, spec in sorted(found.items())
                   if names[-1] in chosen)  # fmt: skip
    fresh = _fresh_adapters(key, layout=layout, rank=lora.rank, dtype=str(jnp.dtype(cfg.param_dtype)))
    quantise = lora.quant != LoraQuant.NONE
    for names in sorted(projections(specs, experts=True) if quantise else found):  # QLoRA: every projection
        parent = _parent(adapted, names)
        base = parent[names[-1]].astype(cfg.dtype)
        if quantise:
            base = _quantize(base, names, lora)
        if names in fresh:
            a, b = fresh[names]
            base = LoraWeight(base, a, b, lora.scale, _N_IN.get(names[-1], 1))
        parent[names[-1]] = base

    def frozen(spec, x):  # the rest of the base (embedding, head, norms) in the compute dtype too
        return x if spec.dtype or isinstance(x, LoraWeight) or is_quantized(x) else x.astype(cfg.dtype)

    return jax.tree.map(frozen, specs, adapted, is_leaf=_is_spec)


@functools.partial(jax.jit, static_argnames=("layout", "rank", "dtype"))
def _fresh_adapters(key, *, layout, rank: int, dtype: str) -> dict:
    """New adapters for ``layout`` ((path, weight shape, lead axes, input axes) each), in one program: ``a`` uniform
    in +-1/sqrt(fan_in), ``b`` zero."""
    out = {}
    for (names, shape, lead, n_in), k in zip(layout, jax.random.split(key, len(layout)), strict=True):
        bound = 1.0 / math.sqrt(math.prod(shape[lead : lead + n_in]))
        a = jax.random.uniform(k, (*shape[: lead + n_in], rank), jnp.float32, -bound, bound)
        out[names] = (a.astype(dtype), jnp.zeros((*shape[:lead], rank, *shape[lead + n_in :]), dtype))
    return out


def _parent(tree: dict, names: tuple[str, ...]) -> dict:
    """The dict holding ``names[-1]``, copied on the way down (the caller's tree is left as it was)."""
    node = tree
    for name in names[:-1]:
        node[name] = dict(node[name])
        node = node[name]
    return node


def has_adapters(params: Params) -> bool:
    return any(isinstance(x, LoraWeight) for x in jax.tree.leaves(params, is_leaf=_is_node))


def partition(params: Params) -> tuple[Params, Params | None]:
    """(trainable, frozen). With adapters: each ``LoraWeight`` split into its ``a``/``b`` and its base, every other
    leaf frozen (``None`` marks what the other part holds). Without: (params, None)."""
    if not has_adapters(params):
        return params, None
    node = lambda x: isinstance(x, LoraWeight)  # noqa: E731
    train = jax.tree.map(lambda w: LoraWeight(None, w.a, w.b, w.scale, w.n_in) if node(w) else None, params,
                         is_leaf=node)  # fmt: skip
    frozen = jax.tree.map(lambda w: LoraWeight(w.base, None, None, w.scale, w.n_in) if node(w) else w, params,
                          is_leaf=node)  # fmt: skip
    return train, frozen


def combine(train: Params, frozen: Params | None) -> Params:
    """The inverse of ``partition``."""
    if frozen is None:
        return train
    return jax.tree.map(lambda t, f: f if t is None else t, train, frozen, is_leaf=lambda x: x is None)


def merge(params: Params) -> Params:
    """A plain parameter tree: every adapted or quantised weight replaced by the array it stands for (export,
    sampling with merged weights)."""
    return jax.tree.map(dense, params, is_leaf=lambda x: isinstance(x, LoraWeight) or is_quantized(x))


def adapters(params: Params) -> Params:
    """The adapters alone as nested plain dicts (each adapted projection -> ``{"a", "b"}``): what a LoRA run saves."""

    def walk(t):
        if isinstance(t, LoraWeight):
            return {"a": t.a, "b": t.b}
        if isinstance(t, dict):
            return {k: v for k, v in ((k, walk(v)) for k, v in t.items()) if v}
        return None

    return walk(params) or {}


def with_adapters(params: Params, saved: Params) -> Params:
    """``params`` (adapted) with the adapters of ``saved`` (an ``adapters`` tree) in place of their own."""

    def walk(t, s):
        if isinstance(t, LoraWeight):
            return LoraWeight(t.base, s["a"], s["b"], t.scale, t.n_in)
        if isinstance(t, dict):
            return {k: walk(v, s[k]) if k in s else v for k, v in t.items()}
        return t

    return walk(params, saved)


def saved_part(params: Params) -> Params:
    """What a run checkpoints of its parameters: the adapters with LoRA, else everything."""
    return adapters(params) if has_adapters(params) else params


def restored(params: Params, saved: Params) -> Params:
    """The inverse of ``saved_part`` given the run's start parameters (which hold the frozen base)."""
    return with_adapters(params, saved) if has_adapters(params) else saved


def specs_like(params: Params, specs: dict) -> dict:
    """``specs`` (a ``param_specs`` tree) reshaped to ``params``' structure: an adapted weight's ``a`` keeps its
    input axes' logical names and ``b`` its output axes', the rank axis unsharded; a quantised base's values and
    scales keep the weight's logical axes (the rules table shards a dimension only where it divides)."""

    def one(spec: ParamSpec, w):
        if isinstance(w, LoraWeight):
            lead = w.a.ndim - w.n_in - 1
            a_axes = (*spec.axes[: lead + w.n_in], None)
            b_axes = (*spec.axes[:lead], None, *spec.axes[lead + w.n_in :])
            a = None if w.a is None else ParamSpec(tuple(w.a.shape), a_axes, dtype=str(w.a.dtype))
            b = None if w.b is None else ParamSpec(tuple(w.b.shape), b_axes, dtype=str(w.b.dtype))
            return LoraWeight(None if w.base is None else one(spec, w.base), a, b, w.scale, w.n_in)
        if is_quantized(w):
            return jax.tree.map(lambda x: ParamSpec(tuple(x.shape), spec.axes, dtype=str(x.dtype)), w)
        return spec

    return jax.tree.map(one, specs, params, is_leaf=_is_spec)


def specs_of(params: Params, cfg: ModelConfig) -> dict:
    """The ``param_specs`` of a parameter tree as it is (adapted, quantised or plain; with the MTP module when it
    has one): what its shardings and sharding constraints are made from."""
    return specs_like(params, param_specs(cfg, mtp="mtp" in params))


def shardings(params: Params, cfg: ModelConfig, mesh) -> Params:
    """The rules table's shardings of a parameter tree as it is (``specs_of``) on ``mesh``."""
    return param_shardings(specs_of(params, cfg), mesh)


def reference(params: Params, ref_train: Params | None) -> Params | None:
    """The GRPO reference model: ``params``' frozen part with ``ref_train`` (a copy of a trainable part)."""
    if ref_train is None:
        return None
    return combine(ref_train, partition(params)[1])


def nbytes(tree) -> float:
    """Bytes a parameter tree (arrays or ShapeDtypeStructs, quantised ones included) stores, 4-bit values at half a
    byte (as accelerators pack them)."""
    return sum(math.prod(x.shape) * jax.dtypes.itemsize_bits(x.dtype) / 8 for x in jax.tree.leaves(tree))
