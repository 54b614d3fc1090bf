"""DeepSeek-R1-Distill-Qwen-7B: GRPO policy update on TPU v6e-8 (default), v5e-8 and one H200.

Model: the HF ``config.json`` of deepseek-ai/DeepSeek-R1-Distill-Qwen-7B (Qwen2: q/k/v bias, untied head), read
through ``r1jax.hf.config_from_hf``.

Parameters (d=3584, V=152064, L=28, h=28, g=4, k=128, f=18944):
    embed + lm_head    2 x 152064 x 3584                                   = 1.090 B
    attention / layer  3584 x (28 + 4 + 4) x 128 + biases + 28 x 128 x 3584 = 16.52 M + 12.85 M = 29.4 M
    MLP / layer        3 x 3584 x 18944                                    = 203.7 M
    28 layers          28 x (29.4 + 203.7) M + norms                        = 6.53 B
    total                                                                  ~= 7.62 B; 7.07 B active in matmuls
State: f32 params + f32 grads + f32 AdamW mu, nu = 16 B/param = 121.8 GB; with bf16 moments 12 B/param = 91.4 GB;
    all bf16 (params, grads, moments) 8 B/param = 60.9 GB.

Activations per sequence of T tokens on the chip that holds it (XLA attention, remat per layer):
    logits [T, 152064] bf16 + f32 log-softmax + its f32 gradient   = T x 1.52 MB  (6.2 GB at T = 4096)
    attention scores + probabilities of one layer, 28 heads, f32   = T^2 x 224 B  (3.8 GB at 4096)
    remat residuals 28 x T x 3584 x 2 B                            = T x 0.2 MB   (0.8 GB at 4096)

v6e-8 (v6e:2x4, 8 x 32 GB; ``model``/``mesh``/``batch``): fsdp 8, one sequence of 4096 tokens per chip (~11 GB),
    8 sequences x 4096 = 32.8 k tokens per update step. With f32 moments (state 121.8 / 8 = 15.2 GB) the compiled
    step needs 28.8 GB per chip, 90.0% of HBM: over the line. bf16 moments (f32 master weights and gradients):
    91.4 / 8 = 11.4 GB of state; compiled: 20.0 GB per chip (63%).
v5e-8 (``v5e_8``, 8 x 16 GB): f32 state alone is 15.2 GB per chip: no fit. bf16 params, grads and moments
    (60.9 / 8 = 7.6 GB) + one sequence of 2048 tokens (3.1 + 0.9 + 0.4 GB) ~= 12 GB. bf16 master weights lose
    updates smaller than 2^-8 of a weight (lr 1e-6 GRPO steps): use stochastic rounding, or a v5e-16/v6e-8 slice.
H200 (``h200``, 141 GB, one GPU, memory arithmetic only: ``tools/aot_compile.py r1_distill_qwen_7b:h200``):
    f32 params and grads + bf16 moments 91.4 GB + 2 sequences x 4096 x ~11 GB ~= 113 GB (80%). f32 moments
    (121.8 GB) leave no room for a sequence. GPU mesh on n H200s: ``{"fsdp": n}``, f32 moments from n = 2.
Roofline (model FLOPs 6 x 7.07 B x tokens): v6e-8, 32.8 k tokens -> 1.39e15 / (8 x 918e12) = 0.19 s at 100% MFU.
"""

from __future__ import annotations

import types

from r1jax.config import ModelConfig, TrainConfig
from r1jax.hf import config_from_hf

from .r1 import r1_on

TOPOLOGY = "v6e:2x4"
MOMENT_DTYPE = "bfloat16"  # AdamW mu and nu; parameters and gradients stay f32

HF_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 151646,
    "eos_token_id": 151643,
}


def model(**overrides) -> ModelConfig:
    """Training precision: f32 parameters, bf16 matmuls, remat per layer."""
    return config_from_hf(HF_CONFIG).replace(
        **{"dtype": "bfloat16", "param_dtype": "float32", "remat": True, **overrides}
    )


def mesh() -> dict[str, int]:
    return {"fsdp": 8}


def batch() -> dict[str, int]:
    """One sequence of 4096 tokens per v6e chip."""
    return {"batch": 8, "seq_len": 4096}


def decode() -> dict[str, int]:
    """Sampling: 64 sequences against an 8k-token GQA cache (28 x 2 x 4 x 128 x 2 B = 57 kB per token)."""
    return {"batch": 64, "cache_len": 8192}


def v5e_8():
    """v5e-8: bf16 parameters and moments, one 2048-token sequence per 16 GB chip (see the docstring)."""
    return types.SimpleNamespace(
        TOPOLOGY="v5e:2x4",
        MOMENT_DTYPE="bfloat16",
        model=lambda **kw: model(**{"param_dtype": "bfloat16", **kw}),
        mesh=mesh,
        batch=lambda: {"batch": 8, "seq_len": 2048},
        decode=lambda: {"batch": 32, "cache_len": 8192},
    )


def h200():
    """One H200: f32 params, bf16 AdamW moments, two sequences (memory arithmetic only)."""
    return types.SimpleNamespace(
        TOPOLOGY="h200:1",
        MOMENT_DTYPE="bfloat16",
        model=model,
        mesh=lambda: {"fsdp": 1},
        batch=lambda: {"batch": 2, "seq_len": 4096},
    )


def train() -> TrainConfig:
    """GRPO of the distilled model on this slice (chat template, ``<think>`` prefill): ``configs.r1.r1_on`` at
    ``mesh()`` / ``batch()``. ``r1jax train r1_distill_qwen_7b --out RUN --set init=HF_DIR``."""
    return r1_on(model(), mesh(), batch(), moment_dtype=MOMENT_DTYPE)
