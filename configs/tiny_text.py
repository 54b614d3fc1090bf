"""The text pipeline at CPU scale: a random 2-layer DeepSeek-V3-style model over UTF-8 bytes (the byte tokenizer,
259 tokens, padded to a 320-row vocabulary) trained with GRPO on generated countdown problems with the real
rule-based rewards. It learns nothing useful in a few steps; it exercises every part of a real run (data, template,
sampling, reward pool, update, checkpoints, metrics) in seconds.

Batch: 2 prompts x G = 4 = 8 samples per step, one mini-batch of 8 in micro-batches of 4 (2 accumulation steps),
completions of up to 16 bytes; the R1-Zero template makes prompts ~450 bytes (max_prompt_tokens 768).
"""

from __future__ import annotations

import dataclasses

from r1jax.config import (
    CheckpointConfig,
    DataConfig,
    GRPOConfig,
    OptimConfig,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
)

from .tiny import tiny_model

MAX_LEN = 16


def tiny_text() -> TrainConfig:
    model = dataclasses.replace(tiny_model(), vocab_size=320, eos_token_ids=(257,), bos_token_id=256, pad_token_id=258)
    return TrainConfig(
        grpo=GRPOConfig(
            group_size=4,
            clip_eps_low=0.2,
            clip_eps_high=0.28,
            kl_coef=0.001,
            loss_agg="grpo",
            max_completion_len=MAX_LEN,
            prompts_per_step=2,
            num_iterations=1,
            num_minibatches=1,
        ),
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=MAX_LEN),
        rewards=RewardConfig(functions=("countdown", "format_soft"), weights=(1.0, 0.5), num_workers=1),
        optim=OptimConfig(lr=1e-3, weight_decay=0.0),
        model=model,
        micro_batch_size=4,
        steps=6,
        data=DataConfig(name="countdown", template="r1_zero", max_prompt_tokens=768),
        checkpoint=CheckpointConfig(every=2, keep=2),
    )
