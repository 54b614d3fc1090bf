"""A CPU-sized model and GRPO run for tests: a 2-layer DeepSeek-V3-style model (MLA + sigmoid-routed MoE with a
shared expert) over a 64-token vocabulary; a step takes well under a second on a laptop CPU after compiling.

Not a preset of ``r1jax train``: no shipped tokenizer fits 64 tokens (the byte tokenizer has 259), so the tests feed
it token ids directly or a character tokenizer of their own. ``tiny_text`` is this model over bytes.

Batch: 4 prompts x G = 4 = 16 samples, one mini-batch, micro-batches of 8 (2 accumulation steps), completions of up
to 8 tokens. lr 1e-2 (a tiny random model needs a large one to move in a few steps), no weight decay.
"""

from __future__ import annotations

from r1jax.config import GRPOConfig, ModelConfig, OptimConfig, RewardConfig, SamplingConfig, TrainConfig

MAX_LEN = 8


def tiny_model() -> ModelConfig:
    # MLA: q-LoRA 16, kv latent 12, heads 4 x (nope 8 + rope 4) for q/k, v 6; cache 12 + 4 = 16 values/token/layer.
    # MoE: layer 0 dense (ffw 48); layer 1 has 4 routed experts (top-2, ffw 16) + 1 shared.
    return ModelConfig(
        arch="deepseek_v3",
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        ffw=48,
        q_lora_rank=16,
        kv_lora_rank=12,
        qk_nope_dim=8,
        qk_rope_dim=4,
        v_head_dim=6,
        n_experts=4,
        n_shared_experts=1,
        experts_per_token=2,
        moe_ffw=16,
        first_k_dense=1,
        scoring="sigmoid",
        topk_method="noaux_tc",
        norm_topk_prob=True,
        rope_interleave=True,
        eos_token_ids=(1,),
    )


def tiny() -> TrainConfig:
    grpo = GRPOConfig(
        group_size=4,
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        kl_coef=0.001,
        loss_agg="grpo",
        max_completion_len=MAX_LEN,
        prompts_per_step=4,  # 4 x 4 = 16 samples
        num_iterations=1,
        num_minibatches=1,
        ref_update_every=10,
    )
    return TrainConfig(
        grpo=grpo,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=MAX_LEN),
        rewards=RewardConfig(functions=("format_soft",), weights=(1.0,), num_workers=0),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, router_bias_gamma=0.001),
        model=tiny_model(),
        micro_batch_size=8,  # 16 / 8 = 2 accumulation steps
        steps=30,
    )
