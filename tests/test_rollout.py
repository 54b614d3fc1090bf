"""Group sampler: greedy equals teacher-forced argmax, greedy groups are identical, the sampler's log-probs equal the
trainer's recomputed ones, stop tokens / stop sequences / stop strings end rows where they should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tiny import tiny_model
from r1jax.config import ModelConfig, SamplingConfig
from r1jax.loss import sequence_logprobs
from r1jax.model import forward, init_params
from r1jax.rollout import Rollout, SlotEngine, apply_stop_strings, completion_texts, sample, stop_token_seqs

MLA = tiny_model()
DENSE = ModelConfig(
    arch="qwen2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffw=48, qkv_bias=True,
    eos_token_ids=(1,),
)  # fmt: skip
PROMPTS = [[5, 17, 33, 8, 41], [9, 12], [60, 61, 62, 63, 2, 3, 4]]
G, T = 3, 6


def _params(cfg):
    # std 0.3: peaked distributions, so greedy ties and float noise cannot flip an argmax
    return init_params(cfg, jax.random.key(0), std=0.3)


def _greedy(cfg, **kw):
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=T, **kw)
    return sample(_params(cfg), PROMPTS, jax.random.key(0), cfg=cfg, sampling=sampling, group_size=G, stop_ids=[],
                  bucket=8)  # fmt: skip


@pytest.fixture(scope="module", params=["mla", "dense"])
def greedy(request):
    cfg = MLA if request.param == "mla" else DENSE
    return cfg, _greedy(cfg)


def test_greedy_equals_teacher_forced_argmax(greedy):
    cfg, ro = greedy
    params = _params(cfg)
    assert ro.tokens.shape == (len(PROMPTS) * G, T)
    np.testing.assert_array_equal(ro.lengths, T)
    assert not ro.ended.any()
    for i, prompt in enumerate(PROMPTS):
        row = ro.tokens[i * G]
        seq = jnp.asarray([prompt + row.tolist()], jnp.int32)
        logits, _ = forward(params, seq, cfg)
        expected = np.asarray(jnp.argmax(logits[0, len(prompt) - 1 : -1], axis=-1))
        np.testing.assert_array_equal(row, expected)


def test_greedy_group_is_identical_copies(greedy):
    _, ro = greedy
    for i in range(len(PROMPTS)):
        group = ro.tokens[i * G : (i + 1) * G]
        np.testing.assert_array_equal(group, np.broadcast_to(group[0], group.shape))
        np.testing.assert_array_equal(ro.logp[i * G : (i + 1) * G], np.broadcast_to(ro.logp[i * G], (G, T)))
    np.testing.assert_array_equal(ro.prompt_start, np.repeat([3, 6, 1], G))


def test_sampler_logprobs_equal_trainer_logprobs():
    """Temperature 1, MLA with the compressed cache: the sampler's per-token log-probs equal a teacher-forced forward
    over the left-padded prompt + completion (rel 1e-4, float32); groups hold different samples."""
    params = _params(MLA)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=T)
    ro = sample(params, PROMPTS, jax.random.key(3), cfg=MLA, sampling=sampling, group_size=G, stop_ids=[1], bucket=8)
    assert len({tuple(r) for r in ro.tokens}) > len(PROMPTS)  # samples within a group differ
    logp, _ = sequence_logprobs(params, ro.prompt_tokens, ro.prompt_start, ro.tokens, MLA, temperature=1.0)
    m = ro.mask > 0
    np.testing.assert_allclose(np.asarray(logp)[m], ro.logp[m], rtol=1e-4)
    np.testing.assert_array_equal(ro.logp[~m], 0.0)
    np.testing.assert_array_equal(ro.mask.sum(1), ro.lengths)
    for row, n, ended in zip(ro.tokens, ro.lengths, ro.ended, strict=True):  # EOS ends a row and is counted
        assert ended == (1 in row[:n].tolist())
        if ended:
            assert row[n - 1] == 1 and 1 not in row[: n - 1].tolist()


@pytest.mark.parametrize("cfg", [MLA, DENSE], ids=["mla", "dense"])
def test_unstacked_decode_equals_scanned(cfg):
    """Decoding over per-layer buffers (the CPU default) and over the scanned layer stacks (accelerators) give the
    same tokens and log-probs at temperature 1."""
    params = _params(cfg)
    runs = []
    for unroll in (False, True):
        engine = SlotEngine(cfg, SamplingConfig(temperature=1.0, max_new_tokens=T), slots=4, prompt_len=8,
                            stop_ids=[1], prefill_batch=2, unroll_layers=unroll)  # fmt: skip
        for i, p in enumerate(PROMPTS):
            engine.submit(p, G, jax.random.fold_in(jax.random.key(5), i))
        engine.run(params)
        runs.append([engine.finished[i] for i in range(len(PROMPTS) * G)])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logp, b.logp, rtol=1e-5, atol=1e-6)
    assert len({tuple(r.tokens) for r in runs[0]}) > len(PROMPTS)


def test_sequence_logprobs_independent_of_padding():
    params = _params(MLA)
    prompt, completion = [7, 8, 9], np.asarray([[4, 5, 6, 1]], np.int32)
    outs = []
    for pad in (0, 5):
        toks = np.asarray([[0] * pad + prompt], np.int32)
        lp, _ = sequence_logprobs(params, toks, np.asarray([pad], np.int32), completion, MLA)
        outs.append(np.asarray(lp))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5)


def test_stop_sequence_ends_rows_in_the_loop():
    """A stop string's token sequence, matched inside the decode loop, ends every row that produces it."""
    ref = _greedy(MLA)
    row = ref.tokens[0].tolist()
    stop = row[1:3]  # tokens 2 and 3 of the first prompt's greedy completion
    encode = {"<s>": stop}.__getitem__
    seqs = stop_token_seqs(["<s>"], encode)
    np.testing.assert_array_equal(seqs, [stop])
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=T, stop_strings=("<s>",))
    ro = sample(_params(MLA), PROMPTS, jax.random.key(0), cfg=MLA, sampling=sampling, group_size=G, stop_ids=[],
                encode=encode, bucket=8)  # fmt: skip
    np.testing.assert_array_equal(ro.lengths[:G], 3)
    assert ro.ended[:G].all()
    np.testing.assert_array_equal(ro.tokens[:G, :3], np.broadcast_to(row[:3], (G, 3)))
    np.testing.assert_array_equal(ro.mask[:G].sum(1), 3)


def test_stop_strings_on_host():
    """Host-side stop strings cut at the first token whose text completes one, whatever the tokenisation."""
    vocab = {1: "<eos>", 2: "</ans", 3: "wer>", 4: "a", 5: "</answer>", 6: "b"}

    def decode(ids):
        return "".join(vocab[i] for i in ids if i != 1)

    tokens = np.asarray([[4, 2, 3, 6, 6], [4, 5, 6, 1, 1], [4, 6, 6, 6, 6], [4, 1, 1, 1, 1]], np.int32)
    lengths = np.asarray([5, 4, 5, 2], np.int32)
    ended = np.asarray([False, True, False, True])
    mask = (np.arange(5)[None] < lengths[:, None]).astype(np.float32)
    ro = Rollout(
        prompt_tokens=np.zeros((4, 1), np.int32), prompt_start=np.zeros(4, np.int32), tokens=tokens, mask=mask,
        logp=-mask, lengths=lengths, ended=ended,
    )  # fmt: skip
    out = apply_stop_strings(ro, decode, ["</answer>"])
    np.testing.assert_array_equal(out.lengths, [3, 2, 5, 2])
    np.testing.assert_array_equal(out.ended, [True, True, False, True])
    np.testing.assert_array_equal(out.mask.sum(1), out.lengths)
    np.testing.assert_array_equal(out.logp, -out.mask)
    texts = completion_texts(out, decode, stop_ids=[1], stop_strings=["</answer>"])
    assert texts == ["a</answer>", "a</answer>", "abbbb", "a"]
    cut = completion_texts(out, decode, stop_ids=[1], stop_strings=["</answer>"], include_stop_str=False)
    assert cut == ["a", "a", "abbbb", "a"]


def test_categorical_draws_follow_the_softmax():
    """100k draws of ``sampling.categorical`` (inverse CDF on CPU) hit each token at its softmax probability
    (within 4 standard errors), never a -inf token, and agree in distribution with ``jax.random.categorical``;
    nucleus sampling keeps only the top-p mass."""
    from r1jax.sampling import categorical, sample_logits

    logits = jnp.asarray([2.0, 0.5, -jnp.inf, 1.0, -1.0, 3.0, -jnp.inf, 0.0])
    p = np.asarray(jax.nn.softmax(logits))
    n = 100_000
    rows = jnp.broadcast_to(logits, (n, logits.shape[0]))
    se = np.sqrt(p * (1 - p) / n)
    for draw in (jax.jit(categorical), jax.jit(lambda k, lg: jax.random.categorical(k, lg, axis=-1))):
        tok = np.asarray(draw(jax.random.key(0), rows))
        freq = np.bincount(tok, minlength=len(p)) / n
        assert np.all(np.abs(freq - p) <= 4 * se + 1e-9), (freq, p)
        assert freq[2] == 0 and freq[6] == 0
    tok = np.asarray(jax.jit(lambda k, lg: sample_logits(lg, k, 1.0, 0.7, 0))(jax.random.key(1), rows))
    kept = np.argsort(-p)[: int(np.searchsorted(np.cumsum(np.sort(p)[::-1]), 0.7)) + 1]  # smallest prefix >= 0.7
    assert set(np.unique(tok)) == set(kept.tolist())
