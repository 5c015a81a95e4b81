"""The result shapes of the index package, defined once.

The CLI prints them, the API serialises them (`dataclasses.asdict`), and tracing consumes
them. Pointers follow infini-gram's conventions: `shard` is the shard number (the `N` of
`tokenized.N`), `ptr` a *byte* offset into `tokenized.N` (a multiple of the width: 2 or 4).

The search shapes (`SourceMatches`, `SpanMatch`, `SpanDocument`) are what a source
answers for a trace; they hold plain ints and strings so that an owner node can send them
over the wire as they are.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BuildResult:
    """What `build_source` did for one source."""

    source: str
    path: Path | None  # None: a remote source (no index here)
    skipped: bool  # the existing index was kept (current), or the source is remote
    n_docs: int
    n_tokens: int  # document tokens, without the document separators
    n_shards: int
    bytes: int  # all files of the index folder
    seconds: float  # whole build: read, tokenize, write, suffix array, verify, record
    tokenize_seconds: float
    suffix_array_seconds: float  # the shards' suffix sorts (index/suffix_array.py)
    verify_seconds: float
    reason: str = ""
    remote: str | None = None  # the owner node's URL of a remote source (not built here)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.n_tokens if self.n_tokens else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = None if self.path is None else str(self.path)
        d["tokens_per_second"] = self.tokens_per_second
        d["bytes_per_token"] = self.bytes_per_token
        return d


@dataclass(frozen=True)
class IndexRecord:
    """One row of the catalog's `indexes` table: the index currently served for a source."""

    source: str
    path: str
    build_id: str
    n_docs: int
    n_tokens: int
    n_shards: int
    bytes: int
    tokenizer_hash: str
    content_hash: str
    files: dict[str, dict]  # name -> {"bytes": int, "sha256": str}
    built_at: dt.datetime
    build_seconds: float
    tokenize_seconds: float
    suffix_array_seconds: float
    tokens_per_second: float

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.n_tokens if self.n_tokens else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["built_at"] = self.built_at.isoformat()
        d["bytes_per_token"] = self.bytes_per_token
        return d


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of `verify_index`: ok, or the list of problems found."""

    source: str
    ok: bool
    problems: list[str]
    checked_files: int
    checked_ngrams: int
    seconds: float
    skipped: str | None = None  # not verified here, and why (a remote source: its owner's node)


@dataclass(frozen=True)
class Takedown:
    """A document removed from what a source may show (one row of `takedowns`)."""

    source: str
    doc_id: str
    reason: str
    requested_by: str
    created_at: dt.datetime

    def to_dict(self) -> dict:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d


@dataclass(frozen=True)
class DocRef:
    """A document of an index, mapped back to its source."""

    source: str
    doc_id: str
    shard: int
    doc_ix: int  # position within its shard
    title: str | None
    path: str | None
    metadata: dict  # the whole metadata line of the index
    n_tokens: int
    blocked: bool


@dataclass(frozen=True)
class SpanDoc:
    """Where an attributed span occurs: shard and byte pointer (infini-gram's AttributionDoc)."""

    shard: int
    ptr: int


@dataclass(frozen=True)
class AttributedSpan:
    """A maximal span of the query found verbatim in one source (infini-gram's AttributionSpan)."""

    source: str
    l: int  # noqa: E741 -- infini-gram's name: first token of the span in the query
    r: int  # one past the last token
    length: int
    count: int
    unigram_logprob_sum: float
    docs: list[SpanDoc] = field(default_factory=list)


@dataclass(frozen=True)
class SourceMatches:
    """One source's answer to a span search, for every position l of the query.

    `lengths[l]` is the longest match of ids[l:] in the source after OLMoTrace's rules (cut
    after the first delimiter inside it; backed off to a word boundary; 0 where l does not
    begin a word or nothing matches) and `counts[l]` its occurrences in the source.
    """

    source: str
    lengths: list[int]
    counts: list[int]


@dataclass(frozen=True)
class SpanMatch:
    """A maximal span of the query found in the federation, merged over its sources."""

    l: int  # noqa: E741 -- first token of the span in the query
    r: int  # one past the last token
    ids: tuple[int, ...]  # the span's token ids, query[l:r]
    count: int  # occurrences over every source searched
    count_by_source: dict[str, int]  # every source searched, in federation order (0 where absent)
    unigram_logprob_sum: float

    @property
    def length(self) -> int:
        return self.r - self.l


@dataclass(frozen=True)
class SpanDocument:
    """One document containing a span, with only the text its source's policy lets out.

    `token_ids` is the match with context cut to the visibility: `full` up to the
    requested context a side, `snippets` up to half the snippet length a side; empty when
    the document is taken down (`blocked`: by doc_id, or by content through the diff
    index), and then `title` is None too. `counts` sources return no documents at all.
    """

    source: str
    doc_id: str
    title: str | None
    shard: int
    doc_ix: int  # position within its shard
    token_offset: int  # where the match starts in the document, in tokens
    blocked: bool
    visibility: str  # the source's visibility the text was cut to
    token_ids: list[int]
    needle_offset: int  # index of the first matched token within token_ids
    needle_len: int
    draw: int  # position of the occurrence in the seeded sample it was drawn from
