"""Serving the per-source indexes: open each available source's index once, query them.

    from index.engine import Federation
    fed = Federation.open(ws)                      # every available (active, unexpired) source
    fed.count(ids)                                 # {"news": 3, "code": 0, ...}
    spans = fed.attribute(ids, delim_ids=[...])    # {"news": [AttributedSpan, ...], ...}
    w = fed.window("news", shard=0, ptr=1234, needle_len=5, left=250, right=250)
    w.doc.doc_id, w.blocked

Opening refuses an index that cannot be trusted: files missing or of the wrong size
(`IntegrityError`), or built with another tokenizer than the workspace's (`ConflictError`,
rebuild). Files are memory-mapped (by the engine and by numpy), not read.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from flexolmo import sources as src_lib
from flexolmo import tokenizer as tok_lib
from flexolmo.errors import ConflictError, InputError, IntegrityError, NotFoundError
from flexolmo.workspace import Workspace

from . import catalog, format as fmt
from .build import diff_dir, index_dir
from .models import AttributedSpan, DocRef, DocWindow, IndexFiles, SpanDoc

MAX_ID = 0xFFFE  # u16 ids; 0xFFFF is the document separator


def check_ids(ids: Iterable[int], what: str = "input_ids") -> list[int]:
    """Query ids as a list of ints in [0, 65534], or an InputError naming the range."""
    try:
        out = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a list of integers in [0, {MAX_ID}]") from None
    if any(i < 0 or i > MAX_ID for i in out):
        raise InputError(f"{what} must be a list of integers in [0, {MAX_ID}]")
    return out


def _ok(result):
    """infini-gram returns {'error': ...} instead of raising: turn it into our exception, here only."""
    if isinstance(result, dict) and "error" in result:
        raise InputError(f"index query rejected: {result['error']}")
    return result


@dataclass
class _Shard:
    ds: np.ndarray  # u16 ids, separators included
    od: np.ndarray  # u64 byte offsets of documents
    mt: np.ndarray  # metadata bytes
    om: np.ndarray  # u64 byte offsets of metadata lines


class SourceIndex:
    """One source's index (and its takedown diff index), opened once."""

    def __init__(self, ws: Workspace, name: str, *, load_to_ram: bool = False):
        from infini_gram.engine import InfiniGramEngine, InfiniGramEngineDiff

        self.name = name
        self.folder = index_dir(ws, name)
        if not self.folder.exists():
            raise NotFoundError(f"source {name!r} has no index; run `flexolmo index build --source {name}`")
        self.manifest = fmt.read_manifest(self.folder)
        problems = fmt.check_files(self.folder, self.manifest)
        if problems:
            raise IntegrityError(f"the index of {name!r} is damaged ({'; '.join(problems[:3])}); "
                                 f"rebuild it with `flexolmo index build --source {name} --force`")
        if self.manifest["tokenizer_hash"] != tok_lib.tokenizer_hash(ws):
            raise ConflictError(f"the index of {name!r} was built with another tokenizer than the workspace's; "
                                f"refusing to serve it: rebuild with `flexolmo index build --source {name}`")
        self.diff_folder: Path | None = None
        self.blocked_doc_ids: set[str] = {t.doc_id for t in catalog.list_takedowns(ws, name)}
        dfolder = diff_dir(ws, name)
        if dfolder.exists():
            dm = fmt.read_manifest(dfolder)
            dproblems = fmt.check_files(dfolder, dm)
            if dproblems:
                raise IntegrityError(f"the takedown index of {name!r} is damaged ({'; '.join(dproblems[:3])}); "
                                     "run `flexolmo index build --force` for that source")
            self.diff_folder = dfolder
            self.blocked_doc_ids |= set(dm["doc_ids"])
        eos = int(self.manifest["eos_id"])
        bow = str(self.folder / fmt.BOW_FILE)
        common = dict(eos_token_id=eos, version=4, token_dtype="u16", load_to_ram=load_to_ram, bow_ids_path=bow,
                      precompute_unigram_logprobs=True)
        with fmt.loader_path(self.folder) as path:
            if self.diff_folder is not None:
                with fmt.loader_path(self.diff_folder) as dpath:
                    self.engine = InfiniGramEngineDiff(index_dir=path, index_dir_diff=dpath, **common)
            else:
                self.engine = InfiniGramEngine(index_dir=path, **common)
        self._shards: list[_Shard] = []
        for st in self.manifest["shards"]:
            k = st["shard"]
            self._shards.append(_Shard(
                ds=np.memmap(self.folder / f"tokenized.{k}", dtype=np.uint16, mode="r"),
                od=np.fromfile(self.folder / f"offset.{k}", dtype=np.uint64),
                mt=np.memmap(self.folder / f"metadata.{k}", dtype=np.uint8, mode="r"),
                om=np.fromfile(self.folder / f"metaoff.{k}", dtype=np.uint64),
            ))
        self._doc_base = np.cumsum([0] + [len(s.od) for s in self._shards])  # global doc_ix of each shard's first doc
        self._by_doc_id: dict[str, tuple[int, int]] | None = None
        self._unigram: np.ndarray | None = None

    # -- counts and spans ----------------------------------------------------------------

    @property
    def n_docs(self) -> int:
        return int(self.manifest["n_docs"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    def count(self, ids: Sequence[int]) -> int:
        """Occurrences of the n-gram `ids` in the source (takedowns included: counts are not text)."""
        return int(_ok(self.engine.count(input_ids=check_ids(ids)))["count"])

    def attribute(self, ids: Sequence[int], delim_ids: Sequence[int] = (), min_len: int = 1,
                  max_cnt: int = 1_000_000, enforce_bow: bool = True) -> list[AttributedSpan]:
        """infini-gram's `attribute`: maximal spans of `ids` found in this source, with pointers."""
        if min_len < 0 or max_cnt <= 0:
            raise InputError("min_len must be >= 0 and max_cnt > 0")
        res = _ok(self.engine.attribute(input_ids=check_ids(ids), delim_ids=check_ids(delim_ids, "delim_ids"),
                                        min_len=int(min_len), max_cnt=int(max_cnt), enforce_bow=bool(enforce_bow)))
        return [AttributedSpan(source=self.name, l=s["l"], r=s["r"], length=s["length"], count=s["count"],
                               unigram_logprob_sum=float(s["unigram_logprob_sum"]),
                               docs=[SpanDoc(shard=d["s"], ptr=d["ptr"]) for d in s["docs"]])
                for s in res["spans"]]

    # -- documents -----------------------------------------------------------------------

    def _check_ptr(self, shard: int, ptr: int) -> _Shard:
        if not 0 <= shard < len(self._shards):
            raise InputError(f"shard must be in [0, {len(self._shards)}) for source {self.name!r}")
        sh = self._shards[shard]
        if not (0 <= ptr < sh.ds.size * 2 and ptr % 2 == 0):
            raise InputError(f"ptr must be an even byte offset in [0, {sh.ds.size * 2}) for {self.name!r} shard {shard}")
        return sh

    def _doc(self, shard: int, doc_ix: int) -> DocRef:
        sh = self._shards[shard]
        m0 = int(sh.om[doc_ix])
        m1 = int(sh.om[doc_ix + 1]) if doc_ix + 1 < len(sh.om) else sh.mt.size
        meta = json.loads(bytes(sh.mt[m0:m1]))
        start = int(sh.od[doc_ix]) // 2
        end = int(sh.od[doc_ix + 1]) // 2 if doc_ix + 1 < len(sh.od) else sh.ds.size
        return DocRef(source=self.name, doc_id=meta["doc_id"], shard=shard, doc_ix=doc_ix, title=meta.get("title"),
                      path=meta.get("path"), metadata=meta, n_tokens=end - start - 1,
                      blocked=meta["doc_id"] in self.blocked_doc_ids)

    def doc_at(self, shard: int, ptr: int) -> DocRef:
        """The document that contains byte `ptr` of shard `shard`."""
        sh = self._check_ptr(shard, ptr)
        return self._doc(shard, int(np.searchsorted(sh.od, np.uint64(ptr), side="right")) - 1)

    def document(self, doc_id: str) -> DocRef:
        """A document of this index by its doc_id (NotFoundError if it is not indexed)."""
        if self._by_doc_id is None:
            index = {}
            for k, sh in enumerate(self._shards):
                for ix, line in enumerate(bytes(sh.mt).splitlines()):
                    index[json.loads(line)["doc_id"]] = (k, ix)
            self._by_doc_id = index
        if doc_id not in self._by_doc_id:
            raise NotFoundError(f"doc_id {doc_id!r} is not in the index of {self.name!r} "
                                "(unknown, or in the validation split, which is never indexed)")
        return self._doc(*self._by_doc_id[doc_id])

    def document_tokens(self, doc: DocRef) -> list[int]:
        """All ids of a document; empty when it is taken down."""
        if doc.blocked:
            return []
        sh = self._shards[doc.shard]
        start = int(sh.od[doc.doc_ix]) // 2 + 1
        return [int(x) for x in sh.ds[start:start + doc.n_tokens]]

    def window(self, shard: int, ptr: int, needle_len: int, left: int = 250, right: int = 250) -> DocWindow:
        """The matched tokens at (shard, ptr) with up to `left`/`right` tokens of context in the document."""
        if needle_len < 0 or left < 0 or right < 0:
            raise InputError("needle_len, left and right must be >= 0")
        sh = self._check_ptr(shard, ptr)
        doc = self.doc_at(shard, ptr)
        d0 = int(sh.od[doc.doc_ix]) // 2 + 1
        d1 = d0 + doc.n_tokens
        pos = ptr // 2
        lo, hi = max(d0, pos - left), min(d1, pos + needle_len + right)
        if doc.blocked:
            return DocWindow(self.name, shard, ptr, doc, [], 0, needle_len, True, pos - d0)
        return DocWindow(self.name, shard, ptr, doc, [int(x) for x in sh.ds[lo:hi]], pos - lo, needle_len, False, pos - d0)

    def engine_windows(self, docs: Sequence[SpanDoc], span_ids: Sequence[int], max_ctx_len: int) -> list[DocWindow]:
        """Windows as the engine serves them (`get_docs_by_ptrs_2[_grouped]`, symmetric context).

        With takedowns this goes through `InfiniGramEngineDiff`, which marks windows that
        equal a window of a removed document `blocked`; windows of a taken-down doc_id are
        blocked in any case.
        """
        span_ids = check_ids(span_ids, "span_ids")
        for d in docs:
            self._check_ptr(d.shard, d.ptr)
        if self.diff_folder is not None:
            req = [{"docs": [{"s": d.shard, "ptr": d.ptr} for d in docs], "span_ids": span_ids,
                    "needle_len": len(span_ids), "max_ctx_len": int(max_ctx_len)}]
            results = _ok(self.engine.get_docs_by_ptrs_2_grouped(req))[0]
        else:
            results = _ok(self.engine.get_docs_by_ptrs_2([(d.shard, d.ptr, len(span_ids), int(max_ctx_len)) for d in docs]))
        out = []
        for d, r in zip(docs, results):
            doc = self.doc_at(d.shard, d.ptr)
            blocked = bool(r["blocked"]) or doc.blocked
            doc_start = int(self._shards[d.shard].od[doc.doc_ix]) // 2 + 1
            out.append(DocWindow(self.name, d.shard, d.ptr, doc, [] if blocked else list(r["token_ids"]),
                                 int(r["needle_offset"]), len(span_ids), blocked, d.ptr // 2 - doc_start))
        return out

    def is_blocked(self, shard: int, ptr: int) -> bool:
        return self.doc_at(shard, ptr).blocked

    # -- files for compiled searches -------------------------------------------------------

    @property
    def files(self) -> IndexFiles:
        ks = [st["shard"] for st in self.manifest["shards"]]
        f = self.folder
        return IndexFiles(
            source=self.name, folder=f, tokenized=[f / f"tokenized.{k}" for k in ks], table=[f / f"table.{k}" for k in ks],
            offset=[f / f"offset.{k}" for k in ks], metadata=[f / f"metadata.{k}" for k in ks],
            metaoff=[f / f"metaoff.{k}" for k in ks], unigram=[f / f"unigram.{k}" for k in ks],
            ptr_size=[st["ptr_size"] for st in self.manifest["shards"]], bow_ids=f / fmt.BOW_FILE,
            diff_folder=self.diff_folder,
        )

    @property
    def unigram_counts(self) -> np.ndarray:
        """65536 counts summed over shards; index 65535 counts the document separators."""
        if self._unigram is None:
            self._unigram = sum(fmt.read_unigram(p) for p in self.files.unigram)
        return self._unigram


class Federation:
    """The indexes of every available source, opened once for a process's lifetime."""

    def __init__(self, indexes: dict[str, SourceIndex], skipped: dict[str, str] | None = None):
        self.indexes = indexes
        self.skipped = skipped or {}  # source -> why it is not served

    @classmethod
    def open(cls, ws: Workspace, names: Sequence[str] | None = None, *, today: dt.date | None = None,
             strict: bool = True, load_to_ram: bool = False) -> "Federation":
        """Open the index of every available source (or of `names`, which must be available).

        :param strict: raise when an available source has no index; else skip it and say why
            in `skipped`. A stale or damaged index raises either way.
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
            if not index_dir(ws, n).exists() and not strict:
                skipped[n] = "no index built"
                continue
            indexes[n] = SourceIndex(ws, n, load_to_ram=load_to_ram)
        return cls(indexes, skipped)

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

    def window(self, source: str, shard: int, ptr: int, needle_len: int, left: int = 250, right: int = 250) -> DocWindow:
        return self.source(source).window(shard, ptr, needle_len, left, right)

    def document(self, source: str, doc_id: str) -> DocRef:
        return self.source(source).document(doc_id)

    def doc_at(self, source: str, shard: int, ptr: int) -> DocRef:
        return self.source(source).doc_at(shard, ptr)

    def is_blocked(self, source: str, shard: int, ptr: int) -> bool:
        return self.source(source).is_blocked(shard, ptr)

    def files(self, source: str) -> IndexFiles:
        return self.source(source).files

    def unigram_counts(self, source: str | None = None) -> np.ndarray:
        """Unigram counts of one source, or summed over the served sources."""
        if source is not None:
            return self.source(source).unigram_counts
        return sum((ix.unigram_counts for ix in self.indexes.values()), np.zeros(65536, dtype=np.int64))

    def close(self) -> None:
        self.indexes.clear()
