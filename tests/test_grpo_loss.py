"""GRPO advantages and losses against an independent float64 numpy implementation, forward and gradient."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.config import AdvScale, GRPOConfig, LossAgg, RatioLevel, RewardConfig, SamplingConfig
from r1jax.loss import (
    dynamic_sampling_keep,
    group_advantages,
    group_rows,
    grpo_loss,
    overlong_filter,
    reward_metrics,
    token_entropy,
    trained_groups,
)

G, N_GROUPS, T = 4, 3, 7
N = G * N_GROUPS


# --- independent reference (float64, explicit loops) -----------------------------------------------------------------


def np_advantages(r, group_size, scale, eps, ddof):
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    batch_std = np.std(r, ddof=ddof)
    for start in range(0, len(r), group_size):
        g = r[start : start + group_size]
        if g.max() == g.min():
            continue
        if scale == "group":
            denom = np.std(g, ddof=ddof) + eps
        elif scale == "batch":
            denom = batch_std + eps
        else:
            denom = 1.0
        out[start : start + group_size] = (g - g.mean()) / denom
    return out


def np_loss(logp, old, ref, adv, mask, cfg, sampler=None, num_tokens=None, num_seqs=None):
    n, t = logp.shape
    lo, hi = 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high
    seq_sums = []
    for i in range(n):
        toks = [j for j in range(t) if mask[i, j]]
        if cfg.ratio_level == "sequence" and toks:
            seq_ratio = np.exp(np.mean([logp[i, j] - old[i, j] for j in toks]))
        s = 0.0
        for j in toks:
            ratio = seq_ratio if cfg.ratio_level == "sequence" else np.exp(logp[i, j] - old[i, j])
            surr = min(ratio * adv[i], min(max(ratio, lo), hi) * adv[i])
            d = ref[i, j] - logp[i, j]
            kl = np.exp(d) - d - 1
            tok = -(surr - cfg.kl_coef * kl)
            if cfg.tis_cap is not None:
                tok *= min(np.exp(old[i, j] - sampler[i, j]), cfg.tis_cap)
            s += tok
        seq_sums.append((s, len(toks)))
    if num_seqs is None:
        num_seqs = sum(1 for _, k in seq_sums if k)
    if num_tokens is None:
        num_tokens = sum(k for _, k in seq_sums)
    if cfg.loss_agg == "grpo":
        return sum(s / k for s, k in seq_sums if k) / num_seqs
    if cfg.loss_agg == "dapo":
        return sum(s for s, _ in seq_sums) / num_tokens
    return sum(s for s, _ in seq_sums) / (num_seqs * cfg.max_completion_len)


def np_grad(logp, *args, h=1e-6, **kwargs):
    g = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        up, down = logp.copy(), logp.copy()
        up[idx] += h
        down[idx] -= h
        g[idx] = (np_loss(up, *args, **kwargs) - np_loss(down, *args, **kwargs)) / (2 * h)
    return g


def make_batch(seed=0, n=N, t=T):
    rng = np.random.default_rng(seed)
    old = rng.uniform(-3.0, -0.1, (n, t))
    logp = old + rng.uniform(-0.45, 0.45, (n, t))
    ref = old + rng.uniform(-0.3, 0.3, (n, t))
    sampler = old + rng.uniform(-0.6, 0.6, (n, t))
    lengths = rng.integers(1, t + 1, n)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float64)
    rewards = rng.integers(0, 3, n).astype(np.float64)
    rewards[:G] = 1.0  # one zero-variance group
    return logp, old, ref, sampler, mask, rewards


def cfg_for(loss_agg="grpo", adv_scale="group", ratio_level="token", tis=False, **kw):
    base = dict(group_size=G, clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.05, max_completion_len=T + 3)
    base.update(kw)
    return GRPOConfig(
        loss_agg=loss_agg, adv_scale=adv_scale, ratio_level=ratio_level, tis_cap=2.0 if tis else None, **base
    )


_jit_loss = jax.jit(grpo_loss, static_argnames="cfg")


def _loss_and_grad(logp, old, ref, adv, mask, cfg, **kw):
    def f(x):
        return grpo_loss(x, old, ref, adv, mask, cfg, **kw)[0]

    return jax.jit(jax.value_and_grad(f))(jnp.asarray(logp, jnp.float32))


# --- advantages -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_advantages_match_numpy(scale, ddof):
    rng = np.random.default_rng(1)
    r = rng.normal(size=N)
    r[G : 2 * G] = 0.1  # all-equal group whose float mean is not exactly 0.1
    cfg = cfg_for(adv_scale=scale, std_ddof=ddof)
    got = np.asarray(group_advantages(jnp.asarray(r, jnp.float32), cfg))
    np.testing.assert_allclose(got, np_advantages(r, G, scale, cfg.std_eps, ddof), rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32
    assert np.all(got[G : 2 * G] == 0.0)


def test_advantages_are_standardised_per_group():
    r = jnp.array([0.0, 1.0, 1.0, 1.0, 5.0, 2.0, 3.0, 4.0])
    a = np.asarray(group_advantages(r, GRPOConfig(group_size=4, std_eps=0.0))).reshape(2, 4)
    np.testing.assert_allclose(a.mean(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.sqrt((a**2).mean(1)), 1.0, rtol=1e-6)


def test_advantages_reject_partial_groups():
    with pytest.raises(ValueError):
        group_advantages(jnp.zeros(5), GRPOConfig(group_size=4))


# --- loss and gradient against numpy ----------------------------------------------------------------------------------


MODES = list(itertools.product(["grpo", "dapo", "dr_grpo"], ["group", "batch", "none"], ["token", "sequence"]))


@pytest.mark.parametrize("tis", [False, True])
@pytest.mark.parametrize("loss_agg,adv_scale,ratio_level", MODES)
def test_loss_and_grad_match_numpy(loss_agg, adv_scale, ratio_level, tis):
    logp, old, ref, sampler, mask, rewards = make_batch(seed=MODES.index((loss_agg, adv_scale, ratio_level)))
    cfg = cfg_for(loss_agg, adv_scale, ratio_level, tis)
    adv = np_advantages(rewards, G, adv_scale, cfg.std_eps, cfg.std_ddof)
    kw = {"sampler_logp": sampler} if tis else {}
    loss, grad = _loss_and_grad(logp, old, ref, adv, mask, cfg, **kw)
    ref_kw = {"sampler": sampler} if tis else {}
    np.testing.assert_allclose(float(loss), np_loss(logp, old, ref, adv, mask, cfg, **ref_kw), rtol=2e-5, atol=1e-6)
    want = np_grad(logp, old, ref, adv, mask, cfg, **ref_kw)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=2e-3, atol=2e-6)
    assert np.all(np.asarray(grad)[mask == 0] == 0.0)


def test_ratio_one_no_kl_gives_minus_mean_advantage():
    logp, _, ref, _, mask, rewards = make_batch(seed=3)
    cfg = cfg_for(kl_coef=0.0)
    adv = group_advantages(jnp.asarray(rewards), cfg)
    loss, metrics = _jit_loss(logp, logp, ref, adv, mask, cfg=cfg)
    np.testing.assert_allclose(float(loss), -float(jnp.mean(adv)), atol=1e-6)
    assert float(metrics["clip/frac"]) == 0.0
    np.testing.assert_allclose(float(metrics["ratio/mean"]), 1.0, rtol=1e-6)


@pytest.mark.parametrize("loss_agg", ["grpo", "dapo", "dr_grpo"])
def test_zero_variance_group_has_zero_gradient(loss_agg):
    logp, old, ref, _, mask, rewards = make_batch(seed=4)
    cfg = cfg_for(loss_agg, kl_coef=0.0)
    adv = group_advantages(jnp.asarray(rewards), cfg)
    _, grad = _loss_and_grad(logp, old, ref, adv, mask, cfg)
    grad = np.asarray(grad)
    assert np.all(grad[:G] == 0.0)
    assert np.any(grad[G:] != 0.0)


@pytest.mark.parametrize("loss_agg", ["grpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_with_global_normaliser(loss_agg):
    logp, old, ref, sampler, mask, rewards = make_batch(seed=5)
    cfg = cfg_for(loss_agg, tis=True)
    adv = group_advantages(jnp.asarray(rewards), cfg)
    full, full_grad = _loss_and_grad(logp, old, ref, adv, mask, cfg, sampler_logp=sampler)
    num_tokens, num_seqs = float(mask.sum()), float((mask.sum(1) > 0).sum())
    total, grads = 0.0, []
    for sl in (slice(0, 5), slice(5, N)):  # uneven micro-batches
        loss, grad = _loss_and_grad(
            logp[sl], old[sl], ref[sl], adv[sl], mask[sl], cfg,
            sampler_logp=sampler[sl], num_tokens=num_tokens, num_seqs=num_seqs,
        )  # fmt: skip
        total += float(loss)
        grads.append(np.asarray(grad))
    np.testing.assert_allclose(total, float(full), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.concatenate(grads), np.asarray(full_grad), rtol=1e-5, atol=1e-8)


def test_masked_garbage_does_not_leak():
    logp, old, ref, sampler, mask, rewards = make_batch(seed=6)
    cfg = cfg_for("dapo", tis=True)
    adv = np_advantages(rewards, G, "group", cfg.std_eps, 0)
    clean = _loss_and_grad(logp, old, ref, adv, mask, cfg, sampler_logp=sampler)
    dirty = [x.copy() for x in (logp, old, ref, sampler)]
    for x, v in zip(dirty, (np.nan, -np.inf, np.inf, np.nan), strict=True):
        x[mask == 0] = v
    got = _loss_and_grad(*dirty[:3], adv, mask, cfg, sampler_logp=dirty[3])
    np.testing.assert_allclose(float(got[0]), float(clean[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(clean[1]), rtol=1e-6, atol=0)


def test_all_padding_rows_do_not_dilute():
    logp, old, ref, _, mask, rewards = make_batch(seed=7)
    cfg = cfg_for("grpo")
    adv = np_advantages(rewards, G, "group", cfg.std_eps, 0)
    base = float(_jit_loss(logp, old, ref, adv, mask, cfg=cfg)[0])
    pad = lambda x, v=0.0: np.concatenate([x, np.full((2,) + x.shape[1:], v)])  # noqa: E731
    padded = float(_jit_loss(pad(logp), pad(old), pad(ref), pad(adv, 5.0), pad(mask), cfg=cfg)[0])
    np.testing.assert_allclose(padded, base, rtol=1e-6)


def test_sequence_ratio_equals_token_ratio_when_constant_per_sequence():
    _, old, ref, _, mask, rewards = make_batch(seed=8)
    shift = np.linspace(-0.4, 0.4, N)[:, None]
    logp = old + shift
    adv = np_advantages(rewards, G, "group", 1e-4, 0)
    tok = _jit_loss(logp, old, ref, adv, mask, cfg=cfg_for(ratio_level="token"))
    seq = _jit_loss(logp, old, ref, adv, mask, cfg=cfg_for(ratio_level="sequence"))
    np.testing.assert_allclose(float(seq[0]), float(tok[0]), rtol=1e-5)


def test_clip_metrics():
    n, t = 4, 3
    old = np.zeros((n, t))
    logp = np.log(np.array([[1.5] * t, [0.5] * t, [1.5] * t, [1.0] * t]))
    adv = np.array([1.0, -1.0, -1.0, 1.0])
    mask = np.ones((n, t))
    _, m = _jit_loss(logp, old, None, adv, mask, cfg=cfg_for(kl_coef=0.0))
    assert float(m["clip/high_frac"]) == pytest.approx(0.25)  # ratio 1.5 > 1.28 with A > 0
    assert float(m["clip/low_frac"]) == pytest.approx(0.25)  # ratio 0.5 < 0.8 with A < 0
    assert float(m["clip/frac"]) == pytest.approx(0.5)
    assert float(m["ratio/max"]) == pytest.approx(1.5, rel=1e-6)
    assert float(m["ratio/min"]) == pytest.approx(0.5, rel=1e-6)
    assert float(m["kl"]) == 0.0


def test_kl_metric_is_k3_mean():
    logp, old, ref, _, mask, rewards = make_batch(seed=9)
    _, m = _jit_loss(logp, old, ref, rewards, mask, cfg=cfg_for())
    d = (ref - logp)[mask == 1]
    np.testing.assert_allclose(float(m["kl"]), np.mean(np.exp(d) - d - 1), rtol=1e-5)


def test_tis_requires_sampler_logp_and_reports_weights():
    logp, old, ref, sampler, mask, rewards = make_batch(seed=10)
    with pytest.raises(ValueError, match="sampler_logp"):
        grpo_loss(logp, old, ref, rewards, mask, cfg_for(tis=True))
    _, m = grpo_loss(logp, old, ref, rewards, mask, cfg_for(tis=True), sampler_logp=sampler)
    w = np.minimum(np.exp(old - sampler), 2.0)[mask == 1]
    np.testing.assert_allclose(float(m["tis/weight_mean"]), w.mean(), rtol=1e-5)
    assert 0.0 <= float(m["tis/capped_frac"]) <= 1.0


def test_low_precision_inputs_compute_in_float32():
    logp, old, ref, _, mask, rewards = make_batch(seed=11)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    loss, m = _jit_loss(bf(logp), bf(old), bf(ref), bf(rewards), mask, cfg=cfg_for())
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in m.values())


# --- helpers ----------------------------------------------------------------------------------------------------------


def test_dynamic_sampling_and_reward_metrics():
    r = np.array([1, 1, 1, 1, 0, 1, 0, 0, 2, 2, 2, 2, 0, 0, 0, 1], np.float32)
    np.testing.assert_array_equal(np.asarray(dynamic_sampling_keep(r, 4)), [False, True, False, True])
    order, dropped = trained_groups(r, 4)  # informative groups first, then the others, which are dropped
    np.testing.assert_array_equal(order, [1, 3, 0, 2])
    np.testing.assert_array_equal(dropped, [False, False, True, True])
    np.testing.assert_array_equal(group_rows(order[~dropped], 4), [4, 5, 6, 7, 12, 13, 14, 15])
    order, dropped = trained_groups(r, 4, max_groups=1)
    np.testing.assert_array_equal(group_rows(order[~dropped], 4), [4, 5, 6, 7])
    assert float(reward_metrics(r, 4)["reward/zero_variance_frac"]) == 0.5


def test_overlong_filter():
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], np.int32)
    out = np.asarray(overlong_filter(mask, np.array([False, True, False]), max_completion_len=4))
    np.testing.assert_array_equal(out, [[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])


def test_token_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 11)).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(token_entropy(logits)), -(p * np.log(p)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(float(token_entropy(jnp.zeros(16))), np.log(16), rtol=1e-6)
    masked = jnp.array([0.0, 0.0, -jnp.inf])
    np.testing.assert_allclose(float(token_entropy(masked)), np.log(2), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda x: token_entropy(x))(masked))))


# --- configs ----------------------------------------------------------------------------------------------------------


def test_grpo_config_accepts_strings_and_validates():
    cfg = GRPOConfig(loss_agg="dr_grpo", adv_scale="none", ratio_level="sequence")
    assert cfg.loss_agg is LossAgg.DR_GRPO and cfg.adv_scale is AdvScale.NONE
    assert cfg.ratio_level is RatioLevel.SEQUENCE
    assert dataclasses.replace(cfg, loss_agg="dapo").loss_agg is LossAgg.DAPO
    hash(cfg)
    for bad in ({"loss_agg": "mean"}, {"group_size": 0}, {"clip_eps_low": 1.0}, {"tis_cap": 0.0}, {"kl_coef": -1}):
        with pytest.raises(ValueError):
            GRPOConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.group_size = 2


def test_reward_and_sampling_configs_validate():
    cfg = RewardConfig(functions=["accuracy", "format_soft"], weights=[1, 0.5])
    assert cfg.functions == ("accuracy", "format_soft") and cfg.weights == (1.0, 0.5)
    for bad in ({"weights": (1.0,)}, {"timeout_s": 0}, {"target_language": "xx"}, {"overlong_buffer_tokens": 5000}):
        with pytest.raises(ValueError):
            RewardConfig(**bad)
    assert SamplingConfig(stop_strings=["</answer>"]).stop_strings == ("</answer>",)
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)
