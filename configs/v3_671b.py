"""DeepSeek-V3 / R1 671B: GRPO policy update on a TPU v5p pod slice, v5p:8x16x16 (2048 chips, 95 GiB HBM each),
and (``v6e_1024``) on four v6e-256 slices over DCN (1024 chips, 32 GB each).

Model: the HF ``config.json`` of deepseek-ai/DeepSeek-V3 (and R1, R1-Zero: same architecture), read through
``r1jax.hf.config_from_hf`` so the preset and the converter cannot disagree.

Parameters (d=7168, V=129280, h=128, q=1536, c=512, n=128, p=64, v=128, e=256, f_moe=2048, f_dense=18432):
    embed + lm_head    2 x 129280 x 7168                                  =   1.853 B
    MLA per layer      7168x1536 + 1536x128x192 + 7168x576 + 512x128x256 + 128x128x7168
                       = 11.01M + 37.75M + 4.13M + 16.78M + 117.44M          = 187.1 M  x 61 = 11.41 B
    dense MLP          3 x 7168 x 18432 = 396.4 M                         x 3  =  1.189 B
    MoE layer          (256 routed + 1 shared) x 3 x 7168 x 2048 + router = 11.32 B  x 58 = 656.6 B
    total                                                                 ~= 671 B (+11.6 B MTP block, not trained)
    active per token   11.41 + 1.19 + 58 x 9 x 44.04M + 0.93 (head)      ~=  37 B

Mesh (2048 chips): fsdp 16 x expert 16 x tensor 8.
    batch over fsdp x expert = 256 sequences, and between blocks the sequence over tensor 8 (sequence parallel:
    4096 / 8 = 512 tokens per chip); tensor 8 splits 128 heads -> 16, dense ffw 18432 -> 2304, vocab 129280 ->
    16160; the 256 routed experts are split over expert 16 x tensor 8 = 128 shards, 2 whole experts per chip;
    fsdp 16 splits embed 7168 -> 448 (and the MLA ranks 1536 -> 96, 512 -> 32).
    Expert weights are split over all 2048 chips; attention/dense weights over fsdp x tensor = 128 (16x replicated
    over expert, 11.41 B x 4 B / 128 = 357 MB per chip).
State per chip (f32 params, f32 AdamW mu and nu, bf16 compute):
    params 656.6 B x 4 B / 2048 + (11.41 + 1.19 + 1.85) B x 4 B / 128   = 1.28 + 0.45 = 1.73 GB
    grads the same 1.73 GB; AdamW 2 x 1.73 = 3.46 GB                     -> ~6.9 GB of 95 GiB
Batch per step (one GRPO minibatch): 256 sequences x 4096 tokens = 1.05 M tokens (R1: 512 samples per step in 16
    minibatches of 32 x up to 32k tokens ~= 1 M tokens). Per chip: 1 sequence x 4096 tokens, 512 of them its own.
Activations: remat per layer keeps the [1, 512, 7168] bf16 residual block (7.3 MB) and, in MoE layers, the chip's
    expert rows [512 x 8, 7168] (58.7 MB, so the recompute skips the dispatch): 3.9 GB per chip over 61 layers.
Expert-parallel dispatch (r1jax.expert_parallel): each chip sends its 512 x 8 = 4096 assignments to the 128 expert
    shards of its group (the chips of one fsdp index) with a ragged all-to-all; a shard receives 4096 rows on
    average and takes up to C = 1.25 (dispatch_slack) x 4096 = 5120 per round ([5120, 7168] bf16 = 73 MB buffers).
    Under balanced routing the busiest shard of a group receives 1.05x the mean (Monte-Carlo in
    tools/aot_compile.py: 16 groups x 128 chips x 512 tokens), so one round; a shard past 5120 rows costs its
    layer a second round (not dropped tokens).
Roofline: 6 x 37 B x 1.05 M tokens = 2.30e17 FLOPs (head on completion tokens only) over 2048 x 459 TFLOP/s
    (v5p bf16 peak) = 0.244 s at 100% MFU.
Compiled (``tools/aot_compile.py v3_671b --reduced``: 2 of 61 layers, extrapolated; 1 dispatch round expected):
    17.8 GB per chip (19% of HBM). 1.80e14 FLOPs per chip (1.6x the model's 1.12e14: remat recompute, attention,
    the slack rows), 0.39 s at peak; 1.33e11 collective bytes, 0.22 s of ICI; 1.62e12 bytes accessed, 0.586 s at
    2.765 TB/s: est. **41.7% MFU** (31.2% at 2 rounds), bound by bytes accessed. What keeps the bytes down: each
    chip dispatches only its own 512 sequence-parallel tokens to experts split over expert x tensor; the Pallas
    flash kernel runs under shard_map (no [16, 4096, 4096] f32 scores); the residual stream is sequence parallel;
    remat keeps the expert rows (the recompute runs no all-to-alls or grouped matmuls); the ragged all-to-all sizes
    a round by what a shard receives in all (1.05x the mean), not by the busiest (chip, shard) pair (1.9x).
    How each of these moved the figures: docs/performance.md.

v6e (``v6e_1024``): one v6e-256 slice cannot hold the state (671 B x 16 B / 256 = 42 GB > 32 GB per chip), so four
slices over DCN: 1024 chips, mesh fsdp 32 (spans the slices) x expert 8 x tensor 4.
    experts  653.8 B x 16 B / (expert 8 x tensor 4 x fsdp 32 = 1024)                    = 10.2 GB per chip
    the rest ~17 B x 16 B / (fsdp 32 x tensor 4 = 128)                                  =  2.1 GB per chip
    batch 256 sequences x 2048 tokens = 524 k tokens per step, one sequence per chip, 512 tokens its own; experts
    over expert 8 x tensor 4 = 32 shards, 8 whole experts per chip.
    Roofline: 6 x 37 B x 524 k / (1024 x 918e12) = 0.12 s at 100% MFU.
    Compiled (``v3_671b:v6e_1024 --step train --reduced``, 1 dispatch round expected): 25.2 GB per chip (79% of
    HBM); 1.74e14 FLOPs per chip, 0.19 s at peak; 2.64e11 collective bytes, 0.59 s of ICI (DCN not modelled);
    2.96e12 bytes accessed, 1.81 s at 1.64 TB/s: 6.7% MFU. Each chip holds 8 experts (1.4 GB of f32
    weights per layer) for 512 tokens: gathering, converting and differentiating them is what the step reads.
"""

from __future__ import annotations

import types

from r1jax.config import ModelConfig, TrainConfig

from .r1 import r1_on, training_model

TOPOLOGY = "v5p:8x16x16"

HF_CONFIG = {
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def model(**overrides) -> ModelConfig:
    """The 671B model in training precision: f32 parameters, bf16 matmuls, remat per layer, Pallas flash attention."""
    return training_model(HF_CONFIG, **overrides)


def mesh() -> dict[str, int]:
    """2048 chips: fsdp 16 x expert 16 x tensor 8 (see the module docstring)."""
    return {"data": 1, "fsdp": 16, "tensor": 8, "expert": 16}


def batch() -> dict[str, int]:
    """One GRPO minibatch: sequences x tokens (the update step's input shape)."""
    return {"batch": 256, "seq_len": 4096}


def decode() -> dict[str, int]:
    """Sampling: 512 sequences (32 prompts x G=16) against a 32k-token compressed MLA cache, one token per step."""
    return {"batch": 512, "cache_len": 32768}


def v6e_1024():
    """Four v6e-256 slices (v6e:16x16 x 4 over DCN): fsdp 32 x expert 8 x tensor 4, 256 x 2048-token sequences."""
    return types.SimpleNamespace(
        TOPOLOGY="v6e:16x16",
        SLICES=4,
        model=model,
        mesh=lambda: {"data": 1, "fsdp": 32, "tensor": 4, "expert": 8},
        batch=lambda: {"batch": 256, "seq_len": 2048},
        decode=lambda: {"batch": 256, "cache_len": 32768},
    )


def train() -> TrainConfig:
    """R1-Zero on this slice, GRPO from the base model with the R1-Zero template: ``configs.r1.r1_on`` at
    ``mesh()`` / ``batch()``. ``r1jax train v3_671b --out RUN --set init=HF_DIR``."""
    return r1_on(model(), mesh(), batch(), template="r1_zero")
