"""Profiles read by component: the model's ``jax.named_scope`` names reach the lowered program's op metadata.

A scope is looked for as a run of components of the op names (``jit(f)/.../layer/attention/dot_general``) in
``Lowered.as_text(debug_info=True)``: the names a ``jax.profiler`` trace and the compiled HLO's ``op_name`` metadata
carry. Each case fails when one of the scopes it expects is removed.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from r1jax.configs.tiny import tiny_model

from r1jax import sharding
from r1jax.cache import init_cache
from r1jax.config import ModelConfig
from r1jax.model import forward, init_params

V3 = tiny_model()  # MLA; a dense first layer, then a MoE layer with a shared expert
QWEN2 = ModelConfig(arch="qwen2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffw=48, qkv_bias=True)
MOE_SCOPES = ("layer/attention", "layer/mlp", "layer/moe", "layer/moe/mlp", "head")  # moe/mlp: the shared expert
DENSE_SCOPES = ("layer/attention", "layer/mlp", "head")


def _op_names(lowered) -> list[str]:
    """The name of every location in the lowered module's debug info."""
    return re.findall(r'loc\("([^"]+)"', lowered.as_text(debug_info=True))


def _has(names: list[str], scope: str) -> bool:
    """True when some op name holds ``scope`` (``a/b``: b directly inside a) as whole components."""
    return any(f"/{scope}/" in f"/{name}/" for name in names)


def _lower(cfg: ModelConfig, decode: bool):
    """The forward (or one cached decode step) lowered for abstract parameters: names need shapes, not values."""
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    if not decode:
        tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
        return jax.jit(lambda p, t: forward(p, t, cfg)[0]).lower(params, tokens)
    cache = jax.eval_shape(lambda: init_cache(cfg, 2, 16))
    tokens = jax.ShapeDtypeStruct((2, 1), jnp.int32)
    return jax.jit(lambda p, t, c: forward(p, t, cfg, cache=c)[0]).lower(params, tokens, cache)


@pytest.mark.parametrize(
    "cfg, decode, scopes",
    [(V3, False, MOE_SCOPES), (V3, True, MOE_SCOPES), (QWEN2, False, DENSE_SCOPES), (QWEN2, True, DENSE_SCOPES)],
    ids=["v3", "v3_decode", "qwen2", "qwen2_decode"],
)
def test_forward_ops_are_named_by_component(cfg, decode, scopes):
    names = _op_names(_lower(cfg, decode))
    missing = [s for s in scopes if not _has(names, s)]
    assert not missing, (missing, names[:20])
    if not cfg.is_moe:
        assert not _has(names, "moe")


def test_expert_parallel_dispatch_rounds_are_named_moe_round():
    """On a mesh that splits the experts, each dispatch round's ops (its all-to-alls among them) sit under
    ``moe_round``. They run inside the ``shard_map`` that the layer's ``moe`` calls, whose body's names are
    relative to it, so they read ``while/body/moe_round/...``."""
    with jax.set_mesh(sharding.make_mesh({"expert": 4, "fsdp": 2})):
        names = _op_names(_lower(V3, decode=False))
    assert _has(names, "layer/moe"), names[:20]
    rounds = [n for n in names if "/moe_round/" in f"/{n}/"]
    assert any("all_to_all" in n for n in rounds), rounds[:20]
