"""The ``code`` reward: run the completion's program against the example's tests in the bubblewrap sandbox
(``r1jax.sandbox``; R1 section 2.2.2, "a compiler can evaluate against predefined test cases").

The program is the completion's last fenced ```` ```python ```` (or ```` ```py ````) block, or the whole completion
when it has none, after ``meta["prefix"]`` when given (HumanEval's prompt: its imports and helper functions; the
program's own definition of the function replaces the stub's). Two test formats:

- ``meta["tests"] = [{"input": str, "output": str}, ...]``: one run per test with ``input`` on stdin; a test passes
  when the run exits 0 and its stdout equals ``output`` up to line endings and surrounding whitespace (both are
  stripped, and so is every line's trailing whitespace);
- ``meta["test"]`` (source defining ``check(candidate)``) and ``meta["entry_point"]``: one run of
  ``program + test + check(<entry_point>)``, which passes when it exits 0 (HumanEval's rule).

Value (``RewardConfig.code_score``): the fraction of tests passed, or 1.0 only when all pass ("all": the runs stop
at the first failure). Counts reported as ``rewards/<function>/<count>``: ``tests_run``, ``tests_passed``,
``tests_wrong`` (exit 0, wrong output), ``sandbox_error`` (another exit status), ``sandbox_timeout``,
``sandbox_killed`` (a signal: CPU limit, segfault, ...), ``sandbox_output_limit``.

The pool's deadline for one completion (``code_timeout_s``) covers every run at ``code_wall_s`` plus a second of
sandbox start-up each, on top of ``RewardConfig.timeout_s``: the sandbox's own deadline ends a run first, the
pool's is the backstop. The sandbox's address-space limit is applied under the pool worker's (the lower wins).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from r1jax import sandbox
from r1jax.config import CodeSandbox, CodeScore, RewardConfig
from r1jax.rewards.outcome import Scored

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CHECK = re.compile(r"^def[ \t]+check[ \t]*\(", re.MULTILINE)
RUN_OVERHEAD_S = 1.0  # sandbox start-up and teardown beyond a run's wall limit, in the pool's deadline
COUNTS = (
    "tests_run",
    "tests_passed",
    "tests_wrong",
    "sandbox_error",
    "sandbox_timeout",
    "sandbox_killed",
    "sandbox_output_limit",
)


def extract_program(completion: str) -> str:
    """The last ```` ```python ```` block's code, or the whole completion when there is no such block."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def normalize_output(text: str) -> str:
    """Output as compared: universal line endings, trailing whitespace of each line and of the whole removed."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def meta_problem(meta: Mapping[str, Any]) -> str | None:
    """What makes ``meta`` unusable for the code reward (one phrase), or None when it is fine."""
    tests, test = meta.get("tests"), meta.get("test")
    if tests is not None and test is not None:
        return "has both 'tests' (stdin/stdout) and 'test' (check(candidate)); give one"
    if tests is not None:
        if not isinstance(tests, list | tuple) or not tests:
            return '\'tests\' must be a non-empty list of {"input": ..., "output": ...}'
        for k, t in enumerate(tests):
            if not (isinstance(t, Mapping) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str)):
                return f'tests[{k}] must be {{"input": str, "output": str}}'
    elif test is not None:
        if not isinstance(test, str) or not _CHECK.search(test):
            return "'test' defines no check(candidate) function"
        entry = meta.get("entry_point")
        if not isinstance(entry, str) or not _IDENTIFIER.fullmatch(entry):
            return f"'entry_point' must be a Python identifier, got {entry!r}"
    else:
        return "needs 'tests' (stdin/stdout pairs) or 'test' + 'entry_point'"
    if not isinstance(meta.get("prefix", ""), str):
        return "'prefix' must be a string"
    return None


def num_runs(meta: Mapping[str, Any]) -> int:
    """How many sandboxed runs scoring one completion of this example takes at most."""
    return len(meta["tests"]) if meta.get("tests") is not None else 1


def code_timeout_s(meta: Mapping[str, Any], cfg: RewardConfig) -> float:
    """The reward pool's deadline for one completion of this example (see the module docstring)."""
    return cfg.timeout_s + num_runs(meta) * (cfg.code_wall_s + RUN_OVERHEAD_S)


def limits(cfg: RewardConfig) -> sandbox.SandboxLimits:
    return sandbox.SandboxLimits(
        cpu_s=cfg.code_cpu_s, wall_s=cfg.code_wall_s, memory_mb=cfg.code_memory_mb, max_procs=cfg.code_max_procs
    )


def check_available(cfg: RewardConfig) -> None:
    """Raise ``SandboxUnavailable`` (one line) when ``cfg`` wants the sandbox and this machine has none."""
    if cfg.code_sandbox == CodeSandbox.BWRAP:
        sandbox.check_sandbox()


def code_reward(completion: str, meta: Mapping[str, Any], cfg: RewardConfig) -> Scored:
    """Fraction of ``meta``'s tests the completion's program passes (or all-or-nothing), with per-run counts."""
    problem = meta_problem(meta)
    if problem is not None:
        raise ValueError(f"code reward: metadata {problem}")
    program = str(meta.get("prefix", "")) + "\n\n" + extract_program(completion)
    lim, unsandboxed = limits(cfg), cfg.code_sandbox == CodeSandbox.NONE
    counts = dict.fromkeys(COUNTS, 0)

    def run(source: str, stdin: str = "") -> sandbox.SandboxResult:
        result = sandbox.run_python(source, stdin=stdin, limits=lim, unsandboxed=unsandboxed)
        counts["tests_run"] += 1
        if result.status != sandbox.OK:
            counts[f"sandbox_{result.status}"] += 1
        return result

    if meta.get("tests") is not None:
        tests, passed = meta["tests"], 0
        for t in tests:
            result = run(program, t["input"])
            ok = result.ok and normalize_output(result.stdout) == normalize_output(t["output"])
            counts["tests_wrong"] += result.ok and not ok
            passed += ok
            if not ok and cfg.code_score == CodeScore.ALL:
                break
        total = len(tests)
    else:
        source = f"{program}\n\n{meta['test']}\n\ncheck({meta['entry_point']})\n"
        passed, total = int(run(source).ok), 1
    counts["tests_passed"] = passed
    value = passed / total if cfg.code_score == CodeScore.FRACTION else float(passed == total)
    return Scored(value, counts)
