"""Search over a local corpus with a BM25 index (``bm25s``).

The corpus is a JSON-lines file, one document per line: ``{"id": ..., "title": "...", "text": "..."}`` (``id`` a
string or an integer, unique). Title and text are indexed together: lower-cased word tokens (``bm25s``' default
``\\w\\w+`` pattern), no stemming and no stop-word list, so nothing is downloaded. A query returns the ``top_k``
documents with a positive score, best first, formatted compactly one per line as ``[id] title: text``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from r1jax.errors import ToolError
from r1jax.tools.protocol import ToolOutput


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


def load_corpus(path: str) -> list[Document]:
    """The documents of a corpus ``.jsonl``; a ``ToolError`` naming the file and line for anything else (a line
    that is not a JSON object, a missing or mistyped field, a repeated id) and for an empty corpus."""
    if not os.path.isfile(path):
        raise ToolError(f"{path}: no such corpus file")
    docs: list[Document] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ToolError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ToolError(f"{where}: expected a JSON object with id, title and text")
            for key in ("id", "title", "text"):
                if key not in rec:
                    raise ToolError(f"{where}: missing field {key!r}")
            if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
                raise ToolError(f"{where}: 'id' must be a string or an integer")
            if not isinstance(rec["title"], str) or not isinstance(rec["text"], str):
                raise ToolError(f"{where}: 'title' and 'text' must be strings")
            doc_id = str(rec["id"])
            if doc_id in seen:
                raise ToolError(f"{where}: repeated id {doc_id!r}")
            seen.add(doc_id)
            docs.append(Document(doc_id, rec["title"], rec["text"]))
    if not docs:
        raise ToolError(f"{path}: the corpus has no documents")
    return docs


def _tokenize(texts: Sequence[str]):
    import bm25s

    return bm25s.tokenize(list(texts), lower=True, stopwords=None, show_progress=False, return_ids=False)


class BM25Search:
    """``search(query) -> [(Document, score)]`` over a corpus; ``__call__(query) -> str`` formats the hits.

    The index is built once; queries only read it, so many threads may search at once.
    """

    name = "search"

    def __init__(self, docs: Sequence[Document], *, top_k: int = 3):
        import bm25s

        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.docs = list(docs)
        self.top_k = top_k
        self._index = bm25s.BM25()
        self._index.index(bm25s.tokenize([f"{d.title} {d.text}" for d in self.docs], lower=True, stopwords=None,
                                         show_progress=False), show_progress=False)  # fmt: skip

    @classmethod
    def from_file(cls, path: str, *, top_k: int = 3) -> BM25Search:
        return cls(load_corpus(path), top_k=top_k)

    def search(self, query: str) -> list[tuple[Document, float]]:
        """The best ``top_k`` documents with a positive BM25 score (ties in corpus order)."""
        tokens = _tokenize([query])[0]
        if not tokens:
            return []
        scores = np.asarray(self._index.get_scores(tokens), np.float64)
        order = np.argsort(-scores, kind="stable")[: self.top_k]
        return [(self.docs[i], float(scores[i])) for i in order if scores[i] > 0]

    def __call__(self, query: str) -> ToolOutput:
        hits = self.search(query)
        if not hits:
            return ToolOutput("no results")
        return ToolOutput("\n".join(f"[{d.id}] {d.title}: {d.text}" for d, _ in hits))
