"""DeepSeek-R1-Distill-Qwen-1.5B: GRPO policy update on TPU v5e-8 (default), v6e-8 and v5p-8, and on one H200.

Model: the HF ``config.json`` of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (Qwen2: q/k/v bias, untied head), read
through ``r1jax.hf.config_from_hf``.

Parameters (d=1536, V=151936, L=28, h=12, g=2, k=128, f=8960):
    embed + lm_head    2 x 151936 x 1536                                   = 466.7 M
    attention / layer  1536 x (12 + 2 + 2) x 128 + biases + 12 x 128 x 1536 = 3.15 M + 2.36 M = 5.51 M
    MLP / layer        3 x 1536 x 8960                                     = 41.3 M
    28 layers          28 x (5.51 + 41.29) M + norms                        = 1.31 B
    total                                                                  ~= 1.78 B; 1.54 B active in matmuls
State (f32 params, f32 grads, f32 AdamW mu and nu = 16 B/param): 28.5 GB, split over fsdp.

Activations per sequence of T = 4096 tokens on the chip that holds it (the large ones):
    logits [T, V] bf16 1.24 GB, their f32 log-softmax 2.49 GB and its gradient 2.49 GB  ~= 6.2 GB
    remat residual per layer T x 1536 x 2 B = 12.6 MB x 28                            =  0.35 GB
so the per-chip batch is set by HBM: one sequence per 16 GB v5e chip, two per 32 GB v6e chip.

v5e-8 (v5e:2x4, 8 chips x 16 GB; ``model``/``mesh``/``batch``): fsdp 8, 8 sequences x 4096 tokens = 32.8 k tokens
    per update step (a GRPO minibatch; R1 runs accumulate several). state 28.5 / 8 = 3.56 GB + activations of one
    sequence ~6.6 GB ~= 10.2 GB per chip (<= 90% of 16 GB). 16 sequences (2 per chip) need ~17 GB: no fit.
v6e-8 (``v6e_8``): fsdp 8, 16 sequences x 4096 (2 per chip): 3.56 + 2 x 6.6 ~= 17 GB of 32 GB.
v5p-8 (``v5p_8``, 4 chips x 95 GB): fsdp 4, 32 sequences (8 per chip): 7.1 + 8 x 6.6 ~= 60 GB of 95 GB.
H200 (``h200``, 141 GB, no TPU compile: memory arithmetic only, ``tools/aot_compile.py --estimate``): one device,
    state 28.5 GB + 8 sequences x 6.6 GB ~= 81 GB (57%); a GPU mesh is the same ``{"fsdp": n}`` over n GPUs.
Roofline (model FLOPs 6 x 1.54 B x tokens): v5e-8 32.8 k tokens -> 3.0e14 / (8 x 197e12) = 0.19 s at 100% MFU.
"""

from __future__ import annotations

import types

from r1jax.config import ModelConfig, TrainConfig

from .r1 import r1_on, training_model

TOPOLOGY = "v5e:2x4"

HF_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 151646,
    "eos_token_id": 151643,
}


def model(**overrides) -> ModelConfig:
    """Training precision: f32 parameters, bf16 matmuls, remat per layer, Pallas flash attention."""
    return training_model(HF_CONFIG, **overrides)


def mesh() -> dict[str, int]:
    return {"fsdp": 8}


def batch() -> dict[str, int]:
    """One sequence of 4096 tokens per v5e chip (see the docstring)."""
    return {"batch": 8, "seq_len": 4096}


def decode() -> dict[str, int]:
    """Sampling: 64 sequences against an 8k-token GQA cache (28 x 2 x 2 x 128 x 2 B = 28.7 kB per token)."""
    return {"batch": 64, "cache_len": 8192}


def v6e_8():
    """v6e-8: two sequences per 32 GB chip."""
    return types.SimpleNamespace(
        TOPOLOGY="v6e:2x4",
        model=model,
        mesh=mesh,
        batch=lambda: {"batch": 16, "seq_len": 4096},
        decode=lambda: {"batch": 128, "cache_len": 8192},
    )


def v5p_8():
    """v5p-8 (4 chips, 95 GB each): eight sequences per chip."""
    return types.SimpleNamespace(
        TOPOLOGY="v5p:2x2x1",
        model=model,
        mesh=lambda: {"fsdp": 4},
        batch=lambda: {"batch": 32, "seq_len": 4096},
        decode=lambda: {"batch": 256, "cache_len": 16384},
    )


def h200():
    """One H200 (141 GB): memory arithmetic only (``--estimate``); on n GPUs use ``{"fsdp": n}``."""
    return types.SimpleNamespace(
        TOPOLOGY="h200:1",
        model=model,
        mesh=lambda: {"fsdp": 1},
        batch=lambda: {"batch": 8, "seq_len": 4096},
    )


def train() -> TrainConfig:
    """GRPO of the distilled model on this slice (chat template, ``<think>`` prefill): ``configs.r1.r1_on`` at
    ``mesh()`` / ``batch()``. ``r1jax train r1_distill_qwen_1_5b --out RUN --set init=HF_DIR``."""
    return r1_on(model(), mesh(), batch())
