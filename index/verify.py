"""Verify an index folder: sizes and checksums, structure, suffix-array order, the engine, counts.

    flexolmo index verify [--source NAME]

`verify_folder` is what a build runs before its rename (and `verify_index` what the CLI
runs later); `quick_check` is the cheap part that `SourceIndex` runs at every open: file
sizes plus the suffix array's order at a few sampled ranks, which catches a `table.N`
or `tokenized.N` overwritten with other bytes of the same size. Full checksums are
checked in the background after an open (see `index/engine.py`).
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

from . import catalog, format as fmt
from .models import VerifyResult

OPEN_RANKS = 64  # adjacent suffix-array pairs checked per shard at every open


# ---------------------------------------------------------------------------------------
# verify


def quick_check(folder: Path, manifest: dict, n_ranks: int = OPEN_RANKS) -> list[str]:
    """The cheap checks run at every open: file sizes, and sampled suffix-array order per shard."""
    problems = fmt.check_files(folder, manifest)
    if problems:
        return problems
    rng = np.random.default_rng(0)
    for st in manifest["shards"]:
        problems += _order_problems(Path(folder), st, rng, n_ranks)
    return problems


def _order_problems(folder: Path, st: dict, rng: np.random.Generator, n_ranks: int) -> list[str]:
    """Is table.k sorted at `n_ranks` sampled adjacent ranks (suffixes compared on 64 bytes)?"""
    k, width = st["shard"], st["ptr_size"]
    raw = np.memmap(fmt.shard_file(folder, "tokenized", k), dtype=np.uint8, mode="r") if st["ds_tokens"] \
        else np.zeros(0, np.uint8)
    n = raw.size // fmt.TOKEN_WIDTH
    if n <= 1:
        return []
    table = fmt.shard_file(folder, "table", k)
    ranks = rng.integers(0, n - 1, size=min(n_ranks, n - 1))
    a = fmt.read_table_ptrs(table, width, ranks)
    b = fmt.read_table_ptrs(table, width, ranks + 1)
    if np.any(a >= raw.size) or np.any(b >= raw.size) or np.any(a % 2) or np.any(b % 2):
        return [f"shard {k}: {table.name} holds pointers outside tokenized.{k}"]
    bad = sum(1 for x, y in zip(a.tolist(), b.tolist()) if bytes(raw[x:x + 64]) > bytes(raw[y:y + 64]))
    return [f"shard {k}: {table.name} is out of order at {bad} of {len(ranks)} sampled ranks"] if bad else []


def verify_folder(folder: Path, manifest: dict, *, n_ngrams: int = 64, n_ranks: int = 256,
                  checksums: bool = True, seed: int = 0) -> list[str]:
    """Every problem found in an index folder; an empty list means it is sound.

    Checks, in order (later checks need the earlier ones): file sizes (and checksums), the
    structure of each shard, the suffix array's order at sampled ranks, that the upstream
    engine loads it with the right document and token counts, and that sampled n-gram
    counts equal a brute-force count over the token files.
    """
    from infini_gram.engine import InfiniGramEngine

    folder = Path(folder)
    problems = fmt.check_files(folder, manifest, checksums=checksums)
    if problems:
        return problems
    rng = np.random.default_rng(seed)
    arrays = []
    for st in manifest["shards"]:
        k = st["shard"]
        tokenized = fmt.shard_file(folder, "tokenized", k)
        ds = np.memmap(tokenized, dtype=np.uint16, mode="r") if st["ds_tokens"] else np.zeros(0, np.uint16)
        od = np.fromfile(fmt.shard_file(folder, "offset", k), dtype=np.uint64)
        if len(ds) != st["ds_tokens"] or len(od) != st["n_docs"]:
            problems.append(f"shard {k}: {len(ds)} ids / {len(od)} documents, manifest says {st['ds_tokens']} / {st['n_docs']}")
            continue
        if len(od) and (od[0] != 0 or np.any(ds[(od // 2).astype(np.int64)] != fmt.DOC_SEP)):
            problems.append(f"shard {k}: offset.{k} does not point at document separators")
        if int(np.count_nonzero(ds == fmt.DOC_SEP)) != st["n_docs"]:
            problems.append(f"shard {k}: the number of separators differs from the number of documents")
        problems += _order_problems(folder, st, rng, n_ranks)
        arrays.append(np.asarray(ds))
    if problems:
        return problems

    with fmt.loader_path(folder) as path:
        engine = InfiniGramEngine(index_dir=path, eos_token_id=int(manifest["eos_id"]), version=4, token_dtype="u16")
    if engine.get_total_doc_cnt() != manifest["n_docs"]:
        problems.append(f"the engine sees {engine.get_total_doc_cnt()} documents, expected {manifest['n_docs']}")
    tok_cnt = sum(engine.engine.get_tok_cnt(s=s) for s in range(engine.engine.get_num_shards()))
    if tok_cnt != manifest["n_tokens"] + manifest["n_docs"]:
        problems.append(f"the engine sees {tok_cnt} positions, expected {manifest['n_tokens'] + manifest['n_docs']}")
    queries = sample_ngrams(arrays, n_ngrams, rng)
    for q, want in zip(queries, brute_counts(arrays, queries)):
        got = engine.count(input_ids=q)
        if "error" in got or got["count"] != want:
            problems.append(f"count({q}) = {got.get('count', got.get('error'))}, brute force {want}")
            break
    return problems


def sample_ngrams(arrays: list[np.ndarray], n: int, rng: np.random.Generator) -> list[list[int]]:
    """n-grams of length 1..8: three quarters taken from the documents, the rest random ids."""
    out = []
    nonempty = [a for a in arrays if len(a) > 1]
    if not nonempty:
        return out
    vocab_max = int(max(int(a[a != fmt.DOC_SEP].max(initial=0)) for a in nonempty)) + 1
    for i in range(n):
        length = int(rng.integers(1, 9))
        if i % 4 != 3:
            a = nonempty[int(rng.integers(len(nonempty)))]
            start = int(rng.integers(0, max(1, len(a) - length)))
            q = [int(x) for x in a[start:start + length] if x != fmt.DOC_SEP]
        else:
            q = [int(x) for x in rng.integers(0, vocab_max, size=length)]
        if q:
            out.append(q)
    return out


def brute_counts(arrays: list[np.ndarray], queries: list[list[int]]) -> list[int]:
    """Occurrences of every query in the token arrays, by direct comparison, in one pass."""
    if not queries:
        return []
    width = max(len(q) for q in queries)
    qs = np.full((len(queries), width), -1, dtype=np.int64)
    for i, q in enumerate(queries):
        qs[i, : len(q)] = q
    lens = np.array([len(q) for q in queries], dtype=np.int64)
    # queries grouped by their first id: the scan looks only at those starting with a[i]
    order = np.argsort(qs[:, 0], kind="stable")
    first = qs[order, 0]
    ids = np.arange(65536)
    start, end = np.searchsorted(first, ids, "left"), np.searchsorted(first, ids, "right")
    counts = np.zeros(len(queries), dtype=np.int64)
    for a in arrays:
        _count_pass(np.asarray(a), qs, lens, order, start, end, counts)
    return counts.tolist()


@numba.njit(cache=True)
def _count_pass(a, qs, lens, order, start, end, counts):
    n = a.shape[0]
    for i in range(n):
        t = a[i]
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
    """Recheck a built index: checksums, structure, the engine, sampled counts, the catalog row.

    The catalog row is re-recorded from the folder when a build was killed after its rename.
    """
    t0 = time.perf_counter()
    src_lib.get_source(ws, name)
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
        if rec is None or rec.build_id != m["build_id"]:
            catalog.rerecord(ws, folder, m)
        tok_hash = tok_lib.tokenizer_hash(ws)
        if m["tokenizer_hash"] != tok_hash:
            problems.append("the tokenizer changed since this index was built; rebuild it with "
                            f"`flexolmo index build --source {name}`")
    dfolder = fmt.diff_dir(ws, name)
    if dfolder.exists():
        try:
            dm = fmt.read_manifest(dfolder)
            problems += [f"takedown index: {p}" for p in verify_folder(dfolder, dm, n_ngrams=8, checksums=True)]
        except FlexolmoError as e:
            problems.append(f"takedown index: {e}")
    return VerifyResult(name, not problems, problems, len(m["files"]), n_ngrams, time.perf_counter() - t0)


def verify_all(ws: Workspace, names: list[str] | None = None) -> list[VerifyResult]:
    names = names or [r.source for r in catalog.list_indexes(ws)]
    return [verify_index(ws, n) for n in names]

