"""The GRPO loss family and the teacher-forced log-probs it reads, as small pure functions.

Symbols (DeepSeekMath section 4.1, DeepSeek-R1 section 2.2): a prompt q has G = ``group_size`` sampled completions
o_1..o_G with rewards r_i; A_i is the advantage of o_i, shared by all of its tokens; pi_theta is the policy being
trained, pi_old the policy that produced the samples (``old_logp``), pi_ref the frozen reference (``ref_logp``);
eps_low / eps_high clip the importance ratio; beta = ``kl_coef``; mu = ``num_iterations``.

Shapes: ``n`` sequences (= prompts x G, groups contiguous), ``t`` completion positions. Per-token arrays are
``[n, t]`` log-probabilities of the sampled tokens; ``mask`` is 1 on completion tokens that count and 0 on padding
(and on whatever the caller filtered out). All math is float32 whatever the input dtype, and every function here is
jittable with the config as a static argument (configs are frozen, hashable dataclasses), except the host-side
``trained_groups`` / ``group_rows``.

Variants selected by ``GRPOConfig``:

- ``loss_agg``: "grpo" (per-sequence token mean, then mean over sequences), "dapo" (token mean over the batch),
  "dr_grpo" (token sum / (sequences x max_completion_len)).
- ``adv_scale``: divide the group-centred reward by the group std, the batch std, or nothing (Dr. GRPO).
- ``ratio_level``: per-token ratio (PPO/GRPO) or one ratio per sequence, exp(mean token log-ratio) (GSPO).
- ``tis_cap``: truncated importance sampling, weight min(pi_old / pi_sampler, cap) per token, against the
  log-prob mismatch between the sampling engine and the training forward.
- ``dynamic_sampling`` / ``overlong_filter`` (DAPO): see ``trained_groups`` and ``overlong_filter``.

``sequence_logprobs`` is the one teacher-forced log-prob computation, shared by pi_old, pi_ref and the
differentiated policy (``r1jax.grpo`` puts all of it to work).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import rollout
from r1jax.cache import init_cache
from r1jax.config import AdvScale, GRPOConfig, LossAgg, ModelConfig, RatioLevel
from r1jax.model import Params, forward, logits_from_hidden, token_logprobs

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

    The caller drops the others and refills the batch with freshly sampled groups (see ``trained_groups``).
    """
    return ~zero_variance_groups(rewards, group_size)


def trained_groups(
    rewards: np.ndarray, group_size: int, max_groups: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Host-side dynamic sampling: (group indices, dropped). The groups worth training on (rewards not all equal)
    come first, in order, then the others, cut to ``max_groups``; ``dropped`` marks the taken groups that carry no
    signal, which the trainer masks out (the batch keeps its static size). Not jittable."""
    zero_var = np.asarray(zero_variance_groups(np.asarray(rewards, np.float32), group_size))
    order = np.concatenate([np.flatnonzero(~zero_var), np.flatnonzero(zero_var)])[:max_groups]
    return order, zero_var[order]


def group_rows(groups: np.ndarray, group_size: int) -> np.ndarray:
    """int64 sample indices of whole groups, in the order given."""
    return (np.asarray(groups)[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1).astype(np.int64)


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

    log_ratio = _log_ratio(logp, old, m)
    if cfg.ratio_level is RatioLevel.SEQUENCE:
        seq_log_ratio = jnp.sum(log_ratio, axis=-1) / jnp.maximum(seq_len, 1.0)
        log_ratio = jnp.broadcast_to(seq_log_ratio[:, None], logp.shape)
    ratio = jnp.exp(log_ratio)
    a = adv[:, None]
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    per_token = -jnp.minimum(ratio * a, clipped_ratio * a)

    kl = None
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl = _k3(_log_ratio(jax.lax.stop_gradient(jnp.asarray(ref_logp, f32)), logp, m))
        per_token = per_token + cfg.kl_coef * kl

    weight, metrics = _sampler_correction(old, sampler_logp, m, cfg.tis_cap)
    if weight is not None:
        per_token = per_token * weight
    per_token = jnp.where(m, per_token, 0.0)
    loss = _aggregate(per_token, seq_len, cfg, num_tokens=num_tokens, num_seqs=num_seqs)
    metrics.update(_loss_metrics(loss, ratio, a, kl, m, seq_len, adv, cfg))
    return loss, metrics


def _log_ratio(num: Array, den: Array, m: Array) -> Array:
    """log(num / den) from log-probs, 0 off the mask, clamped to +-``LOG_RATIO_CLAMP``."""
    return jnp.clip(jnp.where(m, num - den, 0.0), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _k3(log_ratio: Array) -> Array:
    """The k3 estimator of KL from log(q / p) under samples of p: q/p - log(q/p) - 1 (unbiased, >= 0)."""
    return jnp.exp(log_ratio) - log_ratio - 1.0


def _sampler_correction(old: Array, sampler_logp: Array | None, m: Array, cap: float | None):
    """The truncated importance weight min(pi_old / pi_sampler, cap) per token (None without ``cap``) and the
    mismatch metrics: the k3 estimate of KL(sampler || trainer-old), how far the two forwards disagree."""
    if sampler_logp is None:
        if cap is not None:
            raise ValueError("tis_cap is set: pass sampler_logp (the sampling engine's log-probs)")
        return None, {}
    mf = m.astype(jnp.float32)
    mismatch = _log_ratio(old, jax.lax.stop_gradient(jnp.asarray(sampler_logp, jnp.float32)), m)
    metrics = {"tis/mismatch_kl": jax.lax.stop_gradient(masked_mean(_k3(-mismatch), mf))}
    if cap is None:
        return None, metrics
    raw = jnp.exp(mismatch)
    weight = jnp.minimum(raw, cap)
    metrics["tis/weight_mean"] = masked_mean(weight, mf)
    metrics["tis/capped_frac"] = masked_mean((raw > cap).astype(jnp.float32), mf)
    return weight, metrics


def _aggregate(per_token: Array, seq_len: Array, cfg: GRPOConfig, *, num_tokens, num_seqs) -> Array:
    """Per-token losses (0 off the mask) -> the scalar loss by ``cfg.loss_agg`` (see ``grpo_loss``)."""
    f32 = jnp.float32
    if num_seqs is None:
        num_seqs = jnp.sum((seq_len > 0).astype(f32))
    if num_tokens is None:
        num_tokens = jnp.sum(seq_len)
    num_seqs = jnp.maximum(jnp.asarray(num_seqs, f32), 1.0)
    num_tokens = jnp.maximum(jnp.asarray(num_tokens, f32), 1.0)
    if cfg.loss_agg is LossAgg.GRPO:
        return jnp.sum(jnp.sum(per_token, axis=-1) / jnp.maximum(seq_len, 1.0)) / num_seqs
    if cfg.loss_agg is LossAgg.DAPO:
        return jnp.sum(per_token) / num_tokens
    return jnp.sum(per_token) / (num_seqs * cfg.max_completion_len)


def _loss_metrics(loss, ratio, a, kl, m, seq_len, adv, cfg: GRPOConfig) -> dict[str, Array]:
    """What a step logs about its loss: clipping, the ratio's range, KL, advantages, token counts."""
    f32, sg = jnp.float32, jax.lax.stop_gradient
    mf = m.astype(f32)
    has_tokens = seq_len > 0
    ratio = sg(ratio)
    low = (ratio < 1.0 - cfg.clip_eps_low) & (a < 0)
    high = (ratio > 1.0 + cfg.clip_eps_high) & (a > 0)
    total_tokens = jnp.sum(mf)
    any_tok = total_tokens > 0
    return {
        "loss": sg(loss),
        "clip/low_frac": masked_mean(low.astype(f32), mf),
        "clip/high_frac": masked_mean(high.astype(f32), mf),
        "clip/frac": masked_mean((low | high).astype(f32), mf),
        "ratio/mean": masked_mean(ratio, mf),
        "ratio/min": jnp.where(any_tok, jnp.min(jnp.where(m, ratio, jnp.inf)), 1.0),
        "ratio/max": jnp.where(any_tok, jnp.max(jnp.where(m, ratio, -jnp.inf)), 1.0),
        "kl": masked_mean(sg(kl), mf) if kl is not None else jnp.zeros((), f32),
        "advantage/mean": jnp.sum(jnp.where(has_tokens, adv, 0.0)) / jnp.maximum(jnp.sum(has_tokens), 1),
        "tokens": total_tokens,
        "seq_len/mean": jnp.sum(seq_len) / jnp.maximum(jnp.sum(has_tokens), 1),
    }


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
    routes: Array | None = None,
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

    ``routes`` int32[n_moe_layers, n, P + T, k] replays recorded experts (routing replay, R3: what the sampler chose
    for each token of prompt + completion, laid out as ``prompt_tokens`` then ``completion``), so routing flips
    between the sampler and this forward do not add to their mismatch; the router still gets gradients through the
    gates. With ``prompt_group`` > 1 the prompt's routes are read from the first row of each group.
    """
    if prompt_group > 1:
        hidden, load = shared_prompt_hidden(
            params, prompt_tokens, prompt_start, completion, cfg, prompt_group, routes=routes
        )
    else:
        hidden, load = _completion_hidden(params, prompt_tokens, prompt_start, completion, cfg, routes=routes)
    # the output head only on the positions that predict completion tokens
    logits = logits_from_hidden(params, hidden, cfg) / temperature
    out = {"expert_load": load}
    if entropy:
        out["entropy"] = token_entropy(logits)
    return token_logprobs(logits, completion), out


def _completion_hidden(params: Params, prompt_tokens, prompt_start, completion, cfg: ModelConfig, *, routes=None):
    """Hidden states f32[n, T, d] at the positions that predict the completion tokens (one forward over prompt +
    completion, replaying ``routes`` [L, n, P + T, k] when given), and the expert load of the real tokens."""
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
        routes=routes,
    )
    return aux["hidden"][:, plen - 1 : -1], aux["expert_load"]


def shared_prompt_hidden(
    params: Params, prompt_tokens, prompt_start, completion, cfg: ModelConfig, group: int, *, routes=None
):
    """``_completion_hidden`` for rows in runs of ``group`` sharing a prompt: each prompt is prefilled once into a KV
    cache (as the sampler does), the cache is repeated over its rows, and all completion tokens run against it in one
    cached forward. Gradients flow through the shared prompt computation (summed over its rows). The expert load
    counts each prompt token ``group`` times, as the unshared forward does. ``routes`` [L, n, P + T, k]: the prefill
    replays the first row of each group's prompt routes, the completion forward each row's completion routes."""
    n, plen = prompt_tokens.shape
    b = n // group
    prompts = prompt_tokens.reshape(b, group, plen)[:, 0]
    start = prompt_start.reshape(b, group)[:, 0]
    real = jnp.arange(plen, dtype=jnp.int32)[None] >= start[:, None]
    prompt_routes = None if routes is None else routes[:, ::group, :plen]
    completion_routes = None if routes is None else routes[:, :, plen:]
    cache = init_cache(cfg, b, plen, start)
    _, pre = forward(params, prompts, cfg, cache=cache, return_hidden=True, load_mask=real, routes=prompt_routes)
    cache = rollout.repeat_cache(pre["cache"], group, completion.shape[1], None)
    _, aux = forward(
        params, completion.astype(jnp.int32), cfg, cache=cache, return_hidden=True, routes=completion_routes
    )
    last = jnp.repeat(pre["hidden"][:, -1:], group, axis=0)
    hidden = jnp.concatenate([last, aux["hidden"][:, :-1]], axis=1)
    load = None if aux["expert_load"] is None else aux["expert_load"] + group * pre["expert_load"]
    return hidden, load
