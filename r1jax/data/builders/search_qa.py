"""Two-hop questions over a generated corpus of facts about fictional people: a task no model can answer from memory.

The world. Invented names (syllables drawn from a seed) for ``students``, ``masters``, cities and guilds. Every student
has a ``mentor`` and a ``rival``, both masters; every master has a ``city`` and a ``guild``. Each fact is one corpus
document ``{"id", "title", "text"}`` written ``"The mentor of Qarvel is Ostrin."``: the shape ``r1jax.tools``'
search indexes (jsonl with ``id``, ``title``, ``text``).

The questions. ``"What is the city of the mentor of Qarvel?"`` needs two facts: ``The mentor of Qarvel is Ostrin.``
and ``The city of Ostrin is Vexholm.``, so a model answers it by searching twice: ``mentor of Qarvel`` (copied from
the question), then ``city of Ostrin`` (the bridge entity from the first result). Each student gives four questions
(mentor / rival x city / guild). Students and masters never swap roles, so the first query's words match one fact
best (the student's name is in only that student's two facts, and the relation picks one of them), and so does the
second's.

Answers are balanced, so that no answer is worth guessing: within a split every master is a mentor (and a rival)
about equally often, and every city and guild belongs to about equally many masters, so the most common test answer
is right on about 1 / cities and 1 / guilds of the questions, as a blind guess is.

The splits are disjoint in entities: a test question's student and both its masters appear in no training question
(students and masters are split first, and a student's mentor and rival are drawn from the masters of its split).
The corpus holds every fact of both splits: searching is how a model meets test entities.

Examples: ``prompt``, ``answer`` (the city or guild), ``task`` ``"exact"`` (normalised exact match of the
``<answer>`` block, ``r1jax.rewards.accuracy``), ``subject``, ``bridge`` (the master), ``facts`` (the two document
ids) and ``queries`` (the two searches that find them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from r1jax.data.builders.base import Builder, info, text_features
from r1jax.data.builders.generated import check_options, config_name
from r1jax.errors import DataError

RELATIONS = ("mentor", "rival")  # student -> master
ATTRIBUTES = ("city", "guild")  # master -> value
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "qu", "br", "dr", "gr", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "x", "m", "nd", "rk")
_WORDS = {"the", "of", "is", "what", *RELATIONS, *ATTRIBUTES}  # never a name (names must be rare search terms)


@dataclasses.dataclass(eq=False)
class SearchQAConfig(tfds.core.BuilderConfig):
    OPTIONS = ("seed", "train_students", "test_students", "train_masters", "test_masters", "cities", "guilds")

    seed: int = 0
    train_students: int = 1200  # x 4 questions each = 4,800 training questions (many names: a model learns to copy)
    test_students: int = 50  # 200 test questions
    train_masters: int = 240
    test_masters: int = 20
    cities: int = 24
    guilds: int = 12

    @classmethod
    def make(cls, **options) -> SearchQAConfig:
        check_options("search_qa", options, cls.OPTIONS)
        cfg = cls(name="tmp", **options)
        if min(cfg.train_students, cfg.test_students, cfg.cities, cfg.guilds) < 1:
            raise DataError(f"search_qa: every count must be >= 1, got {options}")
        if min(cfg.train_masters, cfg.test_masters) < len(RELATIONS):
            raise DataError(f"search_qa: each split needs >= {len(RELATIONS)} masters (a mentor and a rival)")
        cfg.name = config_name(cfg.seed, cfg)
        cfg.description = (
            f"two-hop questions, {cfg.train_students}/{cfg.test_students} students, "
            f"{cfg.train_masters}/{cfg.test_masters} masters, seed {cfg.seed}"
        )
        return cfg


@dataclasses.dataclass(frozen=True)
class World:
    """The generated facts: ``links[split][student] = {relation: master}``, ``attrs[master] = {attribute: value}``."""

    links: dict[str, dict[str, dict[str, str]]]
    attrs: dict[str, dict[str, str]]


def fact_text(entity: str, relation: str, value: str) -> str:
    return f"The {relation} of {entity} is {value}."


def query(relation: str, entity: str) -> str:
    """The search that finds ``fact_text(entity, relation, ...)``."""
    return f"{relation} of {entity}"


def question(attribute: str, relation: str, student: str) -> str:
    return f"What is the {attribute} of the {relation} of {student}?"


def _names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct capitalised two-syllable names (a name is never drawn twice, across all kinds)."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(2)]
        name = "".join(parts) + _CODAS[rng.integers(len(_CODAS))]
        if name not in seen and name not in _WORDS:
            seen.add(name)
            out.append(name.capitalize())
    return out


def make_world(cfg: SearchQAConfig) -> World:
    """The facts for ``cfg``: a pure function of its options."""
    kind = int.from_bytes(hashlib.sha256(b"search_qa").digest()[:4], "little")
    rng = np.random.default_rng([cfg.seed, kind])
    counts = {
        "train_students": cfg.train_students,
        "test_students": cfg.test_students,
        "train_masters": cfg.train_masters,
        "test_masters": cfg.test_masters,
        "cities": cfg.cities,
        "guilds": cfg.guilds,
    }
    names = iter(_names(rng, sum(counts.values())))
    pools = {k: [next(names) for _ in range(n)] for k, n in counts.items()}
    values = {"city": pools["cities"], "guild": pools["guilds"]}
    links: dict[str, dict[str, dict[str, str]]] = {}
    attrs: dict[str, dict[str, str]] = {}
    for split in ("train", "test"):
        masters = pools[f"{split}_masters"]
        links[split] = {}
        students = pools[f"{split}_students"]
        for student, picked in zip(students, _distinct_pairs(rng, len(masters), len(students)), strict=True):
            links[split][student] = {r: masters[i] for r, i in zip(RELATIONS, picked, strict=True)}
        for a in ATTRIBUTES:
            for m, v in zip(masters, _balanced(rng, len(values[a]), len(masters)), strict=True):
                attrs.setdefault(m, {})[a] = values[a][v]
    return World(links, attrs)


def _balanced(rng: np.random.Generator, n: int, size: int) -> list[int]:
    """``size`` draws from ``range(n)`` whose counts differ by at most one, in random order."""
    out = [int(i) for _ in range(-(-size // n)) for i in rng.permutation(n)]
    return [out[i] for i in rng.permutation(size)]


def _distinct_pairs(rng: np.random.Generator, n: int, size: int) -> list[tuple[int, int]]:
    """``size`` pairs of distinct indices into ``range(n)``, each position balanced as ``_balanced`` draws it: a
    pair that repeats an index swaps its second element with another pair's where neither then repeats (swaps keep
    the counts)."""
    first, second = _balanced(rng, n, size), _balanced(rng, n, size)
    for i in range(size):
        if first[i] == second[i]:
            fits = (j for j in rng.permutation(size) if second[j] != first[i] and second[i] != first[j])
            j = next(fits, None)
            if j is None:
                second[i] = (first[i] + 1) % n
            else:
                second[i], second[j] = second[j], second[i]
    return list(zip(first, second, strict=True))


def facts(world: World) -> list[tuple[str, str, str]]:
    """Every fact as ``(entity, relation, value)`` in corpus order: students' relations, then masters' attributes."""
    out = [(s, r, m) for split in ("train", "test") for s, rels in world.links[split].items() for r, m in rels.items()]
    return out + [(m, a, v) for m, values in world.attrs.items() for a, v in values.items()]


def corpus_records(world: World) -> list[dict]:
    """The corpus: fact ``i`` of ``facts`` as the document ``{"id": str(i), "title": entity, "text": sentence}``
    (short ids: the search tool prints them before every hit, inside the model's context)."""
    return [{"id": str(i), "title": e, "text": fact_text(e, r, v)} for i, (e, r, v) in enumerate(facts(world))]


def questions(world: World, split: str) -> list[dict]:
    """The split's examples: every student x relation x attribute, in a fixed order."""
    ids = {(e, r): str(i) for i, (e, r, _) in enumerate(facts(world))}
    out = []
    for student, rels in world.links[split].items():
        for relation in RELATIONS:
            master = rels[relation]
            for attribute in ATTRIBUTES:
                out.append(
                    {
                        "prompt": question(attribute, relation, student),
                        "answer": world.attrs[master][attribute],
                        "task": "exact",
                        "subject": student,
                        "bridge": master,
                        "facts": [ids[student, relation], ids[master, attribute]],
                        "queries": [query(relation, student), query(attribute, master)],
                    }
                )
    return out


def generate_search_qa(cfg: SearchQAConfig) -> dict[str, list[dict]]:
    """``{"train": [...], "test": [...]}`` examples for ``cfg`` (deterministic in ``cfg``)."""
    world = make_world(cfg)
    return {split: questions(world, split) for split in ("train", "test")}


def write_search_qa(out: str | os.PathLike, **options) -> dict[str, int]:
    """Write ``corpus.jsonl`` and ``{train,test}.jsonl`` for ``SearchQAConfig.make(**options)`` into ``out``; returns
    the number of records in each."""
    cfg = SearchQAConfig.make(**options)
    world = make_world(cfg)
    files = {"corpus": corpus_records(world), "train": questions(world, "train"), "test": questions(world, "test")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: len(rows) for name, rows in files.items()}


class SearchQABuilder(Builder, skip_registration=True):
    """The questions as a TFDS dataset; the corpus they need is ``corpus_records(make_world(config))`` (written by
    ``write_search_qa``)."""

    name = "r1jax_search_qa"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "two-hop questions over generated facts, splits disjoint in entities"}

    def _info(self) -> tfds.core.DatasetInfo:
        features = text_features(
            "prompt",
            "answer",
            "task",
            "subject",
            "bridge",
            facts=tfds.features.Sequence(tfds.features.Text()),
            queries=tfds.features.Sequence(tfds.features.Text()),
        )
        return info(self, "Two-hop questions about fictional people, answerable only by search.", features)

    def _split_generators(self, dl_manager):
        splits = generate_search_qa(self.builder_config)
        return {s: self._generate_examples(v) for s, v in splits.items()}

    def _generate_examples(self, examples: list[dict]):
        yield from enumerate(examples)
