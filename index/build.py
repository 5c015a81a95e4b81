"""Build and record one infini-gram index per source (train split only).

    flexolmo index build --all            # or --source NAME, --shards N, --force

A build is atomic: everything is written into `indexes/.tmp-<name>-*`, checked by
`index/verify.py` (the engine loads it; document and token counts match; sampled n-gram
counts equal a brute-force count; the suffix array is sorted at sampled ranks), renamed
into place, and only then recorded in the catalog. A failed or killed build leaves the
previous folder and catalog row untouched; the next build of the source (which holds the
source's lock, `format.source_lock`) removes the folders a killed one left. An unchanged
source (same content hash and tokenizer hash) is not rebuilt unless forced.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from flexolmo.base import sources as src_lib
from flexolmo.base import tokenizer as tok_lib
from flexolmo.base.errors import FlexolmoError, InputError, IntegrityError
from flexolmo.base.tokens import source_tokens
from flexolmo.base.workspace import Workspace, atomic_dir

from . import catalog, format as fmt
from .format import diff_dir, index_dir  # noqa: F401 -- callers of the builder find the paths here too
from .models import BuildResult, IndexRecord
from .takedown import rebuild_diff
from .verify import verify_folder

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
    with fmt.source_lock(ws, name):  # no one else writes this source's folders now
        _remove_leftovers(ws, name)
        return _build_locked(ws, source, shards, force, progress, config, t_start)


def _build_locked(ws: Workspace, source: src_lib.Source, shards: int, force: bool, progress: Progress,
                  config: IndexConfig, t_start: float) -> BuildResult:
    name = source.name
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
            sa_seconds += fmt.build_suffix_array(fmt.shard_file(tmp, "tokenized", k), fmt.shard_file(tmp, "table", k),
                                                 tmp / f".work-{k}",
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
        problems = verify_folder(tmp, manifest, n_ngrams=config.verify_ngrams,
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
    catalog.record(ws, catalog.record_from_manifest(final, manifest, total_bytes, seconds, tokenize_seconds, sa_seconds))
    # The takedown index copies document tokens from the main index: refresh it.
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
        rec = catalog.rerecord(ws, folder, m)
    return rec


def _remove_leftovers(ws: Workspace, name: str) -> None:
    """Remove the temporary folders of killed builds and takedowns of this source.

    Called with the source's lock held, so no live process is writing any of them.
    """
    for p in fmt.leftover_dirs(ws, name):
        shutil.rmtree(p, ignore_errors=True)


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

