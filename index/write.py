"""Stream a source's cached ids and its documents' metadata into the shard files of an index.

    stats = write_shards(ws, tmp, "news", toks, shards=2, width=U32, vocab_size=100_352)

The ids come from the token cache (flexolmo/base/tokens.py), read a bounded run of documents
at a time from its file; the metadata (doc_id, title, metadata) from the source's Parquet
file, batch by batch, in the same order. Documents go to `shards` contiguous shards balanced
by size (separators included). Nothing here holds more than WRITE_TOKENS ids or WRITE_DOCS
documents at once, whatever the source's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flexolmo.base import sources as src_lib
from flexolmo.base.errors import InputError, IntegrityError
from flexolmo.base.tokens import SourceTokens
from flexolmo.base.workspace import Workspace

from . import format as fmt
from .width import Width

WRITE_DOCS = 1024  # documents per read of the metadata
WRITE_TOKENS = 4_000_000  # ids per write to a shard (a longer document is written alone)


def shard_of(toks: SourceTokens, shards: int) -> np.ndarray:
    """The shard of each document: contiguous runs balanced by positions (ids + separator)."""
    sizes = np.diff(np.asarray(toks.offsets)) + 1
    cum = np.cumsum(sizes) - sizes
    return np.minimum((cum * shards) // max(int(sizes.sum()), 1), shards - 1)


def write_shards(ws: Workspace, tmp: Path, name: str, toks: SourceTokens, shards: int, width: Width,
                 vocab_size: int | None) -> tuple[int, int, list[dict]]:
    """Write the five project-written files of every shard; (documents, tokens, per-shard stats)."""
    n = toks.n_docs
    where = shard_of(toks, shards)
    offsets = np.asarray(toks.offsets)
    writers = [fmt.ShardWriter(tmp, k, name, width, vocab_size, shards) for k in range(shards)]
    i = 0
    try:
        for batch in src_lib.iter_document_batches(ws, name, "train", ["doc_id", "title", "metadata"], WRITE_DOCS):
            doc_ids, titles = batch.column("doc_id").to_pylist(), batch.column("title").to_pylist()
            metas = batch.column("metadata").to_pylist()
            if i + len(doc_ids) > n:
                raise IntegrityError(f"the token cache of {name!r} holds {n} documents, the source more; rebuild")
            a = 0
            while a < len(doc_ids):  # runs of documents of one shard, at most WRITE_TOKENS ids
                k, b = int(where[i + a]), a + 1
                while b < len(doc_ids) and where[i + b] == k and offsets[i + b + 1] - offsets[i + a] <= WRITE_TOKENS:
                    b += 1
                w = writers[k]
                lines = [_meta_line(name, doc_ids[j], titles[j], metas[j], k, w.n_docs + j - a) for j in range(a, b)]
                w.add_batch(toks.read(i + a, i + b), np.diff(offsets[i + a: i + b + 1]), lines)
                a = b
            i += len(doc_ids)
    finally:
        for w in writers:
            w.close()
    if i != n:
        raise IntegrityError(f"the token cache of {name!r} holds {n} documents, the source {i}; rebuild")
    stats = [{"shard": w.k, "n_docs": w.n_docs, "n_tokens": w.n_tokens, "ds_tokens": w.ds_size // width.bytes,
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
