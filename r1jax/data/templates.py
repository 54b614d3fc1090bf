"""Prompt templates: the R1-Zero template for base models, the checkpoint's own chat template, task prompt texts.

``build_prompt(example, tokenizer, template, system) -> (text, think_prefilled)`` renders one example:

============  ====================================================================================================
template      text
============  ====================================================================================================
``r1_zero``   DeepSeek-R1-Zero's template (R1 paper, table 1) around the example's prompt; ``system`` replaces
              its opening paragraph when given
``chat``      ``tokenizer.apply_chat_template`` of ``[system?] + messages`` with the generation prompt
``plain``     the prompt itself
other         a format string with a ``{prompt}`` field
============  ====================================================================================================

``think_prefilled`` is True when the rendered generation prompt already opens the reasoning block (R1 and R1-Distill
templates end with ``<think>\\n``): completions then start inside ``<think>``, and the format / accuracy rewards must
be told (``RewardConfig.think_prefilled``) or a strict format reward always scores 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

R1_ZERO_PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)
R1_ZERO = R1_ZERO_PREAMBLE + " User: {prompt}. Assistant:"

TEMPLATES = ("r1_zero", "chat", "plain")


def countdown_prompt(numbers: Sequence[int], target: int) -> str:
    """TinyZero's Countdown task text (without its base-model wrapper, which ``r1_zero`` / ``chat`` provide)."""
    nums = "[" + ", ".join(str(int(n)) for n in numbers) + "]"
    return (
        f"Using the numbers {nums}, create an equation that equals {int(target)}. "
        "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. "
        "Show your work in <think> </think> tags. And return the final answer in <answer> </answer> tags, "
        "for example <answer> (1 + 2) / 3 </answer>"
    )


def arithmetic_prompt(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}? Give the final answer as a single number."


def prompt_of(example: Mapping[str, Any]) -> str:
    """The user's request: ``prompt``, else the content of the last user message in ``messages``."""
    if example.get("prompt"):
        return str(example["prompt"])
    for m in reversed(example.get("messages") or []):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    raise ValueError("example has neither a 'prompt' nor a user message")


def chat_messages(example: Mapping[str, Any], system: str | None = None) -> list[dict]:
    """Messages to render: the example's ``messages`` (a trailing assistant turn is dropped: it is what the model
    is asked to produce) or one user turn with ``prompt``; ``system`` replaces any system message."""
    if example.get("messages"):
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in example["messages"]]
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
    else:
        msgs = [{"role": "user", "content": prompt_of(example)}]
    if system is not None:
        msgs = [{"role": "system", "content": system}] + [m for m in msgs if m["role"] != "system"]
    return msgs


def is_think_prefilled(text: str) -> bool:
    """Does the rendered prompt end inside an opened ``<think>`` block (R1 / R1-Distill generation prompts)?"""
    return text.rstrip().endswith("<think>")


def build_prompt(
    example: Mapping[str, Any], tokenizer: Any = None, template: str = "r1_zero", system: str | None = None
) -> tuple[str, bool]:
    """``(prompt text, think_prefilled)`` for one example (see the module docstring for ``template``).

    ``tokenizer`` is needed only for ``chat`` (anything with ``apply_chat_template(messages,
    add_generation_prompt=True)``, e.g. ``r1jax.data.tokenizer.Tokenizer``).
    """
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template 'chat' needs a tokenizer with a chat template")
        text = tokenizer.apply_chat_template(chat_messages(example, system), add_generation_prompt=True)
    elif template == "r1_zero":
        head = R1_ZERO_PREAMBLE if system is None else system
        text = f"{head} User: {prompt_of(example)}. Assistant:"
    elif template == "plain":
        text = prompt_of(example) if system is None else f"{system}\n\n{prompt_of(example)}"
    elif "{prompt}" in template:
        text = template.replace("{prompt}", prompt_of(example))
        if system is not None:
            text = f"{system}\n\n{text}"
    else:
        raise ValueError(
            f"unknown prompt template {template!r}: use one of {', '.join(TEMPLATES)} or a '{{prompt}}' string"
        )
    return text, is_think_prefilled(text)
