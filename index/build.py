"""Build, verify and record one infini-gram index per source (train split only).

    flexolmo index build --all            # or --source NAME, --shards N, --force
    flexolmo index verify --source NAME

A build is atomic: everything is written into `indexes/.tmp-<name>-*`, checked (the
engine loads it; document and token counts match; sampled n-gram counts equal a
brute-force count; the suffix array is sorted at sampled ranks), renamed into place,
and only then recorded in the catalog. A failed or killed build leaves the previous
folder and catalog row untouched. An unchanged source (same content hash and tokenizer
hash) is not rebuilt unless forced.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numba
import numpy as np

from flexolmo import sources as src_lib
from flexolmo import tokenizer as tok_lib
from flexolmo.errors import FlexolmoError, InputError, IntegrityError
from flexolmo.tokens import source_tokens
from flexolmo.workspace import Workspace, atomic_dir

from . import catalog, format as fmt
from .models import BuildResult, IndexRecord, VerifyResult

MAX_SHARDS = 10  # shard files sort by name in the loader: tokenized.10 < tokenized.2
WRITE_BATCH = 1024  # documents per write to the shard files


class Progress(Protocol):
    """Receives build progress; `cli/index_cmds.py` prints it with rich."""

    def __call__(self, source: str, step: str, done: float, total: float | None, unit: str) -> None: ...


def _no_progress(source: str, step: str, done: float, total: float | None, unit: str) -> None:
    pass


@dataclass(frozen=True)
class IndexConfig:
    shards: int = 1
    cpus: int = max(1, min(os.cpu_count() or 1, 8))
    mem_gib: int = 8  # rust_indexing part size budget; parts beyond it are made in batches
    verify_ngrams: int = 64  # sampled n-gram counts checked against a brute-force count
    verify_sa_ranks: int = 256  # sampled adjacent suffix-array ranks checked for order


def index_dir(ws: Workspace, name: str) -> Path:
    return ws.indexes_dir / name


def diff_dir(ws: Workspace, name: str) -> Path:
    """The takedown (diff) index of a source. Source names cannot hold '-', so no clash."""
    return ws.indexes_dir / f"{name}-removed"


# ---------------------------------------------------------------------------------------
# build


def build_source(
    ws: Workspace,
    name: str,
    *,
    shards: int = 1,
    force: bool = False,
    progress: Progress | None = None,
    config: IndexConfig | None = None,
) -> BuildResult:
    """Build (or keep, when unchanged) the index of source `name`'s train split.

    :param shards: number of shards (1..10); documents are split in order, balanced by size.
    :param force: rebuild even if the source and the tokenizer did not change.
    :param progress: called per step with counts, for display.
    """
    progress = progress or _no_progress
    config = config or IndexConfig(shards=shards)
    if config.shards != shards:
        config = IndexConfig(**{**config.__dict__, "shards": shards})
    if not 1 <= shards <= MAX_SHARDS:
        raise InputError(f"--shards {shards} is out of range: use 1..{MAX_SHARDS}")
    t_start = time.perf_counter()
    source = src_lib.get_source(ws, name)
    tok_hash = tok_lib.tokenizer_hash(ws)
    final = index_dir(ws, name)

    if not force:
        kept = _unchanged(ws, name, source.content_hash, tok_hash, shards)
        if kept is not None:
            progress(name, "unchanged, kept", 1, 1, "index")
            return BuildResult(source=name, path=final, skipped=True, n_docs=kept.n_docs, n_tokens=kept.n_tokens,
                               n_shards=kept.n_shards, bytes=kept.bytes, seconds=time.perf_counter() - t_start,
                               tokenize_seconds=0.0, suffix_array_seconds=0.0, verify_seconds=0.0,
                               reason="same content hash and tokenizer hash; use --force to rebuild")

    docs = src_lib.load_documents(ws, name, split="train", columns=["doc_id", "text", "title", "metadata"])
    if docs.num_rows == 0:
        raise InputError(f"source {name!r} has no train documents to index "
                         f"({source.n_docs_valid} validation documents are never indexed)")
    _clean_stale_tmp(ws, name)
    build_id = uuid.uuid4().hex[:12]

    with atomic_dir(final) as tmp:
        t0 = time.perf_counter()
        # the source's ids, tokenized once per tokenizer and shared with training
        toks = source_tokens(ws, name, "train", progress=lambda done, total: progress(name, "tokenize", done, total, "chars"))
        n_docs, n_tokens, shard_stats = _write_shards(tmp, name, docs, toks, shards)
        tokenize_seconds = time.perf_counter() - t0

        sa_seconds = 0.0
        for k in range(shards):
            progress(name, f"suffix array {k + 1}/{shards}", 0, shard_stats[k]["ds_tokens"], "tokens")
            sa_seconds += fmt.build_suffix_array(tmp / f"tokenized.{k}", tmp / f"table.{k}", tmp / f".work-{k}",
                                                 cpus=config.cpus, mem_gib=config.mem_gib)
            shutil.rmtree(tmp / f".work-{k}", ignore_errors=True)
            progress(name, f"suffix array {k + 1}/{shards}", shard_stats[k]["ds_tokens"], shard_stats[k]["ds_tokens"], "tokens")
        shutil.copyfile(ws.tokenizer_dir / "bow_ids.txt", tmp / fmt.BOW_FILE)

        progress(name, "checksums", 0, None, "files")
        files = fmt.file_table(tmp)
        manifest = {
            **fmt.FORMAT,
            "build_id": build_id,
            "source": name,
            "split": "train",
            "n_docs": n_docs,
            "n_tokens": n_tokens,
            "n_shards": shards,
            "shards": shard_stats,
            "eos_id": tok_lib.tokenizer_info(ws).eos_id,
            "tokenizer_hash": tok_hash,
            "content_hash": source.content_hash,
            "built_at": catalog.now().isoformat(),
            "files": files,
        }
        fmt.write_manifest(tmp, manifest)

        t1 = time.perf_counter()
        progress(name, "verify", 0, config.verify_ngrams, "n-grams")
        problems = verify_folder(tmp, manifest, docs_tokens=None, n_ngrams=config.verify_ngrams,
                                 n_ranks=config.verify_sa_ranks, checksums=False)
        if problems:
            raise IntegrityError(f"the new index of {name!r} failed verification, the previous index is kept: "
                                 + "; ".join(problems[:5]))
        verify_seconds = time.perf_counter() - t1
        progress(name, "verify", config.verify_ngrams, config.verify_ngrams, "n-grams")
    # renamed into place; now record it (a kill here leaves the folder ahead of the catalog
    # row: `verify` and `_unchanged` re-record from the folder's manifest)
    seconds = time.perf_counter() - t_start
    total_bytes = sum(f["bytes"] for f in files.values()) + (final / fmt.MANIFEST).stat().st_size
    rec = _record_from_manifest(final, manifest, total_bytes, seconds, tokenize_seconds, sa_seconds)
    with catalog.connect(ws) as con:
        con.execute("BEGIN")
        catalog.upsert_index(con, rec)
        con.execute("COMMIT")

    # The takedown index copies document tokens from the main index: refresh it.
    from .takedown import rebuild_diff

    rebuild_diff(ws, name)
    progress(name, "done", n_tokens, n_tokens, "tokens")
    return BuildResult(source=name, path=final, skipped=False, n_docs=n_docs, n_tokens=n_tokens, n_shards=shards,
                       bytes=total_bytes, seconds=seconds, tokenize_seconds=tokenize_seconds,
                       suffix_array_seconds=sa_seconds, verify_seconds=verify_seconds)


def build_all(
    ws: Workspace, *, shards: int = 1, force: bool = False, progress: Progress | None = None,
    names: list[str] | None = None,
) -> list[BuildResult]:
    """Build the index of every registered source (or of `names`), one after another."""
    names = names or [s.name for s in src_lib.list_sources(ws)]
    if not names:
        raise InputError("no sources registered yet; add one with `flexolmo sources add` or `flexolmo data samples`")
    return [build_source(ws, n, shards=shards, force=force, progress=progress) for n in names]


def _write_shards(tmp: Path, name: str, docs, toks, shards: int) -> tuple[int, int, list[dict]]:
    """Stream the documents' cached ids into `shards` contiguous shards, balanced by size."""
    doc_ids = docs.column("doc_id").to_pylist()
    titles = docs.column("title").to_pylist()
    metas = docs.column("metadata").to_pylist()
    n = len(doc_ids)
    assert toks.n_docs == n, "token cache and documents disagree"
    sizes = np.diff(toks.offsets)
    cum = np.cumsum(sizes) - sizes
    shard_of = np.minimum((cum * shards) // max(int(sizes.sum()), 1), shards - 1)
    writers = [fmt.ShardWriter(tmp, k, name) for k in range(shards)]
    try:
        for b in range(0, n, WRITE_BATCH):
            batch: dict[int, list] = {}
            for i in range(b, min(n, b + WRITE_BATCH)):
                k = int(shard_of[i])
                meta = _meta_line(name, doc_ids[i], titles[i], metas[i], k, len(batch.get(k, [])) + writers[k].n_docs)
                batch.setdefault(k, []).append((toks.doc(i), meta))
            for k, items in batch.items():
                writers[k].add_many(items)
    finally:
        for w in writers:
            w.close()
    stats = [{"shard": w.k, "n_docs": w.n_docs, "n_tokens": w.n_tokens, "ds_tokens": w.ds_size // fmt.TOKEN_WIDTH,
              "ptr_size": fmt.ptr_size(w.ds_size)} for w in writers]
    empty = [s["shard"] for s in stats if s["n_docs"] == 0]
    if empty:
        raise InputError(f"--shards {shards} leaves shard(s) {empty} of {name!r} empty ({n} documents); use fewer shards")
    return n, sum(w.n_tokens for w in writers), stats


def _meta_line(source: str, doc_id: str, title: str | None, metadata_json: str | None, shard: int, doc_ix: int) -> dict:
    extra = json.loads(metadata_json) if metadata_json else {}
    path = extra.get("path") or extra.get("file") or extra.get("url")
    return {"doc_id": doc_id, "source": source, "title": title, "path": path, "shard": shard, "doc_ix": doc_ix,
            "meta": extra}


def _record_from_manifest(folder: Path, m: dict, total_bytes: int, seconds: float, tok_s: float, sa_s: float) -> IndexRecord:
    return IndexRecord(
        source=m["source"], path=str(folder), build_id=m["build_id"], n_docs=m["n_docs"], n_tokens=m["n_tokens"],
        n_shards=m["n_shards"], bytes=total_bytes, tokenizer_hash=m["tokenizer_hash"],
        content_hash=m["content_hash"], files=m["files"], built_at=dt.datetime.fromisoformat(m["built_at"]),
        build_seconds=seconds, tokenize_seconds=tok_s, suffix_array_seconds=sa_s,
        tokens_per_second=m["n_tokens"] / seconds if seconds > 0 else 0.0,
    )


def _unchanged(ws: Workspace, name: str, content_hash: str, tok_hash: str, shards: int) -> IndexRecord | None:
    """The catalog row of an index that is current and intact, else None."""
    folder = index_dir(ws, name)
    if not folder.exists():
        return None
    try:
        m = fmt.read_manifest(folder)
    except IntegrityError:
        return None
    if (m.get("content_hash"), m.get("tokenizer_hash"), m.get("n_shards")) != (content_hash, tok_hash, shards):
        return None
    if fmt.check_files(folder, m):
        return None
    rec = catalog.get_index(ws, name)
    if rec is None or rec.build_id != m["build_id"]:
        rec = _rerecord(ws, folder, m)
    return rec


def _rerecord(ws: Workspace, folder: Path, m: dict) -> IndexRecord:
    """Bring the catalog row in line with the folder (after a kill between rename and record)."""
    old = catalog.get_index(ws, m["source"])
    total = sum(f["bytes"] for f in m["files"].values()) + (folder / fmt.MANIFEST).stat().st_size
    secs = old.build_seconds if old else 0.0
    rec = _record_from_manifest(folder, m, total, secs, old.tokenize_seconds if old else 0.0,
                                old.suffix_array_seconds if old else 0.0)
    with catalog.connect(ws) as con:
        con.execute("BEGIN")
        catalog.upsert_index(con, rec)
        con.execute("COMMIT")
    return rec


def _clean_stale_tmp(ws: Workspace, name: str, older_than_s: float = 3600) -> None:
    """Remove leftovers of killed builds of this source (temporary folders over an hour old)."""
    if not ws.indexes_dir.exists():
        return
    now = time.time()
    for p in ws.indexes_dir.glob(f".tmp-{name}-*"):
        if p.is_dir() and now - p.stat().st_mtime > older_than_s:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# verify


def verify_folder(folder: Path, manifest: dict, *, docs_tokens=None, n_ngrams: int = 64, n_ranks: int = 256,
                  checksums: bool = True, seed: int = 0) -> list[str]:
    """Every problem found in an index folder; an empty list means it is sound.

    Checks, in order (later checks need the earlier ones): file sizes (and checksums), the
    structure of each shard, the suffix array's order at sampled ranks, that the upstream
    engine loads it with the right document and token counts, and that sampled n-gram
    counts equal a brute-force count over the token files.
    """
    from infini_gram.engine import InfiniGramEngine

    problems = fmt.check_files(folder, manifest, checksums=checksums)
    if problems:
        return problems
    rng = np.random.default_rng(seed)
    arrays = []
    for st in manifest["shards"]:
        k = st["shard"]
        ds = np.memmap(folder / f"tokenized.{k}", dtype=np.uint16, mode="r") if st["ds_tokens"] else np.zeros(0, np.uint16)
        od = np.fromfile(folder / f"offset.{k}", dtype=np.uint64)
        if len(ds) != st["ds_tokens"] or len(od) != st["n_docs"]:
            problems.append(f"shard {k}: {len(ds)} ids / {len(od)} documents, manifest says {st['ds_tokens']} / {st['n_docs']}")
            continue
        if len(od) and (od[0] != 0 or np.any(ds[(od // 2).astype(np.int64)] != fmt.DOC_SEP)):
            problems.append(f"shard {k}: offset.{k} does not point at document separators")
        if int(np.count_nonzero(ds == fmt.DOC_SEP)) != st["n_docs"]:
            problems.append(f"shard {k}: the number of separators differs from the number of documents")
        width = st["ptr_size"]
        if len(ds) > 1:
            ranks = rng.integers(0, len(ds) - 1, size=min(n_ranks, len(ds) - 1))
            a = fmt.read_table_ptrs(folder / f"table.{k}", width, ranks)
            b = fmt.read_table_ptrs(folder / f"table.{k}", width, ranks + 1)
            raw = np.memmap(folder / f"tokenized.{k}", dtype=np.uint8, mode="r")
            if np.any(a >= raw.size) or np.any(b >= raw.size) or np.any(a % 2) or np.any(b % 2):
                problems.append(f"shard {k}: table.{k} holds pointers outside tokenized.{k}")
            else:
                bad = sum(1 for x, y in zip(a.tolist(), b.tolist()) if bytes(raw[x:x + 64]) > bytes(raw[y:y + 64]))
                if bad:
                    problems.append(f"shard {k}: table.{k} is out of order at {bad} of {len(ranks)} sampled ranks")
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
    folder = index_dir(ws, name)
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
            _rerecord(ws, folder, m)
        tok_hash = tok_lib.tokenizer_hash(ws)
        if m["tokenizer_hash"] != tok_hash:
            problems.append("the tokenizer changed since this index was built; rebuild it with "
                            f"`flexolmo index build --source {name}`")
    dfolder = diff_dir(ws, name)
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


def catalog_table(ws: Workspace) -> list[dict]:
    """One dict per registered source: its policy and its index stats (None when unbuilt)."""
    recs = {r.source: r for r in catalog.list_indexes(ws)}
    takedowns = catalog.list_takedowns(ws)
    out = []
    current_tok = None
    try:
        current_tok = tok_lib.tokenizer_hash(ws)
    except FlexolmoError:
        pass
    for s in src_lib.list_sources(ws):
        r = recs.get(s.name)
        out.append({
            "source": s.name, "owner": s.owner, "domain": s.domain, "licence": s.licence,
            "visibility": s.visibility, "available": s.available(), "expires": s.expires,
            "indexed": r is not None,
            "n_docs": r.n_docs if r else None, "n_tokens": r.n_tokens if r else None,
            "bytes": r.bytes if r else None, "bytes_per_token": r.bytes_per_token if r else None,
            "build_seconds": r.build_seconds if r else None, "tokens_per_second": r.tokens_per_second if r else None,
            "stale": bool(r and current_tok and (r.tokenizer_hash != current_tok or r.content_hash != s.content_hash)),
            "takedowns": sum(1 for t in takedowns if t.source == s.name),
            "path": r.path if r else None,
        })
    return out


ProgressFn = Callable[[str, str, float, "float | None", str], None]
