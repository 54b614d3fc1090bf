"""GSM8K (Cobbe et al. 2021, MIT licence) from local ``{train,test}.jsonl`` files: ``question``, ``answer``.

The answer text ends with ``#### N``; examples carry ``answer`` = N (thousands separators removed), ``solution`` =
the full answer text and ``task`` = ``"gsm8k"`` (exact numeric match in ``r1jax.rewards``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import tensorflow_datasets as tfds

from r1jax.data.builders.base import Builder, info, text_features
from r1jax.data.files import default_gsm8k_dir, fingerprint, read_jsonl
from r1jax.errors import DataError

SPLITS = ("train", "test")


@dataclasses.dataclass(eq=False)
class Gsm8kConfig(tfds.core.BuilderConfig):
    source_dir: str = ""

    @classmethod
    def for_source(cls, source: str | os.PathLike | None) -> Gsm8kConfig:
        src = Path(source) if source is not None else default_gsm8k_dir()
        files = [src / f"{s}.jsonl" for s in SPLITS]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"GSM8K not found: no {', '.join(missing)} (set R1JAX_GSM8K_DIR or pass source=)")
        return cls(name=f"local-{fingerprint(files)}", source_dir=str(src), description=f"GSM8K from {src}")


def final_answer(solution: str, where: str) -> str:
    """N of a GSM8K answer's last ``#### N`` line, without thousands separators."""
    head, sep, tail = solution.rpartition("####")
    if not sep or not tail.strip():
        raise DataError(f"{where}: answer has no final '#### N'")
    return tail.strip().replace(",", "")


class Gsm8kBuilder(Builder, skip_registration=True):
    name = "r1jax_gsm8k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "prompt / answer / task / solution from the original JSONL"}

    def _info(self) -> tfds.core.DatasetInfo:
        return info(
            self,
            "Grade-school math word problems with numeric final answers.",
            text_features("prompt", "answer", "task", "solution"),
            homepage="https://github.com/openai/grade-school-math",
            citation="Cobbe et al. 2021, Training Verifiers to Solve Math Word Problems, arXiv:2110.14168",
        )

    def _split_generators(self, dl_manager):
        src = Path(self.builder_config.source_dir)
        return {s: self._generate_examples(src / f"{s}.jsonl") for s in SPLITS}

    def _generate_examples(self, path: Path):
        n = 0
        for lineno, rec in read_jsonl(path, required=("question", "answer")):
            solution = str(rec["answer"])
            yield (
                n,
                {
                    "prompt": str(rec["question"]),
                    "answer": final_answer(solution, f"{path}:{lineno}"),
                    "task": "gsm8k",
                    "solution": solution,
                },
            )
            n += 1
        if n == 0:
            raise DataError(f"{path}: no examples (empty split)")
