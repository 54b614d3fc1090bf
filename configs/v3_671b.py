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
    batch over fsdp x expert = 256 sequences; tensor 8 splits 128 heads -> 16, dense ffw 18432 -> 2304,
    expert ffw 2048 -> 256, vocab 129280 -> 16160; expert 16 splits 256 experts -> 16 per chip;
    fsdp 16 splits embed 7168 -> 448 (and the MLA ranks 1536 -> 96, 512 -> 32).
    Expert weights are split over all 2048 chips; attention/dense weights over fsdp x tensor = 128 (16x replicated
    over expert, 11.41 B x 4 B / 128 = 357 MB per chip).
State per chip (f32 params, f32 AdamW mu and nu, bf16 compute):
    params 656.6 B x 4 B / 2048 + (11.41 + 1.19 + 1.85) B x 4 B / 128   = 1.28 + 0.45 = 1.73 GB
    grads the same 1.73 GB; AdamW 2 x 1.73 = 3.46 GB                     -> ~6.9 GB of 95 GiB
Batch per step (one GRPO minibatch): 256 sequences x 4096 tokens = 1.05 M tokens (R1: 512 samples per step in 16
    minibatches of 32 x up to 32k tokens ~= 1 M tokens). Per chip: 1 sequence x 4096 tokens.
Activations: remat per layer saves the [1, 4096, 7168] bf16 residual (58.7 MB) x 61 layers = 3.6 GB per chip.
Expert-parallel dispatch (r1jax.expert_parallel): 4096 x 8 = 32768 assignments per chip, 2048 to each of the 16
    expert shards on average; rounds of C = 1.25 (dispatch_slack) x 2048 = 2560 rows per destination, buffers
    [16, 2560, 7168] bf16 = 587 MB (send, receive, results, returned) where one worst-case all-to-all needed
    [16, 32768, 7168] = 7.5 GB. Under balanced routing the busiest (chip, shard) pair of a layer gets 1.09x the mean
    (Monte-Carlo in tools/aot_compile.py: 256 chips x 16 shards), so one round; a pair past 2560 rows costs every
    chip a second round of that layer (not dropped tokens).
Roofline: 6 x 37 B x 1.05 M tokens = 2.33e17 FLOPs (+ attention 6 x 61 x 4096 x 128 x 192+128 ... ~ 12%) over
    2048 x 459 TFLOP/s (v5p bf16 peak) = 0.25 s at 100% MFU.
Compiled (``tools/aot_compile.py v3_671b --step train --reduced``: 2 of 61 layers, extrapolated; 1 dispatch round
    expected): 19.1 GB per chip (20% of HBM). 2.59e14 FLOPs per chip, 2.3x the model's 1.12e14 (remat recompute,
    attention, the 25% slack rows): 0.56 s at peak, 43% MFU if FLOP-bound; 3.1e11 collective bytes, 0.52 s of ICI.
    But XLA counts 6.1e12 bytes accessed per chip, 2.2 s at 2.765 TB/s: 11% MFU (6.9% at 2 rounds). 61% of those
    bytes are the dispatch rounds, 64 GB per layer: a forward round moves its 587 MB buffers ~10 times (gathers into
    the all-to-all buffer, into expert order and back, back to the assignments, relayouts for the matmuls) and runs
    3 times (forward, remat recompute, the backward's recompute), plus the transposes. The rest (0.9 s; not broken
    down) includes XLA attention with [16, 4096, 4096] f32 scores per chip and layer. Before the rounds (one
    worst-case all-to-all, 16x the rows) the same compile gave 65.7 GB per chip, 6.1e15 FLOPs, 1.8% MFU.
    Next: the Pallas flash kernel for attention under shard_map, and fewer row moves per round (a ragged all-to-all
    that lands rows grouped by expert).

v6e (``v6e_1024``): one v6e-256 slice cannot hold the state (671 B x 16 B / 256 = 42 GB > 32 GB per chip), so four
slices over DCN: 1024 chips, mesh fsdp 32 (spans the slices) x expert 8 x tensor 4.
    experts  653.8 B x 16 B / (expert 8 x tensor 4 x fsdp 32 = 1024)                    = 10.2 GB per chip
    the rest ~17 B x 16 B / (fsdp 32 x tensor 4 = 128)                                  =  2.1 GB per chip
    batch 256 sequences x 2048 tokens = 524 k tokens per step, one sequence per chip: remat residuals
    61 x 2048 x 7168 x 2 B = 1.8 GB; dispatch rounds of 1.25 x 2048 = 2560 rows per destination, buffers
    [8, 2560, 7168] bf16 = 294 MB each (send, receive, results, returned; the worst case was [8, 16384, 7168]).
    Roofline: 6 x 37 B x 524 k / (1024 x 918e12) = 0.12 s at 100% MFU; the fsdp all-gathers of each MoE layer's
    experts (11.3 B / 32 x 2 B = 0.7 GB per chip per pass) are what the step waits on.
    Compiled (``v3_671b:v6e_1024 --step train --reduced``, 1 dispatch round expected): 23.0 GB per chip (72% of
    HBM); 2.2e14 FLOPs per chip, 0.24 s at peak (51% MFU if FLOP-bound); 3.4e11 collective bytes, 0.75 s of ICI
    (DCN not modelled); 4.9e12 bytes accessed, 3.0 s at 1.64 TB/s: 4.1% MFU (2.8% at 2 rounds), 47% of the bytes in
    the dispatch rounds.
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
