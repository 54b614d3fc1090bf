"""The tool environment of multi-turn rollouts: the configured tools, how a call is recognised in the model's text,
how its result is formatted, and a thread pool that runs the calls of many rows at once.

``ToolEnv.run(calls)`` submits every call to the pool and waits for all of them: the calls of one turn overlap each
other (a slow tool delays its own row's result, not the start of the others' calls), and the turn takes as long as
its slowest call, bounded by ``timeout_s`` (a call that has not answered by then gets a "timeout" result; its thread
is left to finish on its own, so every tool bounds its own running time too: the sandbox has a wall-clock limit).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from r1jax.errors import ToolError
from r1jax.tools.protocol import TOOL_SYNTAX, Tool, ToolOutput, ToolSyntax

if TYPE_CHECKING:
    from r1jax.config import ToolConfig


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call found in a row's text: the tool and its argument (None: a closing tag with no opening tag)."""

    tool: str
    argument: str | None


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """What happened to one call: the call, its (capped) result text and error kind, and its wall time."""

    tool: str
    argument: str | None
    result: str
    error: str | None
    wall_s: float


class ToolEnv:
    """Tools by name plus the limits of ``ToolConfig`` (``cfg``).

    - ``stop_strings``: the call closing tags (what the sampler stops on).
    - ``find_call(segment)``: the call a segment of model text ends with, or None.
    - ``run(calls)``: every call at once -> ``CallRecord``s in order; ``submit(call)`` / ``record(call, future,
      started)``: one call started now, collected later (the rollout decodes other rows meanwhile).
    - ``result_text(record)``: the result block appended to the trajectory.
    """

    def __init__(self, tools: Mapping[str, Tool], cfg: ToolConfig, *, forbidden: Sequence[str] = ()):
        unknown = [name for name in tools if name not in TOOL_SYNTAX]
        if unknown:
            raise ToolError(f"unknown tool {unknown[0]!r}; known tools: {', '.join(TOOL_SYNTAX)}")
        if not tools:
            raise ToolError("a tool environment needs at least one tool")
        self.tools = dict(tools)
        self.cfg = cfg
        self.syntax: dict[str, ToolSyntax] = {name: TOOL_SYNTAX[name] for name in self.tools}
        # tags of every tool: a result must not contain them (the model would read a call or a result boundary)
        tags = [t for s in TOOL_SYNTAX.values() for t in (s.call_open, s.call_close, s.result_open, s.result_close)]
        self._forbidden = tuple(dict.fromkeys([*tags, *forbidden]))
        self._pool = cf.ThreadPoolExecutor(max_workers=cfg.num_threads, thread_name_prefix="r1jax-tool")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s.call_close for s in self.syntax.values())

    def find_call(self, segment: str) -> ToolCall | None:
        """The call that ``segment`` (one turn of model text, cut after its first stop string) ends with."""
        for name, s in self.syntax.items():
            if segment.endswith(s.call_close):
                return ToolCall(name, s.call_argument(segment))
        return None

    def open_call(self, text: str) -> bool:
        """Does ``text`` end inside a call that never closed?"""
        return any(s.open_call(text) for s in self.syntax.values())

    def _one(self, call: ToolCall) -> tuple[ToolOutput, float]:
        t0 = time.perf_counter()
        if call.argument is None:
            out = ToolOutput(f"malformed {call.tool} call: a closing tag without an opening tag", "malformed")
        else:
            try:
                out = self.tools[call.tool](call.argument)
            except Exception as e:  # a tool's failure is the model's observation, not the trainer's crash
                out = ToolOutput(f"{call.tool} failed: {e.__class__.__name__}", "exception")
        return out, time.perf_counter() - t0

    def run(self, calls: Sequence[ToolCall]) -> list[CallRecord]:
        """Run all ``calls`` concurrently; results in the order of ``calls``."""
        t0 = time.perf_counter()
        futures = [self.submit(c) for c in calls]
        return [self.record(c, f, t0) for c, f in zip(calls, futures, strict=True)]

    def submit(self, call: ToolCall) -> cf.Future:
        """Start ``call`` on the pool; ``record`` collects it."""
        return self._pool.submit(self._one, call)

    def record(self, call: ToolCall, future: cf.Future, started: float) -> CallRecord:
        """The ``CallRecord`` of a submitted call, waiting at most until ``timeout_s`` after ``started``."""
        left = self.cfg.timeout_s - (time.perf_counter() - started)
        try:
            out, wall = future.result(timeout=max(left, 0.0))
        except cf.TimeoutError:
            out, wall = ToolOutput(f"{call.tool} timed out after {self.cfg.timeout_s:g}s", "timeout"), left
        return CallRecord(call.tool, call.argument, self._clean(out.text), out.error, wall)

    def _clean(self, text: str) -> str:
        for s in self._forbidden:
            text = text.replace(s, "")
        text = text.strip("\n")
        cap = self.cfg.max_result_chars
        return text if len(text) <= cap else text[:cap] + " ..."

    def result_text(self, record: CallRecord) -> str:
        return self.syntax[record.tool].result_block(record.result)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ToolEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_tools(cfg: ToolConfig, *, forbidden: Sequence[str] = (), sandbox_limits=None) -> ToolEnv:
    """The ``ToolEnv`` of ``cfg.tools``: ``search`` loads and indexes ``cfg.corpus``; ``python`` first checks that
    the sandbox works (``r1jax.sandbox.check_sandbox``; it refuses with one line where it cannot). ``forbidden``:
    strings removed from results besides the tool tags (e.g. the run's stop strings). ``ToolError`` on bad input."""
    tools: dict[str, Tool] = {}
    for name in cfg.tools:
        if name == "search":
            from r1jax.tools.search import BM25Search

            if not cfg.corpus:
                raise ToolError("the search tool needs a corpus: set tools.corpus to a .jsonl of {id, title, text}")
            tools[name] = BM25Search.from_file(cfg.corpus, top_k=cfg.top_k)
        elif name == "python":
            from r1jax.sandbox import check_sandbox
            from r1jax.tools.python import SandboxedPython

            check_sandbox()
            tools[name] = SandboxedPython(limits=sandbox_limits)
        else:
            raise ToolError(f"unknown tool {name!r}; known tools: {', '.join(TOOL_SYNTAX)}")
    return ToolEnv(tools, cfg, forbidden=forbidden)
