"""DeepSeek-R1-Distill-Qwen-7B: GRPO policy update on TPU v6e-8 (default) and one H200.

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

v6e-8 (v6e:2x4, 8 x 32 GB; ``model``/``mesh``/``batch``): fsdp 8, one sequence per chip, 8 sequences per
    micro-batch, 4 micro-batches per 32-sequence GRPO mini-batch. State with bf16 moments (f32 master weights and
    gradients): 91.4 / 8 = 11.4 GB per chip; the gradient accumulator adds 3.8 GB. The compiled policy update
    (``tools/aot_compile.py r1_distill_qwen_7b``: ``grpo.update_minibatch``) needs 24.5 GB per chip (77% of HBM) at
    4096 tokens (512 prompt + 3584 completion) with the Pallas flash kernel (no score matrices), est. 46.9% MFU.
    With XLA attention 4096 tokens do not fit (the score matrices above; figures in docs/performance.md).
v5e-8 (8 x 16 GB) does not hold the 7B update: even with bf16 parameters, gradients and moments the compiled update
    (XLA attention) needed 14.8-16.1 GB per chip (92-100%) for 1-2k-token sequences. Use v6e-8, v5p-8 or a v5e-16.
H200 (``h200``, 141 GB, one GPU, memory arithmetic only: ``tools/aot_compile.py r1_distill_qwen_7b:h200``):
    f32 params and grads + bf16 moments 91.4 GB + 2 sequences x 4096 x ~11 GB ~= 113 GB (80%). f32 moments
    (121.8 GB) leave no room for a sequence. GPU mesh on n H200s: ``{"fsdp": n}``, f32 moments from n = 2.
Roofline (model FLOPs 6 x 7.07 B x tokens): v6e-8, 4 x 32.8 k tokens -> 5.6e15 / (8 x 918e12) = 0.76 s at 100% MFU.
"""

from __future__ import annotations

import types

from r1jax.config import ModelConfig, TrainConfig

from .r1 import LORA, r1_on, training_model

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
    """Training precision: f32 parameters, bf16 matmuls, remat per layer, Pallas flash attention."""
    return training_model(HF_CONFIG, **overrides)


def mesh() -> dict[str, int]:
    return {"fsdp": 8}


def batch() -> dict[str, int]:
    """One sequence of 4096 tokens per v6e chip (77% of HBM with the flash kernel, see the docstring)."""
    return {"batch": 8, "seq_len": 4096}


def decode() -> dict[str, int]:
    """Sampling: 64 sequences against an 8k-token GQA cache (28 x 2 x 4 x 128 x 2 B = 57 kB per token)."""
    return {"batch": 64, "cache_len": 8192}


def h200():
    """One H200: f32 params, bf16 AdamW moments, two sequences (memory arithmetic only)."""
    return types.SimpleNamespace(
        TOPOLOGY="h200:1",
        MOMENT_DTYPE="bfloat16",
        model=model,
        mesh=lambda: {"fsdp": 1},
        batch=lambda: {"batch": 2, "seq_len": 4096},
    )


def v5e_8_lora():
    """LoRA on v5e-8 (8 x 16 GB), where the full update does not fit: the frozen base in bf16 (15.2 GB / 8 chips),
    rank-16 adapters on every projection (40 M parameters, f32, with f32 moments), one 4096-token sequence per chip
    (the compiled figures: README's TPU table)."""
    return types.SimpleNamespace(
        TOPOLOGY="v5e:2x4",
        model=model,
        mesh=mesh,
        batch=batch,
        decode=decode,
        train=lambda: r1_on(model(), mesh(), batch(), lora=LORA),
    )


def h200_lora():
    """LoRA on one H200 (memory arithmetic only): the bf16 base, rank-16 adapters, eight 4096-token sequences."""
    return types.SimpleNamespace(
        TOPOLOGY="h200:1",
        model=model,
        mesh=lambda: {"fsdp": 1},
        batch=lambda: {"batch": 8, "seq_len": 4096},
        train=lambda: r1_on(model(), {"fsdp": 1}, {"batch": 8, "seq_len": 4096}, lora=LORA),
    )


def train() -> TrainConfig:
    """GRPO of the distilled model on this slice (chat template, ``<think>`` prefill): ``configs.r1.r1_on`` at
    ``mesh()`` / ``batch()``. ``r1jax train r1_distill_qwen_7b --out RUN --set init=HF_DIR``."""
    return r1_on(model(), mesh(), batch(), moment_dtype=MOMENT_DTYPE)
