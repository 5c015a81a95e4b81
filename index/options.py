"""The document window of a span's documents, defined once: how many documents, how much
context around the match, how long the snippet.

    from index.options import DocumentWindow, WINDOW
    WINDOW.context_tokens                                   # 250, the default
    DocumentWindow.parse(context_tokens=5000)              # InputError naming the limit (2000)

The defaults are OLMoTrace's published production settings (docs/architecture.md, Tracing).
Every layer takes its defaults and limits from here: `TraceOptions` (tracing/options.py)
extends `DocumentWindow`, the owner-node protocol (index/protocol.py) types its fields with
the same annotated types, and the engines' `documents` methods (index/engine.py,
index/source.py, index/remote.py) default to `WINDOW`'s values, so a window the tracer may
ask for is one every owner node accepts.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from flexolmo.base.options import Options

DOCS_LIMIT = 100  # documents per span
CONTEXT_LIMIT = 2_000  # context tokens a side of the match
SNIPPET_LIMIT = 500  # tokens of the short snippet

MaxDocs = Annotated[int, Field(ge=0, le=DOCS_LIMIT, description="Documents per span, sampled with `seed` when more.")]
ContextTokens = Annotated[int, Field(ge=0, le=CONTEXT_LIMIT, description="Context a side of the match in the long view.")]
SnippetTokens = Annotated[int, Field(ge=1, le=SNIPPET_LIMIT, description="Tokens of the short snippet around the match.")]


class DocumentWindow(Options):
    """Which documents of a span are shown and how much of each."""

    WHAT = "document window"

    max_docs: MaxDocs = 10
    context_tokens: ContextTokens = 250
    snippet_tokens: SnippetTokens = 40


WINDOW = DocumentWindow()  # the defaults, for signatures: `n: int = WINDOW.max_docs`
