"""MATH-style problems from local JSONL: ``problem``, ``answer`` (optional ``solution``) -> task ``"math"``.

The source is a directory of ``{split}.jsonl`` files (every one becomes a split) or one file (it becomes the split
that was asked for). Answers are compared by ``math-verify`` in ``r1jax.rewards``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import tensorflow_datasets as tfds

from r1jax.data.builders.base import Builder, info, text_features
from r1jax.data.files import fingerprint, read_jsonl
from r1jax.errors import DataError


@dataclasses.dataclass(eq=False)
class MathConfig(tfds.core.BuilderConfig):
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> path

    @classmethod
    def for_source(cls, source: str | os.PathLike | None, split: str = "train") -> MathConfig:
        if source is None:
            raise DataError("math: pass source= (a .jsonl file or a directory of {split}.jsonl files)")
        src = Path(source)
        if src.is_dir():
            files = {p.stem: str(p) for p in sorted(src.glob("*.jsonl"))}
            if not files:
                raise DataError(f"{src}: no .jsonl files")
        elif src.is_file():
            files = {split.split("[", 1)[0]: str(src)}
        else:
            raise DataError(f"{src}: no such file or directory")
        fp = fingerprint(files.values(), sorted(files))
        return cls(name=f"{src.stem}-{fp}", files=files, description=f"MATH-style problems from {src}")


class MathBuilder(Builder, skip_registration=True):
    name = "r1jax_math"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "prompt / answer / task / solution from problem / answer / solution"}

    def _info(self) -> tfds.core.DatasetInfo:
        return info(
            self,
            "Competition-style math problems with reference answers.",
            text_features("prompt", "answer", "task", "solution"),
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(Path(p)) for s, p in self.builder_config.files.items()}

    def _generate_examples(self, path: Path):
        n = 0
        for _, rec in read_jsonl(path, required=("problem", "answer")):
            yield (
                n,
                {
                    "prompt": str(rec["problem"]),
                    "answer": str(rec["answer"]),
                    "task": "math",
                    "solution": str(rec.get("solution") or ""),
                },
            )
            n += 1
        if n == 0:
            raise DataError(f"{path}: no examples (empty split)")
