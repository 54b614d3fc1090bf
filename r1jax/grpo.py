"""GRPO: group-relative advantages and the clipped policy-gradient loss, as small pure functions.

Symbols (DeepSeekMath section 4.1, DeepSeek-R1 section 2.2): a prompt q has G = ``group_size`` sampled completions
o_1..o_G with rewards r_i; A_i is the advantage of o_i, shared by all of its tokens; pi_theta is the policy being
trained, pi_old the policy that produced the samples (``old_logp``), pi_ref the frozen reference (``ref_logp``);
eps_low / eps_high clip the importance ratio; beta = ``kl_coef``; mu = ``num_iterations``.

Shapes: ``n`` sequences (= prompts x G, groups contiguous), ``t`` completion positions. Per-token arrays are
``[n, t]`` log-probabilities of the sampled tokens; ``mask`` is 1 on completion tokens that count and 0 on padding
(and on whatever the caller filtered out). All math is float32 whatever the input dtype, and every function here is
jittable with the config as a static argument (configs are frozen, hashable dataclasses).

Variants selected by ``GRPOConfig``:

- ``loss_agg``: "grpo" (per-sequence token mean, then mean over sequences), "dapo" (token mean over the batch),
  "dr_grpo" (token sum / (sequences x max_completion_len)).
- ``adv_scale``: divide the group-centred reward by the group std, the batch std, or nothing (Dr. GRPO).
- ``ratio_level``: per-token ratio (PPO/GRPO) or one ratio per sequence, exp(mean token log-ratio) (GSPO).
- ``tis_cap``: truncated importance sampling, weight min(pi_old / pi_sampler, cap) per token, against the
  log-prob mismatch between the sampling engine and the training forward.
- ``dynamic_sampling`` / ``overlong_filter`` (DAPO): see ``dynamic_sampling_keep`` and ``overlong_filter``.

The second half of the file ("the step") puts them to work: ``sequence_logprobs`` (the one teacher-forced log-prob
computation, shared by pi_old, pi_ref and the differentiated policy), ``update_minibatch`` (one jitted optimiser step
with gradient accumulation and the MoE router-bias update) and ``GRPOTrainer`` (``init_state`` / ``grpo_step``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from r1jax import lora, moe, rollout
from r1jax.cache import init_cache
from r1jax.config import AdvScale, GRPOConfig, LossAgg, ModelConfig, OptimConfig, RatioLevel, TrainConfig
from r1jax.model import Params, forward, logits_from_hidden, param_specs, token_logprobs
from r1jax.sharding import batch_sharding, normalize_mesh, param_shardings, put, to_host
from r1jax.tool_rollout import sample_with_tools, tool_metrics
from r1jax.tools import ToolEnv

Array = jax.Array

# Log-ratios are clamped to this range before exponentiating (as verl does): a ratio of e^20 already means the sample
# is far off-policy, and the clamp keeps one bad token from turning the loss into inf.
LOG_RATIO_CLAMP = 20.0


def _grouped(rewards: Array, group_size: int) -> Array:
    n = rewards.shape[0]
    if rewards.ndim != 1 or n % group_size:
        raise ValueError(f"rewards must be [n] with n a multiple of group_size={group_size}, got {rewards.shape}")
    return rewards.reshape(n // group_size, group_size)


def zero_variance_groups(rewards: Array, group_size: int) -> Array:
    """bool[n // G]: groups whose rewards are all equal (their advantages are 0, so they carry no gradient)."""
    g = _grouped(jnp.asarray(rewards, jnp.float32), group_size)
    return jnp.max(g, axis=1) == jnp.min(g, axis=1)


def group_advantages(rewards: Array, cfg: GRPOConfig) -> Array:
    """Group-relative advantages A_i, float32[n], from rewards float[n] of consecutive groups of G = group_size.

    - ``adv_scale="group"``: A_i = (r_i - mean(r_group)) / (std(r_group) + std_eps)   (DeepSeekMath / R1)
    - ``adv_scale="batch"``: A_i = (r_i - mean(r_group)) / (std(r_batch) + std_eps)   (centred per group, scaled once)
    - ``adv_scale="none"``:  A_i = r_i - mean(r_group)                                 (Dr. GRPO)

    A group whose rewards are all equal gets exactly 0 in every mode (no float residue from the mean).

    Which std: ``cfg.std_ddof`` (default 0, the population std). With it, the advantages of every non-degenerate
    group are exactly standardised (zero mean, unit RMS up to eps) whatever G is; the Bessel-corrected std (ddof=1,
    what TRL and verl compute with ``torch.std``) makes the scale depend on G: a G=2 group with rewards {0, 1} gets
    +-0.707 instead of +-1. Set ``std_ddof=1`` for parity with those stacks.
    """
    r = jnp.asarray(rewards, jnp.float32)
    g = _grouped(r, cfg.group_size)
    centred = g - jnp.mean(g, axis=1, keepdims=True)
    if cfg.adv_scale is AdvScale.GROUP:
        adv = centred / (jnp.std(g, axis=1, keepdims=True, ddof=cfg.std_ddof) + cfg.std_eps)
    elif cfg.adv_scale is AdvScale.BATCH:
        ddof = cfg.std_ddof if r.shape[0] > 1 else 0
        adv = centred / (jnp.std(r, ddof=ddof) + cfg.std_eps)
    else:
        adv = centred
    flat = jnp.max(g, axis=1, keepdims=True) == jnp.min(g, axis=1, keepdims=True)
    return jnp.where(flat, 0.0, adv).reshape(-1)


def reward_metrics(rewards: Array, group_size: int) -> dict[str, Array]:
    """Per-step reward statistics, including the share of zero-variance groups (the "loss is 0" diagnostic)."""
    r = jnp.asarray(rewards, jnp.float32)
    g = _grouped(r, group_size)
    return {
        "reward/mean": jnp.mean(r),
        "reward/std": jnp.std(r),
        "reward/group_std_mean": jnp.mean(jnp.std(g, axis=1)),
        "reward/zero_variance_frac": jnp.mean(zero_variance_groups(r, group_size).astype(jnp.float32)),
    }


def dynamic_sampling_keep(rewards: Array, group_size: int) -> Array:
    """DAPO dynamic sampling: bool[n // G], True for groups worth training on (rewards not all equal).

    The caller drops the others and refills the batch with freshly sampled groups (see ``kept_sample_indices``).
    """
    return ~zero_variance_groups(rewards, group_size)


def kept_sample_indices(rewards: np.ndarray, group_size: int, max_groups: int | None = None) -> np.ndarray:
    """Host-side helper for dynamic sampling: int64 indices of the samples in kept groups, whole groups only, in
    order, at most ``max_groups`` groups. Not jittable (the output size depends on the data)."""
    keep = np.asarray(dynamic_sampling_keep(np.asarray(rewards, np.float32), group_size))
    groups = np.flatnonzero(keep)
    if max_groups is not None:
        groups = groups[:max_groups]
    return (groups[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1).astype(np.int64)


def overlong_filter(mask: Array, ended: Array, max_completion_len: int, lengths: Array | None = None) -> Array:
    """DAPO overlong filtering: zero the mask of completions truncated at the length limit.

    mask: [n, t] completion-token mask; ended: bool[n], True when the completion stopped on EOS / a stop string.
    A completion with ``lengths >= max_completion_len`` that did not end is truncated: its reward says nothing
    about its reasoning, so it is excluded from the loss (its row becomes all zeros). ``lengths``: int[n] tokens
    each completion took from the budget, default the mask's row sums (tool rollouts pass their trajectory
    lengths: result tokens take budget but have mask 0).
    """
    mask = jnp.asarray(mask)
    lengths = jnp.sum(mask != 0, axis=-1) if lengths is None else jnp.asarray(lengths)
    truncated = (lengths >= max_completion_len) & ~jnp.asarray(ended, bool)
    return jnp.where(truncated[:, None], jnp.zeros_like(mask), mask)


def token_entropy(logits: Array) -> Array:
    """Entropy (nats) of the next-token distribution, float32[...], from logits float[..., V].

    Vocabulary entries with -inf logits (masked) contribute 0, with finite gradients.
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    finite = jnp.isfinite(logp)
    safe = jnp.where(finite, logp, 0.0)
    return -jnp.sum(jnp.where(finite, jnp.exp(safe) * safe, 0.0), axis=-1)


def masked_mean(x: Array, mask: Array, axis: int | None = None) -> Array:
    """Mean of ``x`` over entries where ``mask`` is nonzero; 0 where there are none."""
    m = jnp.asarray(mask, jnp.float32)
    return jnp.sum(jnp.asarray(x, jnp.float32) * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


def grpo_loss(
    logp: Array,
    old_logp: Array,
    ref_logp: Array | None,
    advantages: Array,
    mask: Array,
    cfg: GRPOConfig,
    *,
    sampler_logp: Array | None = None,
    num_tokens: Array | float | None = None,
    num_seqs: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped GRPO surrogate with a k3 KL penalty. Returns (scalar loss to minimise, metrics).

    Args:
      logp: [n, t] log pi_theta(o_{i,t} | q, o_{i,<t}) from the forward being differentiated.
      old_logp: [n, t] log pi_old of the same tokens (the policy that sampled them; equal to ``logp`` up to
        stop_gradient when mu = 1). Treated as a constant.
      ref_logp: [n, t] log pi_ref, or None when ``kl_coef == 0``. Treated as a constant.
      advantages: [n] A_i (``group_advantages``), broadcast over each sequence's tokens.
      mask: [n, t] 1 for completion tokens that count, 0 for prompt, padding and filtered rows.
      cfg: the ``GRPOConfig``; static under jit.
      sampler_logp: [n, t] log-probs reported by the sampling engine; required when ``cfg.tis_cap`` is set.
      num_tokens: "dapo" normaliser override: the valid-token count of the whole accumulated batch when one batch is
        split into micro-batches for gradient accumulation (then summing the micro-batch losses gives the full-batch
        loss). Default: the valid tokens in this call.
      num_seqs: "grpo" / "dr_grpo" normaliser override, likewise the number of sequences in the accumulated batch.
        Default: rows of this call with at least one valid token (all-padding rows do not dilute the mean).

    Per token, with r = pi_theta / pi_old (``ratio_level="token"``) or the per-sequence GSPO ratio
    s_i = exp(mean_t log(pi_theta / pi_old)) broadcast to the sequence's tokens (``ratio_level="sequence"``):

      surrogate = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
      KL        = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1          (k3, unbiased, >= 0)
      loss_tok  = -(surrogate - beta KL) * w,   w = min(pi_old / pi_sampler, tis_cap) if TIS else 1 (constant)

    aggregated by ``cfg.loss_agg``:
      "grpo":    (1 / num_seqs) sum_i (1 / |o_i|) sum_t loss_tok
      "dapo":    (1 / num_tokens) sum_{i,t} loss_tok
      "dr_grpo": (1 / (num_seqs x max_completion_len)) sum_{i,t} loss_tok

    Log-ratios are clamped to +-``LOG_RATIO_CLAMP`` before exp. Values at masked positions never reach the loss or
    its gradient (they may be garbage, even inf/NaN).
    """
    f32 = jnp.float32
    m = jnp.asarray(mask) != 0
    mf = m.astype(f32)
    logp = jnp.asarray(logp, f32)
    old = jax.lax.stop_gradient(jnp.asarray(old_logp, f32))
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, f32))
    if logp.ndim != 2 or old.shape != logp.shape or m.shape != logp.shape or adv.shape != logp.shape[:1]:
        raise ValueError(
            f"expected logp/old_logp/mask [n, t] and advantages [n]; got {logp.shape}, {old.shape}, "
            f"{m.shape}, {adv.shape}"
        )
    seq_len = jnp.sum(mf, axis=-1)  # |o_i|
    has_tokens = seq_len > 0

    log_ratio = jnp.clip(jnp.where(m, logp - old, 0.0), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if cfg.ratio_level is RatioLevel.SEQUENCE:
        seq_log_ratio = jnp.sum(log_ratio, axis=-1) / jnp.maximum(seq_len, 1.0)
        log_ratio = jnp.broadcast_to(seq_log_ratio[:, None], logp.shape)
    ratio = jnp.exp(log_ratio)
    a = adv[:, None]
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    surrogate = jnp.minimum(ratio * a, clipped_ratio * a)
    per_token = -surrogate

    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        ref = jax.lax.stop_gradient(jnp.asarray(ref_logp, f32))
        ref_log_ratio = jnp.clip(jnp.where(m, ref - logp, 0.0), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = jnp.exp(ref_log_ratio) - ref_log_ratio - 1.0
        per_token = per_token + cfg.kl_coef * kl
    else:
        kl = None

    metrics: dict[str, Array] = {}
    if cfg.tis_cap is not None:
        if sampler_logp is None:
            raise ValueError("tis_cap is set: pass sampler_logp (the sampling engine's log-probs)")
        sampler = jax.lax.stop_gradient(jnp.asarray(sampler_logp, f32))
        mismatch = jnp.clip(jnp.where(m, old - sampler, 0.0), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        raw_w = jnp.exp(mismatch)
        w = jnp.minimum(raw_w, cfg.tis_cap)
        per_token = per_token * w
        metrics["tis/weight_mean"] = masked_mean(w, mf)
        metrics["tis/capped_frac"] = masked_mean((raw_w > cfg.tis_cap).astype(f32), mf)
        # k3 estimate of KL(sampler || trainer-old): how far the two forwards disagree
        metrics["tis/mismatch_kl"] = masked_mean(jnp.exp(-mismatch) + mismatch - 1.0, mf)
    elif sampler_logp is not None:
        mismatch = jnp.clip(jnp.where(m, old - jnp.asarray(sampler_logp, f32), 0.0), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        metrics["tis/mismatch_kl"] = jax.lax.stop_gradient(masked_mean(jnp.exp(-mismatch) + mismatch - 1.0, mf))

    per_token = jnp.where(m, per_token, 0.0)
    total_tokens = jnp.sum(mf)
    if num_seqs is None:
        num_seqs = jnp.sum(has_tokens.astype(f32))
    if num_tokens is None:
        num_tokens = total_tokens
    num_seqs = jnp.maximum(jnp.asarray(num_seqs, f32), 1.0)
    num_tokens = jnp.maximum(jnp.asarray(num_tokens, f32), 1.0)
    if cfg.loss_agg is LossAgg.GRPO:
        loss = jnp.sum(jnp.sum(per_token, axis=-1) / jnp.maximum(seq_len, 1.0)) / num_seqs
    elif cfg.loss_agg is LossAgg.DAPO:
        loss = jnp.sum(per_token) / num_tokens
    else:
        loss = jnp.sum(per_token) / (num_seqs * cfg.max_completion_len)

    sg = jax.lax.stop_gradient
    ratio_sg = sg(ratio)
    low = (ratio_sg < 1.0 - cfg.clip_eps_low) & (a < 0)
    high = (ratio_sg > 1.0 + cfg.clip_eps_high) & (a > 0)
    any_tok = total_tokens > 0
    metrics.update(
        {
            "loss": sg(loss),
            "clip/low_frac": masked_mean(low.astype(f32), mf),
            "clip/high_frac": masked_mean(high.astype(f32), mf),
            "clip/frac": masked_mean((low | high).astype(f32), mf),
            "ratio/mean": masked_mean(ratio_sg, mf),
            "ratio/min": jnp.where(any_tok, jnp.min(jnp.where(m, ratio_sg, jnp.inf)), 1.0),
            "ratio/max": jnp.where(any_tok, jnp.max(jnp.where(m, ratio_sg, -jnp.inf)), 1.0),
            "kl": masked_mean(sg(kl), mf) if kl is not None else jnp.zeros((), f32),
            "advantage/mean": jnp.sum(jnp.where(has_tokens, adv, 0.0)) / jnp.maximum(jnp.sum(has_tokens), 1),
            "tokens": total_tokens,
            "seq_len/mean": jnp.sum(seq_len) / jnp.maximum(jnp.sum(has_tokens), 1),
        }
    )
    return loss, metrics


# --- the step ---------------------------------------------------------------------------------------------------------
#
# One GRPO step is a host loop over jitted phases:
#   sample   (r1jax.rollout.sample_groups: one prefill per prompt, G decodes from its repeated cache)
#   score    (host: the reward function, e.g. ``text_reward`` -> r1jax.rewards.score)
#   select   (host: DAPO dynamic sampling picks informative groups; overlong filtering zeroes truncated rows)
#   logprobs (``sequence_logprobs`` under pi_old and pi_ref; pi_old is skipped when mu = 1 and there is one
#             mini-batch: it then equals the current policy's log-probs, used under stop_gradient)
#   update   (``update_minibatch``, mu x num_minibatches times: gradient accumulation over micro-batches with the
#             whole mini-batch's token / sequence counts as normalisers, global-norm clip, AdamW, then the
#             aux-loss-free router-bias update from the mini-batch's global expert loads)
# and every ``ref_update_every`` steps the reference model becomes a copy of the policy.
#
# Sharding: with a mesh, parameters are placed by ``r1jax.sharding.param_shardings`` and every per-row array is
# sharded over the mesh's batch axes (data parallel); gradients are reduced by XLA. Results equal the unsharded run.
#
# Not implemented: routing replay (recomputing MoE routes with the sampler's choices); the expert loads used for the
# bias update count every token of the training forward, padding included (``forward`` has no load mask).

RewardFn = Callable[[rollout.Rollout, Sequence[Mapping[str, Any]]], tuple[np.ndarray, dict[str, float]]]


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "entropy", "prompt_group"))
def sequence_logprobs(
    params: Params,
    prompt_tokens: Array,
    prompt_start: Array,
    completion: Array,
    cfg: ModelConfig,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    prompt_group: int = 1,
) -> tuple[Array, dict[str, Array]]:
    """Teacher-forced log pi(o_t | q, o_<t) of every completion token, f32[n, T], and aux outputs.

    ``prompt_tokens`` int32[n, P] is left-padded with real tokens from ``prompt_start[n]``; ``completion`` int32[n, T]
    follows it. Positions count from each row's first real token and the padding gets its own segment, so the result
    does not depend on how much padding a row has and equals what the cached sampler computed. Log-probs are of
    ``logits / temperature`` (``r1jax.rollout.logprob_temperature``): the same quantity the sampler reports. Values
    past a completion's end are finite but meaningless (mask them). aux: ``expert_load`` f32[n_moe_layers, e] or
    None (real tokens only: prompt padding is left out), and ``entropy`` f32[n, T] of the tempered next-token
    distribution when ``entropy``.

    ``prompt_group`` > 1: rows come in runs of that many with the same prompt (GRPO groups); each prompt is run once
    and its rows' completions attend to its KV cache (``shared_prompt_hidden``). Same result, fewer FLOPs.
    """
    if prompt_group > 1:
        hidden, load = shared_prompt_hidden(params, prompt_tokens, prompt_start, completion, cfg, prompt_group)
    else:
        hidden, load = _completion_hidden(params, prompt_tokens, prompt_start, completion, cfg)
    # the output head only on the positions that predict completion tokens
    logits = logits_from_hidden(params, hidden, cfg) / temperature
    out = {"expert_load": load}
    if entropy:
        out["entropy"] = token_entropy(logits)
    return token_logprobs(logits, completion), out


def _completion_hidden(params: Params, prompt_tokens, prompt_start, completion, cfg: ModelConfig):
    """Hidden states f32[n, T, d] at the positions that predict the completion tokens (one forward over prompt +
    completion), and the expert load of the real tokens."""
    plen = prompt_tokens.shape[1]
    tokens = jnp.concatenate([prompt_tokens, completion.astype(prompt_tokens.dtype)], axis=1)
    slots = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    positions = jnp.maximum(slots - prompt_start[:, None], 0)
    segment_ids = (slots >= prompt_start[:, None]).astype(jnp.int32)
    _, aux = forward(
        params,
        tokens,
        cfg,
        positions=positions,
        segment_ids=segment_ids,
        return_hidden=True,
        load_mask=segment_ids > 0,
    )
    return aux["hidden"][:, plen - 1 : -1], aux["expert_load"]


def shared_prompt_hidden(params: Params, prompt_tokens, prompt_start, completion, cfg: ModelConfig, group: int):
    """``_completion_hidden`` for rows in runs of ``group`` sharing a prompt: each prompt is prefilled once into a KV
    cache (as the sampler does), the cache is repeated over its rows, and all completion tokens run against it in one
    cached forward. Gradients flow through the shared prompt computation (summed over its rows). The expert load
    counts each prompt token ``group`` times, as the unshared forward does."""
    n, plen = prompt_tokens.shape
    b = n // group
    prompts = prompt_tokens.reshape(b, group, plen)[:, 0]
    start = prompt_start.reshape(b, group)[:, 0]
    real = jnp.arange(plen, dtype=jnp.int32)[None] >= start[:, None]
    _, pre = forward(params, prompts, cfg, cache=init_cache(cfg, b, plen, start), return_hidden=True, load_mask=real)
    cache = rollout.repeat_cache(pre["cache"], group, completion.shape[1], None)
    _, aux = forward(params, completion.astype(jnp.int32), cfg, cache=cache, return_hidden=True)
    last = jnp.repeat(pre["hidden"][:, -1:], group, axis=0)
    hidden = jnp.concatenate([last, aux["hidden"][:, :-1]], axis=1)
    load = None if aux["expert_load"] is None else aux["expert_load"] + group * pre["expert_load"]
    return hidden, load


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """What the policy update reads, one row per completion (all sharded along rows)."""

    prompt_tokens: Array  # int32[n, P]
    prompt_start: Array  # int32[n]
    tokens: Array  # int32[n, T]
    mask: Array  # float32[n, T] after overlong / dynamic-sampling filtering
    advantages: Array  # float32[n]
    sampler_logp: Array  # float32[n, T]
    old_logp: Array | None  # float32[n, T]; None: the current policy's (mu = 1, one mini-batch)
    ref_logp: Array | None  # float32[n, T]; None when kl_coef = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GRPOState:
    step: Array  # int32[]: GRPO steps done
    params: Params
    ref_params: Params | None  # the reference's trainable part (``lora.reference``); None when kl_coef = 0
    opt_state: Any


def lr_schedule(opt: OptimConfig) -> optax.Schedule:
    """Linear warmup (lr * (i + 1) / warmup_steps, so the first step is not wasted), then cosine decay over
    ``decay_steps`` to ``lr * min_lr_ratio`` (or constant when ``decay_steps == 0``)."""

    def schedule(count):
        i = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (i + 1.0) / opt.warmup_steps) if opt.warmup_steps else 1.0
        if not opt.decay_steps:
            return opt.lr * warm
        t = jnp.clip((i - opt.warmup_steps) / opt.decay_steps, 0.0, 1.0)
        cos = opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * t))
        return opt.lr * warm * cos

    return schedule


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_router_bias(path) -> bool:
    return "router_bias" in _path_names(path)


def scale_by_adam_stored_as(dtype, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's bias-corrected m / (sqrt(v) + eps) computed in f32, with both moments stored in ``dtype`` (optax's
    ``mu_dtype`` covers only the first)."""

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, dtype)  # noqa: E731
        return optax.ScaleByAdamState(
            jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
        )

    def update(grads, state, params=None):
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), grads, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), grads, state.nu)
        count = optax.safe_int32_increment(state.count)
        c1, c2 = 1 - b1 ** f32(count), 1 - b2 ** f32(count)
        updates = jax.tree.map(lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), mu, nu, grads)
        store = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)  # noqa: E731
        return updates, optax.ScaleByAdamState(count, store(mu), store(nu))

    return optax.GradientTransformation(init, update)


def make_optimizer(opt: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping + AdamW (decay on matrices only); the router bias is frozen (its updates are zero: it is
    moved by ``moe.balance_bias`` after each step instead)."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if is_router_bias(p) else "train", params)

    def decay_mask(params):
        def decays(path, _):
            last = _path_names(path)[-1]
            return not ("norm" in last or "bias" in last)

        return jax.tree_util.tree_map_with_path(decays, params)

    if opt.moment_dtype == "float32":
        adamw = optax.adamw(lr_schedule(opt), opt.b1, opt.b2, opt.eps, weight_decay=opt.weight_decay, mask=decay_mask)
    else:
        adamw = optax.chain(
            scale_by_adam_stored_as(jnp.dtype(opt.moment_dtype), opt.b1, opt.b2, opt.eps),
            optax.add_decayed_weights(opt.weight_decay, decay_mask),
            optax.scale_by_learning_rate(lr_schedule(opt)),
        )
    train = optax.chain(optax.clip_by_global_norm(opt.max_grad_norm), adamw) if opt.max_grad_norm else adamw
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def _stop_router_bias(params: Params) -> Params:
    return jax.tree_util.tree_map_with_path(lambda p, x: jax.lax.stop_gradient(x) if is_router_bias(p) else x, params)


def update_router_bias(params: Params, load: Array | None, gamma: float) -> Params:
    """Aux-loss-free balancing: move the MoE router bias [L, e] against each expert's load deviation (``load`` is
    the global load f32[L, e] of the batch just trained on)."""
    if load is None or not gamma or "moe_layers" not in params:
        return params
    mlp = params["moe_layers"]["mlp"]
    new_mlp = {**mlp, "router_bias": moe.balance_bias(mlp["router_bias"], load, gamma).astype(mlp["router_bias"].dtype)}
    return {**params, "moe_layers": {**params["moe_layers"], "mlp": new_mlp}}


def _param_shardings(params: Params, cfg: ModelConfig, mesh: Mesh):
    return param_shardings(lora.specs_like(params, param_specs(cfg, mtp="mtp" in params)), mesh)


def opt_shardings(opt_state: Any, params: Params, cfg: ModelConfig, mesh: Mesh):
    """Optimiser-state shardings: moments like their parameters (matched by dict-key path and shape), everything else
    (step counts) replicated. Fixed shardings keep the update from recompiling when XLA would pick equivalent but
    differently spelled ones."""
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_path = {}
    for path, sh in jax.tree_util.tree_flatten_with_path(_param_shardings(params, cfg, mesh))[0]:
        by_path[tuple(_path_names(path))] = sh
    shapes = {tuple(_path_names(p)): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def pick(path, leaf):
        names = _path_names(path)  # a parameter's path is a suffix (adapters' and quantised leaves' fields too)
        for i in range(len(names)):
            key = tuple(names[i:])
            if key in by_path and shapes[key] == leaf.shape:
                return by_path[key]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def _combine_metrics(ms: dict[str, Array]) -> dict[str, Array]:
    """Per-micro-batch metrics [k] -> one value: sums for extensive ones, extremes for min/max, token-weighted means
    for the rest."""
    tok = ms["tokens"]
    w = tok / jnp.maximum(jnp.sum(tok), 1.0)
    out = {}
    for name, v in ms.items():
        if name in ("loss", "tokens"):
            out[name] = jnp.sum(v)
        elif name == "ratio/min":
            out[name] = jnp.min(v)
        elif name == "ratio/max":
            out[name] = jnp.max(v)
        else:
            out[name] = jnp.sum(v * w)
    return out


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "model_cfg", "micro_batch", "mesh", "prompt_group"),
    donate_argnames=("params", "opt_state"),
)
def update_minibatch(
    params: Params,
    opt_state: Any,
    batch: TrainBatch,
    *,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    micro_batch: int,
    mesh: Mesh | None = None,
    prompt_group: int = 1,
) -> tuple[Params, Any, dict[str, Array]]:
    """One optimiser step on a mini-batch: accumulate gradients over micro-batches of ``micro_batch`` rows, each
    micro-batch loss normalised by the whole mini-batch's token / sequence counts (so their sum IS the mini-batch
    loss), clip, AdamW, then the router-bias update from the mini-batch's expert loads. ``prompt_group`` > 1: rows
    come in runs of that many sharing a prompt (``sequence_logprobs``)."""
    g = cfg.grpo
    n = batch.tokens.shape[0]
    k = n // micro_batch
    tau = rollout.logprob_temperature(cfg.sampling.temperature)
    mask = batch.mask.astype(jnp.float32)
    num_tokens = jnp.sum(mask)
    num_seqs = jnp.sum((jnp.sum(mask, axis=-1) > 0).astype(jnp.float32))

    def split(x):  # [n, ...] -> [k, micro, ...]; micro-batch j = rows j, j + k, ... (each device keeps its rows)
        return None if x is None else jnp.swapaxes(x.reshape(micro_batch, k, *x.shape[1:]), 0, 1)

    micro = jax.tree.map(split, batch)
    # a micro-batch takes every k-th row, so a run of G rows with one prompt leaves G / k of them in each
    group = prompt_group // k if prompt_group % k == 0 else 1

    train, frozen = lora.partition(params)  # with adapters only they train; otherwise every parameter

    def loss_fn(t, mb: TrainBatch):
        p = _stop_router_bias(lora.combine(t, frozen))
        logp, aux = sequence_logprobs(
            p,
            mb.prompt_tokens,
            mb.prompt_start,
            mb.tokens,
            model_cfg,
            temperature=tau,
            entropy=True,
            prompt_group=group,
        )
        old = jax.lax.stop_gradient(logp) if mb.old_logp is None else mb.old_logp
        loss, metrics = grpo_loss(
            logp,
            old,
            mb.ref_logp,
            mb.advantages,
            mb.mask,
            g,
            sampler_logp=mb.sampler_logp,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
        )
        metrics["entropy"] = jax.lax.stop_gradient(masked_mean(aux["entropy"], mb.mask))
        return loss, (metrics, aux["expert_load"])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_grads(mb):
        mb = jax.tree.map(lambda x: rollout.constrain_batch(x, mesh), mb)
        (_, (metrics, load)), grads = grad_fn(train, mb)
        return grads, load, metrics

    if k == 1:  # one micro-batch: its gradients, no zero-filled accumulators
        grads, load, metrics = micro_grads(jax.tree.map(lambda x: x[0], micro))
        per_micro = jax.tree.map(lambda x: x[None], metrics)
    else:

        def body(acc, mb):
            grads, load, metrics = micro_grads(mb)
            acc_grads, acc_load = acc
            return (jax.tree.map(jnp.add, acc_grads, grads), None if load is None else acc_load + load), metrics

        zero_load = None
        if model_cfg.n_moe_layers:
            zero_load = jnp.zeros((model_cfg.n_moe_layers, model_cfg.n_experts), jnp.float32)
        (grads, load), per_micro = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, train), zero_load), micro)
    metrics = _combine_metrics(per_micro)
    metrics["grad_norm"] = optax.tree.norm(grads)
    tx = make_optimizer(cfg.optim)

    gamma = 0.0 if frozen is not None else cfg.optim.router_bias_gamma  # a frozen base keeps its router bias

    def apply(_):
        updates, new_opt_state = tx.update(grads, opt_state, train)
        new_params = lora.combine(optax.apply_updates(train, updates), frozen)
        return update_router_bias(new_params, load, gamma), new_opt_state

    # a non-finite loss or gradient skips the step: parameters and optimiser state stay as they were (a branch, not
    # a select: no extra pass over the parameters and both moments)
    finite = jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(metrics.get("loss", 0.0))
    params, opt_state = jax.lax.cond(finite, apply, lambda _: (params, opt_state), None)
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    count = optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]  # optimiser steps taken (all equal)
    metrics["lr"] = lr_schedule(cfg.optim)(count - 1)
    if load is not None:
        metrics["moe/load_max_over_mean"] = jnp.mean(jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9))
        metrics["moe/bias_abs_mean"] = jnp.mean(jnp.abs(params["moe_layers"]["mlp"]["router_bias"]))
    if mesh is not None:
        opt_state = jax.lax.with_sharding_constraint(opt_state, opt_shardings(opt_state, params, model_cfg, mesh))
        params = jax.lax.with_sharding_constraint(params, _param_shardings(params, model_cfg, mesh))
    return params, opt_state, metrics


_merged = jax.jit(lora.merge)


def text_reward(cfg: TrainConfig, decode: Callable[[list[int]], str], stop_ids: Sequence[int]) -> RewardFn:
    """The standard reward: decode each completion (stop token dropped, stop string kept or not per the sampling
    config) and score it with ``r1jax.rewards.score`` under ``cfg.rewards``; ``meta["num_tokens"]`` is filled in
    for the overlong reward."""
    from r1jax import rewards

    def fn(ro: rollout.Rollout, metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict[str, float]]:
        texts = rollout.completion_texts(
            ro,
            decode,
            stop_ids=stop_ids,
            stop_strings=cfg.sampling.stop_strings,
            include_stop_str=cfg.sampling.include_stop_str,
        )
        metas = [{**m, "num_tokens": int(n)} for m, n in zip(metadata, np.asarray(ro.lengths), strict=True)]
        return rewards.score(texts, metas, cfg.rewards)

    return fn


def _take_rows(x, rows: np.ndarray):
    return None if x is None else np.asarray(x)[rows]


class GRPOTrainer:
    """The GRPO step around a model config, a reward function and (optionally) a mesh.

    ``init_state(params)`` -> ``GRPOState``; ``grpo_step(state, prompts, metadata, key)`` -> (state, metrics), with
    ``prompts`` a list of token lists (``grpo.prompts_per_step`` of them, or more with dynamic sampling: the step
    trains on the first ``prompts_per_step`` groups whose rewards differ and fills up with masked-out ones) and
    ``metadata`` one dict per prompt (passed to the reward function, repeated per sample).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg: ModelConfig,
        reward_fn: RewardFn,
        *,
        mesh: Mesh | None = None,
        stop_ids: Sequence[int] | None = None,
        encode: Callable[[str], list[int]] | None = None,
        decode: Callable[[list[int]], str] | None = None,
        prompt_bucket: int = 32,
        tools: ToolEnv | None = None,
    ):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.reward_fn = reward_fn
        self.mesh = normalize_mesh(mesh) if mesh is not None else None
        self.stop_ids = list(model_cfg.eos_token_ids) if stop_ids is None else list(stop_ids)
        self.encode, self.decode = encode, decode
        self.prompt_bucket = prompt_bucket
        self.optimizer = make_optimizer(cfg.optim)
        if tools is None and cfg.tools.enabled:
            from r1jax.tools import build_tools

            tools = build_tools(cfg.tools, forbidden=cfg.sampling.stop_strings)
        self.tools = tools

    # placement -------------------------------------------------------------------------------------------------
    def _place_params(self, params: Params) -> Params:
        if self.mesh is None:
            return params
        return jax.device_put(params, _param_shardings(params, self.model_cfg, self.mesh))

    def _place_rows(self, x):
        """Host rows (the same on every process) -> split over the mesh's data axes."""
        if x is None:
            return None
        return jnp.asarray(x) if self.mesh is None else put(np.asarray(x), batch_sharding(self.mesh, x.shape))

    def init_state(self, params: Params) -> GRPOState:
        """Placed parameters, optimiser state for their trainable part, and the reference: a copy of that part (with
        adapters, the adapters alone: the reference shares the policy's frozen base)."""
        params = self._place_params(params)
        train = lora.partition(params)[0]
        ref = jax.tree.map(jnp.copy, train) if self.cfg.grpo.kl_coef > 0 else None
        if self.mesh is None:
            opt_state = jax.jit(self.optimizer.init)(train)
        else:
            shapes = jax.eval_shape(self.optimizer.init, train)
            out = opt_shardings(shapes, params, self.model_cfg, self.mesh)
            opt_state = jax.jit(self.optimizer.init, out_shardings=out)(train)
        return GRPOState(step=jnp.zeros((), jnp.int32), params=params, ref_params=ref, opt_state=opt_state)

    # phases ----------------------------------------------------------------------------------------------------
    def _select(self, ro: rollout.Rollout, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Rows to train on and their mask (dynamic sampling + overlong filtering), host side."""
        g, G = self.cfg.grpo, self.cfg.grpo.group_size
        zero_var = np.asarray(zero_variance_groups(rewards, G))
        n_groups = len(zero_var)
        if g.dynamic_sampling:
            order = np.concatenate([np.flatnonzero(~zero_var), np.flatnonzero(zero_var)])[: g.prompts_per_step]
            dropped = zero_var[order]
        else:
            order, dropped = np.arange(n_groups), np.zeros(n_groups, bool)
        rows = (order[:, None] * G + np.arange(G)[None]).reshape(-1)
        mask = np.asarray(ro.mask, np.float32)[rows]
        if g.overlong_filter:
            ended, lengths = np.asarray(ro.ended)[rows], np.asarray(ro.lengths)[rows]
            mask = np.asarray(overlong_filter(mask, ended, g.max_completion_len, lengths))
        mask = mask * ~np.repeat(dropped, G)[:, None]
        info = {
            "groups/zero_variance_frac": float(zero_var.mean()),
            "groups/sampled": float(n_groups),
            "groups/trained": float((~dropped).sum()),
        }
        return rows, mask, info

    def grpo_step(
        self, state: GRPOState, prompts: Sequence[Sequence[int]], metadata: Sequence[Mapping[str, Any]], key: Array
    ) -> tuple[GRPOState, dict[str, float]]:
        """Sample, score, select, compute log-probs, update (see the section comment); returns the new state and
        host-side float metrics. With a mesh, runs under ``jax.set_mesh`` (the model's activation constraints)."""
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return self._step(state, prompts, metadata, key)

    def _sample(self, params: Params, prompts, key: Array) -> rollout.Rollout:
        """G samples per prompt: single-turn, or multi-turn trajectories with ``self.tools`` (their result tokens
        are context with mask 0, so they stay out of the loss, the ratio and the KL; advantages are per trajectory)."""
        kw = dict(cfg=self.model_cfg, sampling=self.cfg.sampling, group_size=self.cfg.grpo.group_size,
                  stop_ids=self.stop_ids, encode=self.encode, decode=self.decode, mesh=self.mesh,
                  bucket=self.prompt_bucket)  # fmt: skip
        if self.tools is None:
            return rollout.sample(params, prompts, key, **kw)
        return sample_with_tools(params, prompts, key, env=self.tools, **kw)

    def _step(self, state, prompts, metadata, key):
        cfg, g = self.cfg, self.cfg.grpo
        G = g.group_size
        if len(prompts) != len(metadata):
            raise ValueError(f"{len(prompts)} prompts but {len(metadata)} metadata dicts")
        if len(prompts) != g.prompts_per_step and not (g.dynamic_sampling and len(prompts) > g.prompts_per_step):
            raise ValueError(
                f"expected {g.prompts_per_step} prompts (more only with dynamic sampling), got {len(prompts)}"
            )
        k_sample, k_shuffle = jax.random.split(key)

        t0 = time.perf_counter()
        policy = _merged(state.params) if cfg.lora.merge_for_sampling and cfg.lora.enabled else state.params
        ro = self._sample(policy, prompts, k_sample)
        del policy
        t_sample = time.perf_counter() - t0

        meta_rows = [m for m in metadata for _ in range(G)]
        rewards, reward_info = self.reward_fn(ro, meta_rows)
        rewards = np.asarray(rewards, np.float32)
        t_score = time.perf_counter() - t0 - t_sample

        rows, mask, select_info = self._select(ro, rewards)
        r_sel = rewards[rows]
        place = self._place_rows
        batch = TrainBatch(
            prompt_tokens=place(_take_rows(ro.prompt_tokens, rows)),
            prompt_start=place(_take_rows(ro.prompt_start, rows)),
            tokens=place(_take_rows(ro.tokens, rows)),
            mask=place(mask),
            advantages=place(np.asarray(group_advantages(r_sel, g))),
            sampler_logp=place(_take_rows(ro.logp, rows)),
            old_logp=None,
            ref_logp=None,
        )

        t1 = time.perf_counter()
        tau = rollout.logprob_temperature(cfg.sampling.temperature)
        group = G if g.shared_prompt else 1  # the selected rows keep whole groups, in order
        lp = functools.partial(sequence_logprobs, cfg=self.model_cfg, temperature=tau, prompt_group=group)
        args = (batch.prompt_tokens, batch.prompt_start, batch.tokens)
        if g.num_iterations > 1 or g.num_minibatches > 1:
            batch = dataclasses.replace(batch, old_logp=lp(state.params, *args)[0])
        if g.kl_coef > 0:
            batch = dataclasses.replace(batch, ref_logp=lp(lora.reference(state.params, state.ref_params), *args)[0])
        jax.block_until_ready((batch.old_logp, batch.ref_logp))
        t_logp = time.perf_counter() - t1

        t2 = time.perf_counter()
        params, opt_state = state.params, state.opt_state
        n = len(rows)
        mb = g.minibatch_size
        step_metrics = []
        for it in range(g.num_iterations):
            if g.num_minibatches > 1:
                perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_shuffle, it), n))
            for j in range(g.num_minibatches):
                if g.num_minibatches > 1:
                    idx = perm[j * mb : (j + 1) * mb]
                    minibatch = jax.tree.map(lambda x, idx=idx: place(to_host(x)[idx]), batch)
                else:
                    minibatch = batch
                params, opt_state, m = update_minibatch(
                    params,
                    opt_state,
                    minibatch,
                    cfg=cfg,
                    model_cfg=self.model_cfg,
                    micro_batch=min(cfg.micro_batch, mb),
                    mesh=self.mesh,
                    prompt_group=group if g.num_minibatches == 1 else 1,  # shuffled mini-batches split groups
                )
                step_metrics.append(m)
        step_metrics = jax.device_get(step_metrics)
        t_update = time.perf_counter() - t2

        step = int(state.step) + 1
        ref = state.ref_params
        if ref is not None and g.ref_update_every and step % g.ref_update_every == 0:
            # the old reference goes before the new one is made: two model copies on device at the refresh, not
            # three (the step consumes its input state anyway: params and optimizer state were donated)
            jax.tree.map(lambda x: x.delete(), ref)
            ref = jax.tree.map(jnp.copy, lora.partition(params)[0])
        new_state = GRPOState(step=jnp.asarray(step, jnp.int32), params=params, ref_params=ref, opt_state=opt_state)

        metrics: dict[str, float] = {"step": float(step)}
        for name in step_metrics[0]:
            vals = [float(m[name]) for m in step_metrics]
            metrics[name] = max(vals) if name == "ratio/max" else min(vals) if name == "ratio/min" else np.mean(vals)
        metrics["grad_norm_max"] = max(float(m["grad_norm"]) for m in step_metrics)
        metrics.update({k: float(v) for k, v in reward_metrics(rewards, G).items()})
        metrics.update({k: float(v) for k, v in reward_info.items()})
        metrics.update(select_info)
        for name in cfg.rewards.functions:
            if f"rewards/{name}/mean" in reward_info and "accuracy" in name:
                metrics["accuracy"] = float(reward_info[f"rewards/{name}/mean"])
        all_lengths = np.asarray(ro.lengths)
        metrics["response/length_mean"] = float(all_lengths.mean())
        metrics["response/length_max"] = float(all_lengths.max())
        metrics["response/clipped_frac"] = float(1.0 - np.asarray(ro.ended).mean())
        metrics["response/trained_tokens"] = float(mask.sum())
        if self.tools is not None:
            metrics.update(tool_metrics(ro, tuple(self.tools.tools)))
        plen = batch.prompt_tokens.shape[1]
        metrics["perf/sample_s"] = t_sample
        metrics["perf/score_s"] = t_score
        metrics["perf/logprob_s"] = t_logp
        metrics["perf/update_s"] = t_update
        metrics["perf/sample_tokens_per_s"] = float(all_lengths.sum()) / max(t_sample, 1e-9)
        seq_tokens = n * (plen + batch.tokens.shape[1]) * g.num_iterations
        metrics["perf/update_tokens_per_s"] = seq_tokens / max(t_update, 1e-9)
        return new_state, metrics
