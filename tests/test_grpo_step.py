"""The GRPO step: presets parse, the router bias moves against load and never through the optimiser, repeated steps
raise a reward the policy can learn, and an 8-device data-parallel run equals the single-device one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from r1jax.config import LossAgg, ModelConfig, OptimConfig, TrainConfig
from r1jax.errors import ConfigError
from r1jax.grpo import GRPOTrainer
from r1jax.model import init_params
from r1jax.optim import make_optimizer, update_router_bias
from r1jax.sharding import make_mesh

PROMPTS = [[2, 3, 4], [7, 8], [9, 10, 11, 12], [13]]
TARGET = 5
DENSE = ModelConfig(arch="qwen2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffw=48)


def _tiny():
    """The tiny preset with Adam eps 1e-5 instead of 1e-8: with eps = 1e-8 a gradient of float-noise size (~1e-10,
    which differs between reduction orders) becomes a sizeable step, and comparisons of two runs would measure that
    amplification rather than the computation. Shared by the learning and mesh tests so they share compilations."""
    cfg = configs.tiny()
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, eps=1e-5))


def _update_atol(cfg, steps):
    """Parameters near zero are compared on the scale of what training moved them: an Adam step moves each entry by
    at most ~lr, so 1e-4 of lr x steps is the same relative precision as rtol=1e-4 on the update."""
    return 1e-4 * cfg.optim.lr * steps


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
    small = {"moe_layers": {"mlp": {k: new["moe_layers"]["mlp"][k] for k in ("router", "router_bias")}}}
    grads = jax.tree.map(jnp.ones_like, small)
    updates, _ = tx.update(grads, tx.init(small), small)
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
    """Reward = share of completion tokens equal to 5 (chance 1/64). 30 steps of the tiny preset (G=4, 4 prompts,
    2 micro-batches, KL to a reference refreshed every 10 steps) lift it far above chance (how fast depends on the
    random stream: 0.27-0.84 after 22 steps over two seeds)."""
    cfg = _tiny()
    state, hist = _run(cfg, 30)
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
    assert int(state.step) == 30
    assert float(jnp.abs(state.params["moe_layers"]["mlp"]["router_bias"]).max()) > 0  # balancing ran


def test_partial_rollouts_carry_rows_over_and_still_learn():
    """Partial rollouts (8 slots for 16 rows, 3 decode steps per GRPO step): unfinished rows carry over to later
    steps, a step trains the groups complete by then, and the learnable reward still rises as in the synchronous
    run."""
    cfg = _tiny()
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, slots=8, step_budget=3))
    _, hist = _run(cfg, 30)
    rewards = [m["reward/mean"] for m in hist]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert first < 0.1 and last > first + 0.3, rewards
    assert max(m["rollout/staleness_max"] for m in hist) >= 1  # rows sampled over several policies
    assert all(1 <= m["groups/trained"] == m["rollout/complete_groups"] <= len(PROMPTS) for m in hist)
    assert max(m["rollout/carried_groups"] for m in hist) <= 3 * len(PROMPTS)  # the backlog stays bounded


def _off_policy(cfg, steps, k, mesh=None):
    trainer = GRPOTrainer(cfg, cfg.model, token_reward, mesh=mesh)
    state = trainer.init_state(_init(cfg.model))
    meta = [{}] * len(PROMPTS)
    history = []
    for i in range(steps):
        ahead = [(PROMPTS, meta, jax.random.key(100 + j)) for j in range(i + 1, i + 1 + k)]
        state, metrics = trainer.grpo_step(state, PROMPTS, meta, jax.random.key(100 + i), ahead=ahead)
        history.append(metrics)
    return trainer, state, history


def test_off_policy_overlap_bounds_staleness_and_still_learns():
    """One step off-policy: each step trains on samples drawn with the previous step's weights (staleness 1 after
    the first step, never more), TIS weights them, and the learnable reward rises as in the synchronous run."""
    cfg = _tiny()
    cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, max_off_policy_steps=1, tis_cap=2.0))
    _, _, hist = _off_policy(cfg, 30, 1)
    assert [m["offpolicy/staleness"] for m in hist] == [0.0] + [1.0] * 29
    assert all(np.isfinite(m["tis/mismatch_kl"]) and m["perf/weight_transfer_s"] >= 0 for m in hist)
    assert max(m["tis/mismatch_kl"] for m in hist[1:]) > 10 * hist[0]["tis/mismatch_kl"]  # stale samples differ
    rewards = [m["reward/mean"] for m in hist]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert first < 0.1 and last > first + 0.3, rewards


def test_off_policy_on_a_mesh_samples_on_its_own_half():
    cfg = _tiny()
    cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, max_off_policy_steps=2, tis_cap=2.0))
    mesh = make_mesh({"data": 4}, devices=jax.devices()[:4])
    trainer, state, hist = _off_policy(cfg, 4, 2, mesh=mesh)
    assert [m["offpolicy/staleness"] for m in hist] == [0.0, 1.0, 2.0, 2.0]
    train_devs, sample_devs = set(trainer.mesh.devices.flat), set(trainer.sampler_mesh.devices.flat)
    assert len(train_devs) == len(sample_devs) == 2 and not train_devs & sample_devs
    assert set(jax.tree.leaves(state.params)[0].devices()) == train_devs
    assert set(jax.tree.leaves(trainer._ahead.weights)[0].devices()) == sample_devs
    with pytest.raises(ConfigError, match="cannot be split"):
        GRPOTrainer(cfg, cfg.model, token_reward, mesh=make_mesh({"data": 3}, devices=jax.devices()[:3]))


def test_reference_refresh_copies_the_policy_and_frees_the_old_reference():
    """Every ``ref_update_every`` steps the reference becomes a copy of the policy, and the old reference is freed
    before the copy is made (two model copies on device at the refresh, not three); between refreshes it stays."""
    cfg = _tiny()
    cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, ref_update_every=2, kl_coef=0.1))
    trainer = GRPOTrainer(cfg, cfg.model, token_reward)
    state = trainer.init_state(_init(cfg.model))
    first_ref = state.ref_params
    want = jax.device_get(first_ref)
    state, _ = trainer.grpo_step(state, PROMPTS, [{}] * len(PROMPTS), jax.random.key(100))
    assert state.ref_params is first_ref  # step 1: no refresh
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(jax.device_get(state.ref_params)), strict=True):
        np.testing.assert_array_equal(a, b)
    state, _ = trainer.grpo_step(state, PROMPTS, [{}] * len(PROMPTS), jax.random.key(101))
    assert all(x.is_deleted() for x in jax.tree.leaves(first_ref))
    params, ref = jax.device_get(state.params), jax.device_get(state.ref_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(ref), strict=True))


def test_data_parallel_mesh_equals_single_device():
    """Two steps on an 8-device data mesh (rows sharded, parameters replicated) equal the single-device run."""
    cfg = _tiny()
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
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=_update_atol(cfg, steps=2))


def test_accumulated_micro_batches_equal_one_batch():
    """Normalising every micro-batch by the whole mini-batch's counts makes accumulation exact: the tiny preset's 2
    micro-batches of 8 give the loss, KL, gradient norm and update of one batch of 16 (rows of very different
    lengths; per-sequence means, the normaliser most easily got wrong). Same shapes as a real tiny step."""
    from r1jax.grpo import TrainBatch, update_minibatch

    cfg = _tiny()
    mcfg = cfg.model
    rng = np.random.default_rng(0)
    n, T = cfg.grpo.samples_per_step, cfg.grpo.max_completion_len
    lengths = rng.integers(1, T + 1, n)
    mask = np.arange(T)[None] < lengths[:, None]
    batch = TrainBatch(
        prompt_tokens=jnp.asarray(rng.integers(2, 64, (n, 32)), jnp.int32),
        prompt_start=jnp.asarray(rng.integers(0, 30, n), jnp.int32),
        tokens=jnp.asarray(rng.integers(2, 64, (n, T)), jnp.int32),
        mask=jnp.asarray(mask, jnp.float32),
        advantages=jnp.asarray(rng.normal(size=n), jnp.float32),
        sampler_logp=jnp.zeros((n, T), jnp.float32),
        old_logp=None,
        ref_logp=jnp.asarray(np.where(mask, rng.normal(-4.2, 0.3, (n, T)), 0.0), jnp.float32),
    )
    params = _init(mcfg)
    tx = make_optimizer(cfg.optim)
    outs = []
    for micro in (cfg.micro_batch, n):
        p = jax.tree.map(jnp.copy, params)
        new, _, metrics = update_minibatch(p, tx.init(p), batch, cfg=cfg, model_cfg=mcfg, micro_batch=micro, mesh=None)
        outs.append((jax.device_get(new), jax.device_get(metrics)))
    (p_acc, m_acc), (p_one, m_one) = outs
    assert cfg.micro_batch < n
    for key in ("loss", "grad_norm", "kl", "entropy", "tokens"):
        np.testing.assert_allclose(m_acc[key], m_one[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(p_one), jax.tree.leaves(p_acc), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=_update_atol(cfg, steps=1))


def test_dynamic_sampling_overlong_and_several_updates_per_step():
    """DAPO switches plus mu = 2 and 2 mini-batches (dense model): oversampled prompts, only informative groups
    trained."""
    cfg = configs.tiny()
    g = dataclasses.replace(
        cfg.grpo, dynamic_sampling=True, overlong_filter=True, num_iterations=2, num_minibatches=2, loss_agg="dapo"
    )
    cfg = dataclasses.replace(cfg, grpo=g, model=DENSE)
    trainer = GRPOTrainer(cfg, cfg.model, first_prompt_reward)
    state = trainer.init_state(_init(cfg.model))
    prompts = PROMPTS + [[20, 21], [22]]  # 6 sampled, 4 trained on
    state, m = trainer.grpo_step(state, prompts, [{"i": i} for i in range(6)], jax.random.key(0))
    assert m["groups/sampled"] == 6 and m["groups/trained"] == 1  # only prompt 0's group has reward variance
    assert m["reward/zero_variance_frac"] == pytest.approx(5 / 6)
    assert all(np.isfinite(v) for v in m.values())
    import optax

    count = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")[0][1]
    assert int(count) == 4  # mu x mini-batches optimiser steps


def first_prompt_reward(ro, metadata):
    """Prompt 0's samples score their first token's parity, every other prompt scores 0 (zero variance)."""
    first = np.asarray(ro.tokens)[:, 0] % 2
    r = np.asarray([float(f) if m["i"] == 0 else 0.0 for f, m in zip(first, metadata, strict=True)], np.float32)
    r[0], r[1] = 0.0, 1.0  # make sure the informative group really varies
    return r, {}


def test_expert_load_ignores_prompt_padding():
    """The router-bias update sees the same expert loads however much left padding a batch carries."""
    from r1jax.configs.tiny import tiny_model

    from r1jax.loss import sequence_logprobs
    from r1jax.model import init_params
    from r1jax.sampling import left_pad

    cfg = tiny_model()
    params = init_params(cfg, jax.random.key(0), std=0.2)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    completion = jnp.asarray([[12, 13, 14], [15, 16, 17]])
    loads = []
    for bucket in (8, 32):
        tokens, start = left_pad(prompts, bucket=bucket)
        _, aux = sequence_logprobs(params, jnp.asarray(tokens), jnp.asarray(start), completion, cfg)
        loads.append(np.asarray(aux["expert_load"]))
    np.testing.assert_array_equal(loads[0], loads[1])
    assert loads[0].sum() == (5 + 2 + 6) * cfg.experts_per_token * cfg.n_moe_layers


def test_adam_with_bf16_moments():
    """Both AdamW moments stored in bf16 (``moment_dtype``): the f32 instance of the same transformation equals
    optax's Adam; in bf16 the parameters track f32 AdamW to bf16 precision over 20 steps."""
    import optax

    from r1jax.optim import scale_by_adam_stored_as

    key = jax.random.key(0)
    params = {"w": jax.random.normal(key, (16, 8)), "norm": jnp.ones((8,))}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params) for i in range(20)]

    def run(tx):
        p, s = params, tx.init(params)
        for g in grads:
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        return p, s

    ours, _ = run(scale_by_adam_stored_as(jnp.float32, 0.9, 0.95, 1e-8))
    ref, _ = run(optax.scale_by_adam(0.9, 0.95, 1e-8))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    opt = OptimConfig(lr=1e-2, weight_decay=0.1)
    p32, _ = run(make_optimizer(opt))
    p16, s16 = run(make_optimizer(dataclasses.replace(opt, moment_dtype="bfloat16")))
    moments = [x for x in jax.tree.leaves(s16) if x.ndim > 0]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
    for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p32), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-2)
    assert np.abs(p16["w"] - params["w"]).max() > 0.1  # the comparison is not between unmoved parameters


def _grouped_batch(mcfg, n_prompts, G, T, seed=0):
    """Left-padded prompts of different lengths, each repeated over its G rows; random completions and masks."""
    from r1jax.grpo import TrainBatch

    rng = np.random.default_rng(seed)
    n, P = n_prompts * G, 12
    start = np.repeat(rng.integers(0, P - 1, n_prompts), G)
    prompts = np.repeat(rng.integers(2, mcfg.vocab_size, (n_prompts, P)), G, axis=0)
    mask = np.arange(T)[None] < rng.integers(1, T + 1, n)[:, None]
    return TrainBatch(
        prompt_tokens=jnp.asarray(np.where(np.arange(P)[None] >= start[:, None], prompts, 0), jnp.int32),
        prompt_start=jnp.asarray(start, jnp.int32),
        tokens=jnp.asarray(rng.integers(2, mcfg.vocab_size, (n, T)), jnp.int32),
        mask=jnp.asarray(mask, jnp.float32),
        advantages=jnp.asarray(rng.normal(size=n), jnp.float32),
        sampler_logp=jnp.zeros((n, T), jnp.float32),
        old_logp=None,
        ref_logp=jnp.asarray(np.where(mask, rng.normal(-4.2, 0.3, (n, T)), 0.0), jnp.float32),
    )


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2"])
def test_shared_prompt_equals_one_forward_per_row(arch):
    """Each group's prompt run once with its rows attending to the repeated KV cache gives the log-probs, expert
    loads and parameter gradients of running every row's prompt (MLA + MoE, and GQA with biases)."""
    from r1jax.configs.tiny import tiny_model

    from r1jax.loss import sequence_logprobs

    mcfg = tiny_model() if arch == "deepseek_v3" else dataclasses.replace(DENSE, qkv_bias=True)
    params = init_params(mcfg, jax.random.key(0), std=0.2)
    batch = _grouped_batch(mcfg, n_prompts=3, G=4, T=6)
    w = jnp.asarray(np.random.default_rng(1).normal(size=batch.tokens.shape), jnp.float32)

    def run(group):
        def f(p):
            lp, aux = sequence_logprobs(
                p, batch.prompt_tokens, batch.prompt_start, batch.tokens, mcfg, temperature=0.7, prompt_group=group
            )
            return jnp.sum(lp * w), (lp, aux["expert_load"])

        (_, (lp, load)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return jax.device_get((lp, load, grads))

    (lp1, load1, g1), (lp4, load4, g4) = run(1), run(4)
    np.testing.assert_allclose(lp4, lp1, rtol=1e-5, atol=1e-5)
    if load1 is not None:
        np.testing.assert_array_equal(load4, load1)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g4), strict=True):
        # entries near zero are sums that cancel: compared on the scale of their tensor (summation order differs)
        atol = 1e-5 * float(np.abs(a).max())
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_shared_prompt_update_with_micro_batches_equals_unshared():
    """The policy update with ``prompt_group``: 2 strided micro-batches keep runs of G / 2 rows per prompt; the loss,
    KL, gradient norm and new parameters equal the unshared update's."""
    from r1jax.grpo import update_minibatch

    cfg = _tiny()
    mcfg = cfg.model
    G = cfg.grpo.group_size
    batch = _grouped_batch(mcfg, cfg.grpo.prompts_per_step, G, cfg.grpo.max_completion_len)
    params = _init(mcfg)
    tx = make_optimizer(cfg.optim)
    outs = []
    for group in (1, G):
        p = jax.tree.map(jnp.copy, params)
        new, _, m = update_minibatch(
            p, tx.init(p), batch, cfg=cfg, model_cfg=mcfg, micro_batch=cfg.micro_batch, prompt_group=group
        )
        outs.append(jax.device_get((new, m)))
    (p1, m1), (pg, mg) = outs
    assert cfg.grad_accum_steps == 2
    for key in ("loss", "grad_norm", "kl", "entropy"):
        np.testing.assert_allclose(mg[key], m1[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(pg), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=_update_atol(cfg, steps=1))


def test_trainer_with_shared_prompt_matches_the_plain_step():
    """``GRPOConfig.shared_prompt`` end to end: the same samples give the same loss, KL and gradient norm."""
    cfg = _tiny()
    shared = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, shared_prompt=True))
    (_, [a]), (_, [b]) = _run(cfg, 1), _run(shared, 1)
    assert a["reward/mean"] == b["reward/mean"]
    for key in ("loss", "grad_norm", "kl", "entropy"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-7, err_msg=key)


def test_non_finite_update_is_skipped():
    """A NaN in the mini-batch (here one advantage) skips the optimiser step: parameters and optimiser state come
    back bitwise unchanged and ``skipped`` is 1; the same batch without the NaN moves them."""
    import optax

    from r1jax.grpo import update_minibatch

    cfg = _tiny()
    batch = _grouped_batch(cfg.model, cfg.grpo.prompts_per_step, cfg.grpo.group_size, cfg.grpo.max_completion_len)
    params = _init(cfg.model)
    tx = make_optimizer(cfg.optim)
    bad = dataclasses.replace(batch, advantages=batch.advantages.at[3].set(jnp.nan))
    for b, skipped in ((bad, 1.0), (batch, 0.0)):
        p = jax.tree.map(jnp.copy, params)
        new, state, m = update_minibatch(p, tx.init(p), b, cfg=cfg, model_cfg=cfg.model, micro_batch=cfg.micro_batch)
        assert float(m["skipped"]) == skipped
        count = optax.tree_utils.tree_get_all_with_path(state, "count")[0][1]
        assert int(count) == 1 - skipped
        same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new), strict=True)]
        assert all(same) if skipped else not all(same)


def test_remat_policies_give_the_same_gradients():
    """No remat, full remat and remat keeping the matmul outputs compute the same gradients; the policy reaches the
    rematerialised layer (the ``checkpoint`` in the traced step carries it)."""
    from r1jax.loss import sequence_logprobs
    from r1jax.model import REMAT_POLICIES

    batch = _grouped_batch(DENSE, n_prompts=2, G=2, T=5)
    params = init_params(DENSE, jax.random.key(0), std=0.2)

    def grads(cfg):
        def f(p):
            return jnp.sum(sequence_logprobs(p, batch.prompt_tokens, batch.prompt_start, batch.tokens, cfg)[0])

        return jax.grad(f)

    want = jax.device_get(grads(DENSE)(params))
    for policy in ("full", "dots"):
        cfg = DENSE.replace(remat=True, remat_policy=policy)
        got = jax.device_get(grads(cfg)(params))
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))  # recompute: rounding
        text = str(jax.make_jaxpr(grads(cfg))(params))
        assert "remat" in text or "checkpoint" in text
        assert ("policy=None" not in text) == (REMAT_POLICIES[policy] is not None), policy
    with pytest.raises(ValueError, match="remat_policy"):
        DENSE.replace(remat_policy="some")
