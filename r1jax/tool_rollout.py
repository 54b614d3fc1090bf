"""Multi-turn rollouts with tools: decode until a tool call closes, run the calls, append their results, go on.

One trajectory per row (``b`` prompts x G rows, groups contiguous, as ``r1jax.rollout.sample``) is built in turns,
each one call of ``r1jax.rollout.sample`` (its slot engine and host-side stop strings). A row ends the turn at EOS,
a stop string, a tool call's closing tag (``ToolEnv.stop_strings``, e.g. ``</search>``), the per-turn limit or the
trajectory budget. The host then runs the calls of every row that made one, all at once on the environment's thread
pool, appends each result block (``<information>...</information>``) as tokens, and the next turn samples only those
rows, each from its whole context so far. After ``max_turns`` calls a row's closing tags no longer stop it (further
calls are plain text). The decode loop is the slot engine's own: no second decoder.

Re-prefill, not cache reuse. Each later turn is a new engine call that prefills its rows' whole context (prompt +
trajectory) again: one forward over the context per later turn (its cost against decoding is measured in the
README). Turn 0 shares each prompt's prefill across its G rows.

What overlaps what. Within a turn, rows decode together in the engine's slots. Between turns, the calls of all rows
run concurrently on threads, so the turn waits for its slowest call (bounded by ``ToolConfig.timeout_s``), not for
the sum of them. Rows that made no call in a turn are finished: tool latency holds them back only in that the batch
returns when the last row has finished. Decoding and tool execution do not overlap each other (a turn's calls start
when its decoding has ended).

Masks. ``mask`` is 1 on the model's tokens only: result tokens are context (present in ``tokens``, read by every
teacher-forced forward), with loss, ratio and KL mask 0 and no sampler log-prob (``logp`` 0). ``env_mask`` marks
them. ``lengths`` are trajectory lengths (model + result tokens, what the budget ``sampling.max_new_tokens``
bounds); ``ended`` is False for a trajectory cut by the budget or the per-turn limit, including one cut inside a
call that never closed (``open_call``: no tool runs; the reward scores the text as it stands).
"""

from __future__ import annotations

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
    timing: Mapping[str, float]  # sample_s (prefills + decoding), tools_s (wall time of the calls), turns


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


def _pow2_at_least(x: int, cap: int) -> int:
    return min(cap, 1 << max(x - 1, 0).bit_length())


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
) -> ToolRollout:
    """``len(prompts) * group_size`` trajectories with tool calls (see the module docstring): the multi-turn
    counterpart of ``r1jax.rollout.sample``, with the same arguments plus the environment ``env``.

    ``sampling.max_new_tokens`` is the budget of a whole trajectory; ``env.cfg`` (a ``ToolConfig``) bounds the turns
    and the tokens of one turn and one result. Returns numpy arrays on the host.
    """
    stops = list(cfg.eos_token_ids) if stop_ids is None else list(stop_ids)
    pad = stops[0] if stops else 0
    T, tc = sampling.max_new_tokens, env.cfg
    turn_cap = tc.max_turn_tokens or T
    n = len(prompts) * group_size
    rows = [_Row(context=[int(t) for t in prompts[i // group_size]]) for i in range(n)]
    sample_s = tools_s = 0.0
    active = list(range(n))
    turn = 0
    while active:
        strings = tuple(sampling.stop_strings) + (env.stop_strings if turn < tc.max_turns else ())
        budget = max(T - len(rows[i].tokens) for i in active)
        steps = min(turn_cap, _pow2_at_least(budget, T))
        if turn == 0:
            contexts, group = [list(p) for p in prompts], group_size
        else:
            width = n if mesh is not None else _pow2_at_least(len(active), n)
            contexts = [rows[i].context + rows[i].tokens for i in active]
            contexts += [contexts[-1]] * (width - len(contexts))
            group = 1
        t0 = time.perf_counter()
        ro = rollout.sample(
            params,
            contexts,
            jax.random.fold_in(key, turn),
            cfg=cfg,
            sampling=dataclasses.replace(sampling, max_new_tokens=steps, stop_strings=strings),
            group_size=group,
            stop_ids=stops,
            encode=encode,
            decode=decode,
            mesh=mesh,
            bucket=bucket,
        )
        sample_s += time.perf_counter() - t0

        calls: list[tuple[int, ToolCall]] = []
        for j, i in enumerate(active):
            row = rows[i]
            room = T - len(row.tokens)
            length = int(ro.lengths[j])
            seg = ro.tokens[j, : min(length, room)].tolist()
            row.extend(seg, ro.logp[j, : len(seg)])
            text = decode(seg)
            hit = _first_hit(text, strings) if length <= room and ro.ended[j] else None
            if hit in env.stop_strings:
                call = env.find_call(text[: text.find(hit) + len(hit)])
                if len(row.tokens) < T:  # room for its result
                    calls.append((i, call))
            elif length <= room and ro.ended[j]:  # EOS or a stop string
                row.ended = True
            else:  # cut by the budget or the per-turn limit
                row.open_call = env.open_call(decode(row.tokens))

        t1 = time.perf_counter()
        records = env.run([c for _, c in calls]) if calls else []
        tools_s += time.perf_counter() - t1
        active = []
        for (i, _), rec in zip(calls, records, strict=True):
            row = rows[i]
            row.calls.append(rec)
            result = _result_tokens(env, rec, encode)
            room = T - len(row.tokens)
            row.extend(result[:room], None)
            if len(result) < room:
                active.append(i)
        turn += 1
    timing = {"sample_s": sample_s, "tools_s": tools_s, "turns": float(turn)}
    return _assemble(rows, prompts, group_size, T, pad, cfg, bucket, timing)


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
