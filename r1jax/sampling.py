"""Sampling primitives: next-token selection (greedy, temperature, top-k, nucleus) and left padding.

Prompts are left-padded to a bucketed length (multiples of ``PROMPT_BUCKET``, so few shapes are compiled); each
sequence's cache starts at its first real token, so padding never changes results. The decode loop that uses these
is ``r1jax.rollout``'s slot engine (``r1jax.rollout.generate`` for plain generation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PROMPT_BUCKET = 32


def sample_logits(logits: jax.Array, keys: jax.Array, temperature: float, top_p: float, top_k: int) -> jax.Array:
    """Next tokens int32[b] from logits f32[b, V]: greedy at temperature 0, else top-k / nucleus sampling.

    ``keys``: one PRNG key per row (key[b]), so a row's draw depends on its own key alone, never on its place in the
    batch; a single key is split into b."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing the threshold included)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return categorical(keys, logits)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits f32[b, V]) -> int32[b], row i drawn with ``keys[i]`` (a single key is
    split into b); -inf logits are never drawn.

    On CPU by inverting the CDF with one uniform per row: ``jax.random.categorical`` draws V Gumbel variates per row,
    and generating them is a large share of an XLA:CPU decode step at a real vocabulary (figures in
    docs/performance.md). Elsewhere Gumbel-max (``jax.random.categorical``). Same distribution, different random
    streams.
    """
    if keys.ndim == 0:
        keys = jax.random.split(keys, logits.shape[0])
    gumbel = jax.vmap(lambda k, lg: jax.random.categorical(k, lg).astype(jnp.int32))
    return jax.lax.platform_dependent(keys, logits, cpu=_inverse_cdf, default=gumbel)


def _inverse_cdf(keys: jax.Array, logits: jax.Array) -> jax.Array:
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)[:, None] * cdf[:, -1:]  # < the total mass
    # the first index whose cdf exceeds u; a zero-probability token never raises the cdf, so it is never that index
    return jnp.minimum(jnp.sum(cdf <= u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)


def left_pad(prompts: list[list[int]], pad_id: int = 0, bucket: int = PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to a common length rounded up to ``bucket`` -> (tokens int32[b, P], start int32[b])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    plen = -(-longest // bucket) * bucket
    out = np.full((len(prompts), plen), pad_id, np.int32)
    start = np.zeros(len(prompts), np.int32)
    for i, p in enumerate(prompts):
        out[i, plen - len(p) :] = p
        start[i] = plen - len(p)
    return out, start
