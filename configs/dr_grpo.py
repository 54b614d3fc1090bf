"""Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training: a critical perspective").

GRPO without its two biases: advantages are not divided by the group std (``adv_scale="none"``), and the loss is a
token sum divided by a constant, (sequences x max_completion_len), instead of per-sequence means
(``loss_agg="dr_grpo"``), so long wrong answers are not favoured.

Run settings follow the paper's Oat-Zero recipe as we read it (unverified): G = 8, 128 prompts per step
(128 x 8 = 1024 samples), max length 3000, beta = 0, clip 0.2, lr 1e-6, temperature 1.0; one optimiser step per
sampling step here (the paper's mini-batching is not reproduced).
"""

from __future__ import annotations

from r1jax.config import GRPOConfig, OptimConfig, RewardConfig, SamplingConfig, TrainConfig

MAX_LEN = 3000


def dr_grpo() -> TrainConfig:
    grpo = GRPOConfig(
        group_size=8,
        clip_eps_low=0.2,
        clip_eps_high=0.2,
        kl_coef=0.0,
        loss_agg="dr_grpo",  # sum / (1024 x 3000)
        adv_scale="none",
        max_completion_len=MAX_LEN,
        num_iterations=1,
        num_minibatches=1,
        prompts_per_step=128,
    )
    return TrainConfig(
        grpo=grpo,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=MAX_LEN),
        rewards=RewardConfig(functions=("accuracy",), weights=(1.0,)),
        optim=OptimConfig(lr=1e-6, weight_decay=0.0, max_grad_norm=1.0),
        micro_batch_size=32,  # 1024 / 32 = 32 accumulation steps
        steps=500,
    )
