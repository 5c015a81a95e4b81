"""The provenance store: every trace as rows of five tables, queryable in SQL, exportable to Parquet.

    flexolmo query "SELECT source, count(*) FROM span_sources GROUP BY 1"
    flexolmo report contribution --source news
    flexolmo traces repair                      # finish pending redactions, drop leftovers
    with store.reader(ws, sandbox=False) as con: # a notebook: the five tables in DuckDB
        con.sql("SELECT * FROM spans").df()

Tables (one row per ...):
    traces          trace: prompt, response, model, sources searched, experts off, timings
    spans           kept span: token and character range, text, count, top expert, agreement
    span_sources    (span, source) with the span's count in that source's index
    span_documents  retrieved document: source, doc_id, blocked, snippet, BM25 relevance
    span_experts    (span, expert): routing share and counterfactual log-prob drop

On disk the tables are append-only Parquet parts under `traces/` (tracing/provenance/parts.py): a
reader never locks anything, so no notebook, query or export can make a trace fail, and
it holds the files it reads open, so no trace, takedown or compaction can make a read fail.

Who reads what (tracing/provenance/access.py). Every trace stored for a request records its
owner in `traces.owner` (the key that made it, or the hash of a client's capability token);
`reader(ws, caller=...)` gives a caller only the rows it may read: its own traces, all of
them for an analyst or admin key, and for an owner key also its sources' span_sources and
span_documents rows. The operator's CLI (`OPERATOR`, the default) reads everything. Parts
written before owners existed read `owner` as NULL: analysts and admins read them.

Owner guarantees. The catalog says what the store must not hold (`demands`): the text of a
taken-down document, and the documents of a `counts` source. `sync` makes the store agree
with it and records what it applied in the manifest. Every writer and every reader runs it
first, so a redaction that a crash interrupted is finished by the next trace, query or
`flexolmo traces repair`, and a new trace is redacted before it is committed (a trace
computed just before a takedown cannot bring the text back). A reader opened before a
redaction keeps the snapshot it opened until it is closed; every reader opened after reads
the redacted rows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from flexolmo.base import migrate
from flexolmo.base.errors import ConflictError, NotFoundError
from flexolmo.base.workspace import Workspace

from . import parts, upgrades
from ..results import Trace
from .access import OPERATOR, Caller

SCHEMA = """
CREATE TABLE traces (
    trace_id          VARCHAR NOT NULL,
    created_at        TIMESTAMP NOT NULL,
    prompt            VARCHAR,
    response          VARCHAR NOT NULL,
    n_tokens          INTEGER NOT NULL,
    generated         BOOLEAN NOT NULL,   -- routing captured during generation (else one forward pass)
    model             VARCHAR,
    sources_searched  VARCHAR[] NOT NULL,
    experts_off       VARCHAR[] NOT NULL,
    n_spans           INTEGER NOT NULL,
    timings_ms        VARCHAR,            -- JSON text
    settings          VARCHAR,            -- JSON text
    owner             VARCHAR             -- who made it: key:<key_id> | token:<sha256> | NULL (operator, or older)
);
CREATE TABLE spans (
    trace_id            VARCHAR NOT NULL,
    span_index          INTEGER NOT NULL,
    group_index         INTEGER NOT NULL,  -- top-level group of overlapping spans
    start_token         INTEGER NOT NULL,
    end_token           INTEGER NOT NULL,
    char_start          INTEGER NOT NULL,
    char_end            INTEGER NOT NULL,
    text                VARCHAR NOT NULL,
    n_tokens            INTEGER NOT NULL,
    count               BIGINT NOT NULL,   -- occurrences over all searched sources
    unigram_logprob_sum DOUBLE NOT NULL,
    top_expert          INTEGER,
    top_expert_source   VARCHAR,
    agreement           BOOLEAN,           -- top expert's source contains the span
    top_expert_by       VARCHAR,           -- the signal that chose top_expert: counterfactual | routing
    top_by_routing      INTEGER,           -- argmax of the routing share
    top_by_counterfactual INTEGER          -- argmax of the counterfactual drop (null: not computed)
);
CREATE TABLE span_sources (
    trace_id    VARCHAR NOT NULL,
    span_index  INTEGER NOT NULL,
    source      VARCHAR NOT NULL,
    count       BIGINT NOT NULL
);
CREATE TABLE span_documents (
    trace_id        VARCHAR NOT NULL,
    span_index      INTEGER NOT NULL,
    position        INTEGER NOT NULL,
    source          VARCHAR NOT NULL,
    doc_id          VARCHAR,           -- null for a `counts` source
    title           VARCHAR,
    token_offset    INTEGER NOT NULL,
    blocked         BOOLEAN NOT NULL,
    snippet         VARCHAR,           -- null when blocked
    relevance       DOUBLE NOT NULL,
    relevance_norm  DOUBLE NOT NULL,
    bucket          VARCHAR NOT NULL,
    repeat_of       INTEGER            -- position of the first document of the span with the same text
);
CREATE TABLE span_experts (
    trace_id        VARCHAR NOT NULL,
    span_index      INTEGER NOT NULL,
    expert          INTEGER NOT NULL,
    source          VARCHAR NOT NULL,
    routing_share   DOUBLE NOT NULL,
    counterfactual  DOUBLE,            -- log-prob drop of the span with this expert off
    active          BOOLEAN NOT NULL
);
"""
TABLES = ("traces", "spans", "span_sources", "span_documents", "span_experts")
READ_WAIT_S = 10.0  # a reader retries this long when writers remove the parts it was about to read


@lru_cache(maxsize=1)
def schemas() -> dict[str, pa.Schema]:
    """The Arrow schema of each table, as DuckDB derives it from SCHEMA (one definition)."""
    con = duckdb.connect(":memory:")
    con.execute(SCHEMA)
    out = {t: con.sql(f"SELECT * FROM {t}").to_arrow_table().schema for t in TABLES}
    con.close()
    return out


# -- what the store must not hold -------------------------------------------------------------


_DEMANDS: dict[Path, tuple[tuple, list[tuple]]] = {}  # per workspace: the catalog's stamp, its demands then
_DEMANDS_LOCK = threading.Lock()


def demands(ws: Workspace) -> list[tuple]:
    """The redactions the catalog asks for now: ('takedown', source, doc_id) for every
    takedown, ('counts', source, since) for every `counts` source (a new key when its policy
    row changes, so a source switched back to counts is redacted again).

    Read from the catalog only when its files changed since the last read in this process
    (flexolmo/base/catalog.py `stamp`): opening it is most of what storing a trace costs."""
    from flexolmo.base.catalog import stamp
    from flexolmo.base.sources import list_sources
    from index.catalog import list_takedowns

    key, before = ws.root.resolve(), stamp(ws)
    with _DEMANDS_LOCK:
        hit = _DEMANDS.get(key)
    if before is not None and hit is not None and hit[0] == before:
        return list(hit[1])
    keys = [("takedown", t.source, t.doc_id) for t in list_takedowns(ws)]
    keys += [("counts", s.name, s.updated_at.isoformat()) for s in list_sources(ws) if s.visibility == "counts"]
    keys.sort()
    if before is not None and stamp(ws) == before:  # unchanged while it was read: the stamp stands for it
        with _DEMANDS_LOCK:
            _DEMANDS[key] = (before, keys)
    return list(keys)


def _split(keys) -> tuple[set[tuple[str, str]], set[str]]:
    down = {(k[1], k[2]) for k in keys if k[0] == "takedown"}
    return down, {k[1] for k in keys if k[0] == "counts"}


def redact_documents(table: pa.Table, keys) -> tuple[pa.Table, int]:
    """span_documents rows with `keys` applied: a taken-down document keeps its doc_id and is
    blocked, with no title or snippet; a `counts` source keeps counts only. (table, rows changed)."""
    down, counts = _split(keys)
    srcs = table.column("source").to_pylist()
    if not (down or counts) or not ({s for s, _ in down} | counts) & set(srcs):
        return table, 0
    col = {n: table.column(n).to_pylist() for n in ("doc_id", "title", "blocked", "snippet")}
    changed = 0
    for i, s in enumerate(srcs):
        before = (col["doc_id"][i], col["title"][i], col["blocked"][i], col["snippet"][i])
        if (s, col["doc_id"][i]) in down:
            col["title"][i] = col["snippet"][i] = None
            col["blocked"][i] = True
        if s in counts:
            col["doc_id"][i] = col["title"][i] = col["snippet"][i] = None
        changed += before != (col["doc_id"][i], col["title"][i], col["blocked"][i], col["snippet"][i])
    if not changed:
        return table, 0
    for n, values in col.items():
        f = table.schema.field(n)
        table = table.set_column(table.schema.get_field_index(n), f, pa.array(values, f.type))
    return table, changed


def redact_trace(t: Trace, keys) -> None:
    """Apply `keys` to a trace in memory (what is returned matches what is stored)."""
    down, counts = _split(keys)
    for s in t.spans:
        s.documents = [d for d in s.documents if d.source not in counts]  # as a `counts` trace has none
        for d in s.documents:
            if (d.source, d.doc_id) in down:
                d.blocked, d.title, d.snippet, d.snippet_span, d.context, d.context_span = True, None, None, None, None, None


# -- writing ----------------------------------------------------------------------------------


def _tables(t: Trace, owner: str | None = None) -> dict[str, pa.Table]:
    rows: dict[str, list[dict]] = {n: [] for n in TABLES}
    rows["traces"].append(dict(
        trace_id=t.trace_id, created_at=dt.datetime.fromisoformat(t.created_at), prompt=t.prompt,
        response=t.response, n_tokens=t.n_tokens, generated=t.generated, model=t.model,
        sources_searched=list(t.sources_searched), experts_off=list(t.experts_off), n_spans=len(t.spans),
        timings_ms=json.dumps(t.timings_ms), settings=json.dumps(t.settings, default=str), owner=owner))
    for s in t.spans:
        top_src = s.experts[s.top_expert].source if s.top_expert is not None and s.experts else None
        rows["spans"].append(dict(
            trace_id=t.trace_id, span_index=s.index, group_index=s.group, start_token=s.start, end_token=s.end,
            char_start=s.char_start, char_end=s.char_end, text=s.text, n_tokens=s.end - s.start, count=s.count,
            unigram_logprob_sum=s.unigram_logprob_sum, top_expert=s.top_expert, top_expert_source=top_src,
            agreement=s.agreement, top_expert_by=s.top_expert_by, top_by_routing=s.top_by_routing,
            top_by_counterfactual=s.top_by_counterfactual))
        rows["span_sources"] += [dict(trace_id=t.trace_id, span_index=s.index, source=src, count=n)
                                 for src, n in s.count_by_source.items()]
        rows["span_documents"] += [dict(
            trace_id=t.trace_id, span_index=s.index, position=i, source=d.source, doc_id=d.doc_id, title=d.title,
            token_offset=d.token_offset, blocked=d.blocked, snippet=None if d.blocked else d.snippet,
            relevance=d.relevance, relevance_norm=d.relevance_norm, bucket=d.bucket, repeat_of=d.repeat_of)
            for i, d in enumerate(s.documents)]
        rows["span_experts"] += [dict(
            trace_id=t.trace_id, span_index=s.index, expert=e.expert, source=e.source, routing_share=e.routing_share,
            counterfactual=e.counterfactual, active=e.active) for e in s.experts]
    sch = schemas()
    return {n: pa.Table.from_pylist(r, schema=sch[n]) for n, r in rows.items()}


def save_trace(ws: Workspace, t: Trace, owner: str | None = None, compact: bool = True) -> None:
    """Store a trace (one part, committed whole), redacted as the catalog asks now; `t` too.

    :param owner: who may read it back (`access.owner_of(caller)`); None: the operator's (analysts read it)
    :param compact: merge small parts now if due; False: the caller does (a service: `parts.compact_soon`)
    """
    with parts.writer(ws) as r:
        m = _manifest(ws, r)
        _sync(ws, r, m)
        redact_trace(t, m.applied)
        part_id, tmp = parts.new_part_dir(ws)
        try:
            parts.write_tables(tmp, _tables(t, owner))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        parts.commit(r, m, part_id, tmp, 1)
        if compact:
            parts.compact(r, m, TABLES)


def _manifest(ws: Workspace, r: Path) -> parts.Manifest:
    """The manifest, created on first use (importing a DuckDB-file store, if any: upgrades.py)."""
    m = parts.Manifest.read(r)
    if m is not None:
        return m
    m, old = parts.Manifest(), ws.traces_path
    sch = {n: schemas()[n] for n in TABLES}
    tables = upgrades.read_duckdb_store(old, sch, _sql_type) if old.exists() else {n: s.empty_table() for n, s in sch.items()}
    part_id, tmp = parts.new_part_dir(ws)
    parts.write_tables(tmp, tables)
    parts.commit(r, m, part_id, tmp, tables["traces"].num_rows)
    if old.exists():
        upgrades.remove_duckdb_store(old)
    return m


@lru_cache(maxsize=None)
def _sql_type(table: str, column: str) -> str:
    con = duckdb.connect(":memory:")
    con.execute(SCHEMA)
    ty = con.execute("SELECT data_type FROM information_schema.columns WHERE table_name = ? AND column_name = ?",
                     [table, column]).fetchone()[0]
    con.close()
    return ty


def _sync(ws: Workspace, r: Path, m: parts.Manifest, everything: bool = False) -> int:
    """Apply the catalog's pending redactions to every committed part (writer lock held).

    A catalog that stays busy leaves them pending (the next writer or reader applies them).
    Returns the rows changed."""
    try:
        want = [tuple(k) for k in demands(ws)]
    except ConflictError:
        return 0
    applied = {tuple(k) for k in m.applied}
    todo = want if everything else [k for k in want if k not in applied]
    changed = 0
    if todo:
        parts.sweep(r, m)  # no unlisted copy of the text may outlive the redaction
        for p in m.parts:
            def fn(table: pa.Table) -> pa.Table | None:
                nonlocal changed
                new, n = redact_documents(table, todo)
                changed += n
                return new if n else None
            parts.rewrite_table(r / "parts" / p["id"] / "span_documents.parquet", fn)
    if set(want) != applied:
        m.applied = [list(k) for k in want]
        m.write(r)
    return changed


def sync(ws: Workspace) -> int:
    """Make the store agree with the catalog's takedowns and `counts` sources now (rows changed)."""
    with parts.writer(ws) as r:
        return _sync(ws, r, _manifest(ws, r))


def repair(ws: Workspace) -> dict:
    """Import an old DuckDB-file store, re-apply every redaction to every part, remove what
    crashed writers left; safe to run at any time (readers are not disturbed)."""
    legacy = ws.traces_path.exists()
    with parts.writer(ws) as r:
        m = _manifest(ws, r)
        changed = _sync(ws, r, m, everything=True)
        removed = parts.sweep(r, m)
        return {"imported_old_store": legacy, "rows_redacted": changed, "removed": removed,
                "parts": len(m.parts), "traces": sum(p["n"] for p in m.parts), "redactions": len(m.applied)}


def save_traces(ws: Workspace, traces: list[Trace], owner: str | None = None) -> None:
    """Store many traces as one part (committed whole: all or none), redacted as the catalog
    asks now, them too (a batch commits a chunk of rows at a time, tracing/batch/).

    :param owner: who made them (`access.owner_of(caller)`); None: the operator's (analysts read them)
    """
    if not traces:
        return
    with parts.writer(ws) as r:
        m = _manifest(ws, r)
        _sync(ws, r, m)
        each = []
        for t in traces:
            redact_trace(t, m.applied)
            each.append(_tables(t, owner))
        part_id, tmp = parts.new_part_dir(ws)
        try:
            parts.write_tables(tmp, {n: pa.concat_tables([e[n] for e in each]) for n in TABLES})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        parts.commit(r, m, part_id, tmp, len(traces))
        parts.compact(r, m, TABLES)


# -- reading ----------------------------------------------------------------------------------


@contextlib.contextmanager
def reader(ws: Workspace, sandbox: bool = True, caller: Caller = OPERATOR) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB whose five tables are views over the committed parts.

    Pending redactions are applied first. The connection reads a snapshot: the files of the
    parts committed when it opened, held open until it closes (`parts.pinned`), so a trace,
    a takedown or a compaction meanwhile never makes one of its reads fail or read a file
    half old, half new; open a new reader to see what was committed since. With `sandbox`
    the connection reads nothing but the store (no ATTACH, no COPY TO, no other file, no
    Python object), on one thread, and its settings are locked.

    :param caller: whose reads (tracing/provenance/access.py); one who does not read every
        trace gets tables holding only its rows, and a connection that reads no file at all
    """
    r = parts.root(ws)
    m = parts.Manifest.read(r)
    if m is None and not ws.traces_path.exists():
        raise NotFoundError(f"no traces stored yet in {r}; run `flexolmo trace` first")
    if m is None or _pending(ws, m):
        with parts.writer(ws):
            m = _manifest(ws, r)
            _sync(ws, r, m)
    with contextlib.ExitStack() as stack:
        files, folder = _pin(ws, m, stack)
        con = duckdb.connect(":memory:", config={"threads": 1} if sandbox else {})
        stack.callback(con.close)  # before the files are let go
        prefix = "" if caller.reads_all else "_all_"
        for t in TABLES:
            con.execute(f"CREATE VIEW {prefix}{t} AS {_parts_select(con, t, files[t])}")
        if not caller.reads_all:
            _restrict(con, caller)
        if sandbox:
            if caller.reads_all:  # a pinned file is allowed under parts/, or, once replaced or removed, in its folder
                allowed = [f"{r / 'parts'}/"] + ([f"{folder}/"] if folder else [])
                con.execute("SET allowed_directories = [" + ", ".join("'" + a.replace("'", "''") + "'" for a in allowed) + "]")
            con.execute("SET enable_external_access = false")
            con.execute("SET python_enable_replacements = false")  # no Python variable read as a table
            con.execute("SET lock_configuration = true")
        yield con


def _parts_select(con: duckdb.DuckDBPyConnection, table: str, files: list[str]) -> str:
    """SELECT of `table`'s columns over its Parquet files; a column no part has yet (every part
    written before it was added) reads as NULL, as union_by_name does when some parts have it."""
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    src = f"read_parquet([{listed}], union_by_name = true)"
    want = schemas()[table].names
    have = set(pq.read_schema(files[-1]).names) if files else set()  # the newest part: usually every column
    if not set(want) <= have:
        have = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    cols = ", ".join(f'"{f.name}"' if f.name in have else f'CAST(NULL AS {_sql_type(table, f.name)}) AS "{f.name}"'
                     for f in schemas()[table])
    return f"SELECT {cols} FROM {src}"


def _restrict(con: duckdb.DuckDBPyConnection, caller: Caller) -> None:
    """Replace the views `_all_<table>` by tables of the rows `caller` may read (access.py's rule)."""
    con.execute("CREATE TABLE traces AS SELECT * FROM _all_traces WHERE list_contains(?, owner)",
                [sorted(caller.owners)])
    for t in ("spans", "span_experts"):
        con.execute(f"CREATE TABLE {t} AS SELECT * FROM _all_{t} WHERE trace_id IN (SELECT trace_id FROM traces)")
    for t in ("span_sources", "span_documents"):  # an owner key's sources: their rows in every trace
        con.execute(f"CREATE TABLE {t} AS SELECT * FROM _all_{t} "
                    "WHERE trace_id IN (SELECT trace_id FROM traces) OR list_contains(?, source)", [sorted(caller.sources)])
    for t in TABLES:
        con.execute(f"DROP VIEW _all_{t}")


def _pin(ws: Workspace, m: parts.Manifest, stack: contextlib.ExitStack) -> tuple[dict[str, list[str]], str | None]:
    """Pin the files of `m`'s parts, or, when a writer removed one since `m` was read (a
    compaction, then a redaction's sweep), of the newest manifest's, for up to READ_WAIT_S."""
    deadline = time.monotonic() + READ_WAIT_S
    while True:
        try:
            return stack.enter_context(parts.pinned(ws, m, TABLES))
        except FileNotFoundError as e:
            if time.monotonic() > deadline:
                raise ConflictError(f"the provenance store kept changing under this reader for {READ_WAIT_S:g} s "
                                    f"({e.filename} went before it could be read); retry, or see "
                                    "`flexolmo traces repair`") from None
            time.sleep(0.01)
            m = parts.Manifest.read(parts.root(ws)) or m


def _pending(ws: Workspace, m: parts.Manifest) -> bool:
    return bool({tuple(k) for k in demands(ws)} - {tuple(k) for k in m.applied})


def _migrate_step(ws: Workspace, apply: bool) -> list[str]:
    """`flexolmo migrate`'s store step: import a DuckDB-file store into Parquet parts."""
    if not ws.traces_path.exists() or parts.Manifest.read(parts.root(ws)) is not None:
        return []
    if apply:
        with parts.writer(ws) as r:
            n = sum(p["n"] for p in _manifest(ws, r).parts)
        return [f"traces/provenance.duckdb: {n} traces imported into Parquet parts (traces/parts/), the file removed"]
    return ["traces/provenance.duckdb: would be imported into Parquet parts (traces/parts/) and removed"]


migrate.register(migrate.Step("provenance store", _migrate_step, "the single-file DuckDB store -> Parquet parts"))


# The read side (SQL, contribution, export) lives in tracing/provenance/queries.py, over `reader`.
__all__ = ["SCHEMA", "TABLES", "Caller", "OPERATOR", "demands", "reader", "redact_documents", "redact_trace", "repair", "save_trace", "sync"]
