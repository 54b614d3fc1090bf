"""Meshes and the one logical-axis rules table.

Parameters and activations name their axes with nouns (``embed``, ``heads``, ``experts``...); ``RULES`` maps each
noun to mesh axes, in order of preference. ``logical_to_spec`` turns a tensor's nouns into a ``PartitionSpec``:

- a mesh axis is used at most once per tensor (the first noun that asks for it wins);
- a mesh axis is only used where it divides the dimension (together with the axes already chosen for it), so odd
  sizes stay replicated instead of failing;
- size-1 mesh axes are never named.

Mesh axes and what they mean here:

- ``data``: pure data parallelism (parameters replicated).
- ``fsdp``: data parallelism with parameters, gradients and optimizer state sharded over ``embed`` (and the LoRA ranks
  of MLA); XLA all-gathers weights before use and reduce-scatters their gradients.
- ``tensor``: Megatron-style model parallelism over heads, ffw and vocab; between blocks the sequence is split over it
  (batch is never split over ``tensor``). Routed experts are split over ``expert`` x ``tensor`` where that divides them
  (else their ffw is split over ``tensor``).
- ``expert``: expert parallelism: routed experts are split over it (and ``tensor``), and so is the batch;
  ``r1jax.expert_parallel`` moves tokens to their experts' devices with an explicit all-to-all (each device of a
  ``tensor`` group dispatching its own share of the group's tokens).

Activations are constrained at block boundaries with ``constrain(x, ("batch", "seq", None))``: the residual stream
is split over the data axes by batch and over ``tensor`` by sequence (Megatron sequence parallelism: norms, residual
adds and the routed experts' tokens are not repeated on every device of a tensor group; XLA all-gathers the sequence
before the tensor-parallel projections and reduce-scatters after them). ``constrain`` is a no-op unless a mesh is set
with ``jax.set_mesh`` (the mesh belongs to the caller, never to a config), so the same model code runs on one device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# noun -> mesh axes (in order of preference); the ONE table.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),  # activations: every data-like axis; never "tensor"
    "seq": ("tensor",),  # the residual stream between blocks: sequence parallelism over tensor
    "layers": (),  # the scan axis stays whole: each step reads one layer
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "q_lora": ("fsdp",),  # MLA q_b [q, h, n+p]: q is its only fsdp-able axis (q_a keeps fsdp on embed)
    "kv_lora": ("fsdp",),  # MLA kv_b [c, h, n+v]: likewise
    "ffw": ("tensor",),
    "experts": ("expert", "tensor"),  # expert parallelism over expert x tensor: each device holds whole experts
    "expert_ffw": ("tensor",),  # only where tensor does not split the experts
}

# A parameter with at least this many elements must be sharded on a mesh with more than one device.
LARGE_PARAM = 1 << 20


def validate_rules(rules: Mapping[str, Sequence[str]] = RULES) -> None:
    """Raise on unknown mesh axes, or on one noun naming a mesh axis twice."""
    for noun, axes in rules.items():
        unknown = set(axes) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"rule {noun!r} names unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"rule {noun!r} names a mesh axis twice: {axes}")
    if "tensor" in rules.get("batch", ()):
        raise ValueError("batch must not be split over 'tensor' (it splits the heads, ffw and sequence of one row)")


validate_rules()


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> jax.sharding.Mesh:
    """A mesh over ``MESH_AXES``; ``shape`` like ``{"fsdp": 4, "tensor": 2}`` (missing axes are 1)."""
    dims = _mesh_dims(shape)
    devices = list(devices if devices is not None else jax.devices())
    if int(np.prod(dims)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, dims, strict=True))} needs {int(np.prod(dims))} devices, "
            f"{len(devices)} available"
        )
    return jax.sharding.Mesh(np.asarray(devices).reshape(dims), MESH_AXES)


def normalize_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """Any mesh over some of ``MESH_AXES`` — ``jax.make_mesh``'s (Explicit axes by default), ``make_mesh``'s (Auto),
    in any axis order — as the mesh r1jax computes on: every one of ``MESH_AXES``, in order (missing ones of size 1),
    with Auto axis types (shardings come from the rules table and ``constrain``, not from sharding-in-types). The
    public entry points that take a mesh call this; the devices keep their places."""
    from r1jax.errors import ConfigError

    names = tuple(mesh.axis_names)
    unknown = set(names) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"mesh axes {sorted(unknown)} are not r1jax's; name the mesh axes from {MESH_AXES}")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if names == MESH_AXES and tuple(mesh.axis_types) == auto:
        return mesh
    order = [names.index(a) for a in MESH_AXES if a in names]
    devices = np.asarray(mesh.devices).transpose(order).reshape([dict(mesh.shape).get(a, 1) for a in MESH_AXES])
    return jax.sharding.Mesh(devices, MESH_AXES, axis_types=auto)


def split_mesh(mesh: jax.sharding.Mesh) -> tuple[jax.sharding.Mesh, jax.sharding.Mesh]:
    """Two halves of an r1jax mesh along its first batch axis of even size (``RULES["batch"]``), every other axis
    kept: the trainer's and the sampler's meshes of off-policy overlap."""
    from r1jax.errors import ConfigError

    sizes = dict(mesh.shape)
    axis = next((a for a in RULES["batch"] if sizes.get(a, 1) % 2 == 0), None)
    if axis is None:
        raise ConfigError(
            f"mesh {sizes} cannot be split into a trainer and a sampler half: none of its batch axes "
            f"{RULES['batch']} has an even size"
        )
    halves = np.split(np.asarray(mesh.devices), 2, axis=list(mesh.axis_names).index(axis))
    return tuple(jax.sharding.Mesh(d, mesh.axis_names, axis_types=mesh.axis_types) for d in halves)


def abstract_mesh(shape: dict[str, int] | Sequence[int]) -> jax.sharding.AbstractMesh:
    """A device-free mesh over ``MESH_AXES`` (for ``jax.eval_shape`` and sharding arithmetic at any scale)."""
    return jax.sharding.AbstractMesh(_mesh_dims(shape), MESH_AXES)


def _mesh_dims(shape: dict[str, int] | Sequence[int]) -> tuple[int, ...]:
    if not isinstance(shape, dict):
        shape = dict(zip(MESH_AXES, shape, strict=False))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    dims = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    if min(dims) < 1:
        raise ValueError(f"mesh axes must be >= 1, got {shape}")
    return dims


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Mapping[str, Sequence[str]] = RULES
) -> PartitionSpec:
    """PartitionSpec for a tensor with logical ``axes``: each mesh axis used at most once, only where it divides.

    ``mesh`` is a ``Mesh`` or an ``AbstractMesh``; mesh axes it lacks count as size 1. Unknown nouns raise.
    """
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} logical axes {tuple(axes)} for a rank-{len(shape)} tensor {tuple(shape)}")
    sizes = _axis_sizes(mesh)
    used: set[str] = set()
    out = []
    for name, size in zip(axes, shape, strict=True):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        chosen: list[str] = []
        for mesh_axis in rules.get(name, ()) if name else ():
            n = sizes.get(mesh_axis, 1)
            if mesh_axis in used or n == 1:
                continue
            if size % (int(np.prod([sizes[a] for a in chosen])) * n) == 0:
                chosen.append(mesh_axis)
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)


def spec_axes(spec: PartitionSpec) -> list[str]:
    """Mesh axes a PartitionSpec names, flattened, in order (duplicates kept)."""
    return [a for p in spec if p for a in (p if isinstance(p, tuple) else (p,))]


def shard_count(spec: PartitionSpec, mesh) -> int:
    """Into how many pieces ``spec`` splits a tensor on ``mesh``."""
    sizes = _axis_sizes(mesh)
    return int(np.prod([sizes[a] for a in spec_axes(spec)] or [1]))


def _is_spec(x) -> bool:
    return hasattr(x, "axes") and hasattr(x, "shape")


def param_partition_specs(specs_tree, mesh):
    """PartitionSpecs for a ``param_specs`` tree (``ParamSpec`` leaves)."""
    return jax.tree.map(lambda s: logical_to_spec(s.axes, s.shape, mesh), specs_tree, is_leaf=_is_spec)


def param_shardings(specs_tree, mesh: jax.sharding.Mesh):
    """NamedShardings for a ``param_specs`` tree."""
    return jax.tree.map(
        lambda p: NamedSharding(mesh, p),
        param_partition_specs(specs_tree, mesh),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def check_rules(specs_tree, mesh, *, large: int = LARGE_PARAM) -> None:
    """Raise if a parameter's spec names a mesh axis twice or does not divide its dimension, or if a parameter with
    at least ``large`` elements stays fully replicated on a mesh of more than one device (except where the mesh has
    only axes its nouns cannot use, e.g. pure ``data`` parallelism)."""
    problems = []
    n_devices = int(np.prod(list(_axis_sizes(mesh).values())))
    param_axes = {a for noun, axes in RULES.items() if noun != "batch" for a in axes}
    model_parallel = any(_axis_sizes(mesh).get(a, 1) > 1 for a in param_axes)
    flat = jax.tree_util.tree_flatten_with_path(specs_tree, is_leaf=_is_spec)[0]
    for path, s in flat:
        name = jax.tree_util.keystr(path)
        spec = logical_to_spec(s.axes, s.shape, mesh)
        named = spec_axes(spec)
        if len(named) != len(set(named)):
            problems.append(f"{name}: mesh axis used twice in {spec}")
        for dim, part in zip(s.shape, spec, strict=False):
            if part and dim % shard_count(PartitionSpec(part), mesh):
                problems.append(f"{name}: {spec} does not divide {s.shape}")
        if model_parallel and n_devices > 1 and int(np.prod(s.shape)) >= large and not named:
            problems.append(f"{name}: {s.shape} ({s.axes}) is large but fully replicated")
    if problems:
        raise ValueError("sharding rules violated:\n  " + "\n  ".join(problems))


# --- activations -----------------------------------------------------------------------------------------------------
def current_mesh():
    """The mesh set by the caller (``jax.set_mesh``), or None when there is none (or it has a single device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    return mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` to its logical ``axes`` under the current mesh; identity without one.

    Dims whose noun is None (or whose mesh axes do not divide them) are replicated: block boundaries want the batch
    split and the features whole. Meshes without r1jax's axis names are left alone.
    """
    mesh = current_mesh()
    if mesh is None or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def constrain_params(params, specs_tree):
    """``with_sharding_constraint`` of a parameter tree to its rules-table shardings under the current mesh (inside
    jit: outputs keep the layout the parameters came in with); identity without one."""
    mesh = current_mesh()
    if mesh is None or not set(MESH_AXES) <= set(mesh.axis_names):
        return params
    return jax.lax.with_sharding_constraint(params, param_partition_specs(specs_tree, mesh))


def batch_sharding(mesh: jax.sharding.Mesh, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a batch-major array (tokens, masks, advantages...): leading axis split by the ``batch`` rule."""
    return NamedSharding(mesh, logical_to_spec(("batch", *[None] * (len(shape) - 1)), shape, mesh))


# --- host <-> mesh (one process or many) ----------------------------------------------------------------------------
def on_mesh(mesh: jax.sharding.Mesh | None):
    """``jax.set_mesh(mesh)`` (the model's activation constraints and expert-parallel dispatch apply), or nothing."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def commit(tree):
    """Arrays committed to the default device, as a jitted step returns them. jit keys committed and uncommitted
    arguments apart, so a training state that starts uncommitted (fresh from ``jnp`` or the host) and comes back
    committed after its first step would compile every step function a second time at step 2."""
    return jax.device_put(tree, jax.devices()[0])


def put(x, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array that every process holds whole, placed with ``sharding``: each process copies only the slices of
    its own devices (unlike ``device_put`` of process-local data, this means the same thing on one host or many)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x) -> np.ndarray:
    """An array as numpy on every process: gathered across processes where this one does not hold all of it."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
