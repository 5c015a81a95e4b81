"""Serving the per-source indexes: open each available source's index once, search them.

    from index.engine import Federation
    fed = Federation.open(ws)                           # every available (active, unexpired) source
    fed.count(ids)                                      # {"news": 3, "code": 0, ...}
    spans = fed.find_spans(ids, delim_ids, bow_ids)     # [SpanMatch], merged over the sources
    docs = fed.documents(spans[0], n=10, seed=0)        # [SpanDocument], cut to each source's policy

This is the one door to the index files: tracing asks it, never the files. Each source
answers for itself: a local `SourceIndex` (`index/source.py`) or a `RemoteSource`
(`index/remote.py`, a source registered with `sources add --remote`, whose index stays on
its owner's node), behind the same methods. Remote sources are asked concurrently, each
call with a deadline; one that gives no usable answer is `unavailable` for that search
(in `unavailable`, and in `skipped` as "unavailable: why") and the others are merged as
if it were not there. With `strict=False` a local source whose index is missing or damaged
(sizes, sampled suffix-array order at open; checksums, settled on first use) is skipped,
with the reason in `skipped`, and the others are served.
"""

from __future__ import annotations

import datetime as dt
import random
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Sequence

import numpy as np

from flexolmo.base import sources as src_lib
from flexolmo.base.errors import ConflictError, FlexolmoError, InputError, IntegrityError, NotFoundError
from flexolmo.base.workspace import Workspace

from . import format as fmt, search
from .options import WINDOW
from .results import AttributedSpan, DocRef, SpanDocument, SpanMatch
from .remote import RemoteSettings, RemoteSource, RemoteUnavailable, open_remotes
from .source import MAX_ID, SourceIndex, check_ids

DRAWS_PER_DOC = 4  # occurrences sampled per wanted document (a document matched twice counts once)


class Federation:
    """The indexes of every available source, opened once for a process's lifetime."""

    def __init__(self, indexes: dict[str, SourceIndex | RemoteSource], skipped: dict[str, str] | None = None,
                 strict: bool = True):
        self._indexes = indexes
        self._skipped = skipped or {}  # source -> why it is not served
        self._strict = strict
        self._settled = False
        self._ulp: tuple[tuple, np.ndarray] | None = None  # (the answering sources' builds, log-probs)
        self._unavailable: dict[str, str] = {}  # remote source -> why, for the last search
        self._unsearched: set[str] = set()  # remote sources whose matches are missing from the last search
        remotes = [ix for ix in indexes.values() if isinstance(ix, RemoteSource)]
        self._pool = ThreadPoolExecutor(max_workers=2 * len(remotes), thread_name_prefix="remote") if remotes else None
        self._wait_s = max((ix.client.settings.deadline_s for ix in remotes), default=0.0) + 1.0
        # every source shares the workspace's tokenizer (checked at open), so one id range and
        # one unigram layout (index/width.py) serve them all
        self.max_id = min((ix.max_id for ix in indexes.values()), default=MAX_ID)

    @classmethod
    def open(cls, ws: Workspace, names: Sequence[str] | None = None, *, today: dt.date | None = None,
             strict: bool = True, load_to_ram: bool = False, remote: RemoteSettings | None = None) -> "Federation":
        """Open the index of every available source (or of `names`, which must be available).

        :param strict: raise when an available source has no index or a damaged one; else
            skip it and say why in `skipped`. A stale index (another tokenizer) raises either way.
        :param remote: deadline and retries of calls to owner nodes (remote sources are
            opened without asking their nodes anything; a node is asked on first use)
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
        remotes, why = open_remotes(ws, wanted, {n: available[n].visibility for n in wanted}, remote)
        skipped.update(why)
        indexes: dict[str, SourceIndex | RemoteSource] = {}
        for n in wanted:
            if n in remotes or n in why:
                if n in remotes:
                    indexes[n] = remotes[n]
                continue
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
        """Sources not served (why), and remote sources unavailable in the last search."""
        self._settle()
        return {**self._skipped, **{n: f"unavailable: {w}" for n, w in self._unavailable.items()}}

    @property
    def unavailable(self) -> dict[str, str]:
        """Remote sources that gave no usable answer in the last search (matches or documents), and why."""
        return dict(self._unavailable)

    @property
    def names(self) -> list[str]:
        """The sources searched (in the last search: a remote source that did not answer is left out)."""
        return [n for n in self.indexes if n not in self._unsearched]

    @property
    def remote(self) -> dict[str, RemoteSource]:
        return {n: ix for n, ix in self.indexes.items() if isinstance(ix, RemoteSource)}

    @property
    def local(self) -> dict[str, SourceIndex]:
        return {n: ix for n, ix in self.indexes.items() if isinstance(ix, SourceIndex)}

    def source(self, name: str) -> SourceIndex:
        if name not in self.indexes:
            why = self.skipped.get(name)
            raise NotFoundError(f"source {name!r} is not served" + (f" ({why})" if why else "")
                                + f"; served: {', '.join(self.indexes) or 'none'}")
        return self.indexes[name]

    def _ids(self, ids: Sequence[int], what: str = "input_ids") -> list[int]:
        return check_ids(ids, what, self.max_id)

    def count(self, ids: Sequence[int]) -> dict[str, int]:
        """Occurrences in each local source (a node answers only matches and documents)."""
        ids = self._ids(ids)
        return {n: ix.count(ids) for n, ix in self.local.items()}

    def attribute(self, ids: Sequence[int], delim_ids: Sequence[int] = (), min_len: int = 1,
                  max_cnt: int = 1_000_000, enforce_bow: bool = True) -> dict[str, list[AttributedSpan]]:
        """infini-gram's own attribute, per local source."""
        ids, delim_ids = self._ids(ids), self._ids(delim_ids, "delim_ids")
        return {n: ix.attribute(ids, delim_ids, min_len, max_cnt, enforce_bow) for n, ix in self.local.items()}

    def document(self, source: str, doc_id: str) -> DocRef:
        return self.source(source).document(doc_id)

    def doc_at(self, source: str, shard: int, ptr: int) -> DocRef:
        return self.source(source).doc_at(shard, ptr)

    def unigram_counts(self, source: str | None = None) -> np.ndarray:
        """Unigram counts of one source, or summed over the served sources (that answer)."""
        if source is not None:
            return self.source(source).unigram_counts
        total = np.zeros(self.max_id + 2, dtype=np.int64)  # index/width.py: ids, then the separators' slot
        for ix in self.indexes.values():
            try:
                total += ix.unigram_counts
            except RemoteUnavailable:
                continue
        return total

    def _logprobs(self, answering: Sequence[str]) -> np.ndarray:
        """Unigram log-probs over the sources that answered, recomputed when that set or a build changes."""
        key = tuple((n, self.indexes[n].build_id) for n in answering)
        if self._ulp is None or self._ulp[0] != key:
            counts = sum((self.indexes[n].unigram_counts for n in answering), np.zeros(self.max_id + 2, dtype=np.int64))
            self._ulp = (key, search.unigram_logprobs(counts))
        return self._ulp[1]

    # -- the search: spans, then documents for the kept spans ------------------------------

    def find_spans(self, ids: Sequence[int], delim_ids: Sequence[int], bow_ids: Sequence[int] | None = None, *,
                   min_len: int = 1, max_cnt: int = 1_000_000, enforce_bow: bool = True) -> list[SpanMatch]:
        """The maximal spans `engine.attribute` returns over every served index at once.

        Each source answers `matches` for itself (remote sources concurrently, while the local
        ones are searched here); the answers are merged (see `index/search.py`). A remote
        source that does not answer is left out of this search and listed in `unavailable`.

        :param delim_ids: a span is cut after the first of these inside it.
        :param bow_ids: ids that begin a word (spans start and end at word boundaries when
            `enforce_bow`); None: every id does.
        """
        ids, delim_ids = self._ids(ids), self._ids(delim_ids, "delim_ids")
        if min_len < 0 or max_cnt <= 0:
            raise InputError("min_len must be >= 0 and max_cnt > 0")
        bow = None if bow_ids is None else np.asarray(bow_ids, dtype=np.int64)
        self._unavailable, self._unsearched = {}, set()
        remote = self.remote
        futures = {n: self._pool.submit(ix.matches, ids, delim_ids, bow, enforce_bow) for n, ix in remote.items()}
        got = {n: ix.matches(ids, delim_ids, bow, enforce_bow) for n, ix in self.local.items()}
        if futures:
            got.update(self._collect(futures, ""))
        self._unsearched = set(remote) - set(got)
        answers = [got[n] for n in self.indexes if n in got]  # federation order
        ulp = self._logprobs([a.source for a in answers])
        return search.merge_matches(answers, ids, ulp, min_len, max_cnt)

    def warm(self, delim_ids: Sequence[int], bow_ids: Sequence[int]) -> None:
        """Load now what the first search of a process otherwise loads: each local index's compiled
        span search (numba's on-disk cache) and its unigram counts. Remote sources are left alone
        (no round trip at open)."""
        if not self.local:
            return
        probe = [int(i) for i in list(bow_ids)[:4]] or [0]
        bow = np.asarray(bow_ids, dtype=np.int64)
        for ix in self.local.values():
            ix.matches(probe, self._ids(delim_ids, "delim_ids"), bow, True)
        self._logprobs(list(self.local))

    def _collect(self, futures: dict, what: str) -> dict[str, object]:
        """The answers of the remote calls that answered in time; the others are marked unavailable."""
        wait(futures.values(), timeout=self._wait_s)  # each call has its own deadline; this is the backstop
        out = {}
        for n, f in futures.items():
            if not f.done():
                f.cancel()
                self._unavailable[n] = what + "no answer in time"
            elif f.exception() is not None:
                e = f.exception()
                self._unavailable[n] = what + (str(e) if isinstance(e, FlexolmoError) else
                                               f"failed: {type(e).__name__}: {str(e)[:200]}")  # only this source's
            else:
                out[n] = f.result()
        return out

    def documents(self, span: SpanMatch, n: int = WINDOW.max_docs, seed: int = 0, *,
                  context_tokens: int = WINDOW.context_tokens,
                  snippet_tokens: int = WINDOW.snippet_tokens) -> list[SpanDocument]:
        """Up to `n` distinct documents containing `span`, sampled with `seed` over its occurrences.

        A seeded sample of up to DRAWS_PER_DOC * n occurrences over the sources that show
        documents (not `counts`) is split among them; each source returns its distinct
        documents cut to its policy, and the first `n` in sample order are kept.
        """
        return self.documents_many([span], n, seed, context_tokens=context_tokens, snippet_tokens=snippet_tokens)[0]

    def documents_many(self, spans: Sequence[SpanMatch], n: int = WINDOW.max_docs, seed: int = 0, *,
                       context_tokens: int = WINDOW.context_tokens,
                       snippet_tokens: int = WINDOW.snippet_tokens) -> list[list[SpanDocument]]:
        """`documents` of several spans (the same sample per span), one round trip per remote source."""
        if n < 0:
            raise InputError("n must be >= 0")
        asks: dict[str, list[tuple[int, list[int], tuple]]] = {}  # source -> (span number, draws, request)
        for i, span in enumerate(spans):
            for name, ps in self._picks(span, n, seed).items():
                asks.setdefault(name, []).append((i, [d for d, _ in ps], (span.ids, [g for _, g in ps], n)))
        found: dict[str, list[list[SpanDocument]]] = {}
        futures = {name: self._pool.submit(self.indexes[name].documents_many, [r for _, _, r in a], context_tokens,
                                           snippet_tokens) for name, a in asks.items() if name in self.remote}
        for name, a in asks.items():
            if name not in futures:
                found[name] = [self.indexes[name].documents(*r, context_tokens, snippet_tokens) for _, _, r in a]
        if futures:
            found.update(self._collect(futures, "documents: "))
        out: list[list[SpanDocument]] = [[] for _ in spans]
        for name, docs_per_span in found.items():
            for (i, draws, _), docs in zip(asks[name], docs_per_span):
                out[i] += [replace(d, draw=draws[d.draw]) for d in docs]
        return [sorted(docs, key=lambda d: d.draw)[:n] for docs in out]

    def _picks(self, span: SpanMatch, n: int, seed: int) -> dict[str, list[tuple[int, int]]]:
        """source -> (draw, occurrence within the source) of the span's seeded sample."""
        holders = [(name, c) for name, c in span.count_by_source.items()
                   if c > 0 and name in self.indexes and self.indexes[name].visibility != "counts"]
        total = sum(c for _, c in holders)
        order = random.Random(seed).sample(range(total), min(total, DRAWS_PER_DOC * n))
        picks: dict[str, list[tuple[int, int]]] = {}
        for draw, g in enumerate(order):
            for name, c in holders:
                if g < c:
                    break
                g -= c
            picks.setdefault(name, []).append((draw, g))
        return picks

    def close(self) -> None:
        for ix in self.remote.values():
            ix.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._indexes.clear()
