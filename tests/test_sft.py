"""SFT / distillation: packing is invisible to the loss, prompts never count, accumulation equals one big batch, a
few steps fit a fixed example, and a dense Qwen2-style student learns an MLA/MoE teacher's traces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
import r1jax
from r1jax.config import ModelConfig, OptimConfig
from r1jax.model import Transformer, forward, init_params
from r1jax.optim import make_optimizer
from r1jax.sft import completion_nll, eval_loss, pack_examples, sft_loss, sft_step, tokenize_trace

TEACHER = configs.tiny_model()  # MLA + sigmoid-routed MoE, vocab 64
STUDENT = ModelConfig(  # Qwen2-style dense GQA with q/k/v biases, same vocabulary
    arch="qwen2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffw=64, qkv_bias=True,
    eos_token_ids=(1,),
)  # fmt: skip
OPT = OptimConfig(lr=1e-2, weight_decay=0.0, max_grad_norm=1.0, router_bias_gamma=0.0)
TX = make_optimizer(OPT)  # one instance: the optimiser is a static argument of the jitted step
EXAMPLES = [
    ([2, 3, 4], [5, 6, 7, 1]),
    ([8, 9], [10, 11, 1]),
    ([12, 13, 14, 15, 16], [17, 1]),
    ([18], [19, 20, 21, 22, 23, 1]),
    ([24, 25, 26], [27, 28, 1]),
]


def _params(cfg, seed=0):
    return jax.jit(lambda k: init_params(cfg, k))(jax.random.key(seed))


def test_pack_layout_by_hand():
    b = pack_examples([([2, 3], [4, 5]), ([6], [7])], seq_len=6)
    # example 1: tokens 2 3 4 -> targets 3 4 5, prompt target (3) masked; example 2: token 6 -> target 7
    np.testing.assert_array_equal(b["tokens"], [[2, 3, 4, 6, 0, 0]])
    np.testing.assert_array_equal(b["targets"], [[3, 4, 5, 7, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 0, 0]])
    # first-fit: the third example does not fit row 0 and opens row 1; the fourth fills row 0's gap
    b = pack_examples([([1, 2, 3], [4, 5]), ([6, 7], [8, 9]), ([1], [2])], seq_len=5, num_rows=3)
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 2], [1, 1, 1, 0, 0], [0] * 5])
    np.testing.assert_array_equal(b["tokens"][0], [1, 2, 3, 4, 1])
    assert b["loss_mask"].sum() == 2 + 2 + 1
    # truncation keeps the prompt and cuts the completion; a prompt that does not fit is an error
    b = pack_examples([([1, 2], [3, 4, 5, 6])], seq_len=3)
    np.testing.assert_array_equal(b["targets"], [[2, 3, 4]])
    with pytest.raises(ValueError, match="leaves no completion"):
        pack_examples([([1, 2, 3, 4], [5])], seq_len=3)
    with pytest.raises(ValueError, match="do not fit"):
        pack_examples([([1], [2, 3, 4, 5])], seq_len=3, truncate=False)
    with pytest.raises(ValueError, match="num_rows"):
        pack_examples(EXAMPLES, seq_len=8, num_rows=1)


def test_prompt_positions_get_no_gradient():
    b = pack_examples(EXAMPLES[:2], seq_len=12)
    mask = b["loss_mask"]
    logits = jax.random.normal(jax.random.key(0), (*b["tokens"].shape, 64))
    g = jax.grad(lambda lg: completion_nll(lg, jnp.asarray(b["targets"]), jnp.asarray(mask))[0])(logits)
    g = np.asarray(g)
    np.testing.assert_array_equal(g[mask == 0], 0.0)  # prompt targets and padding
    assert np.all(np.abs(g[mask == 1]).sum(-1) > 1e-3)  # every completion target
    # the completion targets are exactly the completion tokens, in order
    np.testing.assert_array_equal(b["targets"][mask == 1], [5, 6, 7, 1, 10, 11, 1])


def test_packed_loss_equals_token_weighted_unpacked_losses():
    params = _params(TEACHER)
    packed = pack_examples(EXAMPLES, seq_len=12)
    assert packed["tokens"].shape[0] < len(EXAMPLES)  # several examples share rows
    loss_fn = jax.jit(lambda p, b: sft_loss(p, b, TEACHER))
    loss, aux = loss_fn(params, packed)
    sums, counts = [], []
    for ex in EXAMPLES:
        _, a = loss_fn(params, pack_examples([ex], seq_len=12))  # alone in a row, padded
        sums.append(float(a["nll_sum"]))
        counts.append(float(a["tokens"]))
    assert float(aux["tokens"]) == sum(counts) == sum(len(c) for _, c in EXAMPLES)
    np.testing.assert_allclose(float(aux["nll_sum"]), sum(sums), rtol=1e-5)
    np.testing.assert_allclose(float(loss), sum(sums) / sum(counts), rtol=1e-5)


def test_accumulation_equals_one_batch_and_router_bias_frozen():
    cfg = TEACHER.replace(n_layers=1, first_k_dense=0)  # one MoE layer: the step compiles twice here
    batch = pack_examples(EXAMPLES, seq_len=12, num_rows=4)
    tx = TX
    outs = []
    for micro in (1, 2):
        params = _params(cfg)
        new, _, m = sft_step(params, tx.init(params), batch, cfg=cfg, optimizer=tx, micro_batches=micro)
        outs.append((jax.device_get(new), jax.device_get(m)))
    (p1, m1), (p2, m2) = outs
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p2)
    ref = jax.device_get(_params(cfg))
    np.testing.assert_array_equal(p1["moe_layers"]["mlp"]["router_bias"], ref["moe_layers"]["mlp"]["router_bias"])
    assert not np.allclose(p1["moe_layers"]["mlp"]["router"], ref["moe_layers"]["mlp"]["router"])


def test_sft_steps_fit_a_fixed_example():
    batch = pack_examples(EXAMPLES, seq_len=12, num_rows=4)
    params = _params(STUDENT)
    tx = TX
    opt_state = tx.init(params)
    before = float(eval_loss(params, batch, cfg=STUDENT))
    for _ in range(15):
        params, opt_state, m = sft_step(params, opt_state, batch, cfg=STUDENT, optimizer=tx, micro_batches=2)
    after = float(eval_loss(params, batch, cfg=STUDENT))
    assert np.isfinite(float(m["grad_norm"]))
    assert after < 0.3 * before, (before, after)


def test_distill_moe_teacher_into_dense_student():
    teacher = Transformer.random(TEACHER, seed=1)
    prompts = [[2 + i, 30 + 3 * i] for i in range(8)]
    traces = r1jax.generate(teacher, prompts, max_new_tokens=4, temperature=0.0, stop_ids=[1])
    assert all(len(t) > 0 for t in traces)
    examples = [(p, t) for p, t in zip(prompts, traces, strict=True)]
    batch = pack_examples(examples, seq_len=12, num_rows=4)
    student = _params(STUDENT, seed=2)
    tx = TX
    opt_state = tx.init(student)
    before = float(eval_loss(student, batch, cfg=STUDENT))
    for _ in range(25):
        student, opt_state, _ = sft_step(student, opt_state, batch, cfg=STUDENT, optimizer=tx, micro_batches=2)
    after = float(eval_loss(student, batch, cfg=STUDENT))
    assert after < 0.5 * before, (before, after)
    # the student now continues the teacher's prompts the teacher's way (greedy, teacher-forced)
    logits, _ = forward(student, jnp.asarray(batch["tokens"]), STUDENT, positions=jnp.asarray(batch["positions"]),
                        segment_ids=jnp.asarray(batch["segment_ids"]))  # fmt: skip
    hit = (np.asarray(logits).argmax(-1) == batch["targets"])[batch["loss_mask"] == 1]
    assert hit.mean() > 0.8


def test_tokenize_trace_appends_eos():
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    assert tokenize_trace("ab", "c", enc, eos_id=0) == ([97, 98], [99, 0])
    assert tokenize_trace("ab", "c", enc) == ([97, 98], [99])
