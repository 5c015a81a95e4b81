"""The index package's tables in the workspace catalog (the same DuckDB file as flexolmo/base/catalog.py).

    indexes     the index currently served per source: counts, bytes, hashes, checksums, timing
    takedowns   documents removed from what a source may show, with who, when and why

The folder `indexes/<name>/manifest.json` (the index's card, index/manifest.py) carries the
same facts as the `indexes` row, which is made from it (`record_from_manifest`); the row is
written after the folder is renamed into place (see index/build.py for the order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Iterator

import duckdb

from flexolmo.base import catalog as base
from flexolmo.base.workspace import Workspace

from . import format as fmt
from .manifest import IndexManifest
from .results import IndexRecord, Takedown

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


def record_from_manifest(folder: Path, m: IndexManifest, total_bytes: int, seconds: float, tok_s: float,
                         sa_s: float) -> IndexRecord:
    """The `indexes` row of an index folder, from its manifest and the build's timings."""
    return IndexRecord(
        source=m.source, path=str(folder), build_id=m.build_id, n_docs=m.n_docs, n_tokens=m.n_tokens,
        n_shards=m.n_shards, bytes=total_bytes, tokenizer_hash=m.tokenizer_hash, content_hash=m.content_hash,
        files={k: {"bytes": f.bytes, "sha256": f.sha256} for k, f in m.files.items()},
        built_at=dt.datetime.fromisoformat(m.built_at), build_seconds=seconds, tokenize_seconds=tok_s,
        suffix_array_seconds=sa_s, tokens_per_second=m.n_tokens / seconds if seconds > 0 else 0.0,
    )


def record(ws: Workspace, rec: IndexRecord) -> None:
    """Write the source's row in its own transaction."""
    with connect(ws) as con:
        con.execute("BEGIN")
        upsert_index(con, rec)
        con.execute("COMMIT")


def rerecord(ws: Workspace, folder: Path, m: IndexManifest) -> IndexRecord:
    """Bring the catalog row in line with the folder (after a kill between rename and record)."""
    old = get_index(ws, m.source)
    total = sum(f.bytes for f in m.files.values()) + (Path(folder) / fmt.MANIFEST).stat().st_size
    rec = record_from_manifest(folder, m, total, old.build_seconds if old else 0.0,
                               old.tokenize_seconds if old else 0.0, old.suffix_array_seconds if old else 0.0)
    record(ws, rec)
    return rec


# -- remote sources: indexes held by their owners' nodes (index/remote.py) ------------------

REMOTE_SCHEMA = """
CREATE TABLE IF NOT EXISTS remote_sources (
    source          VARCHAR PRIMARY KEY,  -- also a row of `sources` (origin 'remote:<url>')
    url             VARCHAR NOT NULL,     -- the owner node, e.g. http://127.0.0.1:8701
    key_path        VARCHAR NOT NULL,     -- the key the owner issued to this tracer (file, mode 0600)
    owner           VARCHAR NOT NULL,
    tokenizer_hash  VARCHAR NOT NULL,     -- the node's, checked equal to ours when added
    build_id        VARCHAR NOT NULL,     -- the node's index build when added
    n_tokens        BIGINT NOT NULL,
    added_at        TIMESTAMP NOT NULL
);
"""

_REMOTE_COLS = ["source", "url", "key_path", "owner", "tokenizer_hash", "build_id", "n_tokens", "added_at"]


def list_remote_sources(ws: Workspace) -> dict[str, dict]:
    """source -> its `remote_sources` row (empty when none was ever added)."""
    with base.connect(ws, read_only=True) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "remote_sources" not in tables:
            return {}
        rows = con.execute(f"SELECT {', '.join(_REMOTE_COLS)} FROM remote_sources ORDER BY source").fetchall()
    return {r[0]: dict(zip(_REMOTE_COLS, r)) for r in rows}


def insert_remote(con: duckdb.DuckDBPyConnection, row: dict) -> None:
    """Add a remote source's row (inside the caller's transaction, with its `sources` row)."""
    con.execute(REMOTE_SCHEMA)
    con.execute(f"INSERT INTO remote_sources ({', '.join(_REMOTE_COLS)}) VALUES ({', '.join('?' * len(_REMOTE_COLS))})",
                [row[c] for c in _REMOTE_COLS])
