"""Logits equal transformers' on tiny random models of every supported architecture (float32, rel <= 1e-4)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import r1jax
from r1jax import hf
from r1jax.checkpoint import convert
from r1jax.model import MOE_LAYERS, forward
from tests import hf_tiny

REL = 1e-4


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all()
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module", params=list(hf_tiny.CASES))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = hf_tiny.build(request.param, str(path))
    return request.param, str(path), ref


def test_logits_match_transformers(tiny):
    case, path, ref = tiny
    tokens = np.random.RandomState(0).randint(3, 96, (2, 11))
    model = r1jax.load(path)
    got = np.asarray(model(tokens))
    np.testing.assert_array_less(rel_err(got, hf_tiny.hf_logits(ref, tokens)), REL)


def test_config_reads_architecture(tiny):
    case, path, _ = tiny
    cfg = hf.config_from_hf(json.loads(Path(f"{path}/config.json").read_text()))
    assert cfg.arch.value == hf_tiny.model_type(case)
    if case.startswith("deepseek"):
        assert cfg.is_mla and cfg.is_moe and cfg.n_dense_layers == 1
    if "yarn" in case:
        assert cfg.rope.type.value == "yarn" and cfg.rope.mscale_all_dim == 1.0


def test_hf_roundtrip_reloads_in_transformers(tiny, tmp_path):
    """HF -> r1jax checkpoint -> HF: transformers loads the export and gives the original logits."""
    from transformers import AutoModelForCausalLM

    case, path, ref = tiny
    convert(path, str(tmp_path / "ckpt"))
    r1jax.export_hf(r1jax.load(str(tmp_path / "ckpt")), str(tmp_path / "hf"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = np.random.RandomState(1).randint(3, 96, (1, 7))
    np.testing.assert_array_less(rel_err(hf_tiny.hf_logits(back, tokens), hf_tiny.hf_logits(ref, tokens)), 1e-6)


def test_padding_and_packing_do_not_change_logits(tiny):
    """Segment ids isolate packed sequences: each equals the sequence run alone."""
    _, path, _ = tiny
    model = r1jax.load(path)
    params = model.param_dict()
    rng = np.random.RandomState(2)
    a, b = rng.randint(3, 96, (1, 5)), rng.randint(3, 96, (1, 6))
    packed = np.concatenate([a, b], 1)
    seg = np.array([[1] * 5 + [2] * 6])
    pos = np.array([list(range(5)) + list(range(6))])
    got, _ = forward(params, jnp.asarray(packed), model.cfg, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(got[:, :5], model(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 5:], model(b), rtol=1e-5, atol=1e-5)


def test_bfloat16_policy(tiny):
    """dtype="bfloat16": parameters and activations in bf16, logits still f32 and close to the f32 model's."""
    _, path, ref = tiny
    model = r1jax.load(path, dtype="bfloat16")
    assert all(
        x.dtype == jnp.bfloat16
        for k, x in jax.tree_util.tree_leaves_with_path(model.param_dict())
        if "router" not in str(k)
    )
    tokens = np.random.RandomState(3).randint(3, 96, (1, 9))
    got = model(tokens)
    assert got.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits: a few per cent of the logit range after 3 layers
    np.testing.assert_array_less(rel_err(got, hf_tiny.hf_logits(ref, tokens)), 5e-2)


def test_sharded_checkpoint_with_index(tmp_path):
    """A checkpoint split into several safetensors files with ``model.safetensors.index.json`` loads (r1jax and
    transformers) and streams tensor by tensor."""
    from transformers import AutoModelForCausalLM

    ref = hf_tiny.build("deepseek_v3", str(tmp_path / "src"))
    r1jax.export_hf(r1jax.load(str(tmp_path / "src")), str(tmp_path / "sharded"), shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 3 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    tokens = np.random.RandomState(4).randint(3, 96, (1, 8))
    want = hf_tiny.hf_logits(ref, tokens)
    np.testing.assert_array_less(rel_err(r1jax.load(str(tmp_path / "sharded"))(tokens), want), REL)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"), dtype=torch.float32).eval()
    np.testing.assert_array_less(rel_err(hf_tiny.hf_logits(back, tokens), want), 1e-6)


def test_load_onto_mesh(tmp_path):
    """``r1jax.load(path, mesh=...)``: every parameter lands sharded by the rules table; logits are unchanged."""
    from r1jax.sharding import make_mesh

    ref = hf_tiny.build("deepseek_v3", str(tmp_path / "m"))
    mesh = make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
    model = r1jax.load(str(tmp_path / "m"), mesh=mesh)
    params = model.param_dict()
    kv_b = params[MOE_LAYERS]["attn"]["kv_b"]  # [layers, c, heads, n + v]: heads over tensor
    assert kv_b.addressable_shards[0].data.shape[2] == kv_b.shape[2] // 2
    experts = params[MOE_LAYERS]["mlp"]["experts"]["gate"]  # [layers, experts, d, f]: over expert x tensor
    assert experts.addressable_shards[0].data.shape[1] == experts.shape[1] // 4
    tokens = np.random.RandomState(5).randint(3, 96, (2, 8))
    np.testing.assert_array_less(rel_err(model(tokens), hf_tiny.hf_logits(ref, tokens)), REL)
