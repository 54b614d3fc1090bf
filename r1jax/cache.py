"""KV caches, stacked per layer stack like the parameters.

- MLA (DeepSeek): the compressed cache — the normed kv latent ``latent[L, b, S, c]`` and the rotated shared rope key
  ``rope[L, b, S, p]``: c + p values per token per layer (576 for V3, versus 2 * 128 * 192 for the expanded keys and
  values of 128 heads).
- GQA (Qwen/Llama): ``k[L, b, S, g, k]`` and ``v[L, b, S, g, k]``.

Each sequence has its own write position ``index[b]`` (the next slot it writes; a forward of t tokens advances it by
t), so the rows of one cache can be at different lengths: the decode slots of ``r1jax.rollout`` are refilled one at
a time. A sequence whose prompt was left-padded starts at slot ``start[b]`` and slots before it are masked, so its
positions are ``slot - start[b]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from r1jax.config import DENSE_LAYERS, MOE_LAYERS, ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    layers: dict  # stack name -> {"latent", "rope"} (MLA) or {"k", "v"} (GQA), each [L, b, S, ...]; or a tuple of
    # per-layer dicts of [b, S, ...] (``r1jax.model.unstack_layers``)
    index: jax.Array  # int32[b]: next slot each sequence writes
    start: jax.Array  # int32[b]: first valid slot of each sequence (left padding)

    @property
    def max_len(self) -> int:
        stack = next(iter(self.layers.values()))  # {"k": [L, b, S, ...]} or, unstacked, ({"k": [b, S, ...]}, ...)
        return jax.tree.leaves(stack)[0].shape[1 if isinstance(stack, tuple) else 2]


def layer_shapes(cfg: ModelConfig, batch: int, max_len: int) -> dict[str, tuple[int, ...]]:
    if cfg.is_mla:
        return {"latent": (batch, max_len, cfg.kv_lora_rank), "rope": (batch, max_len, cfg.qk_rope_dim)}
    kv = (batch, max_len, cfg.num_kv_heads, cfg.head_size)
    return {"k": kv, "v": kv}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, start: jax.Array | None = None, dtype=None) -> Cache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (prompt + generation)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    stacks = {DENSE_LAYERS: cfg.n_dense_layers, MOE_LAYERS: cfg.n_moe_layers}
    layers = {
        name: {k: jnp.zeros((n, *shape), dtype) for k, shape in layer_shapes(cfg, batch, max_len).items()}
        for name, n in stacks.items()
        if n
    }
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return Cache(layers=layers, index=jnp.zeros((batch,), jnp.int32), start=start)


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
    """Bytes of a cache (all layers) — the number the compressed MLA cache exists to shrink."""
    per_layer = sum(int(jnp.prod(jnp.array(s))) for s in layer_shapes(cfg, batch, max_len).values())
    return per_layer * cfg.n_layers * jnp.dtype(dtype or cfg.dtype).itemsize
