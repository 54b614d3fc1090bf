"""Sampling for GRPO, ``sample``, ``eval`` and plain generation: one slot engine, one decode loop.

The slot engine. A fixed pool of S decode slots shares one KV cache (for DeepSeek models the compressed MLA cache:
normed latent + rotated rope key; for Qwen/Llama the GQA keys and values), in which every slot has its own write
position and its own row: its position, token count and token budget. Samples wait in a queue; when a slot's row
ends (EOS, a stop sequence, or its own ``max_new_tokens``), the jitted decode loop returns to the host, which harvests
the row and admits the next queued samples into the freed slots. So the pool's decode steps track total tokens / S,
not, as for static batches, the sum over batches of each batch's longest row (``refill=False`` runs static batches
on the same loop: the benchmark's baseline).

- Prefill. Each prompt is prefilled ONCE (``prefill``: left-padded to the pool's prompt width, in chunks of
  ``prompt_chunk`` tokens) and its cache copied into the slots of its G samples, so a group of G samples costs one
  prompt forward plus G decodes. Prefill runs between jitted decode chunks, for several prompts at once.
- Randomness. A sample's t-th token is drawn with ``fold_in(key_i, t)``, ``key_i`` being the sample's own key
  (``fold_in(key, i)`` for the i-th sample of a call): its tokens depend on its prompt, its key and the weights, never
  on which slot it ran in or which samples shared the pool with it.
- Carry-over. The pool is a value the engine keeps between calls: ``SlotEngine.run(params, max_steps=...)`` stops
  after a decode budget with unfinished rows still in their slots, with their caches; the next call continues them
  (partial rollouts).

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
learns to stop. Rows that never stop are truncated at their budget (``ended`` is False).

Shapes: ``b`` prompts, ``G`` group size, ``n = b * G`` rows with groups contiguous (row ``i`` belongs to prompt
``i // G``), ``P`` padded prompt length, ``T = max_new_tokens``, ``S`` slots, ``W = P + T`` cache slots per row.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.cache import Cache, init_cache
from r1jax.config import ModelConfig, SamplingConfig
from r1jax.errors import ConfigError
from r1jax.model import Params, forward, token_logprobs, unstack_layers
from r1jax.sampling import left_pad, sample_logits
from r1jax.sharding import logical_to_spec, normalize_mesh, on_mesh, put, to_host

Array = jax.Array
UNLIMITED = 2**30
KEY_SHAPE = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape


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
    ended: Array  # bool[n]: stopped on EOS / a stop string (False: truncated at its budget)
    # the experts the sampler chose for every token of prompt + completion (routing replay), [n, L_moe, P + T, k]
    # in ``route_dtype``; None unless recorded
    routes: Array | None = dataclasses.field(default=None, kw_only=True)

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
        index=constrain_batch(jnp.repeat(cache.index, group_size), mesh),
        start=constrain_batch(jnp.repeat(cache.start, group_size), mesh),
    )


def _stop_seq_hit(window: Array, stop_seqs: Array) -> Array:
    """bool[n]: the last L tokens ``window[n, L]`` end with one of ``stop_seqs[m, L]`` (right-aligned, -1 = any)."""
    if stop_seqs.shape[0] == 0:
        return jnp.zeros(window.shape[:1], bool)
    eq = (stop_seqs[None] == -1) | (window[:, None, :] == stop_seqs[None])
    return jnp.any(jnp.all(eq, axis=-1), axis=-1)


# --- the device side: a pool of slots, prefill, admission, the decode loop -----------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pool:
    """The device state of S decode slots (slot axis first; a free slot is ``done``)."""

    cache: Cache  # layers [L, S, W, ...] (or per-layer [S, W, ...] when unstacked), index[S], start[S]
    logits: Array  # f32[S, V]: each slot's next-token logits
    keys: Array  # uint32[S, 2]: key data of each slot's sample (its t-th token is drawn with fold_in(key, t))
    count: Array  # int32[S]: tokens generated
    budget: Array  # int32[S]: the sample's max_new_tokens
    done: Array  # bool[S]: ended, at its budget, or free
    ended: Array  # bool[S]: ended on a stop token / stop sequence
    window: Array  # int32[S, L]: the last tokens, for stop sequences
    tokens: Array  # int32[S, T]
    logp: Array  # f32[S, T]
    routes: Array | None  # [S, W, L_moe, k] experts of the token at each cache slot (routing replay); None: off


def route_dtype(cfg: ModelConfig):
    """The smallest integer type that holds an expert index: recorded routes are [tokens, MoE layers, k] per row."""
    return jnp.uint8 if cfg.n_experts <= 256 else jnp.int16


def _slot_axis(unrolled: bool) -> int:
    return 0 if unrolled else 1


def _constrain_pool(pool: Pool, mesh: Mesh | None, unrolled: bool) -> Pool:
    """Inside jit: the slots over the mesh's batch axes (cache leaves on their slot axis)."""
    if mesh is None:
        return pool
    ax = _slot_axis(unrolled)
    cache = Cache(
        layers=jax.tree.map(lambda x: constrain_batch(x, mesh, ax), pool.cache.layers),
        index=constrain_batch(pool.cache.index, mesh),
        start=constrain_batch(pool.cache.start, mesh),
    )
    rest = {
        f.name: constrain_batch(getattr(pool, f.name), mesh)
        for f in dataclasses.fields(Pool)
        if f.name != "cache" and getattr(pool, f.name) is not None
    }
    return dataclasses.replace(pool, cache=cache, **rest)


@functools.partial(
    jax.jit, static_argnames=("cfg", "slots", "width", "max_new", "window", "unrolled", "mesh", "record_routes")
)
def empty_pool(
    *, cfg: ModelConfig, slots: int, width: int, max_new: int, window: int, unrolled: bool, mesh: Mesh | None,
    record_routes: bool = False,
) -> Pool:  # fmt: skip
    """S free slots of ``width`` cache slots each (prompt width + max_new)."""
    cache = init_cache(cfg, slots, width)
    if unrolled:
        cache = dataclasses.replace(cache, layers=unstack_layers(cache.layers))
    pool = Pool(
        cache=cache,
        logits=jnp.zeros((slots, cfg.vocab_size), jnp.float32),
        keys=jnp.zeros((slots, *KEY_SHAPE), jnp.uint32),
        count=jnp.zeros((slots,), jnp.int32),
        budget=jnp.zeros((slots,), jnp.int32),
        done=jnp.ones((slots,), bool),
        ended=jnp.zeros((slots,), bool),
        window=jnp.full((slots, window), -2, jnp.int32),
        tokens=jnp.zeros((slots, max_new), jnp.int32),
        logp=jnp.zeros((slots, max_new), jnp.float32),
        routes=jnp.zeros((slots, width, cfg.n_moe_layers, cfg.experts_per_token), route_dtype(cfg))
        if record_routes
        else None,
    )
    return _constrain_pool(pool, mesh, unrolled)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "unrolled", "record_routes"))
def prefill(
    params: Params, prompts: Array, start: Array, *, cfg: ModelConfig, chunk: int, unrolled: bool,
    record_routes: bool = False,
):  # fmt: skip
    """Prefill left-padded prompts int32[k, P] (real tokens from ``start[k]``) in chunks of ``chunk`` tokens (P a
    multiple of it; chunks that hold left padding only are skipped) -> (their cache, the next-token logits f32[k, V],
    and with ``record_routes`` the experts of every prompt position, [k, P, L_moe, experts_per_token]; 0 at skipped
    padding). ``params`` and the cache are unstacked when ``unrolled`` (the pool's layout)."""
    k, plen = prompts.shape
    n_chunks = plen // chunk
    first = jnp.min(start) // chunk  # chunks before it hold left padding only: skipped
    cache = init_cache(cfg, k, plen, start)
    cache = dataclasses.replace(cache, index=jnp.full((k,), first * chunk, jnp.int32))
    if unrolled:
        cache = dataclasses.replace(cache, layers=unstack_layers(cache.layers))
    dt = route_dtype(cfg)
    routes = jnp.zeros((k, plen, cfg.n_moe_layers, cfg.experts_per_token), dt) if record_routes else None

    def step(c, carry):
        cache, _, routes = carry
        toks = jax.lax.dynamic_slice_in_dim(prompts, c * chunk, chunk, axis=1)
        logits, aux = forward(params, toks, cfg, cache=cache, return_routes=record_routes)
        if record_routes:
            used = aux["routes"].transpose(1, 2, 0, 3).astype(dt)  # [k, chunk, L, e]
            routes = jax.lax.dynamic_update_slice_in_dim(routes, used, c * chunk, axis=1)
        return aux["cache"], logits[:, -1], routes

    last = jnp.zeros((k, cfg.vocab_size), jnp.float32)
    cache, last, routes = jax.lax.fori_loop(first, n_chunks, step, (cache, last, routes))
    return cache, last, routes


@functools.partial(jax.jit, static_argnames=("unrolled", "mesh"), donate_argnums=(0,))
def admit(
    pool: Pool, pre: Cache, pre_logits: Array, pre_routes: Array | None, src: Array, dst: Array, keys: Array,
    budget: Array, pad: Array, *, unrolled: bool, mesh: Mesh | None,
) -> Pool:  # fmt: skip
    """Copy prefilled prompts ``src[j]`` of ``pre`` into slots ``dst[j]`` (``dst`` = S: no-op padding) and start
    their samples there: key data ``keys[j]``, budget ``budget[j]``, no tokens yet."""
    ax = _slot_axis(unrolled)
    plen = pre.max_len
    lead = (slice(None),) * ax

    def place(big, small):
        return big.at[(*lead, dst, slice(0, plen))].set(jnp.take(small, src, axis=ax).astype(big.dtype), mode="drop")

    def put_rows(x, v):
        return x.at[dst].set(v, mode="drop")

    cache = Cache(
        layers=jax.tree.map(place, pool.cache.layers, pre.layers),
        index=put_rows(pool.cache.index, jnp.full(dst.shape, plen, jnp.int32)),
        start=put_rows(pool.cache.start, pre.start[src]),
    )
    zeros = jnp.zeros(dst.shape, jnp.int32)
    pool = dataclasses.replace(
        pool,
        cache=cache,
        logits=put_rows(pool.logits, pre_logits[src]),
        keys=put_rows(pool.keys, keys),
        count=put_rows(pool.count, zeros),
        budget=put_rows(pool.budget, budget),
        done=put_rows(pool.done, zeros > 0),
        ended=put_rows(pool.ended, zeros > 0),
        window=put_rows(pool.window, jnp.full((dst.shape[0], pool.window.shape[1]), -2, jnp.int32)),
        tokens=put_rows(pool.tokens, jnp.broadcast_to(pad, (dst.shape[0], pool.tokens.shape[1]))),
        logp=put_rows(pool.logp, jnp.zeros((dst.shape[0], pool.logp.shape[1]), jnp.float32)),
        routes=None if pool.routes is None else pool.routes.at[dst, :plen].set(pre_routes[src], mode="drop"),
    )
    return _constrain_pool(pool, mesh, unrolled)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "temperature", "top_p", "top_k", "unrolled", "mesh"),
    donate_argnums=(1,),
)
def decode(
    params: Params,
    pool: Pool,
    stop_ids: Array,
    stop_seqs: Array,
    limit: Array,
    refill: Array,
    *,
    cfg: ModelConfig,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    unrolled: bool = False,
    mesh: Mesh | None = None,
) -> tuple[Pool, Array]:
    """The decode loop: one token for every live slot per step, until every slot is done, ``limit`` steps have run,
    or (when ``refill``) a slot has just finished, so the host can refill it. Returns the pool and the steps run.

    ``params`` are unstacked (``unstack_layers``) when ``unrolled``, as are the pool's cache layers. Done slots idle
    (their writes land on their own next slot, which nothing reads; their index does not advance).
    """
    tau = logprob_temperature(temperature)
    pad = stop_ids[0] if stop_ids.shape[0] else jnp.int32(0)
    S, T = pool.tokens.shape
    rows = jnp.arange(S)
    done0 = pool.done

    def cond(state):
        i, p = state
        return (i < limit) & ~jnp.all(p.done) & ~(refill & jnp.any(p.done & ~done0))

    def body(state):
        i, p = state
        live = ~p.done
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(p.keys), p.count)
        tok = sample_logits(p.logits, keys, temperature, top_p, top_k)
        logp = token_logprobs(p.logits / tau, tok)
        tok = jnp.where(live, tok, pad)
        at = jnp.where(live, p.count, T)  # done slots write nowhere
        window = jnp.where(live[:, None], jnp.concatenate([p.window[:, 1:], tok[:, None]], axis=1), p.window)
        stop = live & (jnp.isin(tok, stop_ids) | _stop_seq_hit(window, stop_seqs))
        count = p.count + live.astype(jnp.int32)
        lg, aux = forward(params, tok[:, None], cfg, cache=p.cache, return_routes=p.routes is not None)
        routes = p.routes
        if routes is not None:  # the experts of the token just fed, at its cache slot
            at_slot = jnp.where(live, p.cache.index, routes.shape[1])
            routes = routes.at[rows, at_slot].set(aux["routes"][:, :, 0].transpose(1, 0, 2).astype(routes.dtype),
                                                  mode="drop")  # fmt: skip
        new = dataclasses.replace(
            p,
            cache=dataclasses.replace(aux["cache"], index=p.cache.index + live.astype(jnp.int32)),
            logits=lg[:, -1],
            count=count,
            done=p.done | stop | (count >= p.budget),
            ended=p.ended | stop,
            window=window,
            tokens=p.tokens.at[rows, at].set(tok, mode="drop"),
            logp=p.logp.at[rows, at].set(logp, mode="drop"),
            routes=routes,
        )
        return i + 1, _constrain_pool(new, mesh, unrolled)

    steps, pool = jax.lax.while_loop(cond, body, (jnp.int32(0), pool))
    return pool, steps


unstack_params = jax.jit(unstack_layers)


# --- the host side: the queue, admission, harvest ------------------------------------------------------------------
@dataclasses.dataclass
class Finished:
    """A harvested sample (host side)."""

    tokens: np.ndarray  # int32[length]
    logp: np.ndarray  # f32[length]
    ended: bool
    routes: np.ndarray | None = None  # [P_pool + length, L_moe, k]: the experts of each cache slot (routing replay)


@dataclasses.dataclass(frozen=True)
class _Request:
    sid: int  # the sample's id, in submission order
    prompt: int  # its prompt's id
    budget: int
    key: np.ndarray  # uint32 key data


class SlotEngine:
    """A pool of ``slots`` decode slots, a queue of samples, and the host loop that refills the pool.

    ``submit`` queues samples (``n`` per prompt); ``run`` decodes until the queue is empty and every slot is done,
    or until ``max_steps`` decode steps (the rest carry over, cache and all, to the next ``run``); ``finished``
    holds the harvested samples by id. ``refill=False`` admits only into an empty pool (static batches);
    ``eager=True`` returns from ``run`` as soon as any row ends (the caller acts on it: a tool call).
    ``prompt_len`` (a multiple of ``prompt_chunk``) and ``max_new_tokens`` fix the cache width; ``prefill_batch``
    prompts are prefilled per call.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        sampling: SamplingConfig,
        *,
        slots: int,
        prompt_len: int,
        max_new_tokens: int | None = None,
        stop_ids: Sequence[int] = (),
        stop_seqs: np.ndarray | None = None,
        prompt_chunk: int | None = None,
        prefill_batch: int = 1,
        refill: bool = True,
        mesh: Mesh | None = None,
        unroll_layers: bool | None = None,
        record_routes: bool = False,
        eager: bool = False,
    ) -> None:
        chunk = prompt_chunk or prompt_len
        if slots < 1 or prompt_len < 1 or prompt_len % chunk:
            raise ConfigError(f"slots ({slots}) and prompt_len ({prompt_len}, a multiple of {chunk}) must be >= 1")
        self.cfg, self.sampling, self.mesh = cfg, sampling, mesh
        self.slots, self.prompt_len, self.chunk = slots, prompt_len, chunk
        self.max_new = int(max_new_tokens or sampling.max_new_tokens)
        self.stops = [int(s) for s in stop_ids]
        self.pad = self.stops[0] if self.stops else 0
        seqs = np.zeros((0, 1), np.int32) if stop_seqs is None else np.asarray(stop_seqs, np.int32)
        self.prefill_batch, self.refill, self.eager = max(1, int(prefill_batch)), refill, eager
        self.unrolled = jax.default_backend() == "cpu" if unroll_layers is None else bool(unroll_layers)
        self._stop_ids, self._stop_seqs = _inputs(mesh, np.asarray(self.stops, np.int32).reshape(-1), seqs)
        self.queue: collections.deque[_Request] = collections.deque()
        self.prompts: dict[int, list[int]] = {}
        self.slot_sid: list[int | None] = [None] * slots
        self.finished: dict[int, Finished] = {}
        self.decode_steps = 0
        self._next_sid = self._next_prompt = 0
        self._pre: tuple[tuple[int, ...], Cache, Array, Array | None] | None = None
        if record_routes and not cfg.n_moe_layers:
            raise ConfigError("routing replay records MoE routes: this model has no MoE layers")
        self.record_routes = record_routes
        with on_mesh(mesh):
            self.pool = empty_pool(
                cfg=cfg, slots=slots, width=prompt_len + self.max_new, max_new=self.max_new,
                window=seqs.shape[1], unrolled=self.unrolled, mesh=mesh, record_routes=record_routes,
            )  # fmt: skip

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(s is not None for s in self.slot_sid)

    def submit(self, prompt: Sequence[int], n: int, key: Array, budgets: Sequence[int] | None = None) -> list[int]:
        """Queue ``n`` samples of ``prompt`` (sample j drawn with ``fold_in(key, j)``); returns their ids."""
        if not 0 < len(prompt) <= self.prompt_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit the pool's {self.prompt_len}")
        budgets = [self.max_new] * n if budgets is None else [int(b) for b in budgets]
        if len(budgets) != n or not all(0 < b <= self.max_new for b in budgets):
            raise ValueError(f"need {n} budgets in [1, {self.max_new}], got {budgets}")
        pid = self._next_prompt
        self._next_prompt += 1
        self.prompts[pid] = [int(t) for t in prompt]
        sids = list(range(self._next_sid, self._next_sid + n))
        self._next_sid += n
        for j, (sid, b) in enumerate(zip(sids, budgets, strict=True)):
            self.queue.append(_Request(sid, pid, b, np.asarray(jax.random.key_data(jax.random.fold_in(key, j)))))
        return sids

    def run(self, params: Params, max_steps: int | None = None) -> int:
        """Decode until nothing is queued or live, or for ``max_steps`` steps (``eager``: or until a row ends);
        returns the steps run."""
        if self.unrolled:
            params = unstack_params(params)
        steps = 0
        with on_mesh(self.mesh):
            while self.busy and (max_steps is None or steps < max_steps):
                self._admit(params)
                limit = UNLIMITED if max_steps is None else max_steps - steps
                self.pool, n = decode(
                    params, self.pool, self._stop_ids, self._stop_seqs, *_inputs(self.mesh, limit, self._refill_now),
                    cfg=self.cfg, temperature=float(self.sampling.temperature), top_p=float(self.sampling.top_p),
                    top_k=int(self.sampling.top_k), unrolled=self.unrolled, mesh=self.mesh,
                )  # fmt: skip
                steps += int(to_host(n))
                if self._harvest() and self.eager:
                    break
        self.decode_steps += steps
        return steps

    @property
    def _refill_now(self) -> bool:
        return (self.refill and bool(self.queue)) or self.eager

    def _admit(self, params: Params) -> None:
        free = [s for s, sid in enumerate(self.slot_sid) if sid is None]
        if not self.queue or not free or (not self.refill and len(free) < self.slots):
            return
        take = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        while take:
            if self._pre is None or take[0].prompt not in self._pre[0]:
                self._prefill(params, take[0].prompt)
            pids = self._pre[0]
            now = [r for r in take if r.prompt in pids]
            take = take[len(now) :]
            dst = [free.pop(0) for _ in now]
            for r, s in zip(now, dst, strict=True):
                self.slot_sid[s] = r.sid
            pad = self.slots - len(now)
            host = _inputs(
                self.mesh,
                np.asarray([pids.index(r.prompt) for r in now] + [0] * pad, np.int32),
                np.asarray(dst + [self.slots] * pad, np.int32),
                np.stack([r.key for r in now] + [now[0].key] * pad),
                np.asarray([r.budget for r in now] + [1] * pad, np.int32),
                np.int32(self.pad),
            )
            self.pool = admit(self.pool, *self._pre[1:], *host, unrolled=self.unrolled, mesh=self.mesh)

    def _prefill(self, params: Params, first: int) -> None:
        """Prefill ``prefill_batch`` prompts from ``first`` on (those queued next), padding the batch by repeats."""
        pids = tuple(range(first, min(first + self.prefill_batch, self._next_prompt)))
        toks = [self.prompts[p] for p in pids]
        toks += [toks[-1]] * (self.prefill_batch - len(toks))
        tokens, start = left_pad(toks, pad_id=self.cfg.pad_token_id or 0, bucket=self.prompt_len)
        pre = prefill(params, *_inputs(self.mesh, tokens, start), cfg=self.cfg, chunk=self.chunk,
                      unrolled=self.unrolled, record_routes=self.record_routes)  # fmt: skip
        self._pre = (pids, *pre)
        for p in [p for p in self.prompts if p < first]:  # admitted in full: admission runs in queue order
            del self.prompts[p]

    def _harvest(self) -> int:
        """Move the rows that ended into ``finished``, freeing their slots; returns how many."""
        p = self.pool
        done, count, ended = (to_host(x) for x in (p.done, p.count, p.ended))
        out = [s for s, sid in enumerate(self.slot_sid) if sid is not None and done[s]]
        if not out:
            return 0
        tokens, logp = to_host(p.tokens), to_host(p.logp)
        routes = None if p.routes is None else to_host(p.routes)
        for s in out:
            n = int(count[s])
            r = None if routes is None else routes[s, : self.prompt_len + n].copy()
            self.finished[self.slot_sid[s]] = Finished(tokens[s, :n].copy(), logp[s, :n].copy(), bool(ended[s]), r)
            self.slot_sid[s] = None
        return len(out)


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


def prompt_width(longest: int, bucket: int, chunk: int = 0) -> int:
    """The pool's prompt length for prompts of up to ``longest`` tokens: a multiple of the shape ``bucket`` and of
    the prefill ``chunk`` (0: one chunk), so a few widths serve every batch."""
    unit = int(np.lcm(bucket, chunk or bucket))
    return -(-longest // unit) * unit


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
    budgets: Sequence[int] | None = None,
    refill: bool = True,
    record_routes: bool = False,
) -> Rollout:
    """Token-list prompts -> a ``Rollout`` of ``len(prompts) * group_size`` rows (numpy arrays on the host), sampled
    by a ``SlotEngine`` of ``sampling.slots`` slots (0: one per row).

    ``stop_ids`` default to the model's EOS ids. ``sampling.stop_strings`` are matched as token sequences inside the
    loop when ``encode`` is given, and as text on the host when ``decode`` is given (``apply_stop_strings``). With
    ``mesh`` (any mesh over r1jax's axis names) sampling runs on it: every process passes the same prompts, the slots
    are split over the data axes, and every process gets the whole rollout back. ``budgets``: each row's
    ``max_new_tokens`` (default ``sampling.max_new_tokens``). Row j of prompt i is drawn with
    ``fold_in(fold_in(key, i), j)``. ``refill=False``: static batches of ``slots`` rows (the benchmark's baseline).
    ``record_routes``: the rollout carries the experts the sampler chose (``Rollout.routes``, routing replay).
    """
    stops = list(cfg.eos_token_ids) if stop_ids is None else list(stop_ids)
    n = len(prompts) * group_size
    slots = min(sampling.slots or n, n)
    if slots < group_size:
        raise ConfigError(f"sampling.slots={slots} is smaller than a group ({group_size})")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    plen = prompt_width(max(len(p) for p in prompts), bucket, sampling.prompt_chunk)
    mesh = normalize_mesh(mesh) if mesh is not None else None
    engine = SlotEngine(
        cfg, sampling, slots=slots, prompt_len=plen, stop_ids=stops,
        stop_seqs=stop_token_seqs(sampling.stop_strings, encode), prompt_chunk=sampling.prompt_chunk or plen,
        prefill_batch=min(-(-slots // group_size), len(prompts)), refill=refill, mesh=mesh,
        record_routes=record_routes,
    )  # fmt: skip
    for i, p in enumerate(prompts):
        rows = None if budgets is None else budgets[i * group_size : (i + 1) * group_size]
        engine.submit(p, group_size, jax.random.fold_in(key, i), rows)
    engine.run(params)
    rows = [engine.finished[i] for i in range(n)]
    out = assemble(rows, prompts, group_size, sampling.max_new_tokens, engine.pad, cfg, plen, plen)
    if decode is not None and sampling.stop_strings:
        out = apply_stop_strings(out, decode, sampling.stop_strings)
    return out


def assemble(
    rows: Sequence[Finished], prompts: Sequence[Sequence[int]], group_size: int, T: int, pad: int, cfg: ModelConfig,
    bucket: int, pool_prompt_len: int = 0,
) -> Rollout:  # fmt: skip
    """Harvested samples (groups contiguous) -> a numpy ``Rollout``: prompts left-padded to a multiple of
    ``bucket``, completions padded to ``T`` with ``pad``; recorded routes (from a pool whose prompts were left-padded
    to ``pool_prompt_len``) moved to the same layout, expert 0 at padding."""
    n = len(rows)
    tokens = np.full((n, T), pad, np.int32)
    logp = np.zeros((n, T), np.float32)
    lengths = np.asarray([len(r.tokens) for r in rows], np.int32)
    for i, r in enumerate(rows):
        tokens[i, : lengths[i]] = r.tokens
        logp[i, : lengths[i]] = r.logp
    ptoks, pstart = left_pad([list(p) for p in prompts], pad_id=cfg.pad_token_id or 0, bucket=bucket)
    routes = None
    if rows and rows[0].routes is not None:
        plen = ptoks.shape[1]
        routes = np.zeros((n, plen + T, *rows[0].routes.shape[1:]), rows[0].routes.dtype)
        for i, r in enumerate(rows):
            real = plen - pstart[i // group_size]  # prompt tokens
            routes[i, plen - real : plen + lengths[i]] = r.routes[pool_prompt_len - real :]
        routes = routes.transpose(0, 2, 1, 3)
    return Rollout(
        prompt_tokens=np.repeat(ptoks, group_size, axis=0),
        prompt_start=np.repeat(pstart, group_size),
        tokens=tokens,
        mask=(np.arange(T)[None] < lengths[:, None]).astype(np.float32),
        logp=logp,
        lengths=lengths,
        ended=np.asarray([r.ended for r in rows], bool),
        routes=routes,
    )


def _first_stop(text: str, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    hits = [(text.find(s), s) for s in stop_strings if s in text]
    return min(hits) if hits else None


def stop_cut(tokens: list[int], decode: Callable[[list[int]], str], stop_strings: Sequence[str]) -> int | None:
    """The length of the shortest prefix of ``tokens`` whose text contains a stop string (None: none does)."""
    if not stop_strings or _first_stop(decode(tokens), stop_strings) is None:
        return None
    lo, hi = 1, len(tokens)  # containment is monotone in the prefix length
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_stop(decode(tokens[:mid]), stop_strings) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo


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
        cut = stop_cut(tokens[i, : lengths[i]].tolist(), decode, stop_strings)
        if cut is not None:
            lengths[i], ended[i] = cut, True
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
    sampling = SamplingConfig(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                              max_new_tokens=max_new_tokens)  # fmt: skip
    stops = list(cfg.eos_token_ids) if stop_ids is None else list(stop_ids)
    ro = sample(model.param_dict(), prompts, jax.random.key(seed), cfg=cfg, sampling=sampling, group_size=1,
                stop_ids=stops, mesh=mesh)  # fmt: skip
    out = []
    for row, n in zip(ro.tokens, ro.lengths, strict=True):
        seq = row[:n].tolist()
        out.append(seq[:-1] if seq and seq[-1] in stops else seq)
    return out
