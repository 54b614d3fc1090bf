"""DeepSeek-R1-Distill-Qwen-32B: GRPO with LoRA on TPU v6e-8 (default).

Model: the HF ``config.json`` of deepseek-ai/DeepSeek-R1-Distill-Qwen-32B (Qwen2.5-32B: q/k/v bias, untied head).

Parameters (d=5120, V=152064, L=64, h=40, g=8, k=128, f=27648):
    embed + lm_head    2 x 152064 x 5120                                    = 1.557 B
    attention / layer  5120 x (40 + 8 + 8) x 128 + biases + 40 x 128 x 5120 = 36.7 M + 26.2 M = 62.9 M
    MLP / layer        3 x 5120 x 27648                                     = 424.7 M
    64 layers          64 x (62.9 + 424.7) M + norms                         = 31.2 B
    total                                                                   ~= 32.8 B
Full fine-tuning needs 12-16 B per parameter of state (394-525 GB): more than a v6e-8 (256 GB) holds. With LoRA the
base is frozen in bf16 (65.5 GB, 8.2 GB per chip under fsdp 8); rank-16 adapters on every projection add 134 M
parameters (f32 weights, gradients and moments: 2.1 GB in all). Activations as for the 7B: one 4096-token sequence
per chip.
"""

from __future__ import annotations

import types

from r1jax.config import ModelConfig, TrainConfig

from .r1 import LORA, r1_on, training_model

TOPOLOGY = "v6e:2x4"

HF_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 151646,
    "eos_token_id": 151643,
}


def model(**overrides) -> ModelConfig:
    """Training precision: f32 adapters, bf16 matmuls and frozen base, remat per layer, the Pallas flash kernel."""
    return training_model(HF_CONFIG, **overrides)


def mesh() -> dict[str, int]:
    return {"fsdp": 8}


def batch() -> dict[str, int]:
    return {"batch": 8, "seq_len": 4096}


def decode() -> dict[str, int]:
    """Sampling: 32 sequences against an 8k-token GQA cache (64 x 2 x 8 x 128 x 2 B = 262 kB per token)."""
    return {"batch": 32, "cache_len": 8192}


def train() -> TrainConfig:
    """LoRA GRPO of the distilled model on this slice: ``configs.r1.r1_on`` with ``configs.r1.LORA``.
    ``r1jax train r1_distill_qwen_32b --out RUN --set init=HF_DIR``."""
    return r1_on(model(), mesh(), batch(), lora=LORA)


def v5p_8_lora():
    """The same run on v5p-8 (4 chips x 95 GB)."""
    return types.SimpleNamespace(
        TOPOLOGY="v5p:2x2x1",
        model=model,
        mesh=lambda: {"fsdp": 4},
        batch=batch,
        decode=decode,
        train=lambda: r1_on(model(), {"fsdp": 4}, batch(), lora=LORA),
    )
