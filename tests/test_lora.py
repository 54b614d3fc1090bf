"""LoRA and QLoRA (``r1jax.lora``): the base is frozen and shared with the reference, only adapters train and carry
optimiser state, merged equals unmerged, quantised bases within their quantisation error, runs that save and resume
their adapters and export merged, and the bad inputs."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import r1jax
from r1jax import checkpoint, configs, lora, train
from r1jax.cli import main
from r1jax.config import LoraConfig, ModelConfig
from r1jax.errors import ConfigError
from r1jax.grpo import GRPOTrainer
from r1jax.loss import sequence_logprobs
from r1jax.model import LoraWeight, dense, forward, init_params, is_quantized
from r1jax.optim import make_optimizer
from r1jax.sft import sft_step

MLA = configs.tiny_model()  # MLA + a dense layer + a MoE layer with shared experts
GQA = ModelConfig(arch="qwen2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffw=48,
                  qkv_bias=True, eos_token_ids=(1,))  # fmt: skip


def _tokens(cfg, shape=(2, 12), seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(2, cfg.vocab_size, shape), jnp.int32)


def _rel(a, b) -> float:
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _noisy(params, seed=1, std=0.05):
    """Adapters with a nonzero ``b``, so the update shows."""
    ad = lora.adapters(params)
    leaves, tree = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return lora.with_adapters(params, jax.tree.unflatten(tree, noisy))


@pytest.mark.parametrize("cfg", [MLA, GQA], ids=["mla_moe", "gqa"])
def test_zero_adapter_is_exactly_the_base(cfg):
    base = init_params(cfg, jax.random.key(0))
    adapted = lora.attach(base, LoraConfig(rank=4, experts=True), cfg, jax.random.key(1))
    assert (
        sum(isinstance(x, LoraWeight) for x in jax.tree.leaves(adapted, is_leaf=lambda x: isinstance(x, LoraWeight)))
        > 5
    )
    t = _tokens(cfg)
    np.testing.assert_array_equal(forward(adapted, t, cfg)[0], forward(base, t, cfg)[0])
    noisy = _noisy(adapted)
    assert _rel(forward(noisy, t, cfg)[0], forward(base, t, cfg)[0]) > 1e-3  # the adapters do act


@pytest.mark.parametrize("cfg", [MLA, GQA], ids=["mla_moe", "gqa"])
def test_merged_equals_unmerged(cfg):
    adapted = _noisy(lora.attach(init_params(cfg, jax.random.key(0)), LoraConfig(rank=4, experts=True), cfg,
                                 jax.random.key(1)))  # fmt: skip
    t = _tokens(cfg)
    merged = lora.merge(adapted)
    assert not any(
        isinstance(x, LoraWeight) for x in jax.tree.leaves(merged, is_leaf=lambda x: isinstance(x, LoraWeight))
    )
    assert _rel(forward(merged, t, cfg)[0], forward(adapted, t, cfg)[0]) < 1e-5


def _sft_batch(cfg, rows=4, seq=12):
    t = np.asarray(_tokens(cfg, (rows, seq + 1)))
    return {"tokens": t[:, :-1], "targets": t[:, 1:], "loss_mask": np.ones((rows, seq), np.float32),
            "positions": np.broadcast_to(np.arange(seq), (rows, seq)).copy(),
            "segment_ids": np.ones((rows, seq), np.int32)}  # fmt: skip


def test_only_adapters_train_and_carry_optimizer_state():
    """An SFT step changes every adapter and leaves the base (router bias included) bitwise as it was; the optimiser
    state holds two moments of the adapters only, far below full fine-tuning's."""
    cfg = MLA
    base = init_params(cfg, jax.random.key(0))
    adapted = lora.attach(base, LoraConfig(rank=2, experts=True), cfg, jax.random.key(1))
    tx = make_optimizer(dataclasses.replace(configs.tiny().optim, lr=1e-2))
    train_part, frozen = lora.partition(adapted)
    opt = tx.init(train_part)
    full_opt = jax.eval_shape(tx.init, base)
    adapter_bytes = lora.nbytes(train_part)
    moments = lora.nbytes(opt) - 8  # two int32 counts
    assert moments == pytest.approx(2 * adapter_bytes, rel=0.01), (moments, adapter_bytes)
    assert lora.nbytes(full_opt) > 2.5 * lora.nbytes(opt)
    before = jax.device_get(frozen)
    new, _, m = sft_step(adapted, opt, _sft_batch(cfg), cfg=cfg, optimizer=tx, router_bias_gamma=0.001)
    new_train, new_frozen = lora.partition(new)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new_frozen), strict=True):
        np.testing.assert_array_equal(a, b)
    pairs = zip(jax.tree.leaves(train_part), jax.tree.leaves(new_train), strict=True)
    assert all(not np.array_equal(u, v) for u, v in pairs)  # every a and b moved
    assert np.isfinite(float(m["loss"]))


def test_reference_is_the_base_with_adapters_off():
    """The GRPO reference of an adapted policy is its frozen base with a copy of the adapters (zero ``b``): its
    log-probs equal the plain base model's, and it holds no second copy of the base."""
    cfg = dataclasses.replace(configs.tiny(), lora=LoraConfig(rank=4))
    model_cfg = cfg.model
    base = init_params(model_cfg, jax.random.key(0))
    adapted = lora.attach(base, cfg.lora, model_cfg, jax.random.key(1))
    trainer = GRPOTrainer(cfg, model_cfg, lambda ro, meta: (np.zeros(len(meta)), {}))
    state = trainer.init_state(adapted)
    assert lora.nbytes(state.ref_params) == lora.nbytes(lora.partition(adapted)[0])  # adapters only
    ref = lora.reference(state.params, state.ref_params)
    frozen_ref, frozen_pol = lora.partition(ref)[1], lora.partition(state.params)[1]
    assert all(a is b for a, b in zip(jax.tree.leaves(frozen_ref), jax.tree.leaves(frozen_pol), strict=True))
    prompt = _tokens(model_cfg, (2, 4))
    comp = _tokens(model_cfg, (2, 6), seed=3)
    start = jnp.zeros((2,), jnp.int32)
    want = sequence_logprobs(base, prompt, start, comp, model_cfg)[0]
    np.testing.assert_array_equal(sequence_logprobs(ref, prompt, start, comp, model_cfg)[0], want)


def test_sampling_reads_merged_weights_for_a_float_base_only():
    """``merge_for_sampling`` unset: GRPO's sampler and log-prob passes read plain merged weights for a float base
    (equal to the adapted model) and the adapters unmerged for a quantised base, whose merged copy would be full
    precision; set, it is obeyed."""
    cfg = dataclasses.replace(configs.tiny(), lora=LoraConfig(rank=4))
    adapted = _noisy(lora.attach(init_params(cfg.model, jax.random.key(0)), cfg.lora, cfg.model, jax.random.key(1)))

    def view(lcfg):
        trainer = GRPOTrainer(dataclasses.replace(cfg, lora=lcfg), cfg.model, lambda ro, meta: (np.zeros(0), {}))
        return trainer._inference_view(adapted)

    merged = view(cfg.lora)
    assert not lora.has_adapters(merged)
    t = _tokens(cfg.model)
    assert _rel(forward(merged, t, cfg.model)[0], forward(adapted, t, cfg.model)[0]) < 1e-5
    assert view(dataclasses.replace(cfg.lora, merge_for_sampling=False)) is adapted
    assert view(dataclasses.replace(cfg.lora, quant="int8")) is adapted
    assert LoraConfig(rank=4, quant="nf4", merge_for_sampling=True).merged_sampling


@pytest.mark.parametrize("cfg", [MLA, GQA], ids=["mla_moe", "gqa"])
def test_dots_remat_saves_one_output_per_adapted_projection(cfg):
    """``remat_policy="dots"`` saves, beyond what ``"full"`` saves, the same bytes with adapters as without: each
    projection's output, not the base and low-rank products an adapted output is summed from."""
    base = init_params(cfg, jax.random.key(0))
    adapted = lora.attach(base, LoraConfig(rank=4), cfg, jax.random.key(1))
    t = _tokens(cfg)

    def saved_bytes(params, policy):
        c = cfg.replace(remat=True, remat_policy=policy)
        train, frozen = lora.partition(params)
        loss = lambda tr: jnp.sum(forward(lora.combine(tr, frozen), t, c)[0])  # noqa: E731
        inputs = {id(x) for x in jax.tree.leaves(params)}
        residuals = jax.tree.leaves(jax.vjp(loss, train)[1])  # what the backward pass reads
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in residuals if id(x) not in inputs)

    dots_extra = {
        name: saved_bytes(p, "dots") - saved_bytes(p, "full") for name, p in (("lora", adapted), ("base", base))
    }
    assert dots_extra["base"] > 0
    assert dots_extra["lora"] == dots_extra["base"], dots_extra


@pytest.mark.parametrize("quant,levels", [("int8", 254), ("nf4", None)])
def test_quantized_base_within_its_quantization_error(quant, levels):
    """Each dequantised weight is within half a quantisation step of the float one: absmax / 254 per element for
    int8 (127 levels each side), and half NF4's widest gap (0.1519 of the block's absmax) for nf4. The model's
    logits then move by about the weights' relative error (first order, summed over the layers' projections)."""
    cfg = GQA
    base = init_params(cfg, jax.random.key(0))
    lc = LoraConfig(rank=4, quant=quant, quant_block=16)
    adapted = lora.attach(base, lc, cfg, jax.random.key(1))
    half_step = 1 / levels if levels else 0.3038 / 2
    errs = []
    for name in ("q", "k", "v", "gate", "up", "down"):
        group = "attn" if name in "qkv" else "mlp"
        w = base["dense_layers"][group][name]
        q = adapted["dense_layers"][group][name].base
        got = dense(q)
        x = np.asarray(w)
        axis = 1  # the input axis, tiled in blocks of 16
        blocks = x.reshape(x.shape[0], x.shape[1] // 16, 16, -1)
        absmax = np.abs(blocks).max(axis=2, keepdims=True)
        err = np.abs(np.asarray(got).reshape(blocks.shape) - blocks)
        assert (err <= absmax * half_step * (1 + 1e-5) + 1e-12).all(), (name, quant)
        errs.append(float(np.linalg.norm(np.asarray(got) - x) / np.linalg.norm(x)))
        assert axis == 1
    t = _tokens(cfg)
    rel = _rel(forward(adapted, t, cfg)[0], forward(base, t, cfg)[0])
    assert 0 < rel < 2 * cfg.n_layers * max(errs), (rel, errs)
    # memory per parameter of the quantised projections: values + one f32 scale per 16 inputs
    bits = (
        lora.nbytes(jax.tree.leaves(adapted["dense_layers"]["mlp"]["up"].base))
        * 8
        / base["dense_layers"]["mlp"]["up"].size
    )
    assert bits == pytest.approx((8 if quant == "int8" else 4) + 32 / 16)


def test_bad_lora_configs():
    base = init_params(GQA, jax.random.key(0))
    with pytest.raises(ConfigError, match=r"match no projection.*valid here: down, gate, k, o, q, up, v"):
        lora.attach(base, LoraConfig(rank=2, targets=("q_a",)), GQA, jax.random.key(0))
    with pytest.raises(ConfigError, match=r"lora.rank=40 is larger than the projection .*k \(32 x 16\)"):
        lora.attach(base, LoraConfig(rank=40), GQA, jax.random.key(0))
    with pytest.raises(ValueError, match="unknown"):
        LoraConfig(rank=2, targets=("qproj",))


# --- runs: save, resume, load, export ---------------------------------------------------------------------------------
FAST = ["steps=2", "checkpoint.every=1", "checkpoint.keep=5", "data.template=plain", "data.max_prompt_tokens=384",
        "data.options=train_size=64,test_size=8", "rewards.num_workers=0", "lora.rank=4", "optim.lr=3e-2"]  # fmt: skip


@pytest.fixture(autouse=True)
def _tfds_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "tfds"))


def test_lora_run_resumes_exactly_and_exports(tmp_path, capsys):
    """A 2-step LoRA GRPO run equals a run stopped after 1 step and resumed; its checkpoints hold only adapters;
    ``r1jax.load`` gives the merged model; export needs --merged or --adapter; a plain checkpoint has no adapter."""
    cfg = train.apply_overrides(train.load_config("tiny_text"), FAST)
    whole, part = tmp_path / "whole", tmp_path / "part"
    train.run(cfg, str(whole), progress=False)
    train.run(cfg, str(part), progress=False, max_steps=1)
    train.run(cfg, str(part), progress=False)
    a, b = r1jax.load(str(whole)).param_dict(), r1jax.load(str(part)).param_dict()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    start = r1jax.model.Transformer.random(cfg.model, cfg.seed).param_dict()
    assert not np.array_equal(a["moe_layers"]["attn"]["q_b"], start["moe_layers"]["attn"]["q_b"])  # trained
    np.testing.assert_array_equal(a["embed"], start["embed"])  # not an adapter target: frozen
    stored = json.loads((whole / "checkpoints" / "2" / "params" / "_METADATA").read_text())["tree_metadata"]
    assert stored and all(key.endswith(("'a')", "'b')")) for key in stored), list(stored)[:4]  # adapters only

    assert main(["export", str(whole), str(tmp_path / "hf")]) == 2
    assert "pass --merged" in capsys.readouterr().err
    assert main(["export", str(whole), str(tmp_path / "hf"), "--merged"]) == 0
    merged = r1jax.load(str(tmp_path / "hf"), dtype="float32").param_dict()
    np.testing.assert_allclose(merged["moe_layers"]["attn"]["q_b"], a["moe_layers"]["attn"]["q_b"], rtol=1e-6)
    plain = tmp_path / "plain"
    checkpoint.save(r1jax.model.Transformer(cfg.model, start), str(plain))
    capsys.readouterr()
    assert main(["export", str(plain), str(tmp_path / "ad"), "--adapter"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a LoRA training run" in err
    assert not (tmp_path / "ad").exists()


def _lora_sft_step(mesh, quant: str):
    from r1jax.config import DataConfig, OptimConfig, TrainConfig
    from r1jax.data.tokenizer import ByteTokenizer
    from r1jax.model import Transformer
    from r1jax.sharding import to_host

    model_cfg = MLA.replace(vocab_size=320)  # the byte tokenizer's ids fit
    lc = LoraConfig(rank=4, experts=True, quant=quant)
    cfg = TrainConfig(stage="sft", model=model_cfg, sft_batch_size=8, micro_batch_size=4, data=DataConfig(seq_len=16),
                      optim=OptimConfig(lr=1e-2, eps=1e-5), lora=lc)  # fmt: skip
    # eps 1e-5: Adam's first steps turn float-noise gradients (which differ between reduction orders) into lr-sized
    # ones with eps = 1e-8, and the comparison would measure that amplification, not the computation
    stage = train.SFTStage(cfg, model_cfg, ByteTokenizer(), mesh)
    state = stage.init(train.start_params(cfg, Transformer.random(model_cfg, 0, mesh=mesh), mesh))
    batch = [{"prompt_text": f"{a} + {a + 3} =", "completion": f" {2 * a + 3}"} for a in range(8)]
    state, metrics = stage.step(state, batch, jax.random.key(0))
    state, metrics = stage.step(state, batch, jax.random.key(1))
    return state, jax.tree.map(to_host, lora.adapters(state["params"])), metrics


def test_qlora_sft_on_mesh_equals_one_device():
    """Two QLoRA (int8 base) SFT steps on 8 devices (fsdp x expert; adapters, their moments and the quantised base
    sharded by the rules table) give the one-device adapters and loss at rel 1e-4."""
    from r1jax.sharding import make_mesh

    _, want, want_m = _lora_sft_step(None, "int8")
    state, got, got_m = _lora_sft_step(make_mesh({"fsdp": 4, "expert": 2}), "int8")
    assert abs(got_m["loss"] - want_m["loss"]) <= 1e-4 * abs(want_m["loss"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        assert _rel(a, b) < 1e-4, jax.tree_util.keystr(path)
    a = state["params"]["moe_layers"]["mlp"]["experts"]["gate"].a  # [L, e, d, r]: experts split over "expert"
    assert len(a.sharding.device_set) == 8 and a.sharding.spec[1] == "expert"
    mu = [x for x in jax.tree.leaves(state["opt"]) if x.shape == a.shape]
    assert mu and all(m.sharding.spec == a.sharding.spec for m in mu)


def test_qlora_quantises_the_routed_experts_it_does_not_adapt():
    """A QLoRA base is quantised whole: the routed experts too (the bulk of a MoE model), with adapters only where
    ``lora.experts`` asks; the model still runs within the quantisation error of the float base."""
    base = init_params(MLA, jax.random.key(0))
    adapted = lora.attach(base, LoraConfig(rank=2, quant="int8"), MLA, jax.random.key(1))
    experts = adapted["moe_layers"]["mlp"]["experts"]
    assert all(is_quantized(w) and not isinstance(w, LoraWeight) for w in experts.values())
    assert isinstance(adapted["moe_layers"]["mlp"]["shared"]["gate"], LoraWeight)
    t = _tokens(MLA)
    assert 0 < _rel(forward(adapted, t, MLA)[0], forward(base, t, MLA)[0]) < 0.05
