"""Run presets: each a function returning a frozen ``r1jax.config.TrainConfig``; the arithmetic is in comments.

``r1``: DeepSeek-R1's reasoning RL. ``dapo``: DAPO (clip-higher, token mean, dynamic sampling, overlong handling,
no KL). ``dr_grpo``: Dr. GRPO (no std division, constant normaliser). ``tiny_text`` and ``demo_*``: CPU-sized runs
from scratch. ``smollm2_*``: GRPO on the real SmolLM2-135M-Instruct on a CPU. ``r1_distill_*`` and ``v3_671b``: R1's
recipe at the shapes a TPU slice holds. ``tiny()`` / ``tiny_model()`` (a 64-token model for tests) are importable
here but not a preset: they run only with a tokenizer that fits 64 tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from r1jax.config import TrainConfig

from . import r1_distill_qwen_1_5b, r1_distill_qwen_7b, r1_distill_qwen_32b, v3_671b
from .dapo import dapo
from .demo import demo_distill, demo_grpo, demo_search_grpo, demo_search_sft, demo_sft
from .dr_grpo import dr_grpo
from .r1 import r1
from .smollm2 import smollm2_arith, smollm2_gsm8k, smollm2_search_grpo, smollm2_search_sft
from .tiny import tiny, tiny_model
from .tiny_text import tiny_text

PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "r1": r1,
    "dapo": dapo,
    "dr_grpo": dr_grpo,
    "tiny_text": tiny_text,
    "demo_sft": demo_sft,
    "demo_grpo": demo_grpo,
    "demo_distill": demo_distill,
    "demo_search_sft": demo_search_sft,
    "demo_search_grpo": demo_search_grpo,
    "smollm2_arith": smollm2_arith,
    "smollm2_gsm8k": smollm2_gsm8k,
    "smollm2_search_sft": smollm2_search_sft,  # the search miniature on SmolLM2 (r1jax demo --task search)
    "smollm2_search_grpo": smollm2_search_grpo,
    "r1_distill_qwen_1_5b": r1_distill_qwen_1_5b.train,  # TPU v5e-8 (the module has v6e/v5p/H200 variants)
    "r1_distill_qwen_7b": r1_distill_qwen_7b.train,  # TPU v6e-8
    "r1_distill_qwen_7b:v5e_8_lora": lambda: r1_distill_qwen_7b.v5e_8_lora().train(),  # LoRA on TPU v5e-8
    "r1_distill_qwen_32b": r1_distill_qwen_32b.train,  # LoRA on TPU v6e-8
    "v3_671b": v3_671b.train,  # R1-Zero on TPU v5p-2048
}


def get(name: str) -> TrainConfig:
    """The preset called ``name``."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


__all__ = ["PRESETS", "dapo", "dr_grpo", "get", "r1", "tiny", "tiny_model"]
