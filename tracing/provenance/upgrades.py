"""Upgrade of the provenance store's older format (one of the upgrades flexolmo/base/migrate.py lists).

Before the Parquet parts, the store was one DuckDB file, `traces/provenance.duckdb`, with the
same five tables (some columns typed JSON, later columns missing). The first writer or reader
of a workspace without a parts manifest imports it as the store's first part, then removes the
file (it may hold text redacted since); `flexolmo migrate` does the same on its own (the
`provenance store` step, registered in tracing/provenance/store.py, which owns the writer).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import duckdb
import pyarrow as pa

from flexolmo.base.errors import ConflictError


def read_duckdb_store(path: Path, schemas: dict[str, pa.Schema], sql_type: Callable[[str, str], str]) -> dict[str, pa.Table]:
    """The rows of the DuckDB-file store at `path`, one Arrow table per table of `schemas`, cast
    to today's types; a column the file lacks (added since) reads as NULL.

    :param sql_type: (table, column) -> today's DuckDB type of the column
    """
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as e:
        raise ConflictError(f"the old store {path} is held by another process ({str(e).splitlines()[0]}); "
                            "close it, then run `flexolmo migrate` (or `flexolmo traces repair`) to import it") from None
    tables = {}
    with contextlib.closing(con):
        for n, sch in schemas.items():
            have = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                              "WHERE table_name = ?", [n]).fetchall()}
            src = {f.name: f'"{f.name}"' if f.name in have else "NULL" for f in sch}
            cols = ", ".join(f'CAST({src[f.name]} AS {sql_type(n, f.name)}) AS "{f.name}"' for f in sch)
            tables[n] = con.sql(f"SELECT {cols} FROM {n}").to_arrow_table().cast(sch)
    return tables


def remove_duckdb_store(path: Path) -> None:
    """Remove the imported file and its write-ahead log."""
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)
