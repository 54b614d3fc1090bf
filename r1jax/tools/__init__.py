"""Tools the model calls from inside its reasoning (multi-turn rollouts: ``r1jax.tool_rollout``). No JAX here.

==========  ===========================  ====================================  ======================================
tool        the model writes             the environment appends               what runs
==========  ===========================  ====================================  ======================================
``search``  ``<search>QUERY</search>``   ``<information>RESULT</information>``  BM25 (``bm25s``) over ``tools.corpus``
``python``  ``<python>CODE</python>``    ``<output>RESULT</output>``            ``r1jax.sandbox.run_python``
==========  ===========================  ====================================  ======================================

API:

- ``TOOL_SYNTAX[name] -> ToolSyntax`` (the four tags; ``result_block``, ``call_argument``), ``result_spans(text,
  names)`` (where the results are in a trajectory's text: what SFT masks out).
- ``Tool``: ``name`` + ``__call__(argument) -> ToolOutput(text, error)``; ``BM25Search`` (``load_corpus(path)``:
  jsonl of ``{"id", "title", "text"}``, errors name file:line), ``SandboxedPython``.
- ``build_tools(ToolConfig) -> ToolEnv``: ``stop_strings`` (the call closing tags), ``find_call(segment)``,
  ``run(calls) -> [CallRecord]`` (all calls of a turn at once on a thread pool), ``result_text(record)``, ``close()``.

Configured by ``r1jax.config.ToolConfig`` (``TrainConfig.tools``; ``--set tools.tools=search --set
tools.corpus=corpus.jsonl``).
"""

from r1jax.tools.env import CallRecord, ToolCall, ToolEnv, build_tools
from r1jax.tools.protocol import TOOL_SYNTAX, Tool, ToolOutput, ToolSyntax, result_spans, syntax_of
from r1jax.tools.python import SandboxedPython
from r1jax.tools.search import BM25Search, Document, load_corpus

__all__ = [
    "TOOL_SYNTAX",
    "BM25Search",
    "CallRecord",
    "Document",
    "SandboxedPython",
    "Tool",
    "ToolCall",
    "ToolEnv",
    "ToolOutput",
    "ToolSyntax",
    "build_tools",
    "load_corpus",
    "result_spans",
    "syntax_of",
]
