"""Tiny random HuggingFace reference models, built with transformers' own classes and ``save_pretrained``."""

from __future__ import annotations

import os

import numpy as np
import torch

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
MLA = dict(
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    first_k_dense_replace=1,
    q_lora_rank=16,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.8,
    "mscale_all_dim": 1.0,
}

CASES = {
    "deepseek_v3": dict(MLA, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5),
    "deepseek_v3_yarn_qnone": dict(MLA, q_lora_rank=None, n_group=4, topk_group=2, rope_parameters=YARN),
    "deepseek_v2_greedy": dict(MLA, topk_method="greedy", routed_scaling_factor=1.5),
    "deepseek_v2_group_limited": dict(
        MLA, topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=None
    ),
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "llama": dict(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen3": dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
}


def model_type(case: str) -> str:
    return next(t for t in ("deepseek_v3", "deepseek_v2", "qwen2", "qwen3", "llama") if case.startswith(t))


def build(case: str, out_dir: str, seed: int = 0) -> torch.nn.Module:
    """Save a random tiny model of ``case`` to ``out_dir`` (non-zero V3 correction bias) and return it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(BASE, **CASES[case])
    cfg = AutoConfig.for_model(model_type(case), **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))  # non-trivial norms
            elif "bias" in name:
                p.normal_(0, 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn_like(buf))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
