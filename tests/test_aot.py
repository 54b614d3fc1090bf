"""AOT compile of the train and decode steps for a TPU topology through libtpu, deviceless (skipped without libtpu)."""

import os
import sys
import types

import jax
import pytest

from r1jax.config import ModelConfig

pytest.importorskip("libtpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

TINY_V3 = ModelConfig(
    arch="deepseek_v3", vocab_size=256, d_model=64, n_layers=3, n_heads=4, ffw=96, q_lora_rank=32, kv_lora_rank=32,
    qk_nope_dim=16, qk_rope_dim=8, v_head_dim=16, n_experts=8, n_shared_experts=1, experts_per_token=2, moe_ffw=32,
    first_k_dense=1, scoring="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1, norm_topk_prob=True,
    rope_interleave=True, dtype="bfloat16", remat=True,
)  # fmt: skip


def test_tiny_v3_train_and_decode_compile_for_v5p():
    import aot_compile

    preset = types.SimpleNamespace(
        model=lambda: TINY_V3,
        mesh=lambda: {"expert": 2, "fsdp": 2},
        batch=lambda: {"batch": 8, "seq_len": 32},
        decode=lambda: {"batch": 8, "cache_len": 64},
    )
    # conftest asks for "highest" matmul precision (f32 parity on CPU); TPU's bf16 grouped-matmul kernel refuses it
    with jax.default_matmul_precision("default"):
        result = aot_compile.run(preset, "v5p:2x2x1")
    train, decode = result["steps"]
    assert result["chips"] == 4
    for step in (train, decode):
        assert step["fits"] and 0 < step["total_bytes"] < step["hbm_bytes"]
        assert step["flops_per_device"] > step["flops_compiled_raw"] > 0  # scan bodies completed per layer
        assert step["roofline_step_s"] > 0
    # one train step does at least 6 x active params x tokens / chips FLOPs per device
    assert train["flops_per_device"] > 0.9 * train["model_flops"] / result["chips"]
    reduced = aot_compile.reduced_config(TINY_V3)
    assert (reduced.n_dense_layers, reduced.n_moe_layers) == (1, 1)
