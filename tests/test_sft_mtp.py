"""The multi-token-prediction loss in SFT (DeepSeek-V3 section 2.2): it stays within each packed example, its
gradient reaches the MTP module (and none does without it), its weight follows the 0.3 -> 0.1 schedule, and a config
that cannot use it is refused in one line."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from r1jax.cli import main
from r1jax.config import MtpConfig, OptimConfig, Stage, TrainConfig
from r1jax.model import forward, init_params, mtp_loss, mtp_mask
from r1jax.optim import make_optimizer
from r1jax.sft import mtp_token_counts, pack_examples, sft_loss, sft_step

CFG = configs.tiny_model().replace(n_mtp_layers=1)  # V3's depth
DEEP = CFG.replace(n_mtp_layers=2)
EXAMPLES = [([2, 3, 4], [5, 6, 7, 8, 1]), ([9, 10], [11, 12, 13, 1]), ([14], [15, 16, 17, 18, 19, 1])]


def _params(cfg=CFG, seed=0):
    return jax.jit(lambda k: init_params(cfg, k, mtp=True))(jax.random.key(seed))


def _batch(examples, seq_len, rows=None):
    return {k: jnp.asarray(v) for k, v in pack_examples(examples, seq_len, num_rows=rows).items()}


@jax.jit
def _mtp(params, batch, counts):
    _, aux = forward(params, batch["tokens"], DEEP, positions=batch["positions"], segment_ids=batch["segment_ids"],
                     return_hidden=True)  # fmt: skip
    mask = mtp_mask(batch["loss_mask"], batch["segment_ids"], DEEP.n_mtp_layers)
    return mtp_loss(params, aux["hidden"], batch["tokens"], batch["targets"], mask, DEEP,
                    positions=batch["positions"], segment_ids=batch["segment_ids"], counts=counts)  # fmt: skip


def test_packed_mtp_loss_equals_each_example_alone():
    params = _params(DEEP)  # two depths: the second predicts three tokens ahead
    packed = _batch(EXAMPLES, seq_len=24)  # all three in one row
    alone = _batch(EXAMPLES, seq_len=10)  # one example per row (each needs > 5 slots)
    assert packed["tokens"].shape[0] == 1 and alone["tokens"].shape[0] == 3
    counts = mtp_token_counts(packed, DEEP.n_mtp_layers)
    np.testing.assert_array_equal(counts, mtp_token_counts(alone, DEEP.n_mtp_layers))
    # depth k at slot i scores the target of slot j = i + k + 1 of the same example: the completion targets j
    # (slots P - 1 .. P + C - 2 of an example with P prompt and C completion tokens) with j >= k + 1
    want = [
        sum(1 for prompt, comp in EXAMPLES for j in range(len(prompt) - 1, len(prompt) + len(comp) - 1) if j >= k + 1)
        for k in range(DEEP.n_mtp_layers)
    ]
    np.testing.assert_array_equal(counts, want)
    a, b = float(_mtp(params, packed, counts)), float(_mtp(params, alone, counts))
    assert a > 0 and abs(a - b) <= 1e-5 * abs(b)


def test_mtp_gradient_reaches_the_mtp_module_only_with_the_loss():
    params = _params()
    batch = _batch(EXAMPLES, seq_len=24)
    grads = jax.jit(lambda p, w: jax.grad(lambda q: sft_loss(q, batch, CFG, mtp_weight=w)[0])(p))
    with_mtp, without = grads(params, 0.3), grads(params, 0.0)  # one program: the weight is an input
    assert float(jnp.abs(with_mtp["mtp"]["eh_proj"]).sum()) > 0
    assert float(jnp.abs(with_mtp["mtp"]["block"]["attn"]["q_a"]).sum()) > 0
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(without["mtp"]))
    # it also flows back into the main model: the main weights' gradients differ
    assert float(jnp.abs(with_mtp["embed"] - without["embed"]).max()) > 0


def test_sft_step_adds_the_weighted_mtp_loss_on_its_schedule():
    params = _params()
    batch = _batch(EXAMPLES, seq_len=12, rows=2)
    tx = make_optimizer(OptimConfig(lr=1e-2, weight_decay=0.0, router_bias_gamma=0.0))
    mtp = MtpConfig(weight=0.3, late_weight=0.1, switch_step=1)
    loss, aux = jax.jit(lambda p: sft_loss(p, batch, CFG, mtp_weight=0.3))(params)
    before = jax.tree.map(np.asarray, params["mtp"])
    step = functools.partial(sft_step, batch=batch, cfg=CFG, optimizer=tx, micro_batches=2, mtp=mtp)
    p, opt, m1 = step(params, jax.jit(tx.init)(params))
    assert float(m1["mtp_weight"]) == pytest.approx(0.3)
    # two micro-batches, each normalised by the whole batch's counts: they sum to the whole batch's terms
    assert float(m1["mtp_loss"]) == pytest.approx(float(aux["mtp_loss"]), rel=1e-5)
    assert float(m1["loss"]) == pytest.approx(float(aux["loss"]), rel=1e-5)
    assert float(loss) == pytest.approx(float(aux["loss"]) + 0.3 * float(aux["mtp_loss"]), rel=1e-6)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), p["mtp"], before)
    router_bias = moved["block"]["mlp"].pop("router_bias")  # moved by the balancing rule (off here), never trained
    assert router_bias == 0 and min(jax.tree.leaves(moved)) > 0  # every MTP weight trained
    _, _, m2 = step(p, opt)
    assert float(m2["mtp_weight"]) == pytest.approx(0.1)  # after switch_step optimiser steps


def test_mtp_config_errors():
    with pytest.raises(ValueError, match="SFT loss"):
        TrainConfig(mtp=MtpConfig(weight=0.3))
    with pytest.raises(ValueError, match=">= 0"):
        MtpConfig(weight=-1.0)
    assert TrainConfig(stage=Stage.SFT, mtp=MtpConfig(weight=0.3)).mtp.enabled


def test_mtp_on_a_model_without_the_module_is_one_line(tmp_path, capsys):
    code = main(["train", "tiny_text", "--out", str(tmp_path / "run"), "--set", "stage=sft", "--set",
                 "data.name=gsm8k", "--set", "mtp.weight=0.3", "--set", "steps=1"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "MTP module" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
