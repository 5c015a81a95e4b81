"""Serving the per-source indexes: open each available source's index once, search them.

    from index.engine import Federation
    fed = Federation.open(ws)                           # every available (active, unexpired) source
    fed.count(ids)                                      # {"news": 3, "code": 0, ...}
    spans = fed.find_spans(ids, delim_ids, bow_ids)     # [SpanMatch], merged over the sources
    docs = fed.documents(spans[0], n=10, seed=0)        # [SpanDocument], cut to each source's policy

This is the one door to the index files: tracing asks it, never the files. Each source
answers for itself (`index/source.py`), so a remote owner node can later stand in for a
local `SourceIndex`. With `strict=False` a source whose index is missing or damaged
(sizes, sampled suffix-array order at open; checksums, settled on first use) is skipped,
with the reason in `skipped`, and the others are served.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import replace
from typing import Sequence

import numpy as np

from flexolmo import sources as src_lib
from flexolmo.errors import ConflictError, InputError, IntegrityError, NotFoundError
from flexolmo.workspace import Workspace

from . import format as fmt, search
from .models import AttributedSpan, DocRef, SpanDocument, SpanMatch
from .source import SourceIndex, check_ids

DRAWS_PER_DOC = 4  # occurrences sampled per wanted document (a document matched twice counts once)


class Federation:
    """The indexes of every available source, opened once for a process's lifetime."""

    def __init__(self, indexes: dict[str, SourceIndex], skipped: dict[str, str] | None = None, strict: bool = True):
        self._indexes = indexes
        self._skipped = skipped or {}  # source -> why it is not served
        self._strict = strict
        self._settled = False
        self._ulp: np.ndarray | None = None

    @classmethod
    def open(cls, ws: Workspace, names: Sequence[str] | None = None, *, today: dt.date | None = None,
             strict: bool = True, load_to_ram: bool = False) -> "Federation":
        """Open the index of every available source (or of `names`, which must be available).

        :param strict: raise when an available source has no index or a damaged one; else
            skip it and say why in `skipped`. A stale index (another tokenizer) raises either way.
        """
        available = {s.name: s for s in src_lib.available_sources(ws, today)}
        skipped: dict[str, str] = {}
        if names is None:
            wanted = list(available)
            for s in src_lib.list_sources(ws):
                if s.name not in available:
                    skipped[s.name] = "inactive" if not s.active else f"expired on {s.expires}"
        else:
            wanted = []
            for n in names:
                s = src_lib.get_source(ws, n)
                if n not in available:
                    raise ConflictError(f"source {n!r} is not available ({'inactive' if not s.active else 'expired'}); "
                                        "it may not return documents")
                wanted.append(n)
        indexes = {}
        for n in wanted:
            if not fmt.index_dir(ws, n).exists() and not strict:
                skipped[n] = "no index built"
                continue
            try:
                indexes[n] = SourceIndex(ws, n, visibility=available[n].visibility, load_to_ram=load_to_ram)
            except IntegrityError as e:
                if strict:
                    raise
                skipped[n] = f"damaged index: {e}"
        fed = cls(indexes, skipped, strict)
        if strict:
            fed._settle()
        return fed

    def _settle(self) -> None:
        """Collect the background checksums once: a damaged source raises (strict) or is skipped."""
        if self._settled:
            return
        for n, ix in list(self._indexes.items()):
            try:
                ix.settle()
            except IntegrityError as e:
                if self._strict:
                    raise
                del self._indexes[n]
                self._skipped[n] = f"damaged index: {e}"
        self._settled = True

    @property
    def indexes(self) -> dict[str, SourceIndex]:
        self._settle()
        return self._indexes

    @property
    def skipped(self) -> dict[str, str]:
        self._settle()
        return self._skipped

    @property
    def names(self) -> list[str]:
        return list(self.indexes)

    def source(self, name: str) -> SourceIndex:
        if name not in self.indexes:
            why = self.skipped.get(name)
            raise NotFoundError(f"source {name!r} is not served" + (f" ({why})" if why else "")
                                + f"; served: {', '.join(self.indexes) or 'none'}")
        return self.indexes[name]

    def count(self, ids: Sequence[int]) -> dict[str, int]:
        ids = check_ids(ids)
        return {n: ix.count(ids) for n, ix in self.indexes.items()}

    def attribute(self, ids: Sequence[int], delim_ids: Sequence[int] = (), min_len: int = 1,
                  max_cnt: int = 1_000_000, enforce_bow: bool = True) -> dict[str, list[AttributedSpan]]:
        ids, delim_ids = check_ids(ids), check_ids(delim_ids, "delim_ids")
        return {n: ix.attribute(ids, delim_ids, min_len, max_cnt, enforce_bow) for n, ix in self.indexes.items()}

    def document(self, source: str, doc_id: str) -> DocRef:
        return self.source(source).document(doc_id)

    def doc_at(self, source: str, shard: int, ptr: int) -> DocRef:
        return self.source(source).doc_at(shard, ptr)

    def unigram_counts(self, source: str | None = None) -> np.ndarray:
        """Unigram counts of one source, or summed over the served sources."""
        if source is not None:
            return self.source(source).unigram_counts
        return sum((ix.unigram_counts for ix in self.indexes.values()), np.zeros(65536, dtype=np.int64))

    # -- the search: spans, then documents for the kept spans ------------------------------

    def find_spans(self, ids: Sequence[int], delim_ids: Sequence[int], bow_ids: Sequence[int] | None = None, *,
                   min_len: int = 1, max_cnt: int = 1_000_000, enforce_bow: bool = True) -> list[SpanMatch]:
        """The maximal spans `engine.attribute` returns over every served index at once.

        Each source answers `matches` for itself; the answers are merged (see `index/search.py`).

        :param delim_ids: a span is cut after the first of these inside it.
        :param bow_ids: ids that begin a word (spans start and end at word boundaries when
            `enforce_bow`); None: every id does.
        """
        ids, delim_ids = check_ids(ids), check_ids(delim_ids, "delim_ids")
        if min_len < 0 or max_cnt <= 0:
            raise InputError("min_len must be >= 0 and max_cnt > 0")
        bow = None if bow_ids is None else np.asarray(bow_ids, dtype=np.int64)
        answers = [ix.matches(ids, delim_ids, bow, enforce_bow) for ix in self.indexes.values()]
        if self._ulp is None:
            self._ulp = search.unigram_logprobs(self.unigram_counts())
        return search.merge_matches(answers, ids, self._ulp, min_len, max_cnt)

    def documents(self, span: SpanMatch, n: int = 10, seed: int = 0, *, context_tokens: int = 250,
                  snippet_tokens: int = 40) -> list[SpanDocument]:
        """Up to `n` distinct documents containing `span`, sampled with `seed` over its occurrences.

        A seeded sample of up to DRAWS_PER_DOC * n occurrences over the sources that show
        documents (not `counts`) is split among them; each source returns its distinct
        documents cut to its policy, and the first `n` in sample order are kept.
        """
        if n < 0:
            raise InputError("n must be >= 0")
        holders = [(name, c) for name, c in span.count_by_source.items()
                   if c > 0 and name in self.indexes and self.indexes[name].visibility != "counts"]
        total = sum(c for _, c in holders)
        order = random.Random(seed).sample(range(total), min(total, DRAWS_PER_DOC * n))
        picks: dict[str, list[tuple[int, int]]] = {}  # source -> (draw, occurrence within the source)
        for draw, g in enumerate(order):
            for name, c in holders:
                if g < c:
                    break
                g -= c
            picks.setdefault(name, []).append((draw, g))
        out = []
        for name, ps in picks.items():
            docs = self.indexes[name].documents(span.ids, [g for _, g in ps], n, context_tokens, snippet_tokens)
            out += [replace(d, draw=ps[d.draw][0]) for d in docs]
        return sorted(out, key=lambda d: d.draw)[:n]

    def close(self) -> None:
        self._indexes.clear()
