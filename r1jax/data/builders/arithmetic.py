"""Multi-digit arithmetic (``a + b``, ``a - b``, ``a * b``) with exact numeric answers (task ``"gsm8k"``: the
numeric-match reward). A small curriculum / smoke-test task: the answer is checkable and the difficulty is set by
the digit counts."""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from r1jax.data.builders.base import Builder, info, text_features
from r1jax.data.builders.generated import check_options, config_name, fill_splits
from r1jax.data.templates import arithmetic_prompt
from r1jax.errors import DataError


@dataclasses.dataclass(eq=False)
class ArithmeticConfig(tfds.core.BuilderConfig):
    OPTIONS = ("seed", "train_size", "test_size", "min_digits", "max_digits", "ops")

    seed: int = 0
    train_size: int = 20_000
    test_size: int = 1_000
    min_digits: int = 2
    max_digits: int = 4
    ops: str = "+*"  # any of "+-*"

    @classmethod
    def make(cls, **options) -> ArithmeticConfig:
        check_options("arithmetic", options, cls.OPTIONS)
        cfg = cls(name="tmp", **options)
        if not 1 <= cfg.min_digits <= cfg.max_digits or not cfg.ops or set(cfg.ops) - set("+-*"):
            raise DataError(f"arithmetic: bad options {options}")
        cfg.name = config_name(cfg.seed, cfg)
        cfg.description = f"arithmetic {cfg.ops}, {cfg.min_digits}-{cfg.max_digits} digits, seed {cfg.seed}"
        return cfg


def generate_arithmetic(cfg: ArithmeticConfig) -> dict[str, list[dict]]:
    """``{"train": [...], "test": [...]}`` examples for ``cfg`` (deterministic in ``cfg``)."""

    def operand(rng) -> int:
        d = int(rng.integers(cfg.min_digits, cfg.max_digits + 1))
        return int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10**d))

    def draw(rng):
        op = cfg.ops[int(rng.integers(len(cfg.ops)))]
        a, b = operand(rng), operand(rng)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        key = (op, *sorted((a, b))) if op in "+*" else (op, a, b)
        return key, {
            "prompt": arithmetic_prompt(a, op, b),
            "answer": str(value),
            "task": "gsm8k",
            "solution": f"{a} {op} {b} = {value}",
        }

    return fill_splits("arithmetic", cfg.seed, {"train": cfg.train_size, "test": cfg.test_size}, draw)


class ArithmeticBuilder(Builder, skip_registration=True):
    name = "r1jax_arithmetic"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "generated problems, hash-assigned splits"}

    def _info(self) -> tfds.core.DatasetInfo:
        return info(
            self, "Multi-digit arithmetic with exact answers.", text_features("prompt", "answer", "task", "solution")
        )

    def _split_generators(self, dl_manager):
        splits = generate_arithmetic(self.builder_config)
        return {s: self._generate_examples(v) for s, v in splits.items()}

    def _generate_examples(self, examples: list[dict]):
        yield from enumerate(examples)
