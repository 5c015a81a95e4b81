"""A source's documents on disk: `sources/<name>/documents.parquet`, written and hashed here.

    doc_id    stable id: the input's `doc_id` or `id` column, else `<file>:<line or row>`
    text      the document
    title     the input's `title` column, else null
    split     'train' or 'validation' (about 2%, by a hash of doc_id: deterministic)
    metadata  every other input column, as a JSON object

Rows are in doc_id order, in row groups of at most ROW_GROUP_ROWS rows (what a streamed read,
`flexolmo.base.sources.iter_document_batches`, holds at once). `write_documents` takes the
rows in batches, so a source larger than memory can be written; the registry
(flexolmo/base/sources.py) records the file with its content hash and counts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from flexolmo.base.errors import InputError, IntegrityError

VALIDATION_PER_MILLE = 20  # about 2% of documents are held out for evaluation
DOCUMENTS_FILE = "documents.parquet"
ROW_GROUP_ROWS = 8192

DOC_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("title", pa.string()),
        ("split", pa.string()),
        ("metadata", pa.string()),
    ]
)


def split_of(doc_id: str) -> str:
    """Deterministic train/validation split: about 2% validation, by a hash of doc_id."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")
    return "validation" if h % 1000 < VALIDATION_PER_MILLE else "train"


def documents_table(records: list[dict]) -> pa.Table:
    seen: dict[str, str] = {}
    for r in records:
        if r["doc_id"] in seen:
            raise InputError(
                f"{r.get('_where', r['doc_id'])}: doc_id {r['doc_id']!r} repeats "
                f"({seen[r['doc_id']]}); doc_ids must be unique within a source"
            )
        seen[r["doc_id"]] = r.get("_where", r["doc_id"])
        if "\x00" in r["text"]:
            raise InputError(f"{r.get('_where', r['doc_id'])}: the text holds a NUL character; remove it")
    records = sorted(records, key=lambda r: r["doc_id"])
    return pa.table(
        {
            "doc_id": [r["doc_id"] for r in records],
            "text": [r["text"] for r in records],
            "title": [r.get("title") for r in records],
            "split": [split_of(r["doc_id"]) for r in records],
            "metadata": [json.dumps(r.get("metadata") or {}, default=str, ensure_ascii=False) for r in records],
        },
        schema=DOC_SCHEMA,
    )


def content_hash(table: pa.Table) -> str:
    """sha256 over (doc_id, text) in row order: a source's identity as its indexes record it."""
    h = hashlib.sha256()
    _hash_rows(h, table.column("doc_id").to_pylist(), table.column("text").to_pylist())
    return h.hexdigest()


def _hash_rows(h, doc_ids: list[str], texts: list[str]) -> None:
    for doc_id, text in zip(doc_ids, texts):
        h.update(doc_id.encode("utf-8") + b"\x00" + text.encode("utf-8") + b"\x01")


def write_documents(path: Path, batches: Iterable[pa.Table]) -> tuple[str, dict]:
    """Write the batches to one Parquet file (a row group each), checking doc_id order; return
    the content hash (as `content_hash` computes it over the whole table) and the counts."""
    h = hashlib.sha256()
    stats = {"n_docs_train": 0, "n_docs_valid": 0, "n_chars_train": 0, "n_chars_valid": 0}
    last = None
    rows = 0
    with pq.ParquetWriter(path, DOC_SCHEMA, compression="zstd") as w:
        for batch in batches:
            batch = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
            batch = batch.select(DOC_SCHEMA.names).cast(DOC_SCHEMA)
            ids, texts = batch.column("doc_id").to_pylist(), batch.column("text").to_pylist()
            if ids and ((last is not None and ids[0] <= last) or any(a >= b for a, b in zip(ids, ids[1:]))):
                raise InputError(f"doc_ids must increase from row to row (sorted, unique); {ids[0]!r} does not")
            _hash_rows(h, ids, texts)
            for text, split in zip(texts, batch.column("split").to_pylist()):
                key = "train" if split == "train" else "valid"
                stats[f"n_docs_{key}"] += 1
                stats[f"n_chars_{key}"] += len(text)
            last = ids[-1] if ids else last
            rows += batch.num_rows
            w.write_table(batch, row_group_size=max(1, batch.num_rows))
    if pq.read_metadata(path).num_rows != rows:
        raise IntegrityError(f"{path} did not read back whole; nothing was registered")
    return h.hexdigest(), stats
