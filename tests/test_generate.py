"""Cached decode: equals transformers' greedy generate token for token, and padding does not change results."""

import jax
import numpy as np
import pytest
import torch

import r1jax
from r1jax.config import SamplingConfig
from r1jax.model import forward
from r1jax.rollout import sample
from tests import hf_tiny

CASES = ["deepseek_v3", "deepseek_v2_group_limited", "qwen2", "llama"]


@pytest.fixture(scope="module", params=CASES)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = hf_tiny.build(request.param, str(path), seed=3)
    return str(path), ref


PROMPTS = [[5, 17, 33, 8, 41], [9, 12], [60, 61, 62, 63, 64, 65, 66, 67, 68]]


def test_greedy_matches_transformers_generate(tiny):
    path, ref = tiny
    model = r1jax.load(path)
    got = r1jax.generate(model, PROMPTS, max_new_tokens=12, stop_ids=[])
    for prompt, ours in zip(PROMPTS, got, strict=True):
        with torch.no_grad():
            out = ref.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert ours == out[0, len(prompt) :].tolist()


def test_batched_left_padded_equals_single(tiny):
    path, _ = tiny
    model = r1jax.load(path)
    batched = r1jax.generate(model, PROMPTS, max_new_tokens=8, stop_ids=[])
    for prompt, row in zip(PROMPTS, batched, strict=True):
        assert r1jax.generate(model, [prompt], max_new_tokens=8, stop_ids=[]) == [row]


def test_cached_logprobs_equal_teacher_forced_forward(tiny):
    """Sampled tokens' log-probs from the cached decode equal a full forward over prompt + completion."""
    path, _ = tiny
    model = r1jax.load(path)
    params = model.param_dict()
    ro = sample(params, [PROMPTS[0]], jax.random.key(0), cfg=model.cfg,
                sampling=SamplingConfig(temperature=1.0, max_new_tokens=6), group_size=1, stop_ids=[])  # fmt: skip
    full = np.array([PROMPTS[0] + ro.tokens[0].tolist()])
    logits, _ = forward(params, full, model.cfg)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    n = len(PROMPTS[0])
    want = [logp[0, n - 1 + i, full[0, n + i]] for i in range(6)]
    np.testing.assert_allclose(ro.logp[0], want, rtol=1e-4, atol=1e-5)
    assert int(ro.lengths[0]) == 6


def test_stops_at_eos(tiny):
    path, _ = tiny
    model = r1jax.load(path)
    free = r1jax.generate(model, [PROMPTS[0]], max_new_tokens=10, stop_ids=[])[0]
    stop = free[3]
    cut = r1jax.generate(model, [PROMPTS[0]], max_new_tokens=10, stop_ids=[stop])[0]
    assert cut == free[: free.index(stop)]
