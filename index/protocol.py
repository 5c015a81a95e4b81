"""The owner-node protocol, version 1: request and response shapes, and their limits.

    GET  /v1/identity    -> Identity         who the node is: source, owner, tokenizer, counts, build
    POST /v1/matches     -> MatchesAnswer    longest match and its count at every query position
    POST /v1/documents   -> DocumentsAnswer  sampled occurrences of kept spans, cut to the owner's policy
    POST /v1/doc_freq    -> DocFreqAnswer    document frequencies of words, for relevance (404: no table)

Every request carries `Authorization: Bearer <key>` (a key the source's owner issued with
scope `index`): 401 without a valid one, 403 with another owner's. Errors are JSON
`{"detail": "..."}` with a 4xx status; a source its owner switched off answers 409.

What crosses the wire is only what these models hold: token ids of the query and of the
kept spans, per-position lengths and counts, unigram counts, and per document the ids of
its window as its owner's policy allows (none for `counts` sources or taken-down
documents). Both sides import this module: the node (`index/node.py`) to answer, the
tracer (`index/remote.py`) to check each answer before it is used.
"""

from __future__ import annotations


from pydantic import BaseModel, ConfigDict, Field

from flexolmo.base.source_schema import VISIBILITY_ORDER, Visibility  # the policy's one definition
from .options import DOCS_LIMIT, WINDOW, ContextTokens, MaxDocs, SnippetTokens

PROTOCOL = "flexolmo-node/1"
MAX_QUERY_TOKENS = 16_384  # ids per matches request (a long response; the API caps traces lower)
MAX_DOCS = DOCS_LIMIT  # documents per span: the document window's limits (index/options.py) are the wire's
MAX_PICKS = 4 * MAX_DOCS  # occurrences sampled per span (the tracer draws 4 per wanted document)
MAX_SPANS = 256  # spans per documents request
MAX_BODY_BYTES = 2_000_000  # a request body larger than this is refused with 413


def stricter(a: str, b: str) -> str:
    """The visibility that lets out less of two."""
    return min(a, b, key=VISIBILITY_ORDER.index)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Unigrams(_Wire):
    """Sparse unigram counts over the index; the document separators under the separator's
    id (65535 in a u16 index, 4294967295 in a u32 one: index/width.py)."""

    ids: list[int]
    counts: list[int]


class Identity(_Wire):
    protocol: str = PROTOCOL
    source: str
    owner: str
    domain: str
    licence: str
    visibility: Visibility
    available: bool  # False: the owner switched it off, or its licence expired
    tokenizer_hash: str
    n_tokens: int
    n_docs: int
    n_shards: int
    build_id: str  # the index build: changes when the index is rebuilt
    content_hash: str
    takedowns: int
    unigrams: Unigrams


class MatchesRequest(_Wire):
    ids: list[int] = Field(max_length=MAX_QUERY_TOKENS)
    delim_ids: list[int] = Field(default_factory=list, max_length=MAX_QUERY_TOKENS)
    bow_ids: list[int] | None = Field(default=None, max_length=MAX_QUERY_TOKENS)  # those in `ids`; None: every id
    enforce_bow: bool = True


class MatchesAnswer(_Wire):
    protocol: str = PROTOCOL
    source: str
    build_id: str
    visibility: Visibility
    lengths: list[int]
    counts: list[int]


class SpanRequest(_Wire):
    span_ids: list[int] = Field(min_length=1, max_length=MAX_QUERY_TOKENS)
    picks: list[int] = Field(max_length=MAX_PICKS)  # occurrence numbers in [0, count)
    n: MaxDocs = WINDOW.max_docs


class DocumentsRequest(_Wire):
    spans: list[SpanRequest] = Field(max_length=MAX_SPANS)
    context_tokens: ContextTokens = WINDOW.context_tokens
    snippet_tokens: SnippetTokens = WINDOW.snippet_tokens
    max_visibility: Visibility = "full"  # the tracer's own cap, if stricter


class WireDocument(_Wire):
    """`index.results.SpanDocument` as it crosses the wire (the same fields)."""

    source: str
    doc_id: str
    title: str | None
    shard: int
    doc_ix: int
    token_offset: int
    blocked: bool
    visibility: Visibility
    token_ids: list[int]
    needle_offset: int
    needle_len: int
    draw: int


class DocumentsAnswer(_Wire):
    protocol: str = PROTOCOL
    source: str
    build_id: str
    visibility: Visibility
    documents: list[list[WireDocument]]  # one list per requested span, in request order


# -- document frequencies (relevance's collection statistics: index/doc_freq.py) ------------
# POST /v1/doc_freq -> DocFreqAnswer. A node whose index has no table answers 404; the
# tracer then rates that source's windows by the windows' own IDF and says so.

MAX_DF_WORDS = 16_384  # words per doc_freq request
MAX_WORD_CHARS = 200


class DocFreqRequest(_Wire):
    """Words (`\\w+`, lowercased) of the response and of the windows this node returned."""

    words: list[str] = Field(max_length=MAX_DF_WORDS)


class DocFreqAnswer(_Wire):
    protocol: str = PROTOCOL
    source: str
    build_id: str
    n_docs: int
    n_words: int
    n_tokens: int
    doc_words_quantiles: list[float] = Field(max_length=1_001)
    df: list[int]  # one per requested word, in request order (0: no document holds it)
