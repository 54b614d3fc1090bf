"""Countdown (TinyZero): reach ``target`` with each of 3-4 ``numbers`` (1-100) exactly once using + - * /.

Problems are generated solvable: draw the numbers, combine them pairwise at random (keeping every intermediate a
positive integer, divisions exact) until one value is left, and keep the problem when that value lies in
``[1, max_target]``. The combining expression is stored as ``solution``; it scores 1.0 under
``r1jax.rewards.countdown_reward``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from r1jax.data.builders.base import Builder, info, int_list, text_features
from r1jax.data.builders.generated import check_options, config_name, fill_splits
from r1jax.data.templates import countdown_prompt
from r1jax.errors import DataError

OPS = ("+", "-", "*", "/")


@dataclasses.dataclass(eq=False)
class CountdownConfig(tfds.core.BuilderConfig):
    OPTIONS = ("seed", "train_size", "test_size", "min_numbers", "max_numbers", "max_number", "max_target")

    seed: int = 0
    train_size: int = 50_000
    test_size: int = 1_000
    min_numbers: int = 3
    max_numbers: int = 4
    max_number: int = 100
    max_target: int = 100

    @classmethod
    def make(cls, **options) -> CountdownConfig:
        check_options("countdown", options, cls.OPTIONS)
        cfg = cls(name="tmp", **options)
        if not 2 <= cfg.min_numbers <= cfg.max_numbers or cfg.max_number < 1 or cfg.max_target < 1:
            raise DataError(f"countdown: bad ranges {options}")
        cfg.name = config_name(cfg.seed, cfg)
        cfg.description = f"Countdown, {cfg.min_numbers}-{cfg.max_numbers} numbers, seed {cfg.seed}"
        return cfg


def random_solution(rng: np.random.Generator, numbers: list[int]) -> tuple[int, str] | None:
    """(value, expression) of a random combination of all ``numbers``; None when a step would leave the positive
    integers (a subtraction reaching 0, an inexact division)."""
    items = [(n, str(n)) for n in numbers]
    while len(items) > 1:
        i, j = rng.choice(len(items), size=2, replace=False)
        (a, ea), (b, eb) = items[i], items[j]
        op = OPS[rng.integers(len(OPS))]
        if op in ("-", "/") and a < b:
            (a, ea), (b, eb) = (b, eb), (a, ea)
        if op == "+":
            v = a + b
        elif op == "*":
            v = a * b
        elif op == "-":
            v = a - b
        elif a % b == 0:
            v = a // b
        else:
            return None
        if v <= 0:
            return None
        items = [x for k, x in enumerate(items) if k not in (i, j)] + [(v, f"({ea} {op} {eb})")]
    value, expr = items[0]
    return value, expr[1:-1] if expr.startswith("(") else expr


def generate_countdown(cfg: CountdownConfig) -> dict[str, list[dict]]:
    """``{"train": [...], "test": [...]}`` examples for ``cfg`` (deterministic in ``cfg``)."""

    def draw(rng):
        count = int(rng.integers(cfg.min_numbers, cfg.max_numbers + 1))
        numbers = [int(x) for x in rng.integers(1, cfg.max_number + 1, size=count)]
        found = random_solution(rng, numbers)
        if found is None or not 1 <= found[0] <= cfg.max_target:
            return None
        target, expr = found
        key = (tuple(sorted(numbers)), target)
        prompt = countdown_prompt(numbers, target)
        return key, {"prompt": prompt, "numbers": numbers, "target": target, "task": "countdown", "solution": expr}

    return fill_splits("countdown", cfg.seed, {"train": cfg.train_size, "test": cfg.test_size}, draw)


class CountdownBuilder(Builder, skip_registration=True):
    name = "r1jax_countdown"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "generated solvable problems, hash-assigned splits"}

    def _info(self) -> tfds.core.DatasetInfo:
        features = text_features("prompt", "task", "solution", numbers=int_list(), target=np.int64)
        return info(self, "Countdown arithmetic puzzles (TinyZero), generated solvable.", features)

    def _split_generators(self, dl_manager):
        splits = generate_countdown(self.builder_config)
        return {s: self._generate_examples(v) for s, v in splits.items()}

    def _generate_examples(self, examples: list[dict]):
        yield from enumerate(examples)
