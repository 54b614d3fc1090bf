"""DeepSeek-R1-Distill-Qwen-14B on one H200 with LoRA (memory arithmetic: ``tools/aot_compile.py
r1_distill_qwen_14b:h200_lora``).

Model: the HF ``config.json`` of deepseek-ai/DeepSeek-R1-Distill-Qwen-14B (Qwen2.5-14B: q/k/v bias, untied head).

Parameters (d=5120, V=152064, L=48, h=40, g=8, k=128, f=13824): embed + head 1.557 B; attention / layer 62.9 M;
MLP / layer 3 x 5120 x 13824 = 212.3 M; 48 layers 13.2 B; total ~= 14.8 B. Full fine-tuning (12-16 B per parameter
of state, 177-237 GB) does not fit one H200 (141 GB); LoRA keeps the base frozen in bf16 (29.5 GB).
"""

from __future__ import annotations

import types

from r1jax.config import ModelConfig

from .r1 import LORA, r1_on, training_model

HF_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 48,
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
    return training_model(HF_CONFIG, **overrides)


def h200_lora():
    """One H200: bf16 frozen base, rank-16 adapters, four 4096-token sequences per micro-batch."""
    return types.SimpleNamespace(
        TOPOLOGY="h200:1",
        model=model,
        mesh=lambda: {"fsdp": 1},
        batch=lambda: {"batch": 4, "seq_len": 4096},
        train=lambda: r1_on(model(), {"fsdp": 1}, {"batch": 4, "seq_len": 4096}, lora=LORA),
    )
