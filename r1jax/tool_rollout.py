"""Multi-turn rollouts with tools: decode until a tool call closes, run the calls, append their results, go on.

One trajectory per row (``b`` prompts x G rows, groups contiguous, as ``r1jax.rollout.sample``) is built in turns
on one ``r1jax.rollout.SlotEngine`` (its decode loop: no second decoder). A turn ends at EOS, a stop string, a tool
call's closing tag (``ToolEnv.stop_strings``, e.g. ``</search>``), the per-turn limit or the trajectory budget; the
engine returns to the host as soon as a row's turn ends (``eager``), the host cuts the turn at its first stop string
as text (``rollout.stop_cut``), and a call starts at once on the environment's thread pool. The engine meanwhile
decodes the other rows, and the host collects finished calls every ``poll_steps`` decode steps (or waits for the
first one when nothing is left to decode): a call's latency blocks only its own row. Its result block
(``<information>...</information>``) is appended as tokens and the row's next turn is queued from its whole context
so far. After ``max_turns`` calls a row's closing tags no longer end its turns (further calls are plain text).

Re-prefill, not cache reuse. Each later turn prefills its row's whole context (prompt + trajectory) again, in
chunks, skipping the chunks of left padding: one forward over the context per later turn (its cost against decoding
is measured in the README). Turn 0 shares each prompt's prefill across its G rows.

Determinism. Turn 0 of row j of prompt i is drawn with ``fold_in(fold_in(key, i), j)``, a later turn of row r with a
key of (r, its trajectory length), and the engine's draws depend on a sample's own key and context only (never on
its slot or its company), so every sampled token is a function of the data and the key, never of how fast a tool
answered.

Masks. ``mask`` is 1 on the model's tokens only: result tokens are context (present in ``tokens``, read by every
teacher-forced forward), with loss, ratio and KL mask 0 and no sampler log-prob (``logp`` 0). ``env_mask`` marks
them. ``lengths`` are trajectory lengths (model + result tokens, what the budget ``sampling.max_new_tokens``
bounds); ``ended`` is False for a trajectory cut by the budget or the per-turn limit, including one cut inside a
call that never closed (``open_call``: no tool runs; the reward scores the text as it stands).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from r1jax import rollout
from r1jax.config import ModelConfig, SamplingConfig
from r1jax.model import Params
from r1jax.rollout import Rollout
from r1jax.sampling import left_pad
from r1jax.tools import CallRecord, ToolCall, ToolEnv


@dataclasses.dataclass(frozen=True)
class ToolRollout(Rollout):
    """A ``Rollout`` whose ``tokens`` are whole trajectories (model and result tokens; numpy arrays), plus:"""

    env_mask: np.ndarray  # float32[n, T]: 1 on tokens the environment appended (result blocks)
    num_calls: np.ndarray  # int32[n]: tool calls executed
    open_call: np.ndarray  # bool[n]: cut by the budget inside a call that never closed
    calls: tuple[tuple[CallRecord, ...], ...]  # per row, in order
    timing: Mapping[str, float]  # sample_s (prefills + decoding), tools_s (decoding idle, waiting on calls), turns


@dataclasses.dataclass
class _Row:
    """One trajectory while it is being built (host side)."""

    context: list[int]  # the prompt
    tokens: list[int] = dataclasses.field(default_factory=list)
    model: list[bool] = dataclasses.field(default_factory=list)
    logp: list[float] = dataclasses.field(default_factory=list)
    calls: list[CallRecord] = dataclasses.field(default_factory=list)
    ended: bool = False
    open_call: bool = False

    def extend(self, tokens: Sequence[int], logp: Sequence[float] | None) -> None:
        self.tokens += [int(t) for t in tokens]
        self.model += [logp is not None] * len(tokens)
        self.logp += [float(x) for x in logp] if logp is not None else [0.0] * len(tokens)


def _first_hit(text: str, strings: Sequence[str]) -> str | None:
    """The stop string that occurs first in ``text`` (None if none does)."""
    return min(((text.find(s), s) for s in strings if s in text), default=(0, None))[1]


def _result_tokens(env: ToolEnv, record: CallRecord, encode: Callable[[str], list[int]]) -> list[int]:
    """The result block's tokens, at most ``max_result_tokens``: the text is cut, the tags always kept."""
    s = env.syntax[record.tool]
    head, tail = encode(s.result_open), encode(s.result_close)
    room = max(env.cfg.max_result_tokens - len(head) - len(tail), 0)
    return head + encode(record.result)[:room] + tail


def sample_with_tools(
    params: Params,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    *,
    cfg: ModelConfig,
    sampling: SamplingConfig,
    env: ToolEnv,
    group_size: int,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    stop_ids: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    bucket: int = 32,
    poll_steps: int = 8,
) -> ToolRollout:
    """``len(prompts) * group_size`` trajectories with tool calls (see the module docstring): the multi-turn
    counterpart of ``r1jax.rollout.sample``, with the same arguments plus the environment ``env``.

    ``sampling.max_new_tokens`` is the budget of a whole trajectory; ``env.cfg`` (a ``ToolConfig``) bounds the turns
    and the tokens of one turn and one result. While calls run, the engine decodes the other rows and looks for
    finished calls every ``poll_steps`` decode steps. Returns numpy arrays on the host.
    """
    stops = list(cfg.eos_token_ids) if stop_ids is None else list(stop_ids)
    T, tc = sampling.max_new_tokens, env.cfg
    turn_cap = min(tc.max_turn_tokens or T, T)
    n = len(prompts) * group_size
    rows = [_Row(context=[int(t) for t in prompts[i // group_size]]) for i in range(n)]
    strings = tuple(sampling.stop_strings) + env.stop_strings  # past max_turns a closing tag is text (below)
    plen = -(-max(len(p) for p in prompts) // bucket) * bucket
    engine = rollout.SlotEngine(
        cfg, dataclasses.replace(sampling, stop_strings=strings), slots=min(sampling.slots or n, n),
        prompt_len=-(-(plen + T) // bucket) * bucket, max_new_tokens=turn_cap, stop_ids=stops,
        stop_seqs=rollout.stop_token_seqs(strings, encode), prompt_chunk=bucket, mesh=mesh, eager=True,
    )  # fmt: skip
    row_of: dict[int, int] = {}
    for i, p in enumerate(prompts):
        for j, sid in enumerate(engine.submit(p, group_size, jax.random.fold_in(key, i), [turn_cap] * group_size)):
            row_of[sid] = i * group_size + j

    def go_on(i: int) -> None:
        """Queue row i's next turn: its whole context so far, re-prefilled; the key depends on the row and turn."""
        r = rows[i]
        turn_key = jax.random.fold_in(jax.random.fold_in(key, n + i), len(r.tokens))
        (sid,) = engine.submit(r.context + r.tokens, 1, turn_key, [min(turn_cap, T - len(r.tokens))])
        row_of[sid] = i

    pending: list[tuple[int, ToolCall, object, float]] = []  # (row, call, future, started)
    sample_s = tools_s = 0.0
    while engine.busy or pending:
        if engine.busy:
            t0 = time.perf_counter()
            engine.run(params, max_steps=poll_steps if pending else None)
            sample_s += time.perf_counter() - t0
        for sid in sorted(engine.finished):
            i, f = row_of.pop(sid), engine.finished.pop(sid)
            call = _turn(rows[i], f, env, decode, stops, sampling.stop_strings, T, turn_cap)
            if call == "continue":
                go_on(i)
            elif call is not None:
                pending.append((i, call, env.submit(call), time.perf_counter()))
        if pending and not engine.busy:  # nothing to decode: wait for the first call to finish
            t0 = time.perf_counter()
            left = min(tc.timeout_s - (t0 - started) for *_, started in pending)
            cf.wait([fut for _, _, fut, _ in pending], timeout=max(left, 0.0), return_when=cf.FIRST_COMPLETED)
            tools_s += time.perf_counter() - t0
        now = time.perf_counter()
        done = [c for c in pending if c[2].done() or now - c[3] >= tc.timeout_s]
        pending = [c for c in pending if c not in done]
        for i, call, fut, started in done:
            r = rows[i]
            rec = env.record(call, fut, started)
            r.calls.append(rec)
            result = _result_tokens(env, rec, encode)
            room = T - len(r.tokens)
            r.extend(result[:room], None)
            if len(result) < room:
                go_on(i)
    timing = {"sample_s": sample_s, "tools_s": tools_s, "turns": float(max(len(r.calls) for r in rows) + 1)}
    pad = stops[0] if stops else 0
    return _assemble(rows, prompts, group_size, T, pad, cfg, bucket, timing)


def _turn(row: _Row, f: rollout.Finished, env: ToolEnv, decode, stops, stop_strings, T: int, turn_cap: int):
    """Append a finished turn to its row -> the call to run, ``"continue"`` (decode on: a closing tag past
    ``max_turns`` or a token-matched stop the text does not confirm), or None (the trajectory is over)."""
    room = T - len(row.tokens)
    live = tuple(stop_strings) + (env.stop_strings if len(row.calls) < env.cfg.max_turns else ())
    seg = f.tokens[:room].tolist()
    cut = rollout.stop_cut(seg, decode, live)
    eos = cut is None and f.ended and bool(seg) and seg[-1] in stops
    if cut is not None:
        seg = seg[:cut]
    row.extend(seg, f.logp[: len(seg)])
    text = decode(seg)
    hit = _first_hit(text, live) if cut is not None else None
    if hit in env.stop_strings:
        return env.find_call(text[: text.find(hit) + len(hit)]) if len(row.tokens) < T else None
    if hit is not None or eos:
        row.ended = True
        return None
    if f.ended and len(row.tokens) < T and len(seg) < turn_cap:  # a stop the text does not confirm: go on
        return "continue"
    row.open_call = env.open_call(decode(row.tokens))  # cut by the budget or the per-turn limit
    return None


def _assemble(rows, prompts, group_size, T, pad, cfg, bucket, timing) -> ToolRollout:
    n = len(rows)
    tokens = np.full((n, T), pad, np.int32)
    mask = np.zeros((n, T), np.float32)
    env_mask = np.zeros((n, T), np.float32)
    logp = np.zeros((n, T), np.float32)
    for i, r in enumerate(rows):
        m = len(r.tokens)
        tokens[i, :m] = r.tokens
        model = np.asarray(r.model, bool)
        mask[i, :m] = model
        env_mask[i, :m] = ~model
        logp[i, :m] = np.where(model, r.logp, 0.0)
    ptoks, pstart = left_pad([list(p) for p in prompts], pad_id=cfg.pad_token_id or 0, bucket=bucket)
    return ToolRollout(
        prompt_tokens=np.repeat(ptoks, group_size, axis=0),
        prompt_start=np.repeat(pstart, group_size),
        tokens=tokens,
        mask=mask,
        logp=logp,
        lengths=np.asarray([len(r.tokens) for r in rows], np.int32),
        ended=np.asarray([r.ended for r in rows], bool),
        env_mask=env_mask,
        num_calls=np.asarray([len(r.calls) for r in rows], np.int32),
        open_call=np.asarray([r.open_call for r in rows], bool),
        calls=tuple(tuple(r.calls) for r in rows),
        timing=dict(timing),
    )


def tool_metrics(ro: ToolRollout, tools: Sequence[str]) -> dict[str, float]:
    """Per-step tool metrics: calls per sample (all and per tool), per-tool errors (count and share of calls),
    trajectories cut inside an open call, result and model tokens per sample, decode and tool wall time."""
    n = ro.tokens.shape[0]
    out = {
        "tools/calls_per_sample": float(np.mean(ro.num_calls)),
        "tools/truncated_calls": float(np.mean(ro.open_call)),
        "tools/result_tokens_mean": float(np.asarray(ro.env_mask).sum() / n),
        "tools/turns": float(ro.timing["turns"]),
        "response/model_tokens_mean": float(np.asarray(ro.mask).sum() / n),
        "perf/sample_decode_s": float(ro.timing["sample_s"]),
        "perf/sample_tools_s": float(ro.timing["tools_s"]),
    }
    for name in tools:
        recs = [c for row in ro.calls for c in row if c.tool == name]
        errors = sum(c.error is not None for c in recs)
        out[f"tools/{name}/calls_per_sample"] = len(recs) / n
        out[f"tools/{name}/errors"] = float(errors)
        out[f"tools/{name}/error_frac"] = errors / max(len(recs), 1)
    return out
