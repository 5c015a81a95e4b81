"""The index package's tables in the workspace catalog (the same DuckDB file as flexolmo/catalog.py).

    indexes     the index currently served per source: counts, bytes, hashes, checksums, timing
    takedowns   documents removed from what a source may show, with who, when and why

The folder `indexes/<name>/manifest.json` carries the same facts as the `indexes` row; the
row is written after the folder is renamed into place (see index/build.py for the order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from typing import Iterator

import duckdb

from flexolmo import catalog as base
from flexolmo.workspace import Workspace

from .models import IndexRecord, Takedown

SCHEMA = """
CREATE TABLE IF NOT EXISTS indexes (
    source                VARCHAR PRIMARY KEY,
    path                  VARCHAR NOT NULL,
    build_id              VARCHAR NOT NULL,     -- also in the folder's manifest.json
    n_docs                BIGINT NOT NULL,
    n_tokens              BIGINT NOT NULL,      -- document tokens, separators excluded
    n_shards              INTEGER NOT NULL,
    bytes                 BIGINT NOT NULL,
    tokenizer_hash        VARCHAR NOT NULL,     -- sha256 of tokenizer.json at build time
    content_hash          VARCHAR NOT NULL,     -- the source's content_hash at build time
    files                 VARCHAR NOT NULL,     -- JSON: name -> {bytes, sha256}
    built_at              TIMESTAMP NOT NULL,
    build_seconds         DOUBLE NOT NULL,
    tokenize_seconds      DOUBLE NOT NULL,
    suffix_array_seconds  DOUBLE NOT NULL,
    tokens_per_second     DOUBLE NOT NULL
);
CREATE TABLE IF NOT EXISTS takedowns (
    source        VARCHAR NOT NULL,
    doc_id        VARCHAR NOT NULL,
    reason        VARCHAR NOT NULL,
    requested_by  VARCHAR NOT NULL,
    created_at    TIMESTAMP NOT NULL,
    PRIMARY KEY (source, doc_id)
);
"""

# Column order of `indexes` = field order of IndexRecord.
_INDEX_COLS = [f.name for f in dataclasses.fields(IndexRecord)]


@contextlib.contextmanager
def connect(ws: Workspace, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """The workspace catalog with the index tables (created when writable)."""
    with base.connect(ws, read_only=read_only) as con:
        if not read_only:
            con.execute(SCHEMA)
        else:
            tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if not {"indexes", "takedowns"} <= tables:
                # A read-only view of a catalog that never had an index built: empty tables.
                mem = duckdb.connect(":memory:")
                mem.execute(SCHEMA)
                try:
                    yield mem
                finally:
                    mem.close()
                return
        yield con


def upsert_index(con: duckdb.DuckDBPyConnection, rec: IndexRecord) -> None:
    """Replace the source's row (inside the caller's transaction)."""
    con.execute("DELETE FROM indexes WHERE source = ?", [rec.source])
    values = [getattr(rec, c) if c != "files" else json.dumps(rec.files, sort_keys=True) for c in _INDEX_COLS]
    con.execute(f"INSERT INTO indexes ({', '.join(_INDEX_COLS)}) VALUES ({', '.join('?' * len(_INDEX_COLS))})", values)


def _record(row: tuple, cols: list[str]) -> IndexRecord:
    d = dict(zip(cols, row))
    d["files"] = json.loads(d["files"])
    return IndexRecord(**d)


def get_index(ws: Workspace, source: str) -> IndexRecord | None:
    with connect(ws, read_only=True) as con:
        cur = con.execute(f"SELECT {', '.join(_INDEX_COLS)} FROM indexes WHERE source = ?", [source])
        row = cur.fetchone()
    return None if row is None else _record(row, _INDEX_COLS)


def list_indexes(ws: Workspace) -> list[IndexRecord]:
    with connect(ws, read_only=True) as con:
        rows = con.execute(f"SELECT {', '.join(_INDEX_COLS)} FROM indexes ORDER BY source").fetchall()
    return [_record(r, _INDEX_COLS) for r in rows]


def list_takedowns(ws: Workspace, source: str | None = None) -> list[Takedown]:
    with connect(ws, read_only=True) as con:
        q = "SELECT source, doc_id, reason, requested_by, created_at FROM takedowns"
        q += " WHERE source = ?" if source else ""
        rows = con.execute(q + " ORDER BY created_at, source, doc_id", [source] if source else []).fetchall()
    return [Takedown(*r) for r in rows]


def now() -> dt.datetime:
    return dt.datetime.now().replace(microsecond=0)
