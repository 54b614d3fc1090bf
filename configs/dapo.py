"""DAPO (Yu et al. 2025, "DAPO: an open-source LLM reinforcement learning system at scale").

- Clip-higher: eps_low 0.2, eps_high 0.28; no KL term (beta = 0, so no reference model is kept).
- Token-level loss: token mean over the whole batch (``loss_agg="dapo"``).
- Dynamic sampling: groups whose rewards are all equal are dropped. Pass more prompts than ``prompts_per_step`` to
  ``grpo_step`` (e.g. 3x, the paper samples until the batch is full): it trains on the first 512 informative groups.
- Overlong: completions truncated at the length limit are masked out of the loss (``overlong_filter``), and the soft
  overlong punishment (``overlong`` reward) ramps from 0 to -1 over the last 4096 tokens before 20480.
- G = 16, 512 prompts per step (512 x 16 = 8192 samples), mini-batches of 512 samples: 8192 / 512 = 16 optimiser
  steps per sampling step; lr 1e-6 with 10 warmup steps; temperature 1.0, top-p 1.0.
- Simplified: DAPO's accuracy reward is +1 / -1; here ``accuracy`` is 1 / 0 (the same advantages after group
  standardisation).
"""

from __future__ import annotations

from r1jax.config import GRPOConfig, OptimConfig, RewardConfig, SamplingConfig, TrainConfig

MAX_LEN = 20480  # 16384 expected + 4096 soft-punishment buffer
BUFFER = 4096


def dapo() -> TrainConfig:
    grpo = GRPOConfig(
        group_size=16,
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        kl_coef=0.0,
        loss_agg="dapo",
        adv_scale="group",
        max_completion_len=MAX_LEN,
        dynamic_sampling=True,
        overlong_filter=True,
        num_iterations=1,
        num_minibatches=16,  # 8192 samples / 16 = 512 per optimiser step
        prompts_per_step=512,
        ref_update_every=0,
    )
    return TrainConfig(
        grpo=grpo,
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=MAX_LEN),
        rewards=RewardConfig(
            functions=("accuracy", "overlong"),
            weights=(1.0, 1.0),
            overlong_max_tokens=MAX_LEN,
            overlong_buffer_tokens=BUFFER,
        ),
        optim=OptimConfig(lr=1e-6, warmup_steps=10, decay_steps=0, weight_decay=0.1, max_grad_norm=1.0),
        micro_batch_size=16,  # 512 / 16 = 32 accumulation steps per optimiser step
        steps=1000,
    )
