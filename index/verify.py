"""Verify an index folder: sizes and checksums, structure, suffix-array order, the engine, counts.

    flexolmo index verify [--source NAME]

`verify_folder` is what a build runs before its rename (and `verify_index` what the CLI
runs later, with whole-file checksums); `quick_check` is the cheap part that `SourceIndex`
runs at every open: file sizes plus the suffix array's order at a few sampled ranks, which
catches a `table.N` or `tokenized.N` overwritten with other bytes of the same size. Token
files are scanned in chunks (`format.token_chunks`), never memory-mapped whole, so a
verify's memory does not grow with the index.
"""

from __future__ import annotations

import time
from pathlib import Path

import numba
import numpy as np

from flexolmo.base import sources as src_lib
from flexolmo.base import tokenizer as tok_lib
from flexolmo.base.errors import FlexolmoError
from flexolmo.base.workspace import Workspace

from . import catalog, doc_freq, format as fmt
from .manifest import IndexManifest, ShardStat
from .results import VerifyResult
from .width import Width

OPEN_RANKS = 64  # adjacent suffix-array pairs checked per shard at every open
MAX_NGRAM = 8  # sampled n-grams are 1..MAX_NGRAM ids long


# ---------------------------------------------------------------------------------------
# verify


def quick_check(folder: Path, manifest: IndexManifest, n_ranks: int = OPEN_RANKS) -> list[str]:
    """The cheap checks run at every open: file sizes, and sampled suffix-array order per shard."""
    problems = fmt.check_files(folder, manifest)
    if problems:
        return problems
    rng = np.random.default_rng(0)
    for st in manifest.shards:
        problems += _order_problems(Path(folder), manifest, st, rng, n_ranks)
    return problems


def _order_problems(folder: Path, m: IndexManifest, st: ShardStat, rng: np.random.Generator, n_ranks: int) -> list[str]:
    """Is table.k sorted at `n_ranks` sampled adjacent ranks (suffixes compared on 64 bytes)?"""
    k, width, w = st.shard, st.ptr_size, m.width.bytes
    tokenized = m.shard_file(folder, "tokenized", k)
    size = tokenized.stat().st_size
    n = size // w
    if n <= 1:
        return []
    table = m.shard_file(folder, "table", k)
    ranks = rng.integers(0, n - 1, size=min(n_ranks, n - 1))
    a = fmt.read_table_ptrs(table, width, ranks)
    b = fmt.read_table_ptrs(table, width, ranks + 1)
    if np.any(a >= size) or np.any(b >= size) or np.any(a % w) or np.any(b % w):
        return [f"shard {k}: {table.name} holds pointers outside tokenized.{k}"]
    # suffixes compared on their first 64 bytes, read with pread (format.read_at: no mapping)
    x, y = fmt.read_at(tokenized, a, 64), fmt.read_at(tokenized, b, 64)
    bad = sum(1 for p, q in zip(x, y) if p > q)
    return [f"shard {k}: {table.name} is out of order at {bad} of {len(ranks)} sampled ranks"] if bad else []


def verify_folder(folder: Path, manifest: IndexManifest, *, n_ngrams: int = 64, n_ranks: int = 256,
                  checksums: bool = True, seed: int = 0) -> list[str]:
    """Every problem found in an index folder; an empty list means it is sound.

    Checks, in order (later checks need the earlier ones): file sizes (and checksums), the
    structure of each shard and of the document-frequency table (index/doc_freq.py), the
    suffix array's order at sampled ranks, that the upstream engine loads it with the right
    document and token counts, and that sampled n-gram counts equal a brute-force count over
    the token files.
    """
    from infini_gram.engine import InfiniGramEngine

    folder, m = Path(folder), manifest
    w = m.width
    problems = fmt.check_files(folder, m, checksums=checksums)
    if problems:
        return problems
    rng = np.random.default_rng(seed)
    files = []
    for st in m.shards:
        k = st.shard
        tokenized = m.shard_file(folder, "tokenized", k)
        n_ids = tokenized.stat().st_size // w.bytes
        od = np.memmap(m.shard_file(folder, "offset", k), dtype=np.uint64, mode="r")
        if n_ids != st.ds_tokens or len(od) != st.n_docs:
            problems.append(f"shard {k}: {n_ids} ids / {len(od)} documents, manifest says {st.ds_tokens} / {st.n_docs}")
            continue
        seps = sum(int(np.count_nonzero(c == w.doc_sep)) for _, c in fmt.token_chunks(tokenized, w))
        at = np.asarray(od[:: max(1, len(od) // 4096)])  # sampled document starts (byte offsets)
        sep = int(w.doc_sep).to_bytes(w.bytes, "little")
        if len(od) and (od[0] != 0 or any(b != sep for b in fmt.read_at(tokenized, at, w.bytes))):
            problems.append(f"shard {k}: offset.{k} does not point at document separators")
        if seps != st.n_docs:
            problems.append(f"shard {k}: the number of separators differs from the number of documents")
        problems += _order_problems(folder, m, st, rng, n_ranks)
        files.append(tokenized)
    problems += doc_freq.check_folder(folder, m.n_docs, m.files)  # relevance's table, when the index has one
    if problems:
        return problems

    def engine() -> InfiniGramEngine:
        with fmt.loader_path(folder) as path:
            return InfiniGramEngine(index_dir=path, **m.engine_kwargs)

    e = engine()
    if e.get_total_doc_cnt() != m.n_docs:
        problems.append(f"the engine sees {e.get_total_doc_cnt()} documents, expected {m.n_docs}")
    tok_cnt = sum(e.engine.get_tok_cnt(s=s) for s in range(e.engine.get_num_shards()))
    if tok_cnt != m.n_tokens + m.n_docs:
        problems.append(f"the engine sees {tok_cnt} positions, expected {m.n_tokens + m.n_docs}")
    vocab = int(np.flatnonzero(sum(fmt.read_unigram(m.shard_file(folder, "unigram", st.shard), w, m.vocab_size)
                                   for st in m.shards)[:-1]).max(initial=0)) + 1
    queries = sample_ngrams(files, w, n_ngrams, rng, vocab)
    for q, want in zip(queries, brute_counts(files, w, queries)):
        # a fresh engine per count: its binary searches map the page-cache folios they touch (10-85 MB
        # a count on a freshly written 300M-token index, format.read_at), which an engine kept open
        # would pile up (1 GB for 64 counts), so the build's memory would grow with the index
        e = engine()
        got = e.count(input_ids=q)
        if "error" in got or got["count"] != want:
            problems.append(f"count({q}) = {got.get('count', got.get('error'))}, brute force {want}")
            break
    return problems


def sample_ngrams(files: list[Path], width: Width, n: int, rng: np.random.Generator, vocab: int) -> list[list[int]]:
    """n-grams of length 1..MAX_NGRAM: three quarters read from the token files at random
    places (separators dropped), the rest random ids below `vocab`."""
    out = []
    sizes = [Path(f).stat().st_size // width.bytes for f in files]
    nonempty = [(f, s) for f, s in zip(files, sizes) if s > 1]
    if not nonempty:
        return out
    for i in range(n):
        length = int(rng.integers(1, MAX_NGRAM + 1))
        if i % 4 != 3:
            f, size = nonempty[int(rng.integers(len(nonempty)))]
            start = int(rng.integers(0, max(1, size - length)))
            q = [int(x) for x in fmt.read_tokens(f, width, start, length) if x != width.doc_sep]
        else:
            q = [int(x) for x in rng.integers(0, vocab, size=length)]
        if q:
            out.append(q)
    return out


def brute_counts(files: list[Path], width: Width, queries: list[list[int]]) -> list[int]:
    """Occurrences of every query in the token files, by direct comparison, in one chunked pass."""
    if not queries:
        return []
    longest = max(len(q) for q in queries)
    qs = np.full((len(queries), longest), -1, dtype=np.int64)
    for i, q in enumerate(queries):
        qs[i, : len(q)] = q
    lens = np.array([len(q) for q in queries], dtype=np.int64)
    # queries grouped by their first id: the scan looks only at those starting with a[i]
    order = np.argsort(qs[:, 0], kind="stable")
    first = qs[order, 0]
    ids = np.arange(int(first.max()) + 1)
    start, end = np.searchsorted(first, ids, "left"), np.searchsorted(first, ids, "right")
    counts = np.zeros(len(queries), dtype=np.int64)
    for f in files:
        n = Path(f).stat().st_size // width.bytes
        for at, chunk in fmt.token_chunks(f, width, overlap=longest - 1):
            # occurrences starting in this chunk's own part; its overlap belongs to the next chunk
            own = min(len(chunk), max(0, n - at), fmt.READ_CHUNK // width.bytes)
            _count_pass(chunk, own, qs, lens, order, start, end, counts)
    return counts.tolist()


@numba.njit(cache=True)
def _count_pass(a, own, qs, lens, order, start, end, counts):
    n = a.shape[0]
    for i in range(own):
        t = a[i]
        if t >= start.shape[0]:  # no query starts with this id (or the separator)
            continue
        for j in range(start[t], end[t]):  # the queries that start with id t
            q = order[j]
            m = lens[q]
            if i + m <= n:
                ok = True
                for k in range(1, m):
                    if a[i + k] != qs[q, k]:
                        ok = False
                        break
                if ok:
                    counts[q] += 1


def verify_index(ws: Workspace, name: str, *, n_ngrams: int = 64) -> VerifyResult:
    """Recheck a built index: whole-file checksums, structure, the engine, sampled counts, whether
    it is current (the manifest's rule: tokenizer and source content as now), the catalog row.

    The catalog row is re-recorded from the folder when a build was killed after its rename.
    A remote source's index is its owner's to verify: the result says so (`skipped`).
    """
    t0 = time.perf_counter()
    src = src_lib.get_source(ws, name)
    remote = catalog.list_remote_sources(ws).get(name)
    if remote is not None:
        return VerifyResult(name, True, [], 0, 0, time.perf_counter() - t0,
                            skipped=f"remote: held by its owner's node at {remote['url']}; its owner verifies it there")
    folder = fmt.index_dir(ws, name)
    if not folder.exists():
        return VerifyResult(name, False, [f"no index at {folder}; run `flexolmo index build --source {name}`"], 0, 0,
                            time.perf_counter() - t0)
    try:
        m = fmt.read_manifest(folder)
    except FlexolmoError as e:
        return VerifyResult(name, False, [str(e)], 0, 0, time.perf_counter() - t0)
    problems = verify_folder(folder, m, n_ngrams=n_ngrams, checksums=True)
    if not problems:
        rec = catalog.get_index(ws, name)
        if rec is None or rec.build_id != m.build_id:
            catalog.rerecord(ws, folder, m)
        why = m.stale_reason(m.inputs_with(tokenizer=tok_lib.tokenizer_hash(ws), source=src.content_hash))
        if why:
            problems.append(f"stale: {why}; rebuild it with `flexolmo index build --source {name}`")
    dfolder = fmt.diff_dir(ws, name)
    if dfolder.exists():
        try:
            dm = fmt.read_manifest(dfolder)
            problems += [f"takedown index: {p}" for p in verify_folder(dfolder, dm, n_ngrams=8, checksums=True)]
        except FlexolmoError as e:
            problems.append(f"takedown index: {e}")
    return VerifyResult(name, not problems, problems, len(m.files), n_ngrams, time.perf_counter() - t0)


def verify_all(ws: Workspace, names: list[str] | None = None) -> list[VerifyResult]:
    """Every built index (and every remote source, as skipped), or those of `names`."""
    if not names:
        names = sorted({r.source for r in catalog.list_indexes(ws)} | set(catalog.list_remote_sources(ws)))
    return [verify_index(ws, n) for n in names]
