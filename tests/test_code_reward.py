"""The ``code`` reward through the real reward pool: HumanEval's canonical solutions pass and bugged ones fail,
stdin/stdout tests, fraction vs all-or-nothing, bad input, and hostile programs that must score 0 within their time
limit, leave the host and the pool unharmed and show in the metrics."""

import dataclasses
import json
import os
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from r1jax import sandbox
from r1jax.config import RewardConfig
from r1jax.data.builders import humaneval
from r1jax.data.datasets import DataError, load_dataset
from r1jax.errors import MetadataError
from r1jax.rewards import RewardPool, Scorer, extract_program
from r1jax.rewards.code import COUNTS, code_timeout_s, normalize_output
from r1jax.sandbox import SandboxUnavailable

REPO = Path(__file__).resolve().parents[1]
FAST = dict(code_wall_s=3.0, code_cpu_s=2.0, code_memory_mb=256, code_max_procs=8, timeout_s=5.0)
CODE = RewardConfig(functions=("code",), weights=(1.0,), **FAST)


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, memory_mb=1024) as p:
        yield p


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    data = load_dataset("humaneval", "test", data_dir=str(tmp_path_factory.mktemp("tfds")))
    assert len(data) == humaneval.NUM_PROBLEMS
    return [data[i] for i in range(len(data))]


def _fence(code: str) -> str:
    return f"Here is the program.\n```python\n{code}```\n"


def _score(pool, completions, metas, cfg=CODE):
    return Scorer(cfg, pool=pool).score(completions, metas)


def test_humaneval_canonical_solutions_all_pass(pool, problems):
    _score(pool, [problems[0]["solution"]] * 2, problems[:2])  # workers started and their sandbox probed
    t0 = time.monotonic()
    rewards, metrics = _score(pool, [p["solution"] for p in problems], problems)
    seconds = time.monotonic() - t0
    failed = [p["task_id"] for p, r in zip(problems, rewards, strict=True) if r != 1.0]
    assert failed == [] and metrics["rewards/code/tests_passed"] == 164 and metrics["rewards/code/tests_run"] == 164
    assert metrics["rewards/code/timeouts"] == 0 and metrics["rewards/code/errors"] == 0
    print(f"\nHumanEval canonical: 164/164 in {seconds:.1f} s, {164 / seconds:.1f} programs/s, 2 workers")


def test_accuracy_routes_code_tasks(pool, problems):
    """``accuracy`` dispatches task "code" to the sandboxed tests (and evaluate.py counts a 1 as correct)."""
    cfg = RewardConfig(functions=("accuracy",), weights=(1.0,), **FAST)
    sample = problems[:4]
    rewards, metrics = _score(pool, [p["solution"] for p in sample] + ["no code"], sample + [sample[0]], cfg)
    np.testing.assert_array_equal(rewards, [1, 1, 1, 1, 0])
    assert metrics["rewards/accuracy/tests_run"] == 5 and metrics["rewards/accuracy/sandbox_error"] == 1


def _perturbed(problem: dict) -> str:
    """The canonical program with its entry point's return value changed (type-preserving where possible)."""
    ep = problem["entry_point"]
    wrapper = (
        f"\n_orig = {ep}\n"
        f"def {ep}(*args, **kwargs):\n"
        "    r = _orig(*args, **kwargs)\n"
        "    if isinstance(r, bool):\n"
        "        return not r\n"
        "    if isinstance(r, int | float):\n"
        "        return r + 1\n"
        "    if isinstance(r, str):\n"
        "        return r + 'x'\n"
        "    if isinstance(r, list | tuple):\n"
        "        return type(r)([*r, 0])\n"
        "    return 'perturbed'\n"
    )
    return _fence(problem["prefix"] + extract_program(problem["solution"])[len(problem["prefix"]) :] + wrapper)


def test_humaneval_bugged_solutions_score_zero(pool, problems):
    sample = problems[::6]  # 28 problems
    returns_none = [_fence(p["prefix"] + "    return None\n") for p in sample]
    perturbed = [_perturbed(p) for p in sample]
    rewards, metrics = _score(pool, returns_none + perturbed, sample + sample)
    passing = [(i, p["task_id"]) for i, (p, r) in enumerate(zip(sample + sample, rewards, strict=True)) if r != 0]
    assert passing == [] and metrics["rewards/code/sandbox_error"] == 2 * len(sample)


def test_stdin_stdout_fraction_and_all(pool):
    meta = {
        "task": "code",
        "tests": [
            {"input": "1 2\n", "output": "3\n"},
            {"input": "5 5", "output": "10"},
            {"input": "-1 1\r\n", "output": "  0  \r\n"},  # whitespace and line endings do not matter
            {"input": "2 2", "output": "5"},  # the program is right, the test is not: fails
        ],
    }
    adder = _fence("a, b = map(int, input().split())\nprint(a + b)\n")
    rewards, metrics = _score(pool, [adder, "print(3)", "import sys\nsys.exit(1)"], [meta] * 3)
    np.testing.assert_allclose(rewards, [0.75, 0.25, 0.0])
    assert metrics["rewards/code/tests_run"] == 12 and metrics["rewards/code/tests_passed"] == 4
    assert metrics["rewards/code/tests_wrong"] == 4 and metrics["rewards/code/sandbox_error"] == 4
    cfg = RewardConfig(functions=("code",), weights=(1.0,), code_score="all", **FAST)
    rewards, metrics = _score(pool, [adder], [{**meta, "tests": meta["tests"][:3]}], cfg)
    assert rewards[0] == 1.0
    rewards, metrics = _score(pool, [adder, "print(3)"], [meta] * 2, cfg)
    np.testing.assert_array_equal(rewards, [0, 0])
    assert metrics["rewards/code/tests_run"] == 4 + 2  # all-or-nothing stops at the first failure


def test_pool_deadline_cut_reports_zero_counts_and_leaves_nothing(pool):
    """When the pool's deadline (here shorter than the sandbox's own) kills a worker in the middle of a run, the
    code counts are still in the metrics, and the sandbox dies with its worker (``--die-with-parent``)."""
    scorer = Scorer(CODE, pool=pool)
    scorer.specs[0] = dataclasses.replace(scorer.specs[0], timeout_s=lambda meta, cfg: 1.0)
    _score(pool, ["print(1)"], [{"tests": [{"input": "", "output": "1"}]}])  # workers up
    workers = [w.proc.pid for w in pool._workers]
    _, metrics = scorer.score(["import time\ntime.sleep(30)"], [{"tests": [{"input": "", "output": ""}]}])
    assert metrics["rewards/code/timeouts"] == 1
    assert {k: metrics[f"rewards/code/{k}"] for k in COUNTS} == dict.fromkeys(COUNTS, 0.0)
    deadline = time.monotonic() + 10
    while _leftovers(workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _leftovers(workers) == []


def test_program_extraction_and_comparison():
    text = "plan\n```python\nprint(1)\n```\nbetter:\n```py\nprint(2)\n```\n```\nnot python\n```"
    assert extract_program(text) == "print(2)\n"
    assert extract_program("print(3)") == "print(3)"
    assert extract_program("```Python\nx = 1\n```") == "x = 1\n"
    assert normalize_output("a  \r\nb\r\n\n") == normalize_output("a\nb") == "a\nb"
    assert normalize_output("a b") != normalize_output("a  b")


def test_pool_deadline_covers_every_run():
    meta = {"tests": [{"input": "", "output": ""}] * 5}
    assert code_timeout_s(meta, CODE) == CODE.timeout_s + 5 * (CODE.code_wall_s + 1.0)
    assert code_timeout_s({"test": "def check(c): pass", "entry_point": "f"}, CODE) == CODE.timeout_s + 4.0


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"test": "assert f() == 1", "entry_point": "f"}, "defines no check"),
        ({"test": "def check(c):\n    pass", "entry_point": "f()"}, "entry_point"),
        ({"tests": []}, "non-empty list"),
        ({"tests": [{"input": "1"}]}, r"tests\[0\]"),
        ({}, "needs 'tests'"),
    ],
)
def test_bad_metadata_is_one_line(pool, meta, message):
    with pytest.raises(MetadataError, match=message) as e:
        _score(pool, ["print(1)"], [meta])
    assert "\n" not in str(e.value)


def test_code_jsonl_format(tmp_path):
    good = tmp_path / "code.jsonl"
    rows = [
        {"prompt": "add", "tests": [{"input": "1 2", "output": "3"}]},
        {"prompt": "sq", "test": "def check(c):\n    assert c(2) == 4\n", "entry_point": "sq"},
        {"prompt": "plain"},
    ]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(str(good))
    assert [d["task"] for d in data] == ["code", "code", "none"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x", "test": "pass", "entry_point": "f"}) + "\n")
    with pytest.raises(DataError, match=rf"^{bad}:2: 'test' defines no check\(candidate\) function$"):
        load_dataset(str(bad))
    bad.write_text(json.dumps({"prompt": "x", "tests": [{"input": 1, "output": "2"}]}) + "\n")
    with pytest.raises(DataError, match=rf"^{bad}:1: tests\[0\]"):
        load_dataset(str(bad))


def test_no_sandbox_refuses_in_one_line(pool, monkeypatch):
    monkeypatch.setattr(sandbox, "_probe", lambda: "the bubblewrap sandbox does not work here: no user namespaces")
    with pytest.raises(SandboxUnavailable, match="^the bubblewrap sandbox does not work here"):
        _score(pool, ["print(1)"], [{"tests": [{"input": "", "output": "1"}]}])
    with pytest.raises(ValueError, match="code_sandbox"):
        RewardConfig(code_sandbox="off")


# ---------------------------------------------------------------------------------------------- hostile programs

MARK = f"r1jax-hostile-{uuid.uuid4().hex[:8]}"
HOST_CANARY = f"/tmp/{MARK}-canary"  # the host's tmp: a sandbox writes to its own /tmp
REPO_CANARY = str(REPO / f"{MARK}-canary")
CHECK = {"test": "def check(candidate):\n    assert candidate() == 1\n", "entry_point": "f"}


def _hostile(port: int, home_secret: Path, host_pids: list[int]) -> dict[str, tuple[str, str]]:
    """name -> (program, the sandbox statuses it may end with). ``f()`` returns 1 only if the attack worked, so a
    program passes only by escaping."""
    return {
        "read the repo": (f"def f():\n    return int(len(open({str(REPO / 'README.md')!r}).read()) > 0)\n", "error"),
        "read /etc/shadow": ("def f():\n    return int(len(open('/etc/shadow').read()) > 0)\n", "error"),
        "read home": (f"def f():\n    return int(open({str(home_secret)!r}).read() == 'secret')\n", "error"),
        "write outside tmp": (
            f"open({HOST_CANARY!r}, 'w').write('x')\nopen({REPO_CANARY!r}, 'w').write('x')\ndef f():\n    return 1\n",
            "error",
        ),
        "connect to 127.0.0.1": (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\ndef f():\n    return 1\n",
            "error",
        ),
        "fork bomb": (
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
            "timeout",
        ),
        "allocate without end": ("x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n", "error timeout"),
        "loop forever": ("while True:\n    pass\n", "killed timeout"),  # CPU limit, or the wall clock on a busy host
        "kill the parent": (
            "import os, signal, time\n"
            "ppid = os.getppid()\n"
            f"for pid in [ppid, 1, -1, *{host_pids!r}]:\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError:\n"
            "        pass\n"
            "time.sleep(0.3)\n"
            "def f():\n"
            "    return int(not os.path.exists(f'/proc/{ppid}'))\n",
            "error",
        ),
        "ctypes segfault": ("import ctypes\nctypes.string_at(0)\ndef f():\n    return 1\n", "killed"),
        "print gigabytes": (
            "import sys\nfor _ in range(1 << 12):\n    sys.stdout.write('x' * (1 << 20))\ndef f():\n    return 1\n",
            "output_limit",
        ),
        "background process": (
            "import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(1.0)\n"
            f"        open({HOST_CANARY!r}, 'w').write('late')\n"
            f"        open({REPO_CANARY!r}, 'w').write('late')\n"
            "    os._exit(0)\n"
            "time.sleep(0.2)\n"
            "def f():\n"
            f"    return int(os.path.exists({REPO_CANARY!r}))\n",
            "error",
        ),
    }


def _leftovers(workers: list[int]) -> list[int]:
    """Live processes below the pool's workers (an idle worker has none) and, for a root caller, live processes of
    the uids the workers' sandboxes run as (which catches those reparented away from the worker)."""
    parent, uid = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as f:
                uid[int(entry)] = int(next(line for line in f if line.startswith("Uid:")).split()[1])
        except (OSError, ValueError, IndexError, StopIteration):
            continue
    found, frontier = set(), set(workers)
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        found |= frontier
    if os.geteuid() == 0:
        uids = {u for w in workers for u in sandbox.sandbox_uids(w)}
        found |= {p for p, u in uid.items() if u in uids}
    return sorted(found)


@pytest.fixture(scope="module")
def listener():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        yield server


@pytest.fixture(scope="module")
def home_secret():
    path = Path.home() / f".{MARK}-secret"
    path.write_text("secret")
    yield path
    path.unlink()


HOSTILE_NAMES = list(_hostile(0, Path("/"), []))


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_program(pool, listener, home_secret, name):
    _score(pool, ["def f():\n    return 1\n"], [CHECK])  # workers up
    workers = [w.proc.pid for w in pool._workers]
    restarts = pool.restarts
    program, statuses = _hostile(listener.getsockname()[1], home_secret, [os.getpid(), *workers])[name]
    t0 = time.monotonic()
    rewards, metrics = _score(pool, [_fence(program)], [CHECK])
    seconds = time.monotonic() - t0
    assert rewards[0] == 0.0
    assert seconds < CODE.code_wall_s + 2.0  # ended by the sandbox's own limits, not the pool's backstop
    outcomes = {s: metrics[f"rewards/code/sandbox_{s}"] for s in ("error", "timeout", "killed", "output_limit")}
    assert sum(outcomes.values()) == 1 and sum(outcomes[s] for s in statuses.split()) == 1, outcomes
    assert metrics["rewards/code/timeouts"] == 0 and metrics["rewards/code/errors"] == 0
    # the host and the pool are unharmed
    assert pool.restarts == restarts and [w.proc.pid for w in pool._workers] == workers
    assert all(w.proc.is_alive() for w in pool._workers)
    assert _leftovers(workers) == []
    with pytest.raises(BlockingIOError):
        listener.accept()
    assert not os.path.exists(HOST_CANARY) and not os.path.exists(REPO_CANARY)
    assert home_secret.read_text() == "secret"
    rewards, _ = _score(pool, ["def f():\n    return 1\n"], [CHECK])
    assert rewards[0] == 1.0  # the pool still scores a normal program
    if name == "background process":
        time.sleep(1.2)  # past the moment the daemon would have written
        assert not os.path.exists(HOST_CANARY) and not os.path.exists(REPO_CANARY)


def test_evaluate_counts_passing_programs_correct(problems, monkeypatch):
    """``r1jax eval`` on code problems: a sample is correct when its program passes; identical programs vote
    together in maj@k."""
    from r1jax import evaluate as ev

    sample = problems[:2]
    wrong = [_fence(p["prefix"] + "    return None\n") for p in sample]
    scripted = {p["prompt"]: [p["solution"], w, p["solution"], w] for p, w in zip(sample, wrong, strict=True)}
    scripted[sample[1]["prompt"]][2] = wrong[1]  # problem 1: one right, three wrong

    def fake_sample(model, tokenizer, examples, *, k, sampling, template, system, batch_size, seed, **kw):
        return [
            {"prompt": ex["prompt"], "think_prefilled": False, "completions": scripted[ex["prompt"]],
             "lengths": [9] * 4, "ended": [True] * 4}
            for ex in examples
        ]  # fmt: skip

    monkeypatch.setattr(ev, "sample_completions", fake_sample)
    cfg = RewardConfig(functions=("accuracy",), weights=(1.0,), **FAST)
    out = ev.evaluate(None, None, sample, k=4, template="plain", rewards=cfg, return_samples=True)
    assert out["samples"][0]["correct"] == [True, False, True, False]
    assert out["samples"][1]["correct"] == [True, False, False, False]
    assert out["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert out["maj@4"] == pytest.approx(0.5)  # problem 0: a tie, the first seen (right) wins; problem 1: wrong
