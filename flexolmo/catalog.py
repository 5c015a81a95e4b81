"""The DuckDB catalog of a workspace: the source registry and its policy log.

Other packages add their own tables to the same file (`index/catalog.py` adds index builds
and takedowns). Connections are short-lived: open, do one unit of work, close, so that a
CLI command and a running service never hold the file at the same time for long.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import duckdb

from .workspace import Workspace

SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    name            VARCHAR PRIMARY KEY,
    owner           VARCHAR NOT NULL,
    domain          VARCHAR NOT NULL,
    licence         VARCHAR NOT NULL,
    visibility      VARCHAR NOT NULL CHECK (visibility IN ('full', 'snippets', 'counts')),
    active          BOOLEAN NOT NULL DEFAULT TRUE,
    expires         DATE,                 -- licence expiry: after this day the source is off
    origin          VARCHAR NOT NULL,     -- where the documents came from (path or sample)
    content_hash    VARCHAR NOT NULL,     -- sha256 over (doc_id, text) in doc_id order
    n_docs_train    BIGINT NOT NULL,
    n_docs_valid    BIGINT NOT NULL,
    n_chars_train   BIGINT NOT NULL,
    n_chars_valid   BIGINT NOT NULL,
    n_synthetic     BIGINT NOT NULL DEFAULT 0,  -- documents generated, not collected
    created_at      TIMESTAMP NOT NULL,
    updated_at      TIMESTAMP NOT NULL,
    updated_by      VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_log (
    source      VARCHAR NOT NULL,
    changed_at  TIMESTAMP NOT NULL,
    changed_by  VARCHAR NOT NULL,
    field       VARCHAR NOT NULL,   -- active | visibility | expires
    old_value   VARCHAR,
    new_value   VARCHAR
);
"""


@contextlib.contextmanager
def connect(ws: Workspace, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the workspace catalog (creating it and its tables when writable)."""
    if read_only and not ws.catalog_path.exists():
        con = duckdb.connect(":memory:")
        con.execute(SCHEMA)
    else:
        ws.ensure()
        try:
            con = duckdb.connect(str(ws.catalog_path), read_only=read_only)
        except duckdb.IOException as e:
            from .errors import ConflictError

            raise ConflictError(f"the catalog {ws.catalog_path} is busy ({str(e).splitlines()[0]}); "
                                "another flexolmo process holds it: retry when it has finished") from None
        if not read_only:
            con.execute(SCHEMA)
    try:
        yield con
    finally:
        con.close()
