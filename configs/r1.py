"""DeepSeek-R1 reasoning RL (DeepSeek-R1 section 2.2 and its RL hyperparameters).

Stated by the paper: G = 16 samples per question, 32 questions per step (32 x 16 = 512 samples), lr 3e-6,
KL coefficient beta = 0.001, clip ratio eps = 10, temperature 1.0 (0.7 in the second RL stage), max length 32768
tokens, one pass over the samples split into 16 mini-batches (512 / 16 = 32 samples per optimiser step), reference
model replaced by the policy every 400 steps, rewards accuracy + format with equal weight.

Simplified / not stated:
- eps = 10 means practically no clipping. ``GRPOConfig`` requires ``clip_eps_low < 1`` (the lower bound 1 - eps must
  stay positive), so the lower side uses 0.999 (ratio floor 0.001; any ratio > 0 is unclipped below with eps = 10).
- The optimiser's betas, weight decay, warmup and schedule are not given: DeepSeek-V3's AdamW values (0.9, 0.95,
  0.1), constant lr.
- Micro-batches: 32 samples per mini-batch x up to 32768 tokens; 8 sequences per micro-batch (4 accumulation steps)
  is a memory choice, not the paper's.
- ``steps``: the R1-Zero run reports about 10k steps (unverified); set it per run.
"""

from __future__ import annotations

import dataclasses

from r1jax.config import (
    DataConfig,
    GRPOConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
)
from r1jax.hf import config_from_hf

MAX_LEN = 32768  # tokens per completion
# LoRA presets: rank 16 on every attention and MLP projection, alpha = 2 x rank (TRL's and PEFT's usual GRPO setting)
LORA = LoraConfig(rank=16, alpha=32.0)
LORA_LR = 2e-5


def r1() -> TrainConfig:
    grpo = GRPOConfig(
        group_size=16,  # G
        clip_eps_low=0.999,  # see the module docstring: eps = 10 in the paper
        clip_eps_high=10.0,
        kl_coef=0.001,  # beta
        loss_agg="grpo",  # per-sequence token mean, then mean over sequences (DeepSeekMath)
        adv_scale="group",  # (r - mean) / std within the group
        max_completion_len=MAX_LEN,
        num_iterations=1,  # mu: one pass over the samples
        num_minibatches=16,  # 512 samples / 16 = 32 per optimiser step
        prompts_per_step=32,  # 32 x 16 = 512 samples per step
        ref_update_every=400,
    )
    return TrainConfig(
        grpo=grpo,
        sampling=SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=MAX_LEN),
        rewards=RewardConfig(functions=("accuracy", "format_strict"), weights=(1.0, 1.0)),
        optim=OptimConfig(lr=3e-6, warmup_steps=0, decay_steps=0, weight_decay=0.1, max_grad_norm=1.0),
        model=None,  # the checkpoint's config (DeepSeek-V3 base for R1-Zero)
        micro_batch_size=8,  # 32 per mini-batch / 8 = 4 accumulation steps
        steps=10_000,
    )


def training_model(hf_config: dict, **overrides) -> ModelConfig:
    """A HF ``config.json`` in training precision: f32 parameters, bf16 matmuls, remat per layer, the Pallas flash
    attention kernel (no [t, t] score matrix in HBM)."""
    return config_from_hf(hf_config).replace(
        **{"dtype": "bfloat16", "param_dtype": "float32", "remat": True, "attention_impl": "pallas", **overrides}
    )


def r1_on(
    model: ModelConfig,
    mesh: dict[str, int],
    batch: dict[str, int],
    *,
    template: str = "chat",
    moment_dtype: str = "float32",
    lora: LoraConfig | None = None,
) -> TrainConfig:
    """R1's recipe at the shapes one slice holds (the ``configs/`` TPU and GPU modules): ``batch["batch"]``
    sequences of ``batch["seq_len"]`` tokens per micro-batch, prompts of up to min(512, seq_len / 4) tokens and
    completions filling the rest. 512 samples per step as R1, in mini-batches of max(32, micro-batch) sequences
    (R1: 16 of 32; a slice that holds more sequences at once takes fewer, larger ones). Data: GSM8K through the
    model's chat template (R1-Distill's ``<think>`` prefill is detected) or ``template="r1_zero"`` for a base model;
    set ``init`` to the HF checkpoint and ``data`` to the task. ``lora``: adapters on a frozen base instead of full
    fine-tuning, at LORA_LR (LoRA's updates are low-rank and start from zero, so it takes a larger step than R1's
    full-parameter 3e-6)."""
    base = r1()
    prompt = min(512, batch["seq_len"] // 4)
    completion = batch["seq_len"] - prompt
    minibatch = max(32, batch["batch"])
    samples = base.grpo.samples_per_step
    return dataclasses.replace(
        base,
        grpo=dataclasses.replace(
            base.grpo,
            max_completion_len=completion,
            num_minibatches=max(1, samples // minibatch),
            prompts_per_step=max(samples, minibatch) // base.grpo.group_size,
        ),
        sampling=dataclasses.replace(base.sampling, max_new_tokens=completion),
        optim=dataclasses.replace(base.optim, moment_dtype=moment_dtype, **({"lr": LORA_LR} if lora else {})),
        lora=lora or LoraConfig(),
        model=model,
        micro_batch_size=batch["batch"],
        data=DataConfig(name="gsm8k", template=template, max_prompt_tokens=prompt),
        mesh=",".join(f"{axis}={n}" for axis, n in mesh.items()),
    )
