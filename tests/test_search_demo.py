"""The search miniature: generated two-hop questions and their corpus, the exact-match reward, tool-use traces and
the ``r1jax demo --task search`` pipeline at a tiny size."""

import json

import pytest

from r1jax.config import RewardConfig
from r1jax.data.builders.search_qa import (
    SearchQAConfig,
    corpus_records,
    generate_search_qa,
    make_world,
    write_search_qa,
)
from r1jax.data.datasets import DataError, load_dataset
from r1jax.rewards.accuracy import accuracy, exact_match_accuracy, normalize_text
from r1jax.rewards.scorer import score

SMALL = dict(train_students=30, test_students=8, train_masters=10, test_masters=4, cities=6, guilds=5)


# --- the generated task -----------------------------------------------------------------------------------------------
def test_generator_is_deterministic_in_its_options():
    a = generate_search_qa(SearchQAConfig.make(seed=3, **SMALL))
    assert a == generate_search_qa(SearchQAConfig.make(seed=3, **SMALL))
    assert a != generate_search_qa(SearchQAConfig.make(seed=4, **SMALL))
    assert len(a["train"]) == 4 * SMALL["train_students"] and len(a["test"]) == 4 * SMALL["test_students"]


def test_every_question_is_answered_by_chaining_its_two_facts():
    world = make_world(SearchQAConfig.make(seed=1, **SMALL))
    docs = {d["id"]: d for d in corpus_records(world)}
    assert len(docs) == len(corpus_records(world))  # ids are unique
    splits = generate_search_qa(SearchQAConfig.make(seed=1, **SMALL))
    for ex in splits["train"] + splits["test"]:
        first, second = (docs[i] for i in ex["facts"])
        rel_query, attr_query = ex["queries"]
        # "The mentor of Qarvel is Ostrin." then "The city of Ostrin is Vexholm.": the bridge links the two facts
        assert first["text"] == f"The {rel_query} is {ex['bridge']}."
        assert second["text"] == f"The {attr_query} is {ex['answer']}."
        assert rel_query in ex["prompt"] and ex["subject"] in rel_query and ex["bridge"] in attr_query
        assert ex["bridge"] not in ex["prompt"] and ex["answer"] not in ex["prompt"]
        assert ex["task"] == "exact"


def test_splits_are_disjoint_in_entities():
    splits = generate_search_qa(SearchQAConfig.make(seed=2, **SMALL))

    def entities(split):
        return {e for ex in splits[split] for e in (ex["subject"], ex["bridge"])}

    assert entities("train") and entities("test")
    assert not entities("train") & entities("test")
    prompts = {split: {ex["prompt"] for ex in splits[split]} for split in splits}
    assert not prompts["train"] & prompts["test"]


def test_names_are_distinct_rare_words():
    world = make_world(SearchQAConfig.make(seed=0))
    docs = corpus_records(world)
    names = {d["title"] for d in docs} | {d["text"].split(" is ")[-1].rstrip(".") for d in docs}
    students = {s for split in world.links.values() for s in split}
    assert not students & set(world.attrs)  # students and masters never swap roles
    lowered = {n.lower() for n in names}
    assert len(lowered) == len(names)
    assert not lowered & {"the", "of", "is", "what", "mentor", "rival", "city", "guild"}


def test_write_search_qa_and_the_tfds_builder_agree(tmp_path):
    sizes = write_search_qa(tmp_path / "qa", seed=5, **SMALL)
    expected = generate_search_qa(SearchQAConfig.make(seed=5, **SMALL))
    assert sizes == {"corpus": 2 * (38 + 14), "train": 120, "test": 32}
    written = [json.loads(line) for line in (tmp_path / "qa" / "test.jsonl").read_text().splitlines()]
    assert written == expected["test"]
    corpus = [json.loads(line) for line in (tmp_path / "qa" / "corpus.jsonl").read_text().splitlines()]
    assert all(set(d) == {"id", "title", "text"} for d in corpus)
    built = load_dataset("search_qa", "test", data_dir=str(tmp_path / "tfds"), seed=5, **SMALL)
    assert [built[i] for i in range(len(built))] == expected["test"]


def test_bad_options_are_one_line_errors():
    with pytest.raises(DataError, match="unknown options"):
        SearchQAConfig.make(people=3)
    with pytest.raises(DataError, match="masters"):
        SearchQAConfig.make(test_masters=1)


# --- the exact-match reward -------------------------------------------------------------------------------------------
CFG = RewardConfig(functions=("accuracy",), weights=(1.0,), num_workers=0)


@pytest.mark.parametrize(
    ("completion", "value"),
    [
        ("<think>x</think> <answer>Vexholm</answer>", 1.0),
        ("<think>x</think> <answer> the vexholm. </answer>", 1.0),  # case, article, punctuation
        ("<think>x</think> <answer>Vexholms</answer>", 0.0),
        ("<think>x</think> <answer>Vexholm Ostrin</answer>", 0.0),
        ("<think>x</think> <answer>Ostrin</answer> <answer>Vexholm</answer>", 0.0),  # hedging over two blocks
        ("<think>x <answer>Vexholm</answer>", 0.0),  # reasoning never closed
        ("<think>x</think> Vexholm", 0.0),  # no answer block
        ("<think>x</think> <answer></answer>", 0.0),
    ],
)
def test_exact_match(completion, value):
    meta = {"answer": "Vexholm", "task": "exact"}
    assert exact_match_accuracy(completion, meta, CFG) == value
    assert accuracy(completion, meta, CFG) == value


def test_exact_match_aliases_and_empty_reference():
    done = "<think>x</think> <answer>Old Vexholm</answer>"
    assert exact_match_accuracy(done, {"answer": ["Vexholm", "old  vexholm"]}, CFG) == 1.0
    assert exact_match_accuracy("<think>x</think> <answer>the</answer>", {"answer": "a"}, CFG) == 0.0
    assert normalize_text("  The  Ember-Guild!") == "emberguild"


def test_scorer_checks_exact_metadata():
    totals, metrics = score(
        ["<think>x</think> <answer>Vexholm</answer>"], [{"task": "exact", "answer": "vexholm"}], CFG
    )
    assert totals.tolist() == [1.0] and metrics["rewards/accuracy/mean"] == 1.0
    with pytest.raises(ValueError, match="answer"):
        score(["<answer>x</answer>"], [{"task": "exact"}], CFG)
