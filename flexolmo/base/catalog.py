"""The DuckDB catalog of a workspace: the source registry and its policy log.

Other packages add their own tables to the same file (`index/catalog.py` adds index builds
and takedowns). Connections are short-lived: open, do one unit of work, close, so that a
CLI command and a running service never hold the file at the same time for long.

Within one process, connections are taken one at a time (a process-wide lock): DuckDB
refuses a read-only and a read-write connection to the same file at once in one process,
and the service runs catalog reads and owner changes on several threads. Across processes,
a connection that finds the file locked retries for `BUSY_WAIT_S` before giving up.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import duckdb

from flexolmo.base.errors import InputError
from flexolmo.base.workspace import Workspace, current_user

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
    field       VARCHAR NOT NULL,   -- active | visibility | expires | max_verbatim
    old_value   VARCHAR,
    new_value   VARCHAR
);
-- the verbatim guard (tracing/guard.py): generation never emits a run of more than this
-- many consecutive tokens found in the source; NULL: no limit. Added after the first
-- catalogs were written, hence ALTER (a no-op once the column exists).
ALTER TABLE sources ADD COLUMN IF NOT EXISTS max_verbatim INTEGER;
-- who changed a policy through the service is the key's owner (changed_by); which key, and
-- the caller's own note (the request's `by`, at most a comment), sit beside it.
ALTER TABLE policy_log ADD COLUMN IF NOT EXISTS key_id VARCHAR;
ALTER TABLE policy_log ADD COLUMN IF NOT EXISTS comment VARCHAR;
"""


BUSY_WAIT_S = 3.0  # how long a connection waits for another process to release the file

_LOCK = threading.RLock()  # one catalog connection at a time in this process


@contextlib.contextmanager
def connect(ws: Workspace, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the workspace catalog (creating it and its tables when writable)."""
    with _LOCK:
        if read_only and not ws.catalog_path.exists():
            con = duckdb.connect(":memory:")
            con.execute(SCHEMA)
        else:
            ws.ensure()
            con = _open(ws, read_only)
            if not read_only:
                con.execute(SCHEMA)
        try:
            yield con
        finally:
            con.close()


def _open(ws: Workspace, read_only: bool) -> duckdb.DuckDBPyConnection:
    """Connect, retrying while another process holds the file's lock."""
    deadline = time.monotonic() + BUSY_WAIT_S
    delay = 0.01
    while True:
        try:
            return duckdb.connect(str(ws.catalog_path), read_only=read_only)
        except (duckdb.IOException, duckdb.ConnectionException) as e:
            if time.monotonic() + delay > deadline:
                from flexolmo.base.errors import ConflictError

                raise ConflictError(f"the catalog {ws.catalog_path} is busy ({str(e).splitlines()[0]}); "
                                    "another flexolmo process holds it: retry when it has finished") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


# -- who wrote a row ---------------------------------------------------------------------------

BY_MAX = 100  # characters of a `by` (who made a change)


def check_text(value: str, what: str, max_len: int) -> str:
    """Caller-supplied text that is stored and shown: one line of printable characters."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{what} is empty; give a short description")
    value = value.strip()
    if len(value) > max_len:
        raise InputError(f"{what} is {len(value):,} characters; the limit is {max_len}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid Unicode (a lone surrogate); send UTF-8 text") from None
    bad = next((c for c in value if not c.isprintable()), None)
    if bad is not None:
        raise InputError(f"{what} holds a control or invisible character ({bad!r}, e.g. a newline); "
                         "give one line of printable text")
    return value


def check_by(by: str | None) -> str:
    """Who makes a change: validated until keys identify callers (the default: the OS user).

    Stored as data and shown escaped, never as markup."""
    return current_user() if by is None else check_text(by, "by (who makes the change)", BY_MAX)
