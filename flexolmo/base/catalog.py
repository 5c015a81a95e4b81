"""The DuckDB catalog of a workspace: the source registry and its policy log.

Other packages add their own tables to the same file (`index/catalog.py` adds index builds
and takedowns). Connections are short-lived: open, do one unit of work, close, so that a
CLI command and a running service never hold the file at the same time for long.

Within one process, connections are taken one at a time (a process-wide lock): DuckDB
refuses a read-only and a read-write connection to the same file at once in one process,
and the service runs catalog reads and owner changes on several threads. Across processes,
a connection that finds the file locked retries for `BUSY_WAIT_S` before giving up.

The tables are written from their one definition (flexolmo/base/source_schema.py). A catalog
that lacks columns added since it was written gains them at its first open (`upgrade`, also
`flexolmo migrate`'s `catalog` step: flexolmo/base/migrate.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import duckdb

from flexolmo.base import migrate, source_schema
from flexolmo.base.errors import InputError
from flexolmo.base.workspace import Workspace, current_user

SCHEMA = source_schema.SCHEMA  # the `sources` and `policy_log` tables, written from their one definition


BUSY_WAIT_S = 3.0  # how long a connection waits for another process to release the file

_LOCK = threading.RLock()  # one catalog connection at a time in this process


SETTLED_S = 2.0  # a stamp is trusted only once its files are this old (see `stamp`)


def stamp(ws: Workspace) -> tuple | None:
    """The catalog files' modification times and sizes (the database and its write-ahead log):
    unchanged stamps mean an unchanged catalog, read in microseconds without opening it.

    None while a file was modified within the last SETTLED_S: a file's mtime moves in clock
    ticks, so a second write within the tick of the first, leaving the size as it was, would
    keep the stamp; a caller that gets None reads the catalog itself (as git does with index
    entries as new as the index)."""
    out, now = [], time.time_ns()
    for p in (ws.catalog_path, ws.catalog_path.with_name(ws.catalog_path.name + ".wal")):
        try:
            st = p.stat()
        except FileNotFoundError:
            out.append(None)
        else:
            if now - st.st_mtime_ns < SETTLED_S * 1e9:
                return None
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


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
            if read_only and _needs_upgrade(ws, con):
                con.close()  # an older catalog: upgraded (a short write) before it is read
                with contextlib.closing(_open(ws, False)) as rw:
                    upgrade(rw)
                con = _open(ws, read_only)
            if not read_only:
                con.execute(SCHEMA)
                upgrade(con)
        try:
            yield con
        finally:
            con.close()


# -- older catalogs ----------------------------------------------------------------------------

_CHECKED: set[tuple] = set()  # catalog files (path, size, mtime) seen current by this process


def missing_columns(con: duckdb.DuckDBPyConnection) -> list[tuple[str, source_schema.Column]]:
    """(table, column) of the schema that the catalog's tables lack (added since it was written)."""
    have: dict[str, set[str]] = {}
    for t, c in con.execute("SELECT table_name, column_name FROM information_schema.columns "
                            "WHERE table_name IN ('sources', 'policy_log')").fetchall():
        have.setdefault(t, set()).add(c)
    return [(t, c) for t, cols in source_schema.TABLES.items() if t in have for c in cols if c.name not in have[t]]


def upgrade(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Add the columns an older catalog lacks, in one transaction (the rows already there get
    NULL or the column's default: no limit, no key, no note); what it added, in words."""
    todo = missing_columns(con)
    if not todo:
        return []
    con.execute("BEGIN")
    try:
        for table, col in todo:
            con.execute(col.add_column_sql(table))
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
    return [f"added column {table}.{col.name}" for table, col in todo]


def _needs_upgrade(ws: Workspace, con: duckdb.DuckDBPyConnection) -> bool:
    """Does the catalog lack columns? (Asked once per version of the file in this process.)"""
    st = ws.catalog_path.stat()
    stamp = (str(ws.catalog_path), st.st_size, st.st_mtime_ns)
    if stamp in _CHECKED:
        return False
    if missing_columns(con):
        return True
    _CHECKED.add(stamp)
    return False


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


def _migrate_step(ws: Workspace, apply: bool) -> list[str]:
    """`flexolmo migrate`'s catalog step: the columns added since the catalog was written."""
    if not ws.catalog_path.exists():
        return []
    with _LOCK, contextlib.closing(_open(ws, read_only=not apply)) as con:
        if apply:
            return upgrade(con)
        return [f"would add column {t}.{c.name}" for t, c in missing_columns(con)]


migrate.register(migrate.Step("catalog", _migrate_step, "columns of `sources` and `policy_log` added since"))
