"""What a tool is: its call syntax (the tags the model writes around a call, the tags the environment writes around
the result) and its interface (``Tool``: argument text in, ``ToolOutput`` out). Standard library only
(``r1jax.config`` validates tool names against ``TOOL_SYNTAX``).

A call is ``<search>QUERY</search>`` or ``<python>CODE</python>``; the environment answers by appending
``<information>RESULT</information>`` or ``<output>RESULT</output>`` right after the call's closing tag, and the
model goes on writing after the result's closing tag. The closing tag of a call is what stops the sampler.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class ToolOutput:
    """One call's result: ``text`` is what the model reads between the result tags; ``error`` is None when the call
    worked, else a short kind for the metrics ("timeout", "exit", "malformed", "exception", ...)."""

    text: str
    error: str | None = None


class Tool(Protocol):
    """A tool: ``name`` (a key of ``TOOL_SYNTAX``) and ``__call__(argument) -> ToolOutput``. Tools are called from
    several threads at once and must bound their own running time."""

    name: str

    def __call__(self, argument: str) -> ToolOutput: ...


@dataclasses.dataclass(frozen=True)
class ToolSyntax:
    """The four tags of one tool."""

    name: str
    call_open: str
    call_close: str
    result_open: str
    result_close: str

    def result_block(self, text: str) -> str:
        """What the environment appends after a call: the result between the result tags."""
        return f"{self.result_open}{text}{self.result_close}"

    def call_argument(self, segment: str) -> str | None:
        """The argument of the call that ``segment`` ends with (text ending in ``call_close``): the text after the
        last ``call_open`` before it, stripped; None when there is no opening tag (a malformed call)."""
        if not segment.endswith(self.call_close):
            raise ValueError(f"segment does not end with {self.call_close!r}")
        body = segment[: -len(self.call_close)]
        at = body.rfind(self.call_open)
        return None if at < 0 else body[at + len(self.call_open) :].strip()

    def open_call(self, segment: str) -> bool:
        """Does ``segment`` end inside a call of this tool (an opening tag with no closing tag after it)?"""
        at = segment.rfind(self.call_open)
        return at >= 0 and self.call_close not in segment[at:]


TOOL_SYNTAX: dict[str, ToolSyntax] = {
    "search": ToolSyntax("search", "<search>", "</search>", "<information>", "</information>"),
    "python": ToolSyntax("python", "<python>", "</python>", "<output>", "</output>"),
}


def syntax_of(name: str) -> ToolSyntax:
    """The syntax of a known tool; a ``ValueError`` naming the known ones otherwise."""
    if name not in TOOL_SYNTAX:
        raise ValueError(f"unknown tool {name!r}; known tools: {', '.join(TOOL_SYNTAX)}")
    return TOOL_SYNTAX[name]


def result_spans(text: str, names: tuple[str, ...] | list[str]) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the result blocks of the tools ``names`` in a trajectory's text, in order.

    A block runs from its result opening tag to the end of its closing tag; one that never closes (a result cut at
    the token budget) runs to the end of the text. Used to keep environment text out of SFT losses.
    """
    tags = [(s.result_open, s.result_close) for s in map(syntax_of, names)]
    spans, at = [], 0
    while True:
        hits = [(text.find(o, at), o, c) for o, c in tags if text.find(o, at) >= 0]
        if not hits:
            return spans
        start, opening, close = min(hits)
        end = text.find(close, start + len(opening))
        end = len(text) if end < 0 else end + len(close)
        spans.append((start, end))
        at = end
