"""Tools in the loop: BM25 search over a jsonl corpus, the sandboxed python tool, the tool environment (concurrent
calls, result cleaning), the tool config, and bad input (unknown tool, invalid corpus, a call that never closes)."""

import json
import threading
import time

import pytest

from r1jax.config import ToolConfig, TrainConfig
from r1jax.errors import ConfigError, ToolError
from r1jax.tools import TOOL_SYNTAX, BM25Search, ToolCall, ToolEnv, ToolOutput, build_tools, load_corpus, result_spans
from r1jax.tools.python import SandboxedPython
from r1jax.train import apply_overrides

DOCS = [
    {"id": 1, "title": "Zorblat", "text": "Zorblat is the capital of Quenland, on the river Ames."},
    {"id": "mirefen", "title": "Mirefen", "text": "Mirefen was founded in 1203 by Oska Vell."},
    {"id": 3, "title": "Oska Vell", "text": "Oska Vell was a sailor born in Zorblat."},
    {"id": 4, "title": "Cats", "text": "Cats chase mice and sleep in the sun."},
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return str(path)


def test_bm25_returns_the_right_document(corpus):
    search = BM25Search.from_file(corpus, top_k=2)
    assert [d.id for d, _ in search.search("who founded Mirefen")][0] == "mirefen"
    assert [d.id for d, _ in search.search("capital of Quenland")][0] == "1"
    hits = search.search("Oska Vell")  # both documents naming her, the one about her first
    assert [d.id for d, _ in hits] == ["3", "mirefen"]
    assert hits[0][1] > hits[1][1] > 0
    assert search.search("xylophone") == []
    assert search("xylophone") == ToolOutput("no results")
    assert (
        search("who founded Mirefen").text.splitlines()[0]
        == "[mirefen] Mirefen: Mirefen was founded in 1203 by Oska Vell."
    )


def test_bm25_scores_match_the_formula(corpus):
    """BM25 in Lucene's form (k1 = 1.5, b = 0.75, idf log(1 + (N - df + .5) / (df + .5)), no (k1 + 1) factor),
    computed by hand for a one-word query, equals the index's scores."""
    import math

    search = BM25Search.from_file(corpus, top_k=4)
    docs = [f"{d['title']} {d['text']}".lower().replace(",", " ").replace(".", " ").split() for d in DOCS]
    docs = [[w for w in d if len(w) > 1] for d in docs]
    avg = sum(map(len, docs)) / len(docs)
    df = sum("zorblat" in d for d in docs)
    idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
    want = {}
    for d, raw in zip(docs, DOCS, strict=True):
        tf = d.count("zorblat")
        if tf:
            want[str(raw["id"])] = idf * tf / (tf + 1.5 * (1 - 0.75 + 0.75 * len(d) / avg))
    got = {d.id: s for d, s in search.search("Zorblat")}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"id": 9, "title": "x"}', "missing field 'text'"),
        ('{"id": 9, "title": "x", "text": 5}', "must be strings"),
        ('{"id": 1, "title": "x", "text": "dup"}', "repeated id '1'"),
    ],
)
def test_invalid_corpus_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(DOCS[0]) + "\n\n" + line + "\n")
    with pytest.raises(ToolError, match=f"^{path}:3: .*{message}"):
        load_corpus(str(path))
    with pytest.raises(ToolError, match="no such corpus file"):
        load_corpus(str(tmp_path / "missing.jsonl"))


def test_tool_config_unknown_name_and_overrides():
    with pytest.raises(ValueError, match="unknown tool 'serach'; known tools: search, python"):
        ToolConfig(tools=("serach",))
    cfg = apply_overrides(TrainConfig(), ["tools.tools=search,python", "tools.max_turns=3"])
    assert cfg.tools.tools == ("search", "python") and cfg.tools.max_turns == 3
    with pytest.raises(ConfigError, match="unknown tool 'serach'"):
        apply_overrides(TrainConfig(), ["tools.tools=serach"])
    with pytest.raises(ConfigError, match="max_turn_tokens"):
        apply_overrides(TrainConfig(), ["tools.max_turn_tokens=5000"])
    with pytest.raises(ToolError, match="needs a corpus"):
        build_tools(ToolConfig(tools=("search",)))


def test_call_syntax():
    s = TOOL_SYNTAX["search"]
    assert s.call_argument("so <search> capital of Quenland </search>") == "capital of Quenland"
    assert s.call_argument("<search>a</search> then <search>b</search>") == "b"
    assert s.call_argument("no opening </search>") is None
    assert s.open_call("let me <search>capital of") and not s.open_call("<search>x</search> done")
    text = "a<search>q</search><information>r1</information>b<python>1</python><output>2</output>c<information>cut"
    spans = result_spans(text, ("search", "python"))
    assert [text[i:j] for i, j in spans] == ["<information>r1</information>", "<output>2</output>", "<information>cut"]


class _Slow:
    """A tool that sleeps, records which threads ran it, and echoes its argument."""

    name = "search"

    def __init__(self, delay):
        self.delay, self.threads = delay, set()

    def __call__(self, argument):
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        if argument == "boom":
            raise RuntimeError("tool crashed")
        return ToolOutput(f"echo {argument}</answer><search>!", None)


def test_env_runs_calls_concurrently_and_cleans_results():
    tool = _Slow(0.3)
    cfg = ToolConfig(tools=("search",), num_threads=8, max_result_chars=6)
    with ToolEnv({"search": tool}, cfg, forbidden=("</answer>",)) as env:
        t0 = time.perf_counter()
        recs = env.run([ToolCall("search", str(i)) for i in range(6)] + [ToolCall("search", "boom")])
        wall = time.perf_counter() - t0
    assert wall < 1.0  # 7 calls of 0.3 s overlap (serially: 2.1 s)
    assert len(tool.threads) > 1
    assert recs[0].result == "echo 0 ..." and recs[0].error is None  # "echo 0!": tags and stop strings removed, cut
    assert recs[6].error == "exception" and recs[6].result == "search ..."  # "search failed: RuntimeError", cut
    assert env.result_text(recs[1]) == "<information>echo 1 ...</information>"


def test_env_timeout_does_not_wait_for_a_hung_tool():
    cfg = ToolConfig(tools=("search",), timeout_s=0.2)
    with ToolEnv({"search": _Slow(1.5)}, cfg) as env:
        t0 = time.perf_counter()
        (rec,) = env.run([ToolCall("search", "q")])
        assert time.perf_counter() - t0 < 1.0
    assert rec.error == "timeout" and "timed out" in rec.result


def test_unknown_tool_in_env():
    with pytest.raises(ToolError, match="unknown tool 'calc'"):
        ToolEnv({"calc": _Slow(0)}, ToolConfig())


class _Result:
    def __init__(self, status, returncode, stdout, stderr):
        self.status, self.returncode, self.stdout, self.stderr, self.wall_s = status, returncode, stdout, stderr, 0.0


def test_python_tool_reports_stdout_and_failures():
    calls = []

    def run(code, **kw):
        calls.append(code)
        if "raise" in code:
            return _Result("ok", 1, "partial\n", "Traceback ...\nValueError: x\n")
        if "while" in code:
            return _Result("timeout", -9, "", "")
        return _Result("ok", 0, "42\n", "")

    tool = SandboxedPython(run=run)
    assert tool("print(6 * 7)") == ToolOutput("42\n")
    out = tool("raise ValueError('x')")
    assert out.error == "exit" and out.text == "partial\nTraceback ...\nValueError: x\n[exit 1]"
    assert tool("while True: pass").error == "timeout"
    assert calls[0] == "print(6 * 7)"
