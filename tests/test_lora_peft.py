"""LoRA adapters exported with ``hf.write_peft_adapter`` load with ``peft.PeftModel.from_pretrained`` onto the
transformers model and give r1jax's adapted logits (float32, rel <= 1e-4)."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import r1jax
from r1jax import hf, lora
from r1jax.config import LoraConfig
from r1jax.errors import CheckpointError
from r1jax.model import forward
from r1jax.safetensors_io import SafetensorsFile
from tests import hf_tiny

RANK, ALPHA = 4, 8.0
REL = 1e-4


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return np.abs(a - b).max() / np.abs(b).max()


def random_b(tree, rng):
    """``tree`` (a ``lora.adapters`` tree) with every ``b`` drawn from N(0, 0.02): a non-zero update."""
    if set(tree) == {"a", "b"}:
        return {"a": tree["a"], "b": jnp.asarray(rng.normal(0, 0.02, tree["b"].shape), tree["b"].dtype)}
    return {k: random_b(v, rng) for k, v in tree.items()}


@pytest.mark.parametrize("case", ["qwen2", "deepseek_v3"])
def test_peft_adapter_matches_r1jax(case, tmp_path):
    """Every projection adapted (MLA and routed experts included): PEFT on transformers gives r1jax's logits, and
    the base model alone does not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    hf_tiny.build(case, base_dir)
    model = r1jax.load(base_dir, dtype="float32")
    cfg = model.cfg
    # rbg keys: threefry's per-shape programs take most of a second each to compile on CPU
    key = jax.random.key(0, impl="rbg")
    params = lora.attach(model.param_dict(), LoraConfig(rank=RANK, alpha=ALPHA, experts=True), cfg, key)
    saved = random_b(lora.adapters(params), np.random.RandomState(1))
    params = lora.with_adapters(params, saved)
    tokens = np.random.RandomState(0).randint(3, 96, (2, 11))
    got = np.asarray(forward(params, jnp.asarray(tokens), cfg)[0])

    hf.write_peft_adapter(saved, cfg, adapter_dir, rank=RANK, alpha=ALPHA, base_model_name_or_path=base_dir)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, ALPHA)
    if cfg.is_moe:  # one pair per routed expert, in every MoE layer
        names = SafetensorsFile(f"{adapter_dir}/adapter_model.safetensors").names()
        n_expert_keys = sum(".mlp.experts." in n for n in names)
        assert n_expert_keys == 2 * 3 * cfg.n_experts * cfg.n_moe_layers

    ref = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    plain = hf_tiny.hf_logits(ref, tokens)
    peft_model = PeftModel.from_pretrained(ref, adapter_dir).eval()
    adapted = hf_tiny.hf_logits(peft_model, tokens)
    assert rel_err(got, adapted) < REL
    assert rel_err(got, plain) > 100 * REL  # the adapter matters: a dropped or misplaced one would show


def test_unmappable_adapter_is_an_error(tmp_path):
    """An adapter on no HF linear weight, or of the wrong shape, is a CheckpointError and writes nothing."""
    cfg = hf.config_from_hf(dict(hf_tiny.BASE, **hf_tiny.CASES["qwen2"], model_type="qwen2"))
    zeros = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    out = tmp_path / "adapter"
    bogus = {"dense_layers": {"attn": {"bogus": {"a": zeros(3, 32, RANK), "b": zeros(3, RANK, 32)}}}}
    with pytest.raises(CheckpointError, match="dense_layers/attn/bogus: no HF linear weight"):
        hf.write_peft_adapter(bogus, cfg, str(out), rank=RANK, alpha=ALPHA)
    wrong_rank = {"dense_layers": {"attn": {"q": {"a": zeros(3, 32, 2), "b": zeros(3, 2, 32)}}}}
    with pytest.raises(CheckpointError, match="dense_layers/attn/q: a has shape"):
        hf.write_peft_adapter(wrong_rank, cfg, str(out), rank=RANK, alpha=ALPHA)
    assert list(tmp_path.iterdir()) == []


def test_lora_run_exports_an_adapter_that_peft_loads(tmp_path, tmp_path_factory, capsys, monkeypatch):
    """The user's path: a LoRA SFT run from a HF checkpoint, ``r1jax export RUN --adapter``, PEFT on the same base
    gives the logits of the run's model (``r1jax.load(RUN)``: base and adapters merged). A base replaced by another
    model since the run is refused in one line."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from r1jax import train
    from r1jax.cli import main
    from r1jax.config import ModelConfig
    from r1jax.model import Transformer

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "tfds"))  # shared with test_lora
    byte_vocab = dict(vocab_size=320, eos_token_ids=(257,), bos_token_id=256, pad_token_id=258)
    dense = ModelConfig(arch="qwen2", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffw=48, qkv_bias=True,
                        **byte_vocab)  # fmt: skip
    base_dir = str(tmp_path / "base")
    r1jax.export_hf(Transformer.random(dense, 0), base_dir, dtype="float32")
    sets = ["stage=sft", "data.template=plain", "data.seq_len=384", "sft_batch_size=4", "steps=2", "optim.lr=0.02",
            "data.options=train_size=64,test_size=8", f"init={base_dir}", "lora.rank=4", "lora.alpha=8",
            "checkpoint.every=2"]  # fmt: skip
    cfg = train.apply_overrides(train.load_config("tiny_text"), sets)
    run = str(tmp_path / "run")
    train.run(cfg, run, progress=False)
    assert main(["export", run, str(tmp_path / "adapter"), "--adapter"]) == 0

    tokens = np.random.RandomState(0).randint(3, 250, (2, 11))
    got = np.asarray(r1jax.load(run)(tokens))
    ref = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    plain = hf_tiny.hf_logits(ref, tokens)
    adapted = hf_tiny.hf_logits(PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval(), tokens)
    assert rel_err(got, adapted) < REL
    assert rel_err(got, plain) > 10 * REL  # two steps moved the adapters

    other = dataclasses.replace(dense, d_model=48)
    shutil.rmtree(base_dir)
    r1jax.export_hf(Transformer.random(other, 0), base_dir, dtype="float32")
    capsys.readouterr()
    assert main(["export", run, str(tmp_path / "merged"), "--merged"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not the model the adapters were trained on (d_model" in err, err
    assert not (tmp_path / "merged").exists()
