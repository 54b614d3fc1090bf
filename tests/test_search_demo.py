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


def test_answers_are_balanced_so_that_guessing_is_worth_one_over_the_values():
    """Within a split, each master is a mentor (and a rival) of as many students as any other, give or take one, and
    each city and guild belongs to as many masters, give or take one: no test answer is more common than a guess."""
    from collections import Counter

    cfg = SearchQAConfig.make(seed=0)
    world = make_world(cfg)
    for split, n_masters in (("train", cfg.train_masters), ("test", cfg.test_masters)):
        masters = {m for rels in world.links[split].values() for m in rels.values()}
        assert len(masters) == n_masters
        for rel in ("mentor", "rival"):
            uses = Counter(rels[rel] for rels in world.links[split].values())
            assert max(uses.values()) - min(uses.values()) <= 1 and len(uses) == n_masters, (split, rel)
        for attr, n_values in (("city", cfg.cities), ("guild", cfg.guilds)):
            held = Counter(world.attrs[m][attr] for m in masters)
            assert len(held) == min(n_values, n_masters) and max(held.values()) - min(held.values()) <= 1
    assert all(rels["mentor"] != rels["rival"] for split in world.links.values() for rels in split.values())
    test = generate_search_qa(cfg)["test"]
    for attr, n_values in (("city", cfg.cities), ("guild", cfg.guilds)):
        answers = Counter(ex["answer"] for ex in test if f" {attr} " in ex["prompt"])
        assert max(answers.values()) / sum(answers.values()) <= 2.5 / min(n_values, cfg.test_masters)


def test_hop_match_reads_each_query_in_order():
    from r1jax.search_demo import hop_match, written_queries

    ex = {"queries": ["mentor of Qarvel", "city of Ostrin"]}
    right = "<think><search>mentor of Qarvel</search><information>x</information><search> City of  Ostrin</search>"
    assert written_queries(right) == ["mentor of Qarvel", "City of  Ostrin"]
    wrong_first = "<search>mentor of Tabraem</search><information>x</information><search>city of Ostrin</search>"
    assert hop_match([right, wrong_first, "<answer>x</answer>"], [ex] * 3) == [1 / 3, 2 / 3]


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


# --- traces -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def search_data(tmp_path_factory):
    from r1jax.search_demo import make_search_data

    out = tmp_path_factory.mktemp("search")
    sizes = make_search_data(out, n_traces=40, seed=0, top_k=1, **SMALL)
    return out, sizes


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bm25_finds_each_hop_first():
    """The real search tool ranks the fact each query needs first: every test question of the default task and every
    12th training question (each cold-start trace is checked again when it is written)."""
    from r1jax.tools.search import BM25Search, Document

    cfg = SearchQAConfig.make(seed=0)
    world = make_world(cfg)
    search = BM25Search([Document(**d) for d in corpus_records(world)], top_k=1)
    splits = generate_search_qa(cfg)
    for ex in splits["test"] + splits["train"][::12]:
        assert [search.search(q)[0][0].id for q in ex["queries"]] == ex["facts"], ex["prompt"]


def test_tool_traces_round_trip(search_data):
    """A cold-start trace is the two calls with the tool's own results, then the answer; it scores 1 on accuracy and
    strict format; SFT tokenisation puts loss weight 0 exactly on the result blocks."""
    from r1jax.data.tokenizer import ByteTokenizer
    from r1jax.rewards.format import format_strict
    from r1jax.search_demo import search_calls
    from r1jax.sft import tokenize_tool_trace
    from r1jax.tools.search import BM25Search

    out, sizes = search_data
    assert sizes["traces"] == 40 and sizes["turn_rows"] == 80
    search = BM25Search.from_file(str(out / "data" / "corpus.jsonl"), top_k=1)
    questions = {ex["prompt"]: ex for ex in _jsonl(out / "data" / "train.jsonl")}
    tok = ByteTokenizer()
    by_prompt: dict[str, list[str]] = {}
    for rec in _jsonl(out / "sft_data" / "train.jsonl"):
        by_prompt.setdefault(rec["prompt"], []).append(rec["completion"])
    assert len(by_prompt) == 40
    for prompt, completions in by_prompt.items():
        ex = questions[prompt]
        q1, q2 = ex["queries"]
        r1, r2 = search(q1).text, search(q2).text
        turn1 = f"<think><search>{q1}</search>"
        turn2 = f"{turn1}<information>{r1}</information><search>{q2}</search>"
        trace = f"{turn2}<information>{r2}</information></think> <answer>{ex['answer']}</answer>"
        # the whole trace, and the trace cut after each call (one example per turn)
        assert sorted(completions) == sorted([trace, turn1, turn2])
        assert ex["bridge"] in r1 and ex["answer"] in r2 and search_calls(trace) == 2
        assert accuracy(trace, ex, CFG) == 1.0 and format_strict(trace, ex, CFG) == 1.0
        for completion in (trace, turn1, turn2):
            _, ids, weights = tokenize_tool_trace(prompt, completion, tok.encode, tools=("search",),
                                                  eos_id=tok.eos_id)  # fmt: skip
            # EOS ends the trace only: after a turn's call the environment speaks, not the model
            assert (ids[-1] == tok.eos_id) == (completion == trace)
            kept = tok.decode([t for t, w in zip(ids, weights, strict=True) if w and t != tok.eos_id])
            assert kept == completion.replace(f"<information>{r1}</information>", "").replace(
                f"<information>{r2}</information>", ""
            )
    closed = _jsonl(out / "closed_sft_data" / "train.jsonl")
    assert sorted(r["prompt"] for r in closed) == sorted(by_prompt)
    for rec in closed:
        ex = questions[rec["prompt"]]
        assert "<search>" not in rec["completion"] and ex["bridge"] in rec["completion"]
        assert accuracy(rec["completion"], ex, CFG) == 1.0 and format_strict(rec["completion"], ex, CFG) == 1.0


def test_trace_refuses_a_result_without_the_fact():
    from r1jax.errors import R1jaxError
    from r1jax.search_demo import tool_trace
    from r1jax.tools import ToolOutput

    ex = generate_search_qa(SearchQAConfig.make(seed=0, **SMALL))["train"][0]
    with pytest.raises(R1jaxError, match="does not return"):
        tool_trace(ex, lambda q: ToolOutput("no results"))


# --- the pipeline -----------------------------------------------------------------------------------------------------
@pytest.mark.slow  # 4 stages and 5 evaluations, each compiling its shapes: minutes (15 at a load average of 15)
def test_search_demo_pipeline_end_to_end(tmp_path):
    """Every stage runs and connects at a toy size (not the learning targets: those need the full-size run)."""
    from r1jax.search_demo import SearchPlan, run_search_demo

    budget = (
        "sampling.max_new_tokens=64",
        "grpo.max_completion_len=64",
        "grpo.prompts_per_step=2",
        "grpo.group_size=2",
    )
    plan = SearchPlan(
        sft_steps=2, grpo_steps=1, sft_traces=8, data=tuple(SMALL.items()), n_test=4, eval_batch=4,
        overrides=(("search_sft", "sft_batch_size=4"), *(("search_grpo", kv) for kv in budget)),
    )  # fmt: skip
    lines = []
    summary = run_search_demo(tmp_path / "demo", 15.0, plan=plan, progress=False, log=lines.append)
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["tool_pass@1"] == summary["tool_pass@1"]
    assert set(summary["stages"]) == {"sft", "grpo", "closed_sft", "closed_grpo"}
    assert set(summary["stages"]["grpo"]["eval"]) == {"tool", "no_tool"}
    for st in summary["stages"].values():
        for e in st["eval"].values():
            assert 0.0 <= e["pass@1"] <= 1.0 and e["n_problems"] == 4
    assert summary["stages"]["closed_sft"]["eval"]["no_tool"]["search_calls_per_answer"] == 0.0
    [window] = summary["search_calls_over_training"]
    assert window["steps"] == "1-1" and window["search_calls_per_sample"] >= 0.0
    for name in ("report.md", "search_calls.png", "data/corpus.jsonl", "grpo/metrics.jsonl", "sft/report/summary.md"):
        assert (tmp_path / "demo" / name).exists(), name
    assert "SFT on tool-use traces" in (tmp_path / "demo" / "report.md").read_text()
