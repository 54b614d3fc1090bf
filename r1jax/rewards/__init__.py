"""Rule-based rewards for reasoning RL (DeepSeek-R1 section 2.2.2: accuracy + format, no neural reward model).

Functions (``fn(completion, meta, cfg) -> float`` or a ``Scored`` value with counts, registered by name in
``REGISTRY``):

========================  ===========  ==========================================================================
name                      range        what
========================  ===========  ==========================================================================
``accuracy``              [0, 1]       dispatch on ``meta["task"]``: math (default), gsm8k, countdown, exact, code
``math_accuracy``         [0, 1]       math-verify equivalence with ``meta["answer"]``
``gsm8k_accuracy``        [0, 1]       exact numeric match with ``meta["answer"]``
``countdown``             [0, 1]       TinyZero Countdown: reach ``meta["target"]`` with ``meta["numbers"]``
``format_strict``         {0, 1}       exactly ``<think> R </think> <answer> A </answer>``
``format_soft``           {0, 1}       each tag once, in order, non-blank answer
``tag_count``             [0, 1]       0.25 per correctly counted tag, 0 if any tag repeats
``language``              [0, 1]       share of target-language words in the reasoning
``overlong``              [-1, 0]      DAPO soft overlong punishment from ``meta["num_tokens"]``
``code``                  [0, 1]       share of ``meta``'s tests the program passes, run in the bwrap sandbox
========================  ===========  ==========================================================================

``score(completions, metadata, cfg)`` combines them with ``RewardConfig`` weights, evaluating every (function,
completion) pair in a worker process with a timeout and memory bound. This package does not import JAX, so worker
processes stay small.
"""

from r1jax.rewards.accuracy import accuracy, gsm8k_accuracy, math_accuracy
from r1jax.rewards.code import code_reward, extract_program
from r1jax.rewards.countdown import ExpressionError, countdown_reward, evaluate
from r1jax.rewards.extract import extract_answer, find_boxed, parse_number, split_reasoning
from r1jax.rewards.format import format_soft, format_strict, tag_count
from r1jax.rewards.language import language_consistency, target_word_share
from r1jax.rewards.length import overlong_penalty
from r1jax.rewards.outcome import Scored
from r1jax.rewards.pool import RewardPool
from r1jax.rewards.registry import REGISTRY, RewardSpec, register
from r1jax.rewards.scorer import Scorer, close_shared_pools, sanitize, score

__all__ = [
    "REGISTRY",
    "ExpressionError",
    "RewardPool",
    "RewardSpec",
    "Scored",
    "Scorer",
    "accuracy",
    "close_shared_pools",
    "code_reward",
    "countdown_reward",
    "evaluate",
    "extract_answer",
    "extract_program",
    "find_boxed",
    "format_soft",
    "format_strict",
    "gsm8k_accuracy",
    "language_consistency",
    "math_accuracy",
    "overlong_penalty",
    "parse_number",
    "register",
    "sanitize",
    "score",
    "split_reasoning",
    "tag_count",
    "target_word_share",
]
