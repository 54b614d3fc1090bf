"""Supervised fine-tuning and distillation: masked next-token cross-entropy on completions, over packed rows.

The R1 pipeline uses SFT three times: the cold-start data before reasoning RL, the ~800k rejection-sampled traces
(``r1jax sample``) before the last RL stage, and distillation (SFT of a dense Qwen2 / Llama base on the same traces,
no RL). All three are this loss.

Packing. Each example is a pair (prompt ids, completion ids). Its input tokens are ``(prompt + completion)[:-1]`` and
its targets ``(prompt + completion)[1:]``, so an example of length L takes L - 1 slots of a row. ``pack_examples``
places examples first-fit into rows of ``seq_len`` slots; every example gets its own segment id (1, 2, ... within a
row; 0 is padding) and positions that restart at 0, so with ``forward(..., positions, segment_ids)`` a packed example
sees exactly what it would see alone.

Loss. ``loss_mask`` is 1 where the target is a completion token (slot j of an example with prompt length P counts
when j >= P - 1) and 0 on prompt targets and padding. The loss is

    L = (1 / N) sum_{rows, slots} -log p(target) * loss_mask,       N = completion tokens in the whole batch

so every completion token weighs the same, whatever the packing (a packed batch gives the token-weighted mean of the
examples' losses), and with gradient accumulation the micro-batch losses (each divided by the whole batch's N) sum to
the batch loss.

Mesh. Under ``jax.set_mesh`` (``r1jax train`` sets the run's mesh) the rows are split over the data axes, the
model's activation constraints and expert-parallel dispatch apply, and the updated parameters keep the rules
table's layout; the result equals one device's.

MTP. With ``TrainConfig.mtp`` on, the DeepSeek-V3 multi-token-prediction loss is added: depth k predicts the token
k + 2 ahead from the main model's hidden state and the next k + 1 tokens' embeddings, within each packed example
(``model.mtp_loss``), weighted lambda / D (0.3, then 0.1 in V3). Its gradient reaches the MTP module and, through
the hidden states, the main model.

MoE. The router correction bias gets no gradient (``stop_gradient`` here and a frozen label in
``r1jax.optim.make_optimizer``); when ``router_bias_gamma`` is set it is moved by the aux-loss-free sign rule from the
batch's expert loads after the optimiser step, as in the GRPO step.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from r1jax import lora
from r1jax.config import ModelConfig, MtpConfig
from r1jax.model import Params, forward, mtp_loss, mtp_mask, token_logprobs
from r1jax.optim import accumulate_and_apply, split_micro, steps_taken, stop_router_bias
from r1jax.sharding import constrain, constrain_params

Array = jax.Array
# (prompt ids, completion ids) or (prompt ids, completion ids, completion loss weights: 0 on tool results)
Example = tuple[Sequence[int], Sequence[int]] | tuple[Sequence[int], Sequence[int], Sequence[float]]
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def pack_examples(
    examples: Sequence[Example],
    seq_len: int,
    *,
    num_rows: int | None = None,
    row_multiple: int = 1,
    pad_id: int = 0,
    truncate: bool = True,
) -> dict[str, np.ndarray]:
    """Pack (prompt ids, completion ids) pairs into rows of ``seq_len`` slots; a third element, one loss weight per
    completion token (``tokenize_tool_trace``: 0 on tool results), scales that token's ``loss_mask`` entry.

    Returns numpy arrays ``tokens`` int32[r, seq_len], ``targets`` int32[r, seq_len], ``loss_mask`` float32[r,
    seq_len] (1 on completion targets), ``segment_ids`` int32[r, seq_len] (1.. per example, 0 on padding) and
    ``positions`` int32[r, seq_len] (restarting at 0 for every example). Rows are filled first-fit in the order of
    ``examples``; ``num_rows`` pads the result with empty rows to a fixed count (a ``ValueError`` if more are
    needed), else ``row_multiple`` pads it to the next multiple of that many rows (few shapes: few compiles).

    An example longer than ``seq_len + 1`` tokens has its completion cut to fit when ``truncate`` (else a
    ``ValueError``); a prompt that leaves no completion target in a row is always a ``ValueError``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    rows: list[list[tuple[list[int], list[float]]]] = []  # per row: (sequence, loss weight of each of its tokens)
    room: list[int] = []
    for i, example in enumerate(examples):
        prompt, completion = [int(t) for t in example[0]], [int(t) for t in example[1]]
        weights = [float(w) for w in example[2]] if len(example) > 2 else [1.0] * len(completion)
        if len(weights) != len(completion):
            raise ValueError(f"example {i}: {len(weights)} loss weights for {len(completion)} completion tokens")
        if not prompt:
            raise ValueError(f"example {i}: empty prompt (the first completion token needs a token to follow)")
        if len(prompt) > seq_len:
            raise ValueError(f"example {i}: prompt of {len(prompt)} tokens leaves no completion in {seq_len} slots")
        seq = prompt + completion
        if len(seq) - 1 > seq_len:
            if not truncate:
                raise ValueError(f"example {i}: {len(seq)} tokens do not fit in {seq_len} + 1")
            seq = seq[: seq_len + 1]
        need = max(len(seq) - 1, 1)
        j = next((r for r, free in enumerate(room) if free >= need), None)
        if j is None:
            rows.append([])
            room.append(seq_len)
            j = len(rows) - 1
        rows[j].append((seq, ([0.0] * len(prompt) + weights)[: len(seq)]))
        room[j] -= need
    n = -(-len(rows) // row_multiple) * row_multiple if num_rows is None else num_rows
    if len(rows) > n:
        raise ValueError(f"{len(examples)} examples need {len(rows)} rows of {seq_len}, more than num_rows={n}")
    out = {
        "tokens": np.full((n, seq_len), pad_id, np.int32),
        "targets": np.full((n, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((n, seq_len), np.float32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
        "positions": np.zeros((n, seq_len), np.int32),
    }
    for r, row in enumerate(rows):
        at = 0
        for s, (seq, weight) in enumerate(row, 1):
            m = max(len(seq) - 1, 1)
            sl = slice(at, at + m)
            out["tokens"][r, sl] = seq[:m]
            out["targets"][r, at : at + len(seq) - 1] = seq[1:]
            out["loss_mask"][r, at : at + len(seq) - 1] = weight[1:]  # slot a predicts token a + 1
            out["segment_ids"][r, sl] = s
            out["positions"][r, sl] = np.arange(m)
            at += m
    return out


def sft_loss(
    params: Params,
    batch: Mapping[str, Array],
    cfg: ModelConfig,
    *,
    num_tokens: Array | float | None = None,
    mtp_weight: Array | float | None = None,
    mtp_counts: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Masked next-token cross-entropy: (sum of -log p(target) over ``loss_mask``) / ``num_tokens``, plus
    ``mtp_weight`` times the MTP loss (``model.mtp_loss`` within each packed example, normalised by ``mtp_counts``)
    when it is given.

    ``num_tokens`` defaults to the mask's sum in this call (pass the whole accumulated batch's count when this is a
    micro-batch; ``mtp_counts`` likewise, ``mtp_token_counts`` of the whole batch). Returns (loss, aux) with aux
    ``loss`` (the cross-entropy term), ``nll_sum``, ``tokens``, ``correct`` (argmax hits on counted targets),
    ``expert_load`` (f32[n_moe_layers, e] or None) and, with MTP, ``mtp_loss``.
    """
    with_mtp = mtp_weight is not None
    logits, aux = forward(
        params, batch["tokens"], cfg, positions=batch["positions"], segment_ids=batch["segment_ids"],
        return_hidden=with_mtp,
    )  # fmt: skip
    mask = jnp.asarray(batch["loss_mask"], jnp.float32)
    loss, nll_sum = completion_nll(logits, batch["targets"], mask, num_tokens)
    hits = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32) * mask
    out = {"loss": jax.lax.stop_gradient(loss), "nll_sum": nll_sum, "tokens": jnp.sum(mask),
           "correct": jnp.sum(hits), "expert_load": aux["expert_load"]}  # fmt: skip
    if with_mtp:
        seg = batch["segment_ids"]
        mtp = mtp_loss(
            params, aux["hidden"], batch["tokens"], batch["targets"], mtp_mask(mask, seg, cfg.n_mtp_layers), cfg,
            positions=batch["positions"], segment_ids=seg, counts=mtp_counts,
        )  # fmt: skip
        out["mtp_loss"] = jax.lax.stop_gradient(mtp)
        loss = loss + mtp_weight * mtp
    return loss, out


def mtp_token_counts(batch: Mapping[str, Array], depth: int) -> Array:
    """f32[D]: the targets each MTP depth is scored on in a packed batch (its loss normaliser)."""
    return jnp.sum(mtp_mask(jnp.asarray(batch["loss_mask"]), jnp.asarray(batch["segment_ids"]), depth), axis=(1, 2))


def mtp_weight_at(mtp: MtpConfig, step: Array) -> Array:
    """lambda after ``step`` optimiser steps: ``mtp.weight`` before ``mtp.switch_step``, ``mtp.late_weight`` from
    there (V3: 0.3, then 0.1)."""
    if not mtp.switch_step:
        return jnp.float32(mtp.weight)
    return jnp.where(step < mtp.switch_step, jnp.float32(mtp.weight), jnp.float32(mtp.late_weight))


def completion_nll(
    logits: Array, targets: Array, loss_mask: Array, num_tokens: Array | float | None = None
) -> tuple[Array, Array]:
    """(loss, nll sum) from logits f32[b, t, V]: -log p(target) summed where ``loss_mask`` is nonzero, divided by
    ``num_tokens`` (default: the mask's sum). Masked positions get zero gradient."""
    mask = jnp.asarray(loss_mask) != 0
    nll = jnp.where(mask, -token_logprobs(logits, targets), 0.0)
    total = jnp.sum(nll)
    count = jnp.sum(mask.astype(jnp.float32)) if num_tokens is None else num_tokens
    return total / jnp.maximum(jnp.asarray(count, jnp.float32), 1.0), jax.lax.stop_gradient(total)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "optimizer", "micro_batches", "router_bias_gamma", "mtp"),
    donate_argnames=("params", "opt_state"),
)
def sft_step(
    params: Params,
    opt_state: Any,
    batch: Mapping[str, Array],
    *,
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    micro_batches: int = 1,
    router_bias_gamma: float = 0.0,
    mtp: MtpConfig | None = None,
) -> tuple[Params, Any, dict[str, Array]]:
    """One optimiser step on a packed batch (``pack_examples``' arrays, rows divisible by ``micro_batches``).

    Gradients are accumulated over ``micro_batches`` micro-batches (a ``lax.scan``), each loss normalised by the
    whole batch's completion-token count, so the result equals one full-batch step. ``optimizer`` is e.g.
    ``r1jax.optim.make_optimizer(OptimConfig(...))`` (it freezes the router bias); it is a static argument, so build it
    once and pass the same instance every step. ``mtp`` (enabled): the MTP loss is added with its weight at the
    optimiser's step count (``mtp_weight_at``). Metrics: ``loss`` (mean nll per completion token), ``tokens``,
    ``token_accuracy``, ``grad_norm``, ``skipped``, and with MTP ``mtp_loss`` and ``mtp_weight``; ``params`` and
    ``opt_state`` are donated.
    """
    batch = {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}
    n = batch["tokens"].shape[0]
    if n % micro_batches:
        raise ValueError(f"{n} rows do not split into {micro_batches} micro-batches")
    num_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    micro = jax.tree.map(lambda x: split_micro(x, micro_batches), batch)
    train, frozen = lora.partition(params)  # with adapters only they train; otherwise every parameter

    with_mtp = mtp is not None and mtp.enabled
    if with_mtp and "mtp" not in params:
        raise ValueError("the MTP loss needs the model's MTP module (params['mtp'])")
    mtp_kw = {}
    if with_mtp:
        mtp_kw = {"mtp_weight": mtp_weight_at(mtp, steps_taken(opt_state)),
                  "mtp_counts": mtp_token_counts(batch, cfg.n_mtp_layers)}  # fmt: skip

    def loss_fn(t, mb):
        mb = {name: constrain(x, ("batch", None)) for name, x in mb.items()}
        loss, aux = sft_loss(stop_router_bias(lora.combine(t, frozen)), mb, cfg, num_tokens=num_tokens, **mtp_kw)
        keep = ("loss", "correct", "mtp_loss") if with_mtp else ("loss", "correct")
        return loss, ({k: aux[k] for k in keep}, aux["expert_load"])

    params, opt_state, per_micro, stats = accumulate_and_apply(
        loss_fn, train, frozen, opt_state, micro, optimizer=optimizer, router_bias_gamma=router_bias_gamma
    )
    params = constrain_params(params, lora.specs_of(params, cfg))  # laid out as they came
    metrics = {
        "skipped": 1.0 - stats["finite"].astype(jnp.float32),
        "loss": jnp.sum(per_micro["loss"]),
        "tokens": num_tokens,
        "token_accuracy": jnp.sum(per_micro["correct"]) / jnp.maximum(num_tokens, 1.0),
        "grad_norm": stats["grad_norm"],
    }
    if with_mtp:
        metrics["mtp_loss"] = jnp.sum(per_micro["mtp_loss"])
        metrics["mtp_weight"] = mtp_kw["mtp_weight"]
    return params, opt_state, metrics


@functools.partial(jax.jit, static_argnames=("cfg",))
def eval_loss(params: Params, batch: Mapping[str, Array], *, cfg: ModelConfig) -> Array:
    """Mean nll per completion token of a packed batch (no gradient)."""
    return sft_loss(params, {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}, cfg)[0]


def tokenize_trace(
    prompt: str, completion: str, encode: Any, *, eos_id: int | None = None
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a text trace (``r1jax sample`` output), the EOS id appended to the completion
    so the model learns to stop. Prompt and completion are tokenised separately, so the boundary is exact."""
    ids = list(encode(completion))
    return list(encode(prompt)), ids + ([eos_id] if eos_id is not None else [])


def tokenize_tool_trace(
    prompt: str, completion: str, encode: Any, *, tools: Sequence[str], eos_id: int | None = None
) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, completion ids, completion loss weights) of a trace with tool turns (``r1jax sample`` with tools,
    or cold-start traces written with the tools' results). The completion is tokenised in pieces split at the result
    blocks of ``tools`` (``r1jax.tools.result_spans``), as the rollout appended them, and the result pieces get
    weight 0: the environment wrote them, so they are context, not targets. The EOS id is appended (weight 1), except
    after a trace that ends with a call's closing tag (one turn of a trajectory): the environment speaks next, and
    the sampler stops there."""
    from r1jax.tools import result_spans, syntax_of

    if any(completion.endswith(syntax_of(t).call_close) for t in tools):
        eos_id = None

    ids: list[int] = []
    weights: list[float] = []
    at = 0
    for start, end in [*result_spans(completion, tools), (len(completion), len(completion))]:
        for text, w in ((completion[at:start], 1.0), (completion[start:end], 0.0)):
            piece = list(encode(text)) if text else []
            ids += piece
            weights += [w] * len(piece)
        at = end
    if eos_id is not None:
        ids.append(eos_id)
        weights.append(1.0)
    return list(encode(prompt)), ids, weights
