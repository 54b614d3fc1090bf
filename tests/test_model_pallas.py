"""The model with ``attention_impl=pallas`` (flash attention kernel, interpret mode on CPU) equals ``xla``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from r1jax.configs.tiny import tiny_model

from r1jax.config import ModelConfig
from r1jax.model import forward, init_params, token_logprobs

CONFIGS = {
    "mla": tiny_model(),
    "gqa": ModelConfig(
        arch="qwen2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffw=48, qkv_bias=True
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pallas_attention_matches_xla(name):
    cfg = CONFIGS[name]
    params = init_params(cfg, jax.random.key(0), std=0.2)
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(0, 64, (2, 20)))
    seg = jnp.asarray([[1] * 20, [1] * 7 + [2] * 13])
    pos = jnp.asarray([list(range(20)), list(range(7)) + list(range(13))])

    def loss(p, c):
        logits, _ = forward(p, tokens, c, positions=pos, segment_ids=seg)
        return -token_logprobs(logits[:, :-1], tokens[:, 1:]).mean(), logits

    (l_x, lg_x), g_x = jax.value_and_grad(loss, has_aux=True)(params, cfg)
    (l_p, lg_p), g_p = jax.value_and_grad(loss, has_aux=True)(params, cfg.replace(attention_impl="pallas"))
    np.testing.assert_allclose(lg_p, lg_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(l_p, l_x, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x), strict=True):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _greedy(params, prompts, cfg, n, mesh=None):
    from r1jax.config import SamplingConfig
    from r1jax.rollout import sample

    sampling = SamplingConfig(temperature=0.0, max_new_tokens=n)
    return sample(params, prompts, jax.random.key(0), cfg=cfg, sampling=sampling, group_size=1, stop_ids=[],
                  bucket=1, mesh=mesh)  # fmt: skip


def test_pallas_decode_matches_xla_generate():
    """The slot engine's decode steps run the absorbed-MLA decode kernel (left-padded cache) and match XLA token for
    token."""
    from r1jax import rollout

    cfg = CONFIGS["mla"]
    params = init_params(cfg, jax.random.key(1), std=0.2)
    prompts = [[5, 17, 33, 8, 41], [9, 12], [60, 61, 62, 63, 2, 3, 4]]
    runs = {impl: _greedy(params, prompts, cfg.replace(attention_impl=impl), 8) for impl in ("xla", "pallas")}
    pallas = cfg.replace(attention_impl="pallas")
    pool = rollout.empty_pool(cfg=pallas, slots=3, width=16, max_new=8, window=1, unrolled=False, mesh=None)
    args = (params, pool, jnp.zeros((0,), jnp.int32), jnp.zeros((0, 1), jnp.int32), 8, False)
    assert "mla_decode" in str(jax.make_jaxpr(lambda *a: rollout.decode(*a, cfg=pallas))(*args))
    x, p = runs["xla"], runs["pallas"]
    np.testing.assert_array_equal(p.tokens, x.tokens)
    np.testing.assert_array_equal(p.lengths, x.lengths)
    np.testing.assert_allclose(p.logp, x.logp, rtol=1e-4, atol=1e-6)


def test_pallas_kernels_on_a_mesh_match_xla():
    """On a mesh the kernels run per device under shard_map (batch over data, heads over tensor): teacher-forced
    log-probs (flash) and a greedy decode (absorbed MLA) equal the single-device XLA model."""
    from r1jax import sharding

    cfg = CONFIGS["mla"]
    params = init_params(cfg, jax.random.key(1), std=0.2)
    prompts = [[5, 17, 33, 8, 41], [9, 12], [60, 61, 62, 63, 2, 3, 4], [7, 7, 7]]
    x = _greedy(params, prompts, cfg, 6)
    full = jnp.concatenate([jnp.asarray(x.prompt_tokens), x.tokens], 1)
    logits_x, _ = forward(params, full, cfg)
    mesh = sharding.make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
    pallas = cfg.replace(attention_impl="pallas")
    assert cfg.n_heads % 2 == 0
    p = _greedy(params, prompts, pallas, 6, mesh=mesh)
    with jax.set_mesh(mesh):
        logits_p, _ = jax.jit(lambda p, t: forward(p, t, pallas))(params, full)
        hlo = jax.jit(lambda p, t: forward(p, t, pallas)).lower(params, full).as_text()
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo
    np.testing.assert_array_equal(p.tokens, x.tokens)
    np.testing.assert_allclose(p.logp, x.logp, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(logits_p), np.asarray(logits_x), rtol=1e-4, atol=1e-4)
