"""The GRPO step: presets parse, the router bias moves against load and never through the optimiser, repeated steps
raise a reward the policy can learn, and an 8-device data-parallel run equals the single-device one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from r1jax.config import LossAgg, TrainConfig
from r1jax.grpo import GRPOTrainer, make_optimizer, update_router_bias
from r1jax.model import init_params
from r1jax.sharding import make_mesh

PROMPTS = [[2, 3, 4], [7, 8], [9, 10, 11, 12], [13]]
TARGET = 5


def _init(cfg, seed=0):
    return jax.jit(lambda k: init_params(cfg, k))(jax.random.key(seed))


def token_reward(ro, metadata):
    """Share of each completion's tokens equal to TARGET."""
    mask, tokens = np.asarray(ro.mask), np.asarray(ro.tokens)
    r = ((tokens == TARGET) * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
    return r.astype(np.float32), {"rewards/target/mean": float(r.mean())}


@pytest.mark.parametrize("name", sorted(configs.PRESETS))
def test_presets_parse(name):
    cfg = configs.get(name)
    assert isinstance(cfg, TrainConfig)
    assert cfg.grpo.samples_per_step == cfg.grpo.prompts_per_step * cfg.grpo.group_size
    assert cfg.grad_accum_steps * cfg.micro_batch * cfg.grpo.num_minibatches == cfg.grpo.samples_per_step
    assert dataclasses.replace(cfg) == cfg  # frozen, invariants re-checked


def test_preset_values():
    r1, dapo, dr = configs.r1(), configs.dapo(), configs.dr_grpo()
    assert (r1.grpo.group_size, r1.grpo.prompts_per_step, r1.grpo.kl_coef, r1.optim.lr) == (16, 32, 1e-3, 3e-6)
    assert (r1.grpo.clip_eps_high, r1.grpo.ref_update_every, r1.sampling.max_new_tokens) == (10.0, 400, 32768)
    assert (dapo.grpo.clip_eps_low, dapo.grpo.clip_eps_high, dapo.grpo.kl_coef) == (0.2, 0.28, 0.0)
    assert dapo.grpo.loss_agg is LossAgg.DAPO and dapo.grpo.dynamic_sampling and dapo.grpo.overlong_filter
    assert dr.grpo.loss_agg is LossAgg.DR_GRPO and dr.grpo.adv_scale.value == "none"
    with pytest.raises(ValueError, match="max_completion_len"):
        dataclasses.replace(r1, sampling=dataclasses.replace(r1.sampling, max_new_tokens=8))
    with pytest.raises(ValueError, match="unknown preset"):
        configs.get("nope")


def test_router_bias_moves_against_load_and_not_through_the_optimiser():
    cfg = configs.tiny_model()
    params = _init(cfg)
    load = jnp.asarray([[10.0, 2.0, 4.0, 0.0]])  # mean 4: expert 0 over, 1 and 3 under, 2 balanced
    new = update_router_bias(params, load, 0.01)
    delta = np.asarray(new["moe_layers"]["mlp"]["router_bias"] - params["moe_layers"]["mlp"]["router_bias"])
    np.testing.assert_allclose(delta, [[-0.01, 0.01, 0.0, 0.01]])
    np.testing.assert_array_equal(new["moe_layers"]["mlp"]["router"], params["moe_layers"]["mlp"]["router"])
    # the optimiser leaves the bias alone even when handed a gradient and weight decay for it
    tx = make_optimizer(dataclasses.replace(configs.tiny().optim, weight_decay=0.1))
    grads = jax.tree.map(jnp.ones_like, new)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, new)
    np.testing.assert_array_equal(updates["moe_layers"]["mlp"]["router_bias"], 0.0)
    assert float(jnp.abs(updates["moe_layers"]["mlp"]["router"]).min()) > 0


def _run(cfg, steps, mesh=None, seed=0):
    trainer = GRPOTrainer(cfg, cfg.model, token_reward, mesh=mesh)
    state = trainer.init_state(_init(cfg.model, seed))
    history = []
    for i in range(steps):
        state, metrics = trainer.grpo_step(state, PROMPTS, [{}] * len(PROMPTS), jax.random.key(100 + i))
        history.append(metrics)
    return state, history


def test_grpo_raises_a_learnable_reward():
    """Reward = share of completion tokens equal to 5 (chance 1/64). 22 steps of the tiny preset (G=4, 4 prompts,
    2 micro-batches, KL to a reference refreshed every 10 steps) lift it far above chance."""
    cfg = configs.tiny()
    state, hist = _run(cfg, 22)
    rewards = [m["reward/mean"] for m in hist]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert first < 0.1, rewards
    assert last > first + 0.3, rewards
    m = hist[-1]
    keys = ["kl", "entropy", "grad_norm", "clip/frac", "moe/load_max_over_mean", "reward/zero_variance_frac"]
    keys += ["response/length_mean", "response/clipped_frac", "perf/sample_tokens_per_s", "rewards/target/mean"]
    for key in keys:
        assert np.isfinite(m[key]), key
    assert hist[-1]["entropy"] < hist[0]["entropy"]
    assert int(state.step) == 22
    assert float(jnp.abs(state.params["moe_layers"]["mlp"]["router_bias"]).max()) > 0  # balancing ran


def test_data_parallel_mesh_equals_single_device():
    """Two steps on an 8-device data mesh (rows sharded, parameters replicated) equal the single-device run.

    Adam's eps is raised to 1e-5 for this comparison: with eps = 1e-8, a gradient of float-noise size (~1e-10, which
    differs between reduction orders) becomes a sizeable step and the comparison would measure that amplification,
    not the sharded computation.
    """
    cfg = configs.tiny()
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-3, eps=1e-5))
    single, h1 = _run(cfg, 2)
    sharded, h8 = _run(cfg, 2, mesh=make_mesh({"data": 8}))
    leaf = jax.tree.leaves(sharded.params)[0]
    assert len(leaf.sharding.device_set) == 8
    for a, b in zip(h1, h8, strict=True):
        assert a["reward/mean"] == b["reward/mean"]  # same samples
        for key in ("loss", "grad_norm", "kl", "entropy"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-7, err_msg=key)
    want, got = jax.device_get(single.params), jax.device_get(sharded.params)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
