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
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa

from flexolmo.base.errors import ConflictError, NotFoundError
from flexolmo.base.workspace import Workspace

from . import parts
from ..results import Trace

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
    settings          VARCHAR             -- JSON text
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


def demands(ws: Workspace) -> list[tuple]:
    """The redactions the catalog asks for now: ('takedown', source, doc_id) for every
    takedown, ('counts', source, since) for every `counts` source (a new key when its policy
    row changes, so a source switched back to counts is redacted again)."""
    from flexolmo.base.sources import list_sources
    from index.catalog import list_takedowns

    keys = [("takedown", t.source, t.doc_id) for t in list_takedowns(ws)]
    keys += [("counts", s.name, s.updated_at.isoformat()) for s in list_sources(ws) if s.visibility == "counts"]
    return sorted(keys)


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


def _tables(t: Trace) -> dict[str, pa.Table]:
    rows: dict[str, list[dict]] = {n: [] for n in TABLES}
    rows["traces"].append(dict(
        trace_id=t.trace_id, created_at=dt.datetime.fromisoformat(t.created_at), prompt=t.prompt,
        response=t.response, n_tokens=t.n_tokens, generated=t.generated, model=t.model,
        sources_searched=list(t.sources_searched), experts_off=list(t.experts_off), n_spans=len(t.spans),
        timings_ms=json.dumps(t.timings_ms), settings=json.dumps(t.settings, default=str)))
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


def save_trace(ws: Workspace, t: Trace) -> None:
    """Store a trace (one part, committed whole), redacted as the catalog asks now; `t` too."""
    with parts.writer(ws) as r:
        m = _manifest(ws, r)
        _sync(ws, r, m)
        redact_trace(t, m.applied)
        part_id, tmp = parts.new_part_dir(ws)
        try:
            parts.write_tables(tmp, _tables(t))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        parts.commit(r, m, part_id, tmp, 1)
        parts.compact(r, m, TABLES)


def _manifest(ws: Workspace, r: Path) -> parts.Manifest:
    """The manifest, created on first use (importing a store of the DuckDB-file era, if any)."""
    m = parts.Manifest.read(r)
    if m is not None:
        return m
    m, legacy = parts.Manifest(), ws.traces_path
    sch = schemas()
    tables = {n: sch[n].empty_table() for n in TABLES}
    if legacy.exists():
        try:
            con = duckdb.connect(str(legacy), read_only=True)
        except duckdb.Error as e:
            raise ConflictError(f"the old store {legacy} is held by another process ({str(e).splitlines()[0]}); "
                                "close it, then run `flexolmo traces repair` to import it") from None
        with contextlib.closing(con):
            for n in TABLES:
                have = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                                  "WHERE table_name = ?", [n]).fetchall()}
                src = {f.name: f'"{f.name}"' if f.name in have else "NULL" for f in sch[n]}  # later columns: NULL
                cols = ", ".join(f'CAST({src[f.name]} AS {_sql_type(n, f.name)}) AS "{f.name}"' for f in sch[n])
                tables[n] = con.sql(f"SELECT {cols} FROM {n}").to_arrow_table().cast(sch[n])
    part_id, tmp = parts.new_part_dir(ws)
    parts.write_tables(tmp, tables)
    parts.commit(r, m, part_id, tmp, tables["traces"].num_rows)
    if legacy.exists():  # imported: the old file (perhaps unredacted, see issue 10) goes
        for p in (legacy, legacy.with_name(legacy.name + ".wal")):
            p.unlink(missing_ok=True)
    return m


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

    :param owner: who made them, where the store records owners; None: the operator
    """
    if not traces:
        return
    with parts.writer(ws) as r:
        m = _manifest(ws, r)
        _sync(ws, r, m)
        each = []
        for t in traces:
            redact_trace(t, m.applied)
            tabs = _tables(t)
            if owner is not None and "owner" in tabs["traces"].column_names:
                i = tabs["traces"].schema.get_field_index("owner")
                tabs["traces"] = tabs["traces"].set_column(i, tabs["traces"].schema.field(i), pa.array([owner]))
            each.append(tabs)
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
def reader(ws: Workspace, sandbox: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB whose five tables are views over the committed parts.

    Pending redactions are applied first. The connection reads a snapshot: the files of the
    parts committed when it opened, held open until it closes (`parts.pinned`), so a trace,
    a takedown or a compaction meanwhile never makes one of its reads fail or read a file
    half old, half new; open a new reader to see what was committed since. With `sandbox`
    the connection reads nothing but the store (no ATTACH, no COPY TO, no other file), on one
    thread, and its settings are locked.
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
        for t in TABLES:
            listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files[t])
            # union_by_name: parts written before a column was added read it as NULL
            cols = ", ".join(f'"{f.name}"' for f in schemas()[t])
            con.execute(f"CREATE VIEW {t} AS SELECT {cols} FROM read_parquet([{listed}], union_by_name = true)")
        if sandbox:  # a pinned file is allowed under parts/, or, once replaced or removed, in its folder
            allowed = [f"{r / 'parts'}/"] + ([f"{folder}/"] if folder else [])
            con.execute("SET allowed_directories = [" + ", ".join("'" + a.replace("'", "''") + "'" for a in allowed) + "]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        yield con


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


# The read side (SQL, contribution, export) lives in tracing/provenance/queries.py, over `reader`.
__all__ = ["SCHEMA", "TABLES", "demands", "reader", "redact_documents", "redact_trace", "repair", "save_trace", "sync"]
