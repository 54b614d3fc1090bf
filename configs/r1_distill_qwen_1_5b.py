"""DeepSeek-R1-Distill-Qwen-1.5B: GRPO on a TPU v5p-8 slice (v5p:2x2x1, 4 chips, 95 GiB HBM each).

Model: the HF ``config.json`` of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (Qwen2: q/k/v bias, untied head), read
through ``r1jax.hf.config_from_hf``.

Parameters (d=1536, V=151936, L=28, h=12, g=2, k=128, f=8960):
    embed + lm_head    2 x 151936 x 1536                                   = 466.7 M
    attention / layer  1536 x (12 + 2 + 2) x 128 + biases + 12 x 128 x 1536 = 3.15 M + 2.36 M = 5.51 M
    MLP / layer        3 x 1536 x 8960                                     = 41.3 M
    28 layers          28 x (5.51 + 41.29) M + norms                        = 1.31 B
    total                                                                  ~= 1.78 B
Mesh (4 chips): fsdp 4 — params, grads and AdamW state split 4 ways:
    f32 params 7.1 GB + grads 7.1 GB + moments 14.2 GB = 28.5 GB / 4 = 7.1 GB per chip.
Batch per step: 32 sequences (2 prompts x G=16 per minibatch) x 4096 tokens = 131 k tokens,
    8 sequences per chip; remat saves 8 x 4096 x 1536 x 2 B = 101 MB per layer -> 2.8 GB; logits [8, 4096, 151936]
    f32 = 19.9 GB per chip, twice with log-softmax (the largest temps; at 64 sequences the step needs 98 GB: no fit).
Roofline: 6 x 1.54 B active (no embedding gather) x 131 k = 1.2e15 FLOPs / (4 x 459e12) = 0.66 s at 100% MFU.
"""

from __future__ import annotations

from r1jax.config import ModelConfig
from r1jax.hf import config_from_hf

TOPOLOGY = "v5p:2x2x1"

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
    return config_from_hf(HF_CONFIG).replace(
        **{"dtype": "bfloat16", "param_dtype": "float32", "remat": True, **overrides}
    )


def mesh() -> dict[str, int]:
    return {"fsdp": 4}


def batch() -> dict[str, int]:
    return {"batch": 32, "seq_len": 4096}


def decode() -> dict[str, int]:
    """Sampling: 256 sequences against a 16k-token GQA cache (28 x 2 x 2 x 128 x 2 B = 28.7 kB per token)."""
    return {"batch": 256, "cache_len": 16384}
