"""AOT compile of the train and decode steps for a TPU topology through libtpu, deviceless (skipped without libtpu)."""

import os
import sys
import types

import jax
import pytest

from r1jax.config import ModelConfig

pytest.importorskip("libtpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # deviceless compiles: other processes may hold libtpu
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
    # expert-parallel dispatch: 64 tokens per device (2 x 32); each of the 2 expert shards receives 2 x 64 rows
    # from its group on average, up to 1.25x that per round;
    # the compiled rounds loop counts once, (rounds - 1) x the cost of a round is added
    dispatch = train["dispatch"]
    assert (dispatch["tokens_per_device"], dispatch["mean_rows"], dispatch["round_rows"]) == (64, 128, 160)
    assert 1 <= dispatch["rounds_expected"] <= 2 and dispatch["round_flops_per_device"] > 0
    assert dispatch["round_collective_bytes_per_device"] > 0
    extra = (dispatch["rounds_expected"] - 1) * dispatch["round_flops_per_device"] * train["shape"]["accum"]
    assert train["flops_per_device"] >= extra
    assert all(m < train["mfu_estimate"] for m in dispatch["mfu_if_rounds"].values())
    reduced = aot_compile.reduced_config(TINY_V3)
    assert (reduced.n_dense_layers, reduced.n_moe_layers) == (1, 1)


def test_tiny_v3_lora_update_compiles_with_adapter_state_only():
    """The LoRA policy update compiles for a TPU with the frozen base in bf16 and optimiser state for the adapters
    alone: 2 bytes per base parameter instead of 12 (f32 parameters and two f32 moments), so its arguments (with
    the adapters, their state and the batch) are under half the full update's."""
    import aot_compile
    from r1jax.configs.r1 import r1_on

    from r1jax.config import LoraConfig

    mesh, batch = {"expert": 2, "fsdp": 2}, {"batch": 8, "seq_len": 32}
    cfg = TINY_V3.replace(param_dtype="float32")

    def preset(lora):
        return types.SimpleNamespace(model=lambda: cfg, mesh=lambda: mesh, batch=lambda: batch,
                                     train=lambda: r1_on(cfg, mesh, batch, lora=lora))  # fmt: skip

    with jax.default_matmul_precision("default"):
        (full,) = aot_compile.run(preset(LoraConfig()), "v5p:2x2x1", step="train")["steps"]
        (low,) = aot_compile.run(preset(LoraConfig(rank=4)), "v5p:2x2x1", step="train")["steps"]
    assert low["fits"] and low["argument_bytes"] < 0.5 * full["argument_bytes"], (low["argument_bytes"], full)
    assert low["model_flops"] == full["model_flops"] * 4 / 6  # no weight gradients of the frozen base
    assert 0 < low["flops_per_device"] < full["flops_per_device"]


TPU_CONFIGS = [
    "v3_671b",
    "v3_671b:v6e_1024",
    "r1_distill_qwen_1_5b",
    "r1_distill_qwen_1_5b:v6e_8",
    "r1_distill_qwen_1_5b:v5p_8",
    "r1_distill_qwen_7b",
    "r1_distill_qwen_7b:v5e_8_lora",
    "r1_distill_qwen_32b",
    "r1_distill_qwen_32b:v5p_8_lora",
]


def test_configs_resolve_and_meshes_cover_their_topologies():
    import aot_compile
    import numpy as np
    from jax.experimental import topologies

    from r1jax import sharding
    from r1jax.model import param_specs

    for name in TPU_CONFIGS:
        preset = aot_compile.load_preset(name)
        kw = {"num_slices": preset.SLICES} if getattr(preset, "SLICES", 1) > 1 else {}
        n = len(topologies.get_topology_desc(preset.TOPOLOGY, platform="tpu", **kw).devices)
        mesh = sharding.abstract_mesh(preset.mesh())
        assert mesh.size == n, name
        sharding.check_rules(param_specs(preset.model()), mesh)
        b = preset.batch()["batch"]
        assert b % sharding.shard_count(sharding.logical_to_spec(("batch",), (b,), mesh), mesh) == 0
        assert sharding.shard_count(sharding.logical_to_spec(("batch",), (b,), mesh), mesh) == int(
            np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")])
        ), name  # every data-like axis splits the batch


def test_gpu_estimates_fit_an_h200():
    import aot_compile

    for name in ("r1_distill_qwen_1_5b:h200", "r1_distill_qwen_7b:h200", "r1_distill_qwen_7b:h200_lora",
                 "r1_distill_qwen_14b:h200_lora"):  # fmt: skip
        (step,) = aot_compile.run(aot_compile.load_preset(name), name=name)["steps"]
        assert step["fits"] and 0.5 < step["hbm_fraction"] < 0.9, (name, step["hbm_fraction"])
    # the 7B model with f32 moments on one H200 does not fit
    preset = aot_compile.load_preset("r1_distill_qwen_7b:h200")
    preset.MOMENT_DTYPE = "float32"
    assert not aot_compile.run(preset)["steps"][0]["fits"]


def test_collective_bytes_from_hlo():
    import aot_compile

    hlo = """
  %all-gather.1 = bf16[16,7168,256]{2,1,0} all-gather(bf16[1,7168,256]{2,1,0} %p), dimensions={0}
  %ags = (f32[8,4]{1,0}, f32[64,4]{1,0}) all-gather-start(f32[8,4]{1,0} %q), dimensions={0}
  %rs = f32[2,4]{1,0} reduce-scatter(f32[16,4]{1,0} %g), dimensions={0}
  %add = f32[2,4]{1,0} add(f32[2,4]{1,0} %rs, f32[2,4]{1,0} %rs)
  %a2a = bf16[16,2560,7168]{2,1,0} all-to-all(bf16[16,2560,7168]{2,1,0} %send), dimensions={0}
  %while = (s32[], bf16[16,2560,7168]{2,1,0}) while((s32[], bf16[16,2560,7168]{2,1,0}) %t), body=%round
"""
    want = 16 * 7168 * 256 * 2 + 64 * 4 * 4 + 2 * 4 * 4 + 16 * 2560 * 7168 * 2
    assert aot_compile.collective_bytes(hlo) == want
