"""The slot engine (``r1jax.rollout.SlotEngine``): slots refilled in flight give the tokens of one static batch and of
a teacher-forced reference (MLA latent cache and GQA cache); sampled log-probs equal the trainer's; a row's output
does not depend on its slot or on the rows that shared the pool; a decode stopped at a step budget continues exactly;
decode steps track total tokens / S."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tiny import tiny_model
from r1jax.config import ModelConfig, SamplingConfig
from r1jax.errors import ConfigError
from r1jax.loss import sequence_logprobs
from r1jax.model import forward, init_params
from r1jax.rollout import SlotEngine, sample

CFGS = {
    "mla": tiny_model(),
    "gqa": ModelConfig(
        arch="qwen2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffw=48, qkv_bias=True,
        eos_token_ids=(1,),
    ),
}  # fmt: skip
PROMPTS = [[5, 17, 33, 8, 41], [9, 12], [60, 61, 62, 63, 2, 3, 4], [7], [20, 21, 22]]
G = 2
BUDGETS = [3, 11, 2, 7, 5, 1, 12, 4, 6, 2]  # per row: a long tail, so slots free at different steps
SLOTS = 4


def _params(cfg):
    return init_params(cfg, jax.random.key(0), std=0.3)  # peaked: float noise cannot flip a greedy argmax


def _sample(cfg, slots=0, temperature=0.0, **kw):
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max(BUDGETS), slots=slots)
    return sample(_params(cfg), PROMPTS, jax.random.key(3), cfg=cfg, sampling=sampling, group_size=G, stop_ids=[],
                  bucket=8, budgets=BUDGETS, **kw)  # fmt: skip


@pytest.mark.parametrize("name", list(CFGS))
def test_refilled_slots_equal_one_static_batch_and_the_teacher_forced_argmax(name):
    cfg = CFGS[name]
    one_batch = _sample(cfg)  # every row in its own slot, no refill
    refilled = _sample(cfg, slots=SLOTS)
    np.testing.assert_array_equal(refilled.lengths, BUDGETS)
    np.testing.assert_array_equal(refilled.tokens, one_batch.tokens)
    np.testing.assert_allclose(refilled.logp, one_batch.logp, rtol=1e-5, atol=1e-6)
    params = _params(cfg)
    for i, n in enumerate(BUDGETS):
        prompt = PROMPTS[i // G]
        seq = jnp.asarray([prompt + refilled.tokens[i, :n].tolist()], jnp.int32)
        logits, _ = forward(params, seq, cfg)  # no cache: an independent path
        np.testing.assert_array_equal(refilled.tokens[i, :n], np.argmax(logits[0, len(prompt) - 1 : -1], -1))


@pytest.mark.parametrize("name", list(CFGS))
def test_sampled_logprobs_equal_trainer_logprobs_with_refills(name):
    cfg = CFGS[name]
    ro = _sample(cfg, slots=SLOTS, temperature=1.0)
    assert len({tuple(r) for r in ro.tokens}) > len(PROMPTS)
    logp, _ = sequence_logprobs(_params(cfg), ro.prompt_tokens, ro.prompt_start, ro.tokens, cfg, temperature=1.0)
    m = ro.mask > 0
    np.testing.assert_allclose(np.asarray(logp)[m], ro.logp[m], rtol=1e-4)
    np.testing.assert_array_equal(ro.logp[~m], 0.0)


def _engine_run(cfg, slots, order, *, max_steps=None, refill=True, temperature=1.0, stop_ids=(1,)):
    """Submit the prompts in ``order`` (each with its own key) -> {(prompt, j): Finished}, the engine."""
    sampling = SamplingConfig(temperature=temperature, top_k=16, max_new_tokens=max(BUDGETS))
    engine = SlotEngine(cfg, sampling, slots=slots, prompt_len=8, stop_ids=stop_ids, prefill_batch=2,
                        refill=refill)  # fmt: skip
    ids = {}
    for i in order:
        key = jax.random.fold_in(jax.random.key(11), i)
        for j, sid in enumerate(engine.submit(PROMPTS[i], G, key, BUDGETS[i * G : (i + 1) * G])):
            ids[sid] = (i, j)
    if max_steps is not None:
        engine.run(_params(cfg), max_steps=max_steps)
        assert engine.busy and len(engine.finished) < len(ids)  # rows were cut mid-decode and carried
    engine.run(_params(cfg))
    return {ids[sid]: f for sid, f in engine.finished.items()}, engine


@pytest.mark.parametrize("name", list(CFGS))
def test_a_rows_output_does_not_depend_on_its_slot_or_its_company(name):
    cfg = CFGS[name]
    base, _ = _engine_run(cfg, SLOTS, range(len(PROMPTS)))
    for slots, order in ((6, [4, 2, 0, 3, 1]), (2, [3, 1, 4, 0, 2])):
        other, _ = _engine_run(cfg, slots, order)
        assert other.keys() == base.keys()
        for k, f in base.items():
            np.testing.assert_array_equal(other[k].tokens, f.tokens)
            np.testing.assert_allclose(other[k].logp, f.logp, rtol=1e-5, atol=1e-6)
            assert other[k].ended == f.ended
    assert len({tuple(f.tokens) for f in base.values()}) > len(PROMPTS)


@pytest.mark.parametrize("name", list(CFGS))
def test_a_decode_stopped_at_a_step_budget_continues_to_the_same_tokens(name):
    cfg = CFGS[name]
    whole, _ = _engine_run(cfg, SLOTS, range(len(PROMPTS)))
    split, _ = _engine_run(cfg, SLOTS, range(len(PROMPTS)), max_steps=5)
    for k, f in whole.items():
        np.testing.assert_array_equal(split[k].tokens, f.tokens)
        np.testing.assert_allclose(split[k].logp, f.logp, rtol=1e-6)


def test_decode_steps_track_total_tokens_over_slots():
    """Static batches cost the sum of each batch's longest row; refilled slots at most total / S + the longest."""
    cfg = CFGS["gqa"]
    _, static = _engine_run(cfg, SLOTS, range(len(PROMPTS)), refill=False, temperature=0.0, stop_ids=())
    _, refilled = _engine_run(cfg, SLOTS, range(len(PROMPTS)), temperature=0.0, stop_ids=())
    assert static.decode_steps == sum(max(BUDGETS[i : i + SLOTS]) for i in range(0, len(BUDGETS), SLOTS))
    assert refilled.decode_steps <= -(-sum(BUDGETS) // SLOTS) + max(BUDGETS)
    assert refilled.decode_steps < static.decode_steps


def test_an_eager_engine_returns_when_a_row_ends():
    """``eager``: ``run`` comes back as soon as one row ends (a tool rollout starts its call then), the others still
    live in their slots; the next ``run`` goes on with them."""
    cfg = CFGS["gqa"]
    engine = SlotEngine(cfg, SamplingConfig(temperature=0.0, max_new_tokens=10), slots=2, prompt_len=8, eager=True)
    engine.submit(PROMPTS[0], 2, jax.random.key(0), budgets=[3, 10])
    assert engine.run(_params(cfg)) == 3 and list(engine.finished) == [0] and engine.busy
    assert engine.run(_params(cfg)) == 7 and sorted(engine.finished) == [0, 1] and not engine.busy


def test_fewer_slots_than_a_group_is_refused():
    with pytest.raises(ConfigError, match="smaller than a group"):
        _sample(CFGS["gqa"], slots=1)
