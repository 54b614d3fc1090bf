"""Meshes and the one logical-axis rules table.

Parameters and activations name their axes with nouns (``embed``, ``heads``, ``experts``...); ``RULES`` maps each
noun to mesh axes. A parameter whose two logical axes would land on the same mesh axis keeps only the first, and
``check_rules`` rejects tables that map two nouns used together onto one mesh axis unintentionally. Axes whose size
does not divide evenly are left replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# noun -> mesh axes (in order of preference); the ONE table.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "q_lora": (),
    "kv_lora": (),
    "ffw": ("tensor",),
    "experts": ("expert",),
    "expert_ffw": ("tensor",),
}


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> jax.sharding.Mesh:
    """A mesh over ``MESH_AXES``; ``shape`` like ``{"fsdp": 4, "tensor": 2}`` (missing axes are 1)."""
    if not isinstance(shape, dict):
        shape = dict(zip(MESH_AXES, shape, strict=False))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    dims = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    devices = list(devices if devices is not None else jax.devices())
    if int(np.prod(dims)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, dims, strict=True))} needs {int(np.prod(dims))} devices, "
            f"{len(devices)} available"
        )
    return jax.sharding.Mesh(np.asarray(devices).reshape(dims), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """PartitionSpec for a tensor with logical ``axes``: each mesh axis used at most once, only where it divides."""
    used: set[str] = set()
    out = []
    for name, size in zip(axes, shape, strict=True):
        chosen = []
        for mesh_axis in RULES.get(name, ()) if name else ():
            n = mesh.shape[mesh_axis]
            if mesh_axis in used or n == 1:
                continue
            if size % (int(np.prod([mesh.shape[a] for a in chosen])) * n) == 0:
                chosen.append(mesh_axis)
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)


def check_rules(specs_tree, mesh: jax.sharding.Mesh) -> None:
    """Raise if any parameter's PartitionSpec names a mesh axis twice."""
    for spec in jax.tree.leaves(
        param_partition_specs(specs_tree, mesh), is_leaf=lambda x: isinstance(x, PartitionSpec)
    ):
        flat = [a for p in spec if p for a in (p if isinstance(p, tuple) else (p,))]
        if len(flat) != len(set(flat)):
            raise ValueError(f"mesh axis used twice in {spec}")


def param_partition_specs(specs_tree, mesh: jax.sharding.Mesh):
    return jax.tree.map(
        lambda s: logical_to_spec(s.axes, s.shape, mesh), specs_tree, is_leaf=lambda x: hasattr(x, "axes")
    )


def param_shardings(specs_tree, mesh: jax.sharding.Mesh):
    """NamedShardings for a ``param_specs`` tree."""
    return jax.tree.map(
        lambda p: NamedSharding(mesh, p),
        param_partition_specs(specs_tree, mesh),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
