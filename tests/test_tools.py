"""Tools in the loop: BM25 search over a jsonl corpus, the sandboxed python tool, the tool environment (concurrent
calls, result cleaning), the tool config, and bad input (unknown tool, invalid corpus, a call that never closes)."""

import json
import os
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.config import GRPOConfig, ModelConfig, OptimConfig, SamplingConfig, ToolConfig, TrainConfig
from r1jax.data.tokenizer import ByteTokenizer
from r1jax.errors import ConfigError, ToolError
from r1jax.grpo import GRPOTrainer
from r1jax.loss import group_advantages, grpo_loss, overlong_filter, sequence_logprobs
from r1jax.model import init_params
from r1jax.sft import pack_examples, tokenize_tool_trace
from r1jax.tool_rollout import ToolRollout, sample_with_tools, tool_metrics
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
    """What ``r1jax.sandbox.run_python`` returns (``SandboxResult``'s fields)."""

    def __init__(self, status, returncode, stdout, stderr):
        self.status, self.returncode, self.stdout, self.stderr, self.wall_s = status, returncode, stdout, stderr, 0.0


def test_python_tool_reports_stdout_and_failures():
    calls = []

    def run(code, **kw):
        calls.append(code)
        if "raise" in code:
            return _Result("error", 1, "partial\n", "Traceback ...\nValueError: x\n")
        if "while" in code:
            return _Result("timeout", None, "", "")
        return _Result("ok", 0, "42\n", "")

    tool = SandboxedPython(run=run)
    assert tool("print(6 * 7)") == ToolOutput("42\n")
    out = tool("raise ValueError('x')")
    assert out.error == "error" and out.text == "partial\nTraceback ...\nValueError: x\n[error 1]"
    assert tool("while True: pass") == ToolOutput("[timeout]", "timeout")
    assert calls[0] == "print(6 * 7)"


def test_python_tool_in_the_real_sandbox():
    """The python tool through bubblewrap: stdout comes back; a crash shows its traceback's last line and status;
    the host's files are not there."""
    from r1jax.sandbox import SandboxLimits

    tool = SandboxedPython(limits=SandboxLimits(wall_s=5.0))
    paths = ["/etc/passwd", os.path.abspath(__file__)]  # the host's accounts, this repository
    assert all(map(os.path.exists, paths))
    with ToolEnv({"python": tool}, ToolConfig(tools=("python",))) as env:
        ok, bad, peek = env.run([
            ToolCall("python", "print(sum(range(10)))"),
            ToolCall("python", "import json\njson.loads('{')"),
            ToolCall("python", f"import os\nprint([os.path.exists(p) for p in {paths!r}])"),
        ])  # fmt: skip
    assert (ok.result, ok.error) == ("45", None)
    assert bad.error == "error" and "JSONDecodeError" in bad.result and bad.result.endswith("[error 1]")
    assert peek.result == "[False, False]"


# --- the multi-turn loop -------------------------------------------------------------------------------------------
WORDS = ["<eos>", "<unk>", "question", "compute", "<search>", "</search>", "<information>", "</information>",
         "<python>", "</python>", "<output>", "</output>", "capital", "code", "answer", "zorblat", "4"]  # fmt: skip
ID = {w: i for i, w in enumerate(WORDS)}
TOY = ModelConfig(arch="qwen2", vocab_size=32, d_model=32, n_layers=1, n_heads=2, ffw=32, eos_token_ids=(0,))


def toy_encode(text):
    """Word tokens: tags and whitespace-separated words; unknown words -> <unk>."""
    return [ID.get(w, ID["<unk>"]) for w in re.findall(r"<[^<>\s]+>|[^\s<]+", text)]


def toy_decode(ids):
    return " ".join(WORDS[i] if i < len(WORDS) else "<unk>" for i in ids if i != 0)


# A deterministic bigram machine: the next token depends on the current one only.
SCRIPT = {
    "question": "<search>", "<search>": "capital", "capital": "</search>", "</information>": "answer",
    "answer": "zorblat", "zorblat": "<eos>",
    "compute": "<python>", "<python>": "code", "code": "</python>", "</python>": "<python>", "</output>": "<python>",
}  # fmt: skip


def bigram_params(cfg=TOY, script=SCRIPT, logit=30.0):
    """Parameters whose layers add nothing (output and down projections zero), one-hot embeddings and an output head
    that puts ``logit`` on ``script[token]`` (``<eos>`` by default): greedy decoding follows the script exactly."""
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if jax.tree_util.keystr(p).endswith(("['o']", "['down']")) else x, params
    )
    head = np.zeros((cfg.d_model, cfg.vocab_size), np.float32)
    for i in range(cfg.vocab_size):
        head[i, ID[script.get(WORDS[i] if i < len(WORDS) else "", "<eos>")]] = logit / np.sqrt(cfg.d_model)
    return {**params, "embed": jnp.eye(cfg.vocab_size, cfg.d_model), "lm_head": jnp.asarray(head)}


def fake_python(code, **kw):
    return _Result("ok", 0, "4\n", "")


def toy_env(corpus, **kw):
    cfg = ToolConfig(tools=("search", "python"), corpus=corpus, top_k=1, **kw)
    return ToolEnv({"search": BM25Search.from_file(corpus, top_k=1), "python": SandboxedPython(run=fake_python)}, cfg)


def test_loop_calls_the_tools_and_masks_their_results(corpus):
    """A scripted model: prompt "question" searches, reads the result and answers; prompt "compute" calls python
    again and again: two calls run (max_turns=2), then its closing tags are plain text and the budget cuts it inside a
    call that never closes."""
    T = 20
    with toy_env(corpus, max_turns=2) as env:
        ro = sample_with_tools(
            bigram_params(), [[ID["question"]], [ID["compute"]]], jax.random.key(0), cfg=TOY,
            sampling=SamplingConfig(temperature=0.0, max_new_tokens=T), env=env, group_size=2,
            encode=toy_encode, decode=toy_decode, bucket=8,
        )  # fmt: skip
    found = "[1] Zorblat: Zorblat is the capital of Quenland, on the river Ames."
    block = toy_encode(f"<information>{found}</information>")
    a = [ID["<search>"], ID["capital"], ID["</search>"], *block, ID["answer"], ID["zorblat"], ID["<eos>"]]
    call = [ID["<python>"], ID["code"], ID["</python>"]]
    out = [ID["<output>"], ID["4"], ID["</output>"]]
    b = (call + out + call + out + call * 3)[:T]  # the third call is text; cut after "<python> code"
    for i, (want, n_calls) in enumerate([(a, 1), (a, 1), (b, 2), (b, 2)]):
        assert ro.tokens[i, : ro.lengths[i]].tolist() == want
        assert ro.num_calls[i] == n_calls
    np.testing.assert_array_equal(ro.ended, [True, True, False, False])
    np.testing.assert_array_equal(ro.open_call, [False, False, True, True])
    env_a = np.zeros(T, np.float32)
    env_a[3 : 3 + len(block)] = 1
    env_b = np.zeros(T, np.float32)
    env_b[[3, 4, 5, 9, 10, 11]] = 1
    for i, want in enumerate([env_a, env_a, env_b, env_b]):
        np.testing.assert_array_equal(ro.env_mask[i], want)
        np.testing.assert_array_equal(ro.mask[i], (np.arange(T) < ro.lengths[i]) * (1 - want))
        assert np.all(ro.logp[i][want > 0] == 0) and np.all(ro.logp[i][ro.mask[i] > 0] > -1e-3)
    assert [(c.tool, c.argument, c.result) for c in ro.calls[0]] == [("search", "capital", found)]
    assert [(c.tool, c.argument, c.result) for c in ro.calls[2]] == [("python", "code", "4")] * 2
    m = tool_metrics(ro, ("search", "python"))
    assert m["tools/calls_per_sample"] == 1.5 and m["tools/python/calls_per_sample"] == 1.0
    assert m["tools/truncated_calls"] == 0.5 and m["tools/search/errors"] == 0.0


def test_sampler_logprobs_equal_teacher_forced_over_trajectories(corpus):
    """Temperature 1, a random model that closes calls by chance: the sampler's log-probs of the model tokens equal
    the trainer's teacher-forced log-probs of the whole trajectory (result tokens as context) at rel 1e-4 in f32."""
    params = init_params(TOY, jax.random.key(1), std=0.3)
    prompts = [[ID["question"], ID["capital"]], [ID["compute"]], [ID["answer"], ID["code"], ID["4"]]]
    with toy_env(corpus, max_turns=3, max_result_tokens=6) as env:
        ro = sample_with_tools(
            params, prompts, jax.random.key(2), cfg=TOY, sampling=SamplingConfig(temperature=1.0, max_new_tokens=24),
            env=env, group_size=4, encode=toy_encode, decode=toy_decode, bucket=8,
        )  # fmt: skip
    assert (ro.num_calls >= 1).sum() >= 4 and (ro.num_calls >= 2).any()  # multi-turn rows exist
    logp, _ = sequence_logprobs(params, ro.prompt_tokens, ro.prompt_start, ro.tokens, TOY, temperature=1.0)
    m = ro.mask > 0
    np.testing.assert_allclose(np.asarray(logp)[m], ro.logp[m], rtol=1e-4)
    assert ro.env_mask.sum() > 0 and not np.any(m & (ro.env_mask > 0))
    np.testing.assert_array_equal((ro.mask + ro.env_mask).sum(1), ro.lengths)


def test_a_slow_call_holds_back_only_its_own_row(corpus):
    """The scripted model, one "question" row whose search takes 1.5 s and one "compute" row that calls python
    twice: both python calls run while the search is still sleeping (the engine decodes the other row meanwhile),
    and every token equals the run with instant tools (latency never changes what is sampled)."""
    events = []
    search = BM25Search.from_file(corpus, top_k=1)

    def slow_search(query):
        t0 = time.perf_counter()
        time.sleep(1.5)
        events.append(("search", t0, time.perf_counter()))
        return search(query)

    def timed_python(code, **kw):
        events.append(("python", time.perf_counter(), time.perf_counter()))
        return fake_python(code)

    def run(tools):
        cfg = ToolConfig(tools=("search", "python"), corpus=corpus, top_k=1, max_turns=2)
        with ToolEnv(tools, cfg) as env:
            return sample_with_tools(
                bigram_params(), [[ID["question"]], [ID["compute"]]], jax.random.key(0), cfg=TOY,
                sampling=SamplingConfig(temperature=0.0, max_new_tokens=20), env=env, group_size=1,
                encode=toy_encode, decode=toy_decode, bucket=8, poll_steps=2,
            )  # fmt: skip

    slow = run({"search": slow_search, "python": SandboxedPython(run=timed_python)})
    (search_end,) = [end for name, _, end in events if name == "search"]
    python_at = [t for name, t, _ in events if name == "python"]
    assert len(python_at) == 2 and all(t < search_end for t in python_at), events
    fast = run({"search": search, "python": SandboxedPython(run=fake_python)})
    np.testing.assert_array_equal(slow.tokens, fast.tokens)
    np.testing.assert_array_equal(slow.num_calls, [1, 2])
    assert slow.timing["tools_s"] < 1.5  # decoding waited for the search less than the search took


def _toy_rollout(corpus, params, key=2):
    prompts = [[ID["question"], ID["capital"]], [ID["compute"]]]
    with toy_env(corpus, max_turns=3, max_result_tokens=6) as env:
        return sample_with_tools(
            params, prompts, jax.random.key(key), cfg=TOY, sampling=SamplingConfig(temperature=1.0, max_new_tokens=24),
            env=env, group_size=4, encode=toy_encode, decode=toy_decode, bucket=8,
        )  # fmt: skip


def test_grpo_loss_ignores_tool_tokens(corpus):
    """The GRPO loss of tool trajectories (ratio, KL, TIS weights): its gradient w.r.t. the parameters is unchanged
    when old / reference / sampler log-probs are perturbed on the result tokens, and its gradient w.r.t. the policy
    log-probs is 0 there (nonzero on model tokens)."""
    params = init_params(TOY, jax.random.key(1), std=0.3)
    ro = _toy_rollout(corpus, params)
    env = jnp.asarray(ro.env_mask)
    assert env.sum() > 0
    gcfg = GRPOConfig(group_size=4, kl_coef=0.05, tis_cap=2.0, max_completion_len=24)
    adv = group_advantages(jnp.asarray(ro.num_calls, jnp.float32), gcfg)
    assert jnp.any(adv != 0)

    def loss_of(p, old, ref, sampler):
        logp, _ = sequence_logprobs(p, ro.prompt_tokens, ro.prompt_start, ro.tokens, TOY, temperature=1.0)
        return grpo_loss(logp, old, ref, adv, ro.mask, gcfg, sampler_logp=sampler)[0]

    rng = np.random.default_rng(0)
    base = jnp.asarray(ro.logp)
    noise = lambda: base + env * jnp.asarray(rng.normal(0, 3.0, base.shape), jnp.float32)  # noqa: E731
    g1 = jax.grad(loss_of)(params, base, base - 0.1, base)
    g2 = jax.grad(loss_of)(params, noise(), noise() - 0.1, noise())
    jax.tree.map(np.testing.assert_array_equal, g1, g2)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g1))
    d_logp = jax.grad(lambda lp: grpo_loss(lp, base, base - 0.1, adv, ro.mask, gcfg, sampler_logp=base)[0])(base)
    np.testing.assert_array_equal(np.asarray(d_logp)[ro.env_mask > 0], 0.0)
    assert np.abs(np.asarray(d_logp)[ro.mask > 0]).max() > 0


def test_overlong_filter_counts_result_tokens():
    """A trajectory cut at the budget is overlong even when result tokens (mask 0) took part of the budget."""
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 1]], np.float32)  # row 0: 2 model + 2 result tokens, cut at T = 4
    ended = np.array([False, True])
    out = np.asarray(overlong_filter(mask, ended, 4, lengths=np.array([4, 4])))
    np.testing.assert_array_equal(out, [[0, 0, 0, 0], [1, 0, 0, 1]])
    assert np.asarray(overlong_filter(mask, ended, 4))[0].sum() == 2  # counting model tokens alone misses it


def test_grpo_step_with_tools(corpus):
    """A GRPO step samples tool trajectories, trains on the model tokens only and logs the tool metrics."""
    cfg = TrainConfig(
        grpo=GRPOConfig(group_size=4, prompts_per_step=2, max_completion_len=24, kl_coef=0.01, overlong_filter=True),
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=24),
        optim=OptimConfig(lr=1e-2),
    )
    seen = {}

    def reward(ro, metas):
        seen["ro"] = ro
        return ro.num_calls.astype(np.float32), {}

    with toy_env(corpus, max_turns=3, max_result_tokens=6) as env:
        trainer = GRPOTrainer(cfg, TOY, reward, stop_ids=[0], encode=toy_encode, decode=toy_decode, tools=env,
                              prompt_bucket=8)  # fmt: skip
        state = trainer.init_state(init_params(TOY, jax.random.key(1), std=0.3))
        prompts = [[ID["question"], ID["capital"]], [ID["compute"]]]
        new, m = trainer.grpo_step(state, prompts, [{}, {}], jax.random.key(4))
    ro = seen["ro"]
    assert isinstance(ro, ToolRollout) and ro.num_calls.sum() > 0
    assert m["tools/calls_per_sample"] == pytest.approx(ro.num_calls.mean())
    kept = ~(~ro.ended & (ro.lengths >= 24))  # the overlong filter drops trajectories cut at the budget
    assert m["response/trained_tokens"] == ro.mask[kept].sum() < ro.lengths.sum()
    assert m["response/length_mean"] == pytest.approx(ro.lengths.mean())
    assert int(new.step) == 1 and np.isfinite(m["loss"])


def test_sft_masks_tool_results():
    """SFT on a trace with tool turns: the result blocks are tokenised as their own pieces and weigh 0 in the loss;
    every other completion token (and EOS) weighs 1."""
    tok = ByteTokenizer()
    completion = "<search>mentor of Qarvel</search><information>[3] Ostrin</information> so <answer>Vexholm</answer>"
    prompt_ids, ids, weights = tokenize_tool_trace("Q?", completion, tok.encode, tools=("search",), eos_id=tok.EOS)
    assert tok.decode(ids) == completion and ids[-1] == tok.EOS and len(weights) == len(ids)
    block = "<information>[3] Ostrin</information>"
    at = completion.index(block)
    want = [1.0] * at + [0.0] * len(block) + [1.0] * (len(completion) - at - len(block)) + [1.0]
    assert weights == want
    packed = pack_examples([(prompt_ids, ids, weights), (prompt_ids, ids)], seq_len=256)
    row = packed["loss_mask"][0]
    first = len(prompt_ids) - 1  # the slot that predicts the first completion token
    np.testing.assert_array_equal(row[first : first + len(ids)], want)
    assert row.sum() == len(ids) - len(block) + len(ids)  # the pair without weights counts every token


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--tools", "calc"], "unknown tool 'calc'"),
        (["--tools", "search"], "needs a corpus"),
        (["--tools", "search", "--corpus", "BAD"], "BAD:2: not valid JSON"),
        (["--tools", "search", "--max-turns", "0"], "max_turns"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "sample"])
def test_cli_tool_errors_are_one_line(tmp_path, capsys, command, extra, match):
    """Bad tool options stop ``r1jax eval`` / ``r1jax sample`` with one line and exit status 2, before any model
    is loaded."""
    from r1jax.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(DOCS[0]) + "\n{oops\n")
    extra = [str(bad) if x == "BAD" else x for x in extra]
    out = ["--out", str(tmp_path / "t.jsonl")] if command == "sample" else []
    code = main([command, str(tmp_path / "no_model"), "--data", "gsm8k", *out, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("r1jax: error:"), err
    assert match.replace("BAD", str(bad)) in err, err


def test_evaluate_with_tools(corpus):
    """``evaluate`` samples with the tools: the scripted model searches, answers "zorblat", and the completions hold
    the tool turn as text."""

    class Model:
        cfg = TOY

        def param_dict(self):
            return bigram_params()

    class Tok:
        eos_id = 0
        encode = staticmethod(toy_encode)
        decode = staticmethod(toy_decode)

    from r1jax.evaluate import sample_completions

    with toy_env(corpus, max_turns=2) as env:
        out = sample_completions(
            Model(), Tok(), [{"prompt": "question"}], k=2, sampling=SamplingConfig(temperature=0.0, max_new_tokens=20),
            tools=env, template="{prompt}",
        )  # fmt: skip
    (s,) = out
    assert s["tool_calls"] == [1, 1] and s["ended"] == [True, True]
    block = "<information>[1] Zorblat: Zorblat is the capital of Quenland, on the river Ames.</information>"
    assert s["completions"] == [f"<search> capital </search> {toy_decode(toy_encode(block))} answer zorblat"] * 2


@pytest.mark.slow  # ~65 s of CPU (3.5 min wall at load average 17 on 2 cores): dataset, GRPO and eval compiles
def test_train_run_with_tools(tmp_path, monkeypatch, corpus):
    """``r1jax train ... --set tools.tools=search --set tools.corpus=...``: the GRPO stage and the in-training eval
    build the tool environment from the config and log the tool metrics (a random byte model rarely closes a call:
    this checks the wiring, the loop itself is tested above)."""
    from r1jax import train

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    sets = ["steps=1", "checkpoint.every=1", "data.template=plain", "data.max_prompt_tokens=384",
            "data.options=train_size=64,test_size=8", "rewards.num_workers=0", "tools.tools=search",
            f"tools.corpus={corpus}", "tools.max_turns=2", "eval.every=1", "eval.limit=2", "eval.batch_size=2",
            "eval.max_new_tokens=8"]  # fmt: skip
    out = tmp_path / "run"
    train.run(train.apply_overrides(train.load_config("tiny_text"), sets), str(out), progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    step = lines[1]
    for key in ("tools/calls_per_sample", "tools/search/errors", "tools/truncated_calls", "perf/sample_tools_s"):
        assert key in step, key
    assert "eval/tool_calls_mean" in lines[0] and "eval/tool_calls_mean" in step
    with pytest.raises(ToolError, match="no such corpus file"):
        train.run(train.apply_overrides(train.load_config("tiny_text"), [*sets[:-7], "tools.tools=search",
                                        f"tools.corpus={tmp_path / 'nope.jsonl'}"]), str(tmp_path / "r2"))  # fmt: skip
