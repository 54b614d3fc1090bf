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
- ``demo_sft`` (cold start): 350 steps of 32 traces, lr 3e-3 with warmup and cosine decay. Short of convergence,
  so the model is right on only part of the held-out problems and RL has room to improve it, yet strong enough that
  sampled groups are not all wrong (the step counts tried: docs/performance.md, "CLI, data and demo").
- ``demo_grpo``: 150 steps of 16 prompts x G = 8 = 128 samples, temperature 0.7 (the trained log-probs use the same
  temperature), lr 3e-5, rewards accuracy + format_strict (equal weight, as R1), clip 0.2 / 0.28, beta = 0.02,
  one on-policy update per step: a setting at which the policy does not drift away from the SFT model (the
  settings tried: docs/performance.md). Rewards are scored in-process (``num_workers=0``): the demo's rewards are
  trusted numeric matches, and a worker process would compete with JAX for the two cores.
- ``demo_distill``: SFT of the student from scratch on the correct traces rejection-sampled from the GRPO model.
"""

from __future__ import annotations

import dataclasses

from r1jax.config import (
    CheckpointConfig,
    DataConfig,
    GRPOConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    SamplingConfig,
    ToolConfig,
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


def _sft(
    model: ModelConfig | None,
    *,
    steps: int,
    lr: float,
    data: str,
    seq_len: int = SEQ_LEN,
    max_len: int = MAX_LEN,
    max_prompt_tokens: int = 32,
    tools: ToolConfig | None = None,
) -> TrainConfig:
    return TrainConfig(
        stage="sft",
        model=model,
        steps=steps,
        sft_batch_size=32,
        optim=OptimConfig(lr=lr, warmup_steps=20, decay_steps=steps - 20, weight_decay=0.0),
        data=DataConfig(name=data, template=TEMPLATE, max_prompt_tokens=max_prompt_tokens, seq_len=seq_len),
        checkpoint=CheckpointConfig(every=steps, keep=1),
        tools=tools or ToolConfig(),
        # GRPO fields are unused by SFT but must agree with each other
        grpo=GRPOConfig(max_completion_len=max_len),
        sampling=SamplingConfig(max_new_tokens=max_len),
    )


def demo_sft() -> TrainConfig:
    return _sft(demo_model(), steps=350, lr=3e-3, data=DATA_DIR)


def demo_grpo() -> TrainConfig:
    steps = 150
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
        optim=OptimConfig(lr=3e-5, weight_decay=0.0, max_grad_norm=1.0),  # larger ones drift (docs/performance.md)
        data=DataConfig(name=DATA_DIR, template=TEMPLATE, max_prompt_tokens=32),
        checkpoint=CheckpointConfig(every=steps, keep=1),
    )


def demo_distill() -> TrainConfig:
    return _sft(demo_student_model(), steps=300, lr=3e-3, data="runs/demo/distill_data")


# --- search in the loop (``r1jax demo --task search``, ``r1jax.search_demo``) -----------------------------------------
# Two-hop questions over a generated corpus (``r1jax.data.builders.search_qa``): prompts <= 45 bytes; a cold-start
# trace is <= 271 bytes + EOS, two <information> results of one document (~50 bytes each) included, so SFT rows hold
# 45 + 272 - 1 <= 320 slots and a trajectory (model + result tokens) fits 288.
SEARCH_DATA_DIR = "runs/demo_search/data"
SEARCH_SEQ_LEN = 320
SEARCH_MAX_LEN = 288
SEARCH_PROMPT_TOKENS = 48


def demo_search_model() -> ModelConfig:
    return demo_model().replace(max_position_embeddings=SEARCH_PROMPT_TOKENS + SEARCH_MAX_LEN)


def search_tools(corpus: str = f"{SEARCH_DATA_DIR}/corpus.jsonl") -> ToolConfig:
    """BM25 search over the corpus, one document per query (a result block is ~50 tokens), up to 3 calls."""
    return ToolConfig(tools=("search",), corpus=corpus, max_turns=3, top_k=1, max_result_tokens=96, num_threads=4)


def demo_search_sft() -> TrainConfig:
    """Cold start on tool-use traces, 800 steps of 32 examples packed into rows (``sft_pack``: ~22 rows of 320 a
    step, padded to 24 or 32): 1.8 epochs of the 4,800 training questions' traces and their turn prefixes
    (``search_demo.turn_prefixes``: the trace cut after each call, so each query is a target in a short row too).
    The names are distinct: the model must learn to copy them into its queries, it cannot memorise them, and
    copying an unseen name is learnt only after some 20,000 examples of it (README, the search miniature). The
    ``<information>`` blocks are context, masked out of the loss (``tools``)."""
    cfg = _sft(
        demo_search_model(), steps=800, lr=3e-3, data="runs/demo_search/sft_data", seq_len=SEARCH_SEQ_LEN,
        max_len=SEARCH_MAX_LEN, max_prompt_tokens=SEARCH_PROMPT_TOKENS, tools=search_tools(),
    )  # fmt: skip
    return dataclasses.replace(cfg, sft_batch_size=32, sft_pack=8)


def demo_search_grpo() -> TrainConfig:
    """GRPO with the search tool in the loop: 8 prompts x G = 8 per step, the main demo's clip and KL; lr 1e-4 (the
    main demo's 3e-5 moves a policy little in 20 steps)."""
    steps = 20
    return TrainConfig(
        stage="grpo",
        init="runs/demo_search/sft",
        steps=steps,
        grpo=GRPOConfig(
            group_size=8,
            prompts_per_step=8,
            clip_eps_low=0.2,
            clip_eps_high=0.28,
            kl_coef=0.02,
            loss_agg="grpo",
            max_completion_len=SEARCH_MAX_LEN,
        ),  # fmt: skip
        sampling=SamplingConfig(temperature=0.7, top_p=1.0, max_new_tokens=SEARCH_MAX_LEN),
        rewards=RewardConfig(functions=("accuracy", "format_strict"), weights=(1.0, 1.0), num_workers=0),
        optim=OptimConfig(lr=1e-4, weight_decay=0.0, max_grad_norm=1.0),
        data=DataConfig(name=SEARCH_DATA_DIR, template=TEMPLATE, max_prompt_tokens=SEARCH_PROMPT_TOKENS),
        checkpoint=CheckpointConfig(every=steps, keep=1),
        tools=search_tools(),
    )
