"""MoE routing replay (R3): a teacher-forced pass can reuse recorded experts.

Replaying a forward's own routes reproduces it bit for bit (uncached and cached, stacked and unstacked layers);
replaying other routes changes the result (the replay is used, in every MoE layer and both halves of a row); the
router still gets the same gradients through the replayed gates; ``sequence_logprobs`` replays whole rows, in its
plain and shared-prompt paths.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from r1jax.configs.tiny import tiny_model

from r1jax import moe
from r1jax.cache import init_cache
from r1jax.config import MOE_LAYERS
from r1jax.loss import sequence_logprobs
from r1jax.model import forward, init_params, unstack_layers

CFG = tiny_model().replace(n_layers=3)  # one dense layer, then two MoE layers (a scan of more than one layer)
B, T = 3, 7
G = 3  # rows per prompt in the sequence_logprobs tests
fwd = jax.jit(forward, static_argnames=("cfg", "return_routes"))
LAYOUTS = ["stacked", "unstacked"]


@pytest.fixture(scope="module")
def params():
    assert CFG.n_moe_layers == 2 and CFG.experts_per_token < CFG.n_experts
    return init_params(CFG, jax.random.key(0), std=0.3)


def _layout(params, layout):
    return unstack_layers(params) if layout == "unstacked" else params


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(2, CFG.vocab_size, shape), jnp.int32)


def _shift(routes):
    """Every token's experts moved to the next expert ids: still k distinct experts, none of them the same."""
    return (routes + 1) % CFG.n_experts


def _loads(routes, mask=None):
    """f32[L, e]: tokens routed to each expert, per layer, from routes [L, b, t, k]."""
    flat = np.asarray(routes).reshape(routes.shape[0], -1, routes.shape[-1])
    m = np.ones(flat.shape[1], bool) if mask is None else np.asarray(mask).reshape(-1)
    return np.stack([np.bincount(layer[m].reshape(-1), minlength=CFG.n_experts) for layer in flat]).astype(np.float32)


def _assert_differs(a, b):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


@pytest.mark.parametrize(
    "cfg",
    [CFG, CFG.replace(scoring="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=2.5)],
    ids=["sigmoid_noaux_tc", "softmax_greedy"],
)
def test_route_with_given_experts_gates_them_by_current_scores(cfg):
    """``route(idx=...)`` keeps the given experts and gates them with this call's normalised scores; replaying its
    own choice gives its own weights."""
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k1, (10, cfg.d_model))
    w = 0.3 * jax.random.normal(k2, (cfg.d_model, cfg.n_experts))
    bias = 0.1 * jax.random.normal(k3, (cfg.n_experts,))
    weights, idx = moe.route(x, w, bias, cfg)
    again, same = moe.route(x, w, bias, cfg, idx=idx)
    np.testing.assert_array_equal(same, idx)
    np.testing.assert_array_equal(again, weights)

    other = _shift(idx)
    got_w, got_idx = moe.route(x, w, bias, cfg, idx=other)
    np.testing.assert_array_equal(got_idx, other)
    logits = np.asarray(x @ w, np.float64)
    scores = 1 / (1 + np.exp(-logits)) if cfg.scoring == "sigmoid" else np.exp(logits) / np.exp(logits).sum(-1)[:, None]
    want = np.take_along_axis(scores, np.asarray(other), -1)
    if cfg.norm_topk_prob:
        want = want / want.sum(-1, keepdims=True)
    np.testing.assert_allclose(got_w, want * cfg.routed_scaling_factor, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_replaying_own_routes_reproduces_forward(params, layout):
    p = _layout(params, layout)
    tokens = _tokens((B, T))
    logits, aux = fwd(p, tokens, CFG, return_routes=True)
    routes = aux["routes"]
    assert routes.shape == (CFG.n_moe_layers, B, T, CFG.experts_per_token) and routes.dtype == jnp.int32
    np.testing.assert_array_equal(aux["expert_load"], _loads(routes))
    replay, raux = fwd(p, tokens, CFG, routes=routes, return_routes=True)
    np.testing.assert_array_equal(replay, logits)
    np.testing.assert_array_equal(raux["routes"], routes)
    if layout == "unstacked":  # the Python loop over layers picks what the scan picks
        np.testing.assert_array_equal(routes, fwd(params, tokens, CFG, return_routes=True)[1]["routes"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_replaying_other_routes_is_used_in_every_moe_layer(params, layout):
    """Other experts change the logits, whichever MoE layer gets them; the expert load counts the experts used."""
    p = _layout(params, layout)
    tokens = _tokens((B, T))
    logits, aux = fwd(p, tokens, CFG, return_routes=True)
    routes = aux["routes"]
    for layer in range(CFG.n_moe_layers):
        other = routes.at[layer].set(_shift(routes[layer]))
        got, gaux = fwd(p, tokens, CFG, routes=other, return_routes=True)
        _assert_differs(got, logits)
        np.testing.assert_array_equal(gaux["routes"], other)
        np.testing.assert_array_equal(gaux["expert_load"], _loads(other))


def _cached(params, cache, layout):
    if layout == "unstacked":
        return _layout(params, layout), dataclasses.replace(cache, layers=unstack_layers(cache.layers))
    return params, cache


@pytest.mark.parametrize("layout", LAYOUTS)
def test_replay_in_cached_prefill_and_decode(params, layout):
    """A left-padded prefill into a cache and a decode step after it: replaying their own routes gives the same
    logits and cache, other routes change them."""
    start = jnp.asarray([0, 2, 4], jnp.int32)
    p, cache = _cached(params, init_cache(CFG, B, T + 1, start), layout)
    tokens = _tokens((B, T))
    logits, aux = fwd(p, tokens, CFG, cache=cache, return_routes=True)
    replay, raux = fwd(p, tokens, CFG, cache=cache, routes=aux["routes"], return_routes=True)
    np.testing.assert_array_equal(replay, logits)
    for a, b in zip(jax.tree.leaves(raux["cache"]), jax.tree.leaves(aux["cache"]), strict=True):
        np.testing.assert_array_equal(a, b)
    _assert_differs(fwd(p, tokens, CFG, cache=cache, routes=_shift(aux["routes"]))[0], logits)

    step = _tokens((B, 1), seed=1)
    step_logits, saux = fwd(p, step, CFG, cache=aux["cache"], return_routes=True)
    assert saux["routes"].shape == (CFG.n_moe_layers, B, 1, CFG.experts_per_token)
    np.testing.assert_array_equal(fwd(p, step, CFG, cache=aux["cache"], routes=saux["routes"])[0], step_logits)
    _assert_differs(fwd(p, step, CFG, cache=aux["cache"], routes=_shift(saux["routes"]))[0], step_logits)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_router_gradient_flows_through_replayed_gates(params, layout):
    """The router weight's gradient with the forward's own routes replayed equals the gradient without replay; with
    other routes it is still nonzero (the gates are the router's scores of the replayed experts) and different."""
    tokens = _tokens((B, T))
    w = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, CFG.vocab_size)), jnp.float32)
    routes = fwd(params, tokens, CFG, return_routes=True)[1]["routes"]

    def grad(routes):
        def loss(router):
            mlp = {**params[MOE_LAYERS]["mlp"], "router": router}
            p = _layout({**params, MOE_LAYERS: {**params[MOE_LAYERS], "mlp": mlp}}, layout)
            return jnp.sum(forward(p, tokens, CFG, routes=routes)[0] * w)

        return np.asarray(jax.jit(jax.grad(loss))(params[MOE_LAYERS]["mlp"]["router"]))

    natural, replayed, other = grad(None), grad(routes), grad(_shift(routes))
    assert natural.shape == (CFG.n_moe_layers, CFG.d_model, CFG.n_experts)
    assert np.all(np.abs(replayed).max(axis=(1, 2)) > 0)  # every MoE layer's router
    # a small entry is a sum of terms of the gradient's scale: its rounding is relative to that scale
    np.testing.assert_allclose(replayed, natural, rtol=1e-5, atol=1e-5 * np.abs(natural).max())
    assert np.all(np.abs(other).max(axis=(1, 2)) > 0)
    _assert_differs(other, natural)


def _grouped_rows(n_prompts=2, group=G, plen=5, tlen=4):
    """Rows in groups sharing a left-padded prompt (each group its own prompt and padding) and their completions."""
    rng = np.random.default_rng(3)
    start = np.repeat(np.asarray([1, 3])[:n_prompts], group)
    prompts = np.repeat(rng.integers(2, CFG.vocab_size, (n_prompts, plen)), group, axis=0)
    prompts = np.where(np.arange(plen)[None] >= start[:, None], prompts, 0)
    completion = rng.integers(2, CFG.vocab_size, (n_prompts * group, tlen))
    return jnp.asarray(prompts, jnp.int32), jnp.asarray(start, jnp.int32), jnp.asarray(completion, jnp.int32)


def _row_routes(params, prompts, start, completion):
    """The routes a forward over each whole row picks: int32[L, n, P + T, k]."""
    tokens = jnp.concatenate([prompts, completion], axis=1)
    slots = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    segment_ids = (slots >= start[:, None]).astype(jnp.int32)
    positions = jnp.maximum(slots - start[:, None], 0)
    _, aux = fwd(params, tokens, CFG, positions=positions, segment_ids=segment_ids, return_routes=True)
    return aux["routes"]


@pytest.mark.parametrize("group", [1, G])
def test_sequence_logprobs_replays_row_routes(params, group):
    """``sequence_logprobs`` replaying the routes a forward over the rows picks equals it without replay (exactly in
    the one-forward path; the shared-prompt path to its usual tolerance, and it equals the one-forward path); other
    routes for the prompt or for the completion change it; the shared-prompt path reads each group's prompt routes
    from its first row only."""
    prompts, start, completion = _grouped_rows()
    plen = prompts.shape[1]
    routes = _row_routes(params, prompts, start, completion)

    def logp(routes, prompt_group=group):
        lp, aux = sequence_logprobs(params, prompts, start, completion, CFG, prompt_group=prompt_group, routes=routes)
        return np.asarray(lp), np.asarray(aux["expert_load"])

    (free, free_load), (replay, replay_load) = logp(None), logp(routes)
    np.testing.assert_array_equal(replay_load, free_load)
    if group == 1:
        np.testing.assert_array_equal(replay, free)
    else:
        np.testing.assert_allclose(replay, free, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(replay, logp(routes, prompt_group=1)[0], rtol=1e-5, atol=1e-5)
        not_first = (np.arange(routes.shape[1]) % group != 0)[None, :, None, None]
        later_rows = jnp.where(
            not_first & (np.arange(routes.shape[2]) < plen)[None, None, :, None], _shift(routes), routes
        )
        np.testing.assert_array_equal(logp(later_rows)[0], replay)

    in_prompt = (np.arange(routes.shape[2]) < plen)[None, None, :, None]
    prompt_shifted = jnp.where(in_prompt, _shift(routes), routes)
    completion_shifted = jnp.where(in_prompt, routes, _shift(routes))
    _assert_differs(logp(prompt_shifted)[0], replay)
    _assert_differs(logp(completion_shifted)[0], replay)


def _k3(d, m):
    return float((np.exp(d) - 1 - d)[m].mean())


def test_replay_removes_routing_flips_from_the_bf16_sampler_mismatch():
    """bf16 compute on a tiny V3 (8 experts, top-2): the sampler records every token's experts; recomputing the
    log-probs with those routes leaves the mismatch of bf16 rounding alone (what the absorbed-MLA decode and the
    expanded training forward round differently), while recomputing them with fresh routing adds the flips: the
    mismatch KL is several times larger. In f32 both are float noise."""
    from r1jax.config import SamplingConfig
    from r1jax.rollout import sample

    kls = {}
    for dtype in ("bfloat16", "float32"):
        cfg = CFG.replace(n_experts=8, experts_per_token=2, dtype=dtype)
        p = init_params(cfg, jax.random.key(0), std=0.3)
        prompts = [np.random.default_rng(i).integers(2, 64, 6).tolist() for i in range(4)]
        ro = sample(p, prompts, jax.random.key(1), cfg=cfg, sampling=SamplingConfig(temperature=1.0, max_new_tokens=24),
                    group_size=4, stop_ids=[], bucket=8, record_routes=True)  # fmt: skip
        assert ro.routes.shape == (16, cfg.n_moe_layers, 8 + 24, 2)
        m = ro.mask > 0
        routes = jnp.asarray(np.swapaxes(ro.routes, 0, 1).astype(np.int32))
        for replay in (False, True):
            lp, _ = sequence_logprobs(p, ro.prompt_tokens, ro.prompt_start, ro.tokens, cfg,
                                      routes=routes if replay else None)  # fmt: skip
            kls[dtype, replay] = _k3(np.asarray(lp) - ro.logp, m)
    assert kls["bfloat16", False] > 3 * kls["bfloat16", True], kls
    # f32 routes do not flip: replay changes nothing there, and what is left is rounding far below bf16's
    assert kls["float32", False] == pytest.approx(kls["float32", True], rel=1e-3), kls
    assert kls["float32", False] < 1e-7 and kls["float32", False] < kls["bfloat16", True] / 1000, kls


def test_grpo_step_replays_the_sampler_routes():
    """The trainer with ``grpo.routing_replay``: the sampler's routes reach the teacher-forced passes, and the
    step's measured sampler/trainer mismatch (``tis/mismatch_kl``) falls against the same step without replay."""
    import configs
    from r1jax.grpo import GRPOTrainer

    base = configs.tiny()
    cfg = base.model.replace(n_layers=3, n_experts=8, experts_per_token=2, dtype="bfloat16")
    prompts = [[2, 3, 4], [7, 8], [9, 10, 11, 12], [13]]

    def reward(ro, metas):
        return np.asarray(ro.mask).sum(1).astype(np.float32), {}

    mismatch = {}
    for replay in (False, True):
        grpo = dataclasses.replace(base.grpo, tis_cap=2.0, routing_replay=replay)
        tc = dataclasses.replace(base, model=cfg, grpo=grpo)
        trainer = GRPOTrainer(tc, cfg, reward)
        state = trainer.init_state(init_params(cfg, jax.random.key(0), std=0.3))
        _, m = trainer.grpo_step(state, prompts, [{}] * 4, jax.random.key(3))
        mismatch[replay] = m["tis/mismatch_kl"]
    assert mismatch[False] > 2 * mismatch[True], mismatch
