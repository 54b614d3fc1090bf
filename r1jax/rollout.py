"""Group sampling for GRPO: G completions per prompt from one prefill.

Each prompt is prefilled ONCE; its KV cache (for DeepSeek models the compressed MLA cache: normed latent + rotated
rope key) is repeated G times along the batch axis and padded to the decode length, so a group of G samples costs one
prompt forward plus G decodes. Decoding is one jitted ``lax.while_loop`` that exits as soon as every row is done.

Log-probabilities. The sampler reports, for every sampled token, ``log_softmax(logits / tau)`` with tau the sampling
temperature (tau = 1 when greedy): the log-probability under the *tempered, unfiltered* policy. top-k / top-p only
restrict what can be drawn; they are not part of the policy being trained (as in TRL and verl). The trainer's
``r1jax.loss.sequence_logprobs`` computes exactly this quantity with a teacher-forced forward, so sampler and trainer
log-probs agree to float rounding (tested at rel 1e-4 in float32) and ``old_logp`` has one definition.

Stopping. A row ends after a token in ``stop_ids`` (EOS) or when its last tokens equal one of the ``stop_seqs``
(token sequences of the stop strings, checked inside the loop so decoding stops early). Because a string can be
tokenised many ways, token matching can miss a stop string; ``apply_stop_strings`` is the authoritative check on the
host: it decodes each completion and cuts it after the first token whose text completes a stop string. The
completion mask covers every token up to and including the stop token / the stop string's last token: the policy
learns to stop. Rows that never stop are truncated at ``max_new_tokens`` (``ended`` is False).

Shapes: ``b`` prompts, ``G`` group size, ``n = b * G`` rows with groups contiguous (row ``i`` belongs to prompt
``i // G``), ``P`` padded prompt length, ``T = max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.cache import Cache, init_cache
from r1jax.config import ModelConfig, SamplingConfig
from r1jax.model import Params, forward, unstack_layers
from r1jax.sampling import left_pad, sample_logits
from r1jax.sharding import logical_to_spec, normalize_mesh, on_mesh, put, to_host

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
    """Completions of a batch of prompt groups (all arrays have the row axis first)."""

    prompt_tokens: Array  # int32[n, P]: left-padded prompts, each repeated G times
    prompt_start: Array  # int32[n]: first real prompt token (left padding before it)
    tokens: Array  # int32[n, T]: completions; past a row's length: stop_ids[0] (or 0)
    mask: Array  # float32[n, T]: 1 on completion tokens (stop token included), 0 after
    logp: Array  # float32[n, T]: log_softmax(logits / tau) of each sampled token; 0 where mask is 0
    lengths: Array  # int32[n]: completion lengths (= mask row sums)
    ended: Array  # bool[n]: stopped on EOS / a stop string (False: truncated at T)

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


def logprob_temperature(temperature: float) -> float:
    """The tau of the policy whose log-probs are trained on: the sampling temperature, or 1 when greedy."""
    return float(temperature) if temperature > 0 else 1.0


def constrain_batch(x: Array, mesh: Mesh | None, axis: int = 0) -> Array:
    """Inside jit: shard ``x``'s ``axis`` over the mesh's batch axes (the ``batch`` rule); no-op without a mesh."""
    if mesh is None:
        return x
    axes: list[str | None] = [None] * x.ndim
    axes[axis] = "batch"
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


def repeat_cache(cache: Cache, group_size: int, extra: int, mesh: Mesh | None) -> Cache:
    """Repeat a prefilled cache G times along batch (rows of a group adjacent) and add ``extra`` empty slots."""

    def grow(x):  # [L, b, S, ...]
        x = jnp.repeat(x, group_size, axis=1)
        x = jnp.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3))
        return constrain_batch(x, mesh, axis=1)

    return Cache(
        layers=jax.tree.map(grow, cache.layers),
        index=cache.index,
        start=constrain_batch(jnp.repeat(cache.start, group_size), mesh),
    )


def _stop_seq_hit(window: Array, stop_seqs: Array) -> Array:
    """bool[n]: the last L tokens ``window[n, L]`` end with one of ``stop_seqs[m, L]`` (right-aligned, -1 = any)."""
    if stop_seqs.shape[0] == 0:
        return jnp.zeros(window.shape[:1], bool)
    eq = (stop_seqs[None] == -1) | (window[:, None, :] == stop_seqs[None])
    return jnp.any(jnp.all(eq, axis=-1), axis=-1)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "group_size", "max_new_tokens", "temperature", "top_p", "top_k", "mesh", "unroll_layers"),
)
def sample_groups(
    params: Params,
    prompts: Array,
    start: Array,
    stop_ids: Array,
    stop_seqs: Array,
    key: Array,
    *,
    cfg: ModelConfig,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    mesh: Mesh | None = None,
    unroll_layers: bool | None = None,
) -> Rollout:
    """Sample ``group_size`` completions for each left-padded prompt.

    Args:
      prompts: int32[b, P] left-padded (``r1jax.sampling.left_pad``), real tokens from ``start[b]``.
      stop_ids: int32[m] tokens that end a row (EOS); may be empty.
      stop_seqs: int32[k, L] token sequences that end a row, right-aligned, left-padded with -1; may be [0, 1].
      key: PRNG key; row i of every step gets its own draw, so the G rows of a group differ.
      mesh: shard the rows over the mesh's batch axes (data parallel sampling); None = as the inputs are placed.
      unroll_layers: decode with unstacked layers (``r1jax.model.unstack_layers``); None = on the CPU backend only.
    """
    b, plen = prompts.shape
    n, T = b * group_size, max_new_tokens
    tau = logprob_temperature(temperature)
    pad = stop_ids[0] if stop_ids.shape[0] else jnp.int32(0)
    seq_len = stop_seqs.shape[1]

    cache = init_cache(cfg, b, plen, start)
    logits, aux = forward(params, prompts, cfg, cache=cache)
    cache = repeat_cache(aux["cache"], group_size, T, mesh)
    if jax.default_backend() == "cpu" if unroll_layers is None else unroll_layers:
        params = unstack_layers(params)
        cache = dataclasses.replace(cache, layers=unstack_layers(cache.layers))
    last = constrain_batch(jnp.repeat(logits[:, -1], group_size, axis=0), mesh)

    def cond(state):
        i, _, _, done, *_ = state
        return (i < T) & ~jnp.all(done)

    def body(state):
        i, cache, lg, done, toks, logps, lengths, window, key = state
        key, sub = jax.random.split(key)
        tok = sample_logits(lg, sub, temperature, top_p, top_k)
        logp = jnp.take_along_axis(jax.nn.log_softmax(lg.astype(jnp.float32) / tau, -1), tok[:, None], -1)[:, 0]
        tok = jnp.where(done, pad, tok)
        toks = toks.at[:, i].set(tok)
        logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
        lengths = lengths + (~done).astype(jnp.int32)
        window = jnp.concatenate([window[:, 1:], tok[:, None]], axis=1)
        done = done | jnp.isin(tok, stop_ids) | _stop_seq_hit(window, stop_seqs)
        lg, aux = forward(params, tok[:, None], cfg, cache=cache)
        return i + 1, aux["cache"], lg[:, -1], done, toks, logps, lengths, window, key

    state = (
        jnp.int32(0),
        cache,
        last,
        constrain_batch(jnp.zeros((n,), bool), mesh),
        constrain_batch(jnp.full((n, T), pad, jnp.int32), mesh),
        constrain_batch(jnp.zeros((n, T), jnp.float32), mesh),
        constrain_batch(jnp.zeros((n,), jnp.int32), mesh),
        constrain_batch(jnp.full((n, seq_len), -2, jnp.int32), mesh),  # -2: never equals a stop token
        key,
    )
    _, _, _, done, toks, logps, lengths, _, _ = jax.lax.while_loop(cond, body, state)
    mask = (jnp.arange(T)[None] < lengths[:, None]).astype(jnp.float32)
    return Rollout(
        prompt_tokens=constrain_batch(jnp.repeat(prompts, group_size, axis=0), mesh),
        prompt_start=constrain_batch(jnp.repeat(start, group_size), mesh),
        tokens=toks,
        mask=mask,
        logp=logps,
        lengths=lengths,
        ended=done,
    )


def stop_token_seqs(stop_strings: Sequence[str], encode: Callable[[str], list[int]] | None) -> np.ndarray:
    """int32[k, L]: each stop string's tokens, right-aligned and left-padded with -1 (shape [0, 1] if none)."""
    if not stop_strings or encode is None:
        return np.zeros((0, 1), np.int32)
    seqs = [list(encode(s)) for s in stop_strings]
    seqs = [s for s in seqs if s]
    if not seqs:
        return np.zeros((0, 1), np.int32)
    width = max(len(s) for s in seqs)
    out = np.full((len(seqs), width), -1, np.int32)
    for i, s in enumerate(seqs):
        out[i, width - len(s) :] = s
    return out


def _inputs(mesh: Mesh | None, *xs) -> tuple[Array, ...]:
    """Host arrays for the jitted loop: replicated on ``mesh`` (every process holds them whole), else as they are."""
    if mesh is None:
        return tuple(jnp.asarray(x) for x in xs)
    return tuple(put(x, NamedSharding(mesh, PartitionSpec())) for x in xs)


def sample(
    params: Params,
    prompts: Sequence[Sequence[int]],
    key: Array,
    *,
    cfg: ModelConfig,
    sampling: SamplingConfig,
    group_size: int,
    stop_ids: Sequence[int] | None = None,
    encode: Callable[[str], list[int]] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    mesh: Mesh | None = None,
    bucket: int = 32,
) -> Rollout:
    """Token-list prompts -> a ``Rollout`` of ``len(prompts) * group_size`` rows (numpy arrays on the host).

    ``stop_ids`` default to the model's EOS ids. ``sampling.stop_strings`` are matched as token sequences inside the
    loop when ``encode`` is given, and as text on the host when ``decode`` is given (``apply_stop_strings``). With
    ``mesh`` (any mesh over r1jax's axis names) sampling runs on it: every process passes the same prompts, the rows
    are split over the data axes, and every process gets the whole rollout back.
    """
    stops = list(cfg.eos_token_ids) if stop_ids is None else list(stop_ids)
    tokens, start = left_pad([list(p) for p in prompts], pad_id=cfg.pad_token_id or 0, bucket=bucket)
    mesh = normalize_mesh(mesh) if mesh is not None else None
    inputs = _inputs(mesh, tokens, start, np.asarray(stops, np.int32).reshape(-1))
    with on_mesh(mesh):
        out = sample_groups(
            params,
            *inputs,
            *_inputs(mesh, stop_token_seqs(sampling.stop_strings, encode)),
            key,
            cfg=cfg,
            group_size=group_size,
            max_new_tokens=sampling.max_new_tokens,
            temperature=float(sampling.temperature),
            top_p=float(sampling.top_p),
            top_k=int(sampling.top_k),
            mesh=mesh,
        )
    out = jax.tree.map(to_host, out)
    if decode is not None and sampling.stop_strings:
        out = apply_stop_strings(out, decode, sampling.stop_strings)
    return out


def _first_stop(text: str, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    hits = [(text.find(s), s) for s in stop_strings if s in text]
    return min(hits) if hits else None


def apply_stop_strings(rollout: Rollout, decode: Callable[[list[int]], str], stop_strings: Sequence[str]) -> Rollout:
    """Host-side stop strings: cut each row after the first token at which its decoded text contains a stop string.

    Rows that already ended on a stop token are checked too (a stop string may come first). A cut row gets
    ``ended=True``, a shorter ``lengths``/``mask``, and zeroed ``logp`` past the cut. Works on numpy rollouts.
    """
    if not stop_strings:
        return rollout
    tokens = np.asarray(rollout.tokens)
    lengths = np.array(rollout.lengths)
    ended = np.array(rollout.ended)
    for i in range(tokens.shape[0]):
        row = tokens[i, : lengths[i]].tolist()
        if _first_stop(decode(row), stop_strings) is None:
            continue
        lo, hi = 1, len(row)  # smallest prefix whose text contains a stop string (containment is monotone)
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_stop(decode(row[:mid]), stop_strings) is None:
                lo = mid + 1
            else:
                hi = mid
        lengths[i], ended[i] = lo, True
    mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.float32)
    return dataclasses.replace(
        rollout, lengths=lengths, ended=ended, mask=mask, logp=np.where(mask > 0, rollout.logp, 0.0)
    )


def completion_texts(
    rollout: Rollout,
    decode: Callable[[list[int]], str],
    *,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    include_stop_str: bool = True,
) -> list[str]:
    """The text of each completion: without a trailing stop token; with the stop string unless
    ``include_stop_str`` is False (what the reward functions read)."""
    stops = set(int(s) for s in stop_ids)
    out = []
    for row, n in zip(np.asarray(rollout.tokens), np.asarray(rollout.lengths), strict=True):
        seq = row[:n].tolist()
        if seq and seq[-1] in stops:
            seq = seq[:-1]
        text = decode(seq)
        if stop_strings:
            hit = _first_stop(text, stop_strings)
            if hit is not None:
                pos, s = hit
                text = text[: pos + len(s)] if include_stop_str else text[:pos]
        out.append(text)
    return out


def generate_tokens(
    params: Params,
    prompts: Array,
    start: Array,
    stop_ids: Array,
    key: Array,
    *,
    cfg: ModelConfig,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    mesh: Mesh | None = None,
) -> tuple[Array, Array, Array]:
    """``sample_groups`` with one sample per prompt and no stop sequences -> (tokens int32[b, N], log-probs f32[b, N]
    of the tempered distribution, lengths int32[b]). A sequence ends after its first token in ``stop_ids`` (included
    in its length); positions past a sequence's length hold ``stop_ids[0]`` (or 0) and log-prob 0."""
    ro = sample_groups(
        params,
        prompts,
        start,
        stop_ids,
        jnp.zeros((0, 1), jnp.int32),
        key,
        cfg=cfg,
        group_size=1,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        mesh=mesh,
    )
    return ro.tokens, ro.logp, ro.lengths


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
    mesh: Mesh | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` for each prompt; returns the new tokens, without the stop token.

    ``stop_ids`` default to the model's EOS ids. Greedy at ``temperature=0``. ``mesh``: generate on it (the model's
    parameters placed there, e.g. by ``r1jax.load(..., mesh=mesh)``), rows split over its data axes.
    """
    cfg: ModelConfig = model.cfg
    stops = list(cfg.eos_token_ids) if stop_ids is None else list(stop_ids)
    tokens, start = left_pad(prompts, pad_id=cfg.pad_token_id or 0)
    mesh = normalize_mesh(mesh) if mesh is not None else None
    with on_mesh(mesh):
        toks, _, lengths = generate_tokens(
            model.param_dict(),
            *_inputs(mesh, tokens, start, np.asarray(stops, np.int32)),
            jax.random.key(seed),
            cfg=cfg,
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            mesh=mesh,
        )
    toks, lengths = to_host(toks), to_host(lengths)
    out = []
    for row, n in zip(toks, lengths, strict=True):
        seq = row[:n].tolist()
        out.append(seq[:-1] if seq and seq[-1] in stops else seq)
    return out
