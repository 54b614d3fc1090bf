"""Sampling: prefill + a jitted decode loop over the KV cache.

Prompts are left-padded to a bucketed length (multiples of ``PROMPT_BUCKET``, so few shapes are compiled); each
sequence's cache starts at its first real token, so padding never changes results. The decode loop is one
``lax.while_loop`` that exits as soon as every sequence has produced a stop token; the sampler returns the tokens and
their log-probabilities under the sampling distribution's model (log-softmax of the raw logits, float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.cache import init_cache
from r1jax.config import ModelConfig
from r1jax.model import Params, forward

PROMPT_BUCKET = 32


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_p: float, top_k: int) -> jax.Array:
    """Next tokens int32[b] from logits f32[b, V]: greedy at temperature 0, else top-k / nucleus sampling."""
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
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_p", "top_k"))
def generate_tokens(
    params: Params,
    prompts: jax.Array,
    start: jax.Array,
    stop_ids: jax.Array,
    key: jax.Array,
    *,
    cfg: ModelConfig,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Left-padded ``prompts`` int32[b, P] (real tokens from ``start[b]``) -> (tokens int32[b, N], log-probs
    f32[b, N], lengths int32[b]). A sequence ends after its first token in ``stop_ids`` (included in its length);
    positions past a sequence's length hold ``stop_ids[0]`` (or 0) and log-prob 0."""
    b, plen = prompts.shape
    cache = init_cache(cfg, b, plen + max_new_tokens, start)
    logits, aux = forward(params, prompts, cfg, cache=cache)
    pad = stop_ids[0] if stop_ids.shape[0] else jnp.int32(0)

    def pick(lg, k):
        tok = sample_logits(lg, k, temperature, top_p, top_k)
        logp = jnp.take_along_axis(jax.nn.log_softmax(lg.astype(jnp.float32), -1), tok[:, None], -1)[:, 0]
        return tok, logp

    def cond(state):
        i, _, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, lg, done, toks, logps, lengths, key = state
        key, sub = jax.random.split(key)
        tok, logp = pick(lg, sub)
        tok = jnp.where(done, pad, tok)
        toks = toks.at[:, i].set(tok)
        logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stop_ids)
        lg, aux = forward(params, tok[:, None], cfg, cache=cache)
        return i + 1, aux["cache"], lg[:, -1], done, toks, logps, lengths, key

    state = (
        jnp.int32(0),
        aux["cache"],
        logits[:, -1],
        jnp.zeros((b,), bool),
        jnp.full((b, max_new_tokens), pad, jnp.int32),
        jnp.zeros((b, max_new_tokens), jnp.float32),
        jnp.zeros((b,), jnp.int32),
        key,
    )
    _, _, _, _, toks, logps, lengths, _ = jax.lax.while_loop(cond, body, state)
    return toks, logps, lengths


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


def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_ids: list[int] | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` for each prompt; returns the new tokens, without the stop token.

    ``stop_ids`` default to the model's EOS ids. Greedy at ``temperature=0``.
    """
    cfg: ModelConfig = model.cfg
    stops = list(cfg.eos_token_ids) if stop_ids is None else list(stop_ids)
    tokens, start = left_pad(prompts, pad_id=cfg.pad_token_id or 0)
    toks, _, lengths = generate_tokens(
        model.param_dict(),
        jnp.asarray(tokens),
        jnp.asarray(start),
        jnp.asarray(stops, jnp.int32),
        jax.random.key(seed),
        cfg=cfg,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
    )
    toks, lengths = np.asarray(toks), np.asarray(lengths)
    out = []
    for row, n in zip(toks, lengths, strict=True):
        seq = row[:n].tolist()
        out.append(seq[:-1] if seq and seq[-1] in stops else seq)
    return out
