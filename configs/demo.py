"""``make demo``: R1 in miniature on a 2-core CPU. Three stages, each a preset; ``r1jax.demo.run_demo`` chains them,
pointing ``data.name`` at the generated JSONL directories and ``init`` at the previous stage's run directory.

Task: two-digit addition (``What is 47 + 85?``) over UTF-8 bytes, answered R1-style as
``<think>7+5=12 4+8+1=13</think> <answer>132</answer>`` (column addition, carries written out): prompts are 16
bytes, completions at most 51 bytes plus EOS, so sequences fit 72 slots and completions 56 tokens.

Teacher (``demo_model``): a DeepSeek-V3-style model, d=128, 3 layers (layer 0 dense, layers 1-2 MoE), MLA with
q-LoRA 64, kv latent 32, 4 heads x (nope 16 + rope 16) for q/k and v 32; MoE of 4 routed experts (sigmoid router,
top-2, no-aux-loss bias balancing, ffw 128) plus one shared expert.
    embed + head      2 x 320 x 128                                            =  82 k
    MLA / layer       128x64 + 64x(4x32) + 128x(32+16) + 32x(4x(16+32)) + 4x32x128 = 8.2 + 8.2 + 6.1 + 6.1 + 16.4 = 45 k
    dense MLP (L0)    3 x 128 x 384                                            = 147 k
    MoE / layer       (4 routed + 1 shared) x 3 x 128 x 128 + router 4 x 128   = 246 k
    total             82 + 3 x 45 + 147 + 2 x 246                              ~= 0.86 M (0.61 M active per token)

Student (``demo_student_model``): a dense Qwen2-style model (GQA 4 heads / 2 kv heads, q/k/v bias), d=64, 2 layers,
ffw 192: 2 x 320 x 64 + 2 x (64 x (64 + 32 + 32) + 64 x 64 + 3 x 64 x 192) = 41 k + 2 x 53 k ~= 0.15 M.

Stages (step counts sized for the 15-minute budget; measured times land in runs/demo/summary.json):
- ``demo_sft`` (cold start): 400 steps of 32 traces, lr 3e-3 with warmup and cosine decay. Short of convergence,
  so the model is right on only part of the held-out problems and RL has room to improve it: greedy pass@1 was 19.5%
  after 250 steps (too weak for RL: 4.5% sampled accuracy at temperature 1, most groups all-wrong) and 88.5% after
  600 (little headroom left).
- ``demo_grpo``: 16 prompts x G = 8 = 128 samples per step, temperature 0.7 (the trained log-probs use the same
  temperature), lr 3e-5, rewards accuracy + format_strict (equal weight, as R1), clip 0.2 / 0.28, beta = 0.02,
  one on-policy update per step. At temperature 1.0 / lr 1e-4 / beta 0.001 the policy drifted (KL ~0.3) and greedy
  pass@1 fell. Rewards are scored in-process (``num_workers=0``): the demo's rewards are trusted numeric matches,
  and a worker process would compete with JAX for the two cores.
- ``demo_distill``: SFT of the student from scratch on the correct traces rejection-sampled from the GRPO model.
"""

from __future__ import annotations

from r1jax.config import (
    CheckpointConfig,
    DataConfig,
    GRPOConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
)

MAX_LEN = 56  # completion tokens (bytes + EOS)
SEQ_LEN = 72  # SFT row: prompt (16) + completion (<= 52), one trace per row
TEMPLATE = "{prompt}"  # the bare question: the trace format is learnt from the cold-start data
DATA_DIR = "runs/demo/data"  # {train,test}.jsonl written by r1jax.demo


def _byte_vocab(**fields) -> dict:
    return dict(vocab_size=320, bos_token_id=256, eos_token_ids=(257,), pad_token_id=258, **fields)


def demo_model() -> ModelConfig:
    return ModelConfig(
        arch="deepseek_v3",
        d_model=128,
        n_layers=3,
        n_heads=4,
        ffw=384,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_dim=16,
        qk_rope_dim=16,
        v_head_dim=32,
        n_experts=4,
        n_shared_experts=1,
        experts_per_token=2,
        moe_ffw=128,
        first_k_dense=1,
        scoring="sigmoid",
        topk_method="noaux_tc",
        norm_topk_prob=True,
        rope_interleave=True,
        max_position_embeddings=256,
        **_byte_vocab(),
    )


def demo_student_model() -> ModelConfig:
    return ModelConfig(
        arch="qwen2",
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffw=192,
        qkv_bias=True,
        max_position_embeddings=256,
        **_byte_vocab(),
    )


def _sft(model: ModelConfig | None, *, steps: int, lr: float, data: str) -> TrainConfig:
    return TrainConfig(
        stage="sft",
        model=model,
        steps=steps,
        sft_batch_size=32,
        optim=OptimConfig(lr=lr, warmup_steps=20, decay_steps=steps - 20, weight_decay=0.0),
        data=DataConfig(name=data, template=TEMPLATE, max_prompt_tokens=32, seq_len=SEQ_LEN),
        checkpoint=CheckpointConfig(every=steps, keep=1),
        # GRPO fields are unused by SFT but must agree with each other
        grpo=GRPOConfig(max_completion_len=MAX_LEN),
        sampling=SamplingConfig(max_new_tokens=MAX_LEN),
    )


def demo_sft() -> TrainConfig:
    return _sft(demo_model(), steps=400, lr=3e-3, data=DATA_DIR)


def demo_grpo() -> TrainConfig:
    steps = 100
    return TrainConfig(
        stage="grpo",
        init="runs/demo/sft",
        steps=steps,
        grpo=GRPOConfig(
            group_size=8,
            prompts_per_step=16,  # 16 x 8 = 128 samples per step
            clip_eps_low=0.2,
            clip_eps_high=0.28,
            kl_coef=0.02,
            loss_agg="grpo",
            max_completion_len=MAX_LEN,
        ),
        sampling=SamplingConfig(temperature=0.7, top_p=1.0, max_new_tokens=MAX_LEN),
        rewards=RewardConfig(functions=("accuracy", "format_strict"), weights=(1.0, 1.0), num_workers=0),
        optim=OptimConfig(lr=3e-5, weight_decay=0.0, max_grad_norm=1.0),  # 1e-4 drifts, 1e-3 collapses the policy
        data=DataConfig(name=DATA_DIR, template=TEMPLATE, max_prompt_tokens=32),
        checkpoint=CheckpointConfig(every=steps, keep=1),
    )


def demo_distill() -> TrainConfig:
    return _sft(demo_student_model(), steps=300, lr=3e-3, data="runs/demo/distill_data")
