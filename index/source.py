"""One source's index, opened once: counts, the span search, and documents cut to its policy.

`SourceIndex.matches` and `SourceIndex.documents` are the two questions a trace asks a
source (`index/engine.py`'s Federation asks them of every source and merges the answers);
an owner node will answer the same two for its own source over HTTP. Policy is enforced
here, on the source's side: `counts` sources return no documents, `snippets` sources no
more than a snippet, and taken-down documents (by doc_id, or by content through the
takedown diff index) come back `blocked` with no text and no title.

Opening refuses an index that cannot be trusted (`IntegrityError`: files missing or of
the wrong size, suffix array out of order at sampled ranks; `ConflictError`: another
tokenizer, the manifest's `serve_problem`). Opening costs the same at any index size: files
up to `OPEN_HASH_MAX` bytes are checked against their build checksums in a background
thread (each once per process, collected by `settle()`), larger ones only at sampled
blocks; whole-file checksums of large files are `flexolmo index verify`'s job.

Ids are u16 or u32 as the manifest says (`index/width.py`); `check_ids` takes the range.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from flexolmo.base import sources as src_lib
from flexolmo.base import tokenizer as tok_lib
from flexolmo.base.errors import ConflictError, InputError, IntegrityError, NotFoundError
from flexolmo.base.workspace import Workspace, file_sha256

from . import catalog, format as fmt, search
from .manifest import IndexManifest
from .options import WINDOW
from .results import AttributedSpan, DocRef, SourceMatches, SpanDoc, SpanDocument
from .verify import quick_check

MAX_ID = 0xFFFE  # u16 ids; 0xFFFF is the document separator (a u32 index: its vocabulary's last id)
NTD_CONTEXT = 20  # next tokens: context a side on which a copy of a taken-down document is recognised
OPEN_HASH_MAX = fmt.SPOT_ABOVE  # bytes: files up to this size get their whole checksum checked after an open


def check_ids(ids: Iterable[int], what: str = "input_ids", max_id: int = MAX_ID) -> list[int]:
    """Query ids as a list of ints in [0, max_id], or an InputError naming the range."""
    try:
        out = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a list of integers in [0, {max_id}]") from None
    if any(i < 0 or i > max_id for i in out):
        raise InputError(f"{what} must be a list of integers in [0, {max_id}]")
    return out


def open_search(ws: Workspace, name: str) -> search.Shards:
    """The compiled search's shards of source `name`'s local index, for the verbatim guard:
    NotFoundError without an index, ConflictError when it may not serve (another tokenizer)."""
    folder = fmt.index_dir(ws, name)
    if not folder.exists():
        raise NotFoundError(f"source {name!r} has no index here; run `flexolmo index build --source {name}`")
    m = fmt.read_manifest(folder)
    why = m.serve_problem(tok_lib.tokenizer_hash(ws))
    if why:
        raise ConflictError(f"the index of {name!r} cannot guard generation: {why}")
    return search.Shards([search.Shard.open(name, st.shard, m.shard_file(folder, "tokenized", st.shard),
                                            m.shard_file(folder, "table", st.shard), m.width) for st in m.shards])


def _ok(result):
    """infini-gram returns {'error': ...} instead of raising: turn it into our exception, here only."""
    if isinstance(result, dict) and "error" in result:
        raise InputError(f"index query rejected: {result['error']}")
    return result


# -- checksums, in the background ----------------------------------------------------------

_checked: dict[tuple, bool] = {}  # (path, inode, size, mtime_ns, sha256) -> matches: each file hashed once per process
_pool: ThreadPoolExecutor | None = None


def _checksum_problems(folder: Path, manifest: IndexManifest) -> list[str]:
    """Whole checksums of the small files, sampled blocks of the large ones (each file once per process)."""
    problems = []
    for name, info in manifest.files.items():
        p = folder / name
        try:
            st = p.stat()
            key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns, info.sha256)
            if key not in _checked:
                _checked[key] = (file_sha256(p) == info.sha256 if st.st_size <= OPEN_HASH_MAX
                                 else not info.blocks or fmt.block_digests(p) == info.blocks)
        except OSError as e:
            problems.append(f"{name} cannot be read ({e.strerror})")
            continue
        if not _checked[key]:
            problems.append(f"{name} fails its sha256 checksum (altered since the build)")
    return problems


def _check_in_background(folders: list[tuple[Path, IndexManifest]]) -> Future:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-checksums")
    return _pool.submit(lambda: [p for f, m in folders for p in _checksum_problems(f, m)])


@dataclass
class _Shard:
    ds: np.ndarray  # ids (u16 or u32), separators included
    od: np.ndarray  # u64 byte offsets of documents
    mt: np.ndarray  # metadata bytes
    om: np.ndarray  # u64 byte offsets of metadata lines


class SourceIndex:
    """One source's index (and its takedown diff index), opened once."""

    def __init__(self, ws: Workspace, name: str, *, visibility: str = "full", load_to_ram: bool = False):
        from infini_gram.engine import InfiniGramEngine, InfiniGramEngineDiff

        self.name = name
        self.visibility = src_lib.check_visibility(visibility)
        self.folder = fmt.index_dir(ws, name)
        if not self.folder.exists():
            raise NotFoundError(f"source {name!r} has no index; run `flexolmo index build --source {name}`")
        self.manifest = m = fmt.read_manifest(self.folder)
        self._refuse(quick_check(self.folder, m), "index")
        why = m.serve_problem(tok_lib.tokenizer_hash(ws))
        if why:
            raise ConflictError(f"refusing to serve the index of {name!r}: {why}")
        self.width, self.max_id = m.width, m.max_id
        self.diff_folder: Path | None = None
        self.blocked_doc_ids: set[str] = {t.doc_id for t in catalog.list_takedowns(ws, name)}
        checked = [(self.folder, m)]
        dfolder = fmt.diff_dir(ws, name)
        if dfolder.exists():
            dm = fmt.read_manifest(dfolder)
            self._refuse(quick_check(dfolder, dm), "takedown index")
            self.diff_folder = dfolder
            self.blocked_doc_ids |= set(dm.doc_ids)
            checked.append((dfolder, dm))
        self.checksums = _check_in_background(checked)
        bow = str(self.folder / fmt.BOW_FILE)
        common = dict(**m.engine_kwargs, load_to_ram=load_to_ram, bow_ids_path=bow, precompute_unigram_logprobs=True)
        with fmt.loader_path(self.folder) as path:
            if self.diff_folder is not None:
                with fmt.loader_path(self.diff_folder) as dpath:
                    self.engine = InfiniGramEngineDiff(index_dir=path, index_dir_diff=dpath, **common)
            else:
                self.engine = InfiniGramEngine(index_dir=path, **common)
        self._shards: list[_Shard] = []
        self._search: list[search.Shard] | search.Shards = []
        for st in m.shards:
            k = st.shard
            f = lambda kind: m.shard_file(self.folder, kind, k)  # noqa: E731
            self._shards.append(_Shard(ds=np.memmap(f("tokenized"), dtype=self.width.dtype, mode="r"),
                                       od=np.memmap(f("offset"), dtype=np.uint64, mode="r"),
                                       mt=np.memmap(f("metadata"), dtype=np.uint8, mode="r"),
                                       om=np.memmap(f("metaoff"), dtype=np.uint64, mode="r")))
            self._search.append(search.Shard.open(name, k, f("tokenized"), f("table"), self.width))
        self._search = search.Shards(self._search)
        self._by_doc_id: dict[str, tuple[int, int]] | None = None
        self._unigram: np.ndarray | None = None

    def _refuse(self, problems: list[str], what: str) -> None:
        if problems:
            raise IntegrityError(f"the {what} of {self.name!r} is damaged ({'; '.join(problems[:3])}); "
                                 f"rebuild it with `flexolmo index build --source {self.name} --force`")

    def settle(self) -> None:
        """Wait for the background checksums; IntegrityError if a file changed since its build."""
        self._refuse(self.checksums.result(), "index")

    # -- counts and spans ----------------------------------------------------------------

    @property
    def n_docs(self) -> int:
        return self.manifest.n_docs

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    @property
    def build_id(self) -> str:
        return self.manifest.build_id

    def _ids(self, ids: Iterable[int], what: str = "input_ids") -> list[int]:
        return check_ids(ids, what, self.max_id)

    def count(self, ids: Sequence[int]) -> int:
        """Occurrences of the n-gram `ids` in the source (takedowns included: counts are not text)."""
        return int(_ok(self.engine.count(input_ids=self._ids(ids)))["count"])

    def attribute(self, ids: Sequence[int], delim_ids: Sequence[int] = (), min_len: int = 1,
                  max_cnt: int = 1_000_000, enforce_bow: bool = True) -> list[AttributedSpan]:
        """infini-gram's own `attribute` (slow on frequent spans; the reference `matches` is checked against)."""
        if min_len < 0 or max_cnt <= 0:
            raise InputError("min_len must be >= 0 and max_cnt > 0")
        res = _ok(self.engine.attribute(input_ids=self._ids(ids), delim_ids=self._ids(delim_ids, "delim_ids"),
                                        min_len=int(min_len), max_cnt=int(max_cnt), enforce_bow=bool(enforce_bow)))
        return [AttributedSpan(source=self.name, l=s["l"], r=s["r"], length=s["length"], count=s["count"],
                               unigram_logprob_sum=float(s["unigram_logprob_sum"]),
                               docs=[SpanDoc(shard=d["s"], ptr=d["ptr"]) for d in s["docs"]])
                for s in res["spans"]]

    def matches(self, ids: Sequence[int], delim_ids: Sequence[int], bow_ids: Sequence[int] | None,
                enforce_bow: bool = True) -> SourceMatches:
        """The longest match (after OLMoTrace's cut rules) and its count at every position of `ids`."""
        return search.source_matches(self.name, self._search, self._ids(ids), self._ids(delim_ids, "delim_ids"),
                                     bow_ids, enforce_bow)

    @property
    def unigram_counts(self) -> np.ndarray:
        """Counts summed over shards, one slot per id and a last slot counting the document
        separators (`Width.dense_size`: 65,536 slots for u16, the vocabulary + 1 for u32)."""
        m = self.manifest
        if self._unigram is None:
            self._unigram = sum(fmt.read_unigram(m.shard_file(self.folder, "unigram", st.shard), m.width, m.vocab_size)
                                for st in m.shards)
        return self._unigram

    # -- documents -----------------------------------------------------------------------

    def documents(self, span_ids: Sequence[int], picks: Sequence[int], n: int = WINDOW.max_docs,
                  context_tokens: int = WINDOW.context_tokens,
                  snippet_tokens: int = WINDOW.snippet_tokens) -> list[SpanDocument]:
        """Up to `n` distinct documents at the span's occurrences `picks`, in the order first picked.

        :param picks: occurrence numbers in [0, count) (suffix-array order over the shards);
            a document picked twice counts once. `draw` of each result is its pick's position.
        :param context_tokens: context a side for `full` sources (also what the takedown
            diff index compares windows on); `snippets` sources get half of `snippet_tokens`.
        """
        span_ids = self._ids(span_ids, "span_ids")
        if not span_ids or n < 0 or context_tokens < 0 or snippet_tokens < 0:
            raise InputError("span_ids must not be empty; n, context_tokens and snippet_tokens must be >= 0")
        if self.visibility == "counts" or not picks or n == 0:
            return []
        ranges = search.rank_ranges(self._search, span_ids)
        sizes = [hi - lo for lo, hi in ranges]
        found: list[tuple[int, int, int, int]] = []  # (pick position, shard, ptr, doc_ix), distinct documents
        seen: set[tuple[int, int]] = set()
        for p, j in enumerate(picks):
            if not 0 <= j < sum(sizes):
                raise InputError(f"occurrence {j} is out of range: the span occurs {sum(sizes)} times in {self.name!r}")
            k = 0
            while j >= sizes[k]:
                j -= sizes[k]
                k += 1
            ptr = search.rank_to_ptr(self._search[k], ranges[k][0] + int(j))
            doc_ix = int(np.searchsorted(self._shards[k].od, np.uint64(ptr), side="right")) - 1
            if (k, doc_ix) not in seen:
                seen.add((k, doc_ix))
                found.append((p, k, ptr, doc_ix))
                if len(found) == n:
                    break
        docs = [self._doc(k, ix) for _, k, _, ix in found]  # one metadata read per document
        blocked = self._blocked(found, docs, span_ids, context_tokens)
        side = context_tokens if self.visibility == "full" else min(context_tokens, max(0, (snippet_tokens - len(span_ids)) // 2))
        return [self._window(f, doc, b, len(span_ids), side) for f, doc, b in zip(found, docs, blocked)]

    def _window(self, found: tuple[int, int, int, int], doc: DocRef, blocked: bool, needle_len: int,
                side: int) -> SpanDocument:
        """The occurrence `found` = (draw, shard, ptr, doc_ix) with up to `side` tokens a side
        within its document; a blocked one carries no tokens and no title."""
        draw, k, ptr, ix = found
        sh = self._shards[k]
        w = self.width.bytes
        d0, pos = int(sh.od[ix]) // w + 1, ptr // w  # first token of the document, of the match
        lo, hi = max(d0, pos - side), min(d0 + doc.n_tokens, pos + needle_len + side)
        return SpanDocument(source=self.name, doc_id=doc.doc_id, title=None if blocked else doc.title, shard=k,
                            doc_ix=ix, token_offset=pos - d0, blocked=blocked, visibility=self.visibility,
                            token_ids=[] if blocked else sh.ds[lo:hi].tolist(),
                            needle_offset=0 if blocked else pos - lo, needle_len=needle_len, draw=draw)

    def _blocked(self, found: list[tuple[int, int, int, int]], docs: list[DocRef], span_ids: list[int],
                 context_tokens: int) -> list[bool]:
        """Taken down by doc_id, or by content: InfiniGramEngineDiff marks a window blocked when it
        (with `context_tokens` a side) equals one of a removed document. One engine call per span."""
        blocked = [d.blocked for d in docs]
        ask = [i for i, b in enumerate(blocked) if not b]
        if self.diff_folder is None or not ask:
            return blocked
        req = [{"docs": [{"s": found[i][1], "ptr": found[i][2]} for i in ask], "span_ids": span_ids,
                "needle_len": len(span_ids), "max_ctx_len": int(context_tokens)}]
        for i, r in zip(ask, _ok(self.engine.get_docs_by_ptrs_2_grouped(req))[0]):
            blocked[i] = bool(r["blocked"])
        return blocked

    def _doc(self, shard: int, doc_ix: int) -> DocRef:
        sh = self._shards[shard]
        m0 = int(sh.om[doc_ix])
        m1 = int(sh.om[doc_ix + 1]) if doc_ix + 1 < len(sh.om) else sh.mt.size
        meta = json.loads(bytes(sh.mt[m0:m1]))
        w = self.width.bytes
        start = int(sh.od[doc_ix]) // w
        end = int(sh.od[doc_ix + 1]) // w if doc_ix + 1 < len(sh.od) else sh.ds.size
        return DocRef(source=self.name, doc_id=meta["doc_id"], shard=shard, doc_ix=doc_ix, title=meta.get("title"),
                      path=meta.get("path"), metadata=meta, n_tokens=end - start - 1,
                      blocked=meta["doc_id"] in self.blocked_doc_ids)

    def doc_at(self, shard: int, ptr: int) -> DocRef:
        """The document that contains byte `ptr` of shard `shard`."""
        if not 0 <= shard < len(self._shards):
            raise InputError(f"shard must be in [0, {len(self._shards)}) for source {self.name!r}")
        sh, w = self._shards[shard], self.width.bytes
        if not (0 <= ptr < sh.ds.size * w and ptr % w == 0):
            raise InputError(f"ptr must be a byte offset in [0, {sh.ds.size * w}), a multiple of {w}, "
                             f"for {self.name!r} shard {shard}")
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
        start = int(sh.od[doc.doc_ix]) // self.width.bytes + 1
        return [int(x) for x in sh.ds[start:start + doc.n_tokens]]

    # -- searching the training data (index/query.py) -------------------------------------

    def count_cnf(self, cnf: list[list[list[int]]], max_clause_freq: int, max_diff_tokens: int) -> tuple[int, bool]:
        """infini-gram's `count_cnf`: occurrences of an AND of ORs of phrases; (count, approx).
        Counts include taken-down documents (counts are not text)."""
        r = _ok(self.engine.count_cnf(cnf=cnf, max_clause_freq=int(max_clause_freq), max_diff_tokens=int(max_diff_tokens)))
        return int(r["count"]), bool(r["approx"])

    def cnf_documents(self, cnf: list[list[list[int]]], n: int, seed: int, snippet_tokens: int,
                      max_clause_freq: int, max_diff_tokens: int) -> list[SpanDocument]:
        """Up to `n` distinct documents where the CNF holds (infini-gram's `find_cnf` pointers,
        sampled with `seed`), each cut to a snippet around the phrase found there; none for a
        `counts` source; taken-down documents `blocked`, with no text."""
        import random

        if self.visibility == "counts" or n <= 0:
            return []
        r = _ok(self.engine.find_cnf(cnf=cnf, max_clause_freq=int(max_clause_freq), max_diff_tokens=int(max_diff_tokens)))
        ptrs = [(k, int(p)) for k, ps in enumerate(r["ptrs_by_shard"]) for p in ps]
        terms = sorted({tuple(t) for clause in cnf for t in clause}, key=len, reverse=True)
        found: list[tuple[int, int, int, int]] = []  # (draw, shard, ptr, doc_ix)
        needles: list[tuple[int, ...]] = []
        seen: set[tuple[int, int]] = set()
        for draw, j in enumerate(random.Random(seed).sample(range(len(ptrs)), len(ptrs))):
            k, ptr = ptrs[j]
            sh = self._shards[k]
            doc_ix = int(np.searchsorted(sh.od, np.uint64(ptr), side="right")) - 1
            if (k, doc_ix) in seen:
                continue
            seen.add((k, doc_ix))
            pos = ptr // self.width.bytes
            needles.append(next((t for t in terms if sh.ds[pos: pos + len(t)].tolist() == list(t)), terms[-1]))
            found.append((draw, k, ptr, doc_ix))
            if len(found) == n:
                break
        docs = [self._doc(k, ix) for _, k, _, ix in found]
        blocked = [d.blocked for d in docs]
        for needle in set(needles):  # the takedown diff index compares windows around each phrase
            at = [i for i, t in enumerate(needles) if t == needle]
            side = max(0, (snippet_tokens - len(needle)) // 2)
            for i, b in zip(at, self._blocked([found[i] for i in at], [docs[i] for i in at], list(needle), side)):
                blocked[i] = b
        return [self._window(f, doc, b, len(needle), max(0, (snippet_tokens - len(needle)) // 2))
                for f, doc, b, needle in zip(found, docs, blocked, needles)]

    def next_token_counts(self, ids: Sequence[int], max_support: int) -> tuple[int, bool, dict[int, int]]:
        """infini-gram's `ntd`: how often each token follows the phrase `ids`, counted over up to
        `max_support` occurrences (evenly spaced in suffix-array order when there are more:
        approx). Occurrences in taken-down documents are left out (a continuation is text).
        Returns (occurrences of the phrase, approx, {token id: count})."""
        ids = self._ids(ids)
        if not ids or max_support <= 0:
            raise InputError("next tokens need a non-empty phrase and max_support > 0")
        ranges = search.rank_ranges(self._search, ids)
        total = sum(hi - lo for lo, hi in ranges)
        step = max(1, -(-total // max_support))
        occ: list[tuple[int, int, int, int, int]] = []  # (draw, shard, ptr, doc_ix, next id)
        for k, (lo, hi) in enumerate(ranges):
            sh = self._shards[k]
            for rank in range(lo, hi, step):
                ptr = search.rank_to_ptr(self._search[k], rank)
                pos = ptr // self.width.bytes + len(ids)
                if pos >= sh.ds.size or int(sh.ds[pos]) == self.width.doc_sep:  # the phrase ends its document
                    continue
                doc_ix = int(np.searchsorted(sh.od, np.uint64(ptr), side="right")) - 1
                occ.append((len(occ), k, ptr, doc_ix, int(sh.ds[pos])))
        docs: dict[tuple[int, int], DocRef] = {}
        for _, k, _, ix, _ in occ:
            if (k, ix) not in docs:
                docs[(k, ix)] = self._doc(k, ix)
        # a copy of a removed document's text is blocked by content: windows of NTD_CONTEXT a side
        blocked = self._blocked([o[:4] for o in occ], [docs[(o[1], o[3])] for o in occ], ids, NTD_CONTEXT) if occ else []
        counts: dict[int, int] = {}
        for o, b in zip(occ, blocked):
            if not b:
                counts[o[4]] = counts.get(o[4], 0) + 1
        return total, step > 1, counts
