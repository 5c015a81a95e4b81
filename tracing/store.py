"""The provenance store: every trace in a DuckDB file, queryable in SQL, exportable to Parquet.

    flexolmo query "SELECT source, count(*) FROM span_sources GROUP BY 1"
    flexolmo report contribution --source news

Tables (one row per ...):
    traces          trace: prompt, response, model, sources searched, experts off, timings
    spans           kept span: token and character range, text, count, top expert, agreement
    span_sources    (span, source) with the span's count in that source's index
    span_documents  retrieved document: source, doc_id, blocked, snippet, BM25 relevance
    span_experts    (span, expert): routing share and counterfactual log-prob drop

Blocked text is never stored: a blocked document row has no snippet.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import duckdb

from flexolmo.errors import ConflictError, InputError, NotFoundError
from flexolmo.workspace import Workspace

from .models import Trace

SCHEMA = """
CREATE TABLE IF NOT EXISTS traces (
    trace_id          VARCHAR PRIMARY KEY,
    created_at        TIMESTAMP NOT NULL,
    prompt            VARCHAR,
    response          VARCHAR NOT NULL,
    n_tokens          INTEGER NOT NULL,
    generated         BOOLEAN NOT NULL,   -- routing captured during generation (else one forward pass)
    model             VARCHAR,
    sources_searched  VARCHAR[] NOT NULL,
    experts_off       VARCHAR[] NOT NULL,
    n_spans           INTEGER NOT NULL,
    timings_ms        JSON,
    settings          JSON
);
CREATE TABLE IF NOT EXISTS spans (
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
    PRIMARY KEY (trace_id, span_index)
);
CREATE TABLE IF NOT EXISTS span_sources (
    trace_id    VARCHAR NOT NULL,
    span_index  INTEGER NOT NULL,
    source      VARCHAR NOT NULL,
    count       BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS span_documents (
    trace_id        VARCHAR NOT NULL,
    span_index      INTEGER NOT NULL,
    position        INTEGER NOT NULL,
    source          VARCHAR NOT NULL,
    doc_id          VARCHAR,
    title           VARCHAR,
    token_offset    INTEGER NOT NULL,
    blocked         BOOLEAN NOT NULL,
    snippet         VARCHAR,           -- null when blocked
    relevance       DOUBLE NOT NULL,
    relevance_norm  DOUBLE NOT NULL,
    bucket          VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS span_experts (
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


@contextlib.contextmanager
def connect(ws: Workspace, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the store. Read-only connections also get no access outside the file: no ATTACH
    of the catalog, no COPY TO a path, no read_parquet of a source's documents."""
    path = ws.traces_path
    if read_only and not path.exists():
        raise NotFoundError(f"no traces stored yet in {path}; run `flexolmo trace` first")
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"enable_external_access": False, "lock_configuration": True} if read_only else {}
    try:
        con = duckdb.connect(str(path), read_only=read_only, config=config)
    except duckdb.IOException as e:
        raise ConflictError(f"the provenance store {path} is busy ({str(e).splitlines()[0]}); retry") from None
    try:
        if not read_only:
            con.execute(SCHEMA)
        yield con
    finally:
        con.close()


def save_trace(ws: Workspace, t: Trace) -> None:
    """Store a trace and all its rows in one transaction."""
    with connect(ws) as con:
        con.execute("BEGIN")
        con.execute("INSERT INTO traces VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [t.trace_id, t.created_at, t.prompt, t.response, t.n_tokens, t.generated, t.model,
                     t.sources_searched, t.experts_off, len(t.spans), json.dumps(t.timings_ms),
                     json.dumps(t.settings)])
        for s in t.spans:
            top_src = s.experts[s.top_expert].source if s.top_expert is not None and s.experts else None
            con.execute("INSERT INTO spans VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [t.trace_id, s.index, s.group, s.start, s.end, s.char_start, s.char_end, s.text,
                         s.end - s.start, s.count, s.unigram_logprob_sum, s.top_expert, top_src, s.agreement])
            con.executemany("INSERT INTO span_sources VALUES (?, ?, ?, ?)",
                            [[t.trace_id, s.index, src, n] for src, n in s.count_by_source.items()])
            if s.documents:
                con.executemany("INSERT INTO span_documents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                [[t.trace_id, s.index, i, d.source, d.doc_id, d.title, d.token_offset, d.blocked,
                                  None if d.blocked else d.snippet, d.relevance, d.relevance_norm, d.bucket]
                                 for i, d in enumerate(s.documents)])
            if s.experts:
                con.executemany("INSERT INTO span_experts VALUES (?, ?, ?, ?, ?, ?, ?)",
                                [[t.trace_id, s.index, e.expert, e.source, e.routing_share, e.counterfactual, e.active]
                                 for e in s.experts])
        con.execute("COMMIT")


def redact(ws: Workspace, source: str, doc_id: str | None = None) -> int:
    """Strip stored text of a taken-down document (doc_id) or of a whole `counts` source.

    A taken-down document keeps its doc_id and becomes `blocked`; a `counts` source keeps
    only counts (doc_id, title and snippet are cleared). Returns the rows changed.
    """
    if not ws.traces_path.exists():
        return 0
    with connect(ws) as con:
        if doc_id is not None:
            q = ("UPDATE span_documents SET snippet = NULL, title = NULL, blocked = TRUE "
                 "WHERE source = ? AND doc_id = ?", [source, doc_id])
        else:
            q = ("UPDATE span_documents SET snippet = NULL, title = NULL, doc_id = NULL "
                 "WHERE source = ? AND (snippet IS NOT NULL OR doc_id IS NOT NULL)", [source])
        return con.execute(*q).fetchone()[0]


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple]


def query(ws: Workspace, sql: str, limit: int | None = 1000) -> QueryResult:
    """Run read-only SQL over the provenance store (writes are refused by the connection)."""
    if not sql.strip():
        raise InputError("the query is empty; e.g. flexolmo query \"SELECT * FROM spans LIMIT 5\"")
    with connect(ws, read_only=True) as con:
        try:
            cur = con.execute(sql)
        except duckdb.Error as e:
            raise InputError(f"query failed: {str(e).splitlines()[0]} (tables: {', '.join(TABLES)})") from None
        if cur.description is None:
            return QueryResult([], [])
        rows = cur.fetchmany(limit) if limit else cur.fetchall()
        return QueryResult([d[0] for d in cur.description], rows)


def trace_rows(ws: Workspace, trace_id: str) -> dict[str, QueryResult]:
    """Every table's rows for one stored trace (NotFoundError when there is none)."""
    out = {}
    with connect(ws, read_only=True) as con:
        for table in TABLES:
            cur = con.execute(f"SELECT * FROM {table} WHERE trace_id = ?", [trace_id])
            out[table] = QueryResult([d[0] for d in cur.description], cur.fetchall())
    if not out["traces"].rows:
        raise NotFoundError(f"no stored trace {trace_id!r}; list them with "
                            "flexolmo query \"SELECT trace_id, created_at FROM traces\"")
    return out


def export_parquet(ws: Workspace, out: Path) -> list[Path]:
    """Write every table to `out/<table>.parquet`."""
    import os

    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with connect(ws, read_only=True) as con:
        for table in TABLES:
            path = out / f"{table}.parquet"
            tmp = out / f".tmp-{table}.parquet"
            pq.write_table(con.sql(f"SELECT * FROM {table}").to_arrow_table(), tmp)
            os.replace(tmp, path)
            paths.append(path)
    return paths


@dataclass(frozen=True)
class Contribution:
    """What one source contributed over every stored trace."""

    source: str
    n_traces: int  # stored traces
    traces_matched: int  # traces with at least one span found in the source
    spans_matched: int  # spans found in the source
    documents_matched: int  # distinct documents of the source retrieved for spans (not taken down)
    blocked_hits: int  # retrieved windows that were blocked by a takedown
    mean_routing_share: float | None  # the source's expert, over every traced span
    mean_counterfactual: float | None  # mean log-prob drop of a span with the expert off
    agreement_rate: float | None  # of spans found in the source, top expert is the source's
    top_spans: list[dict]


def contribution(ws: Workspace, source: str, top: int = 10) -> Contribution:
    with connect(ws, read_only=True) as con:
        one = lambda q: con.execute(q, [source]).fetchone()[0]  # noqa: E731
        n_traces = con.execute("SELECT count(*) FROM traces").fetchone()[0]
        traces_matched = one("SELECT count(DISTINCT trace_id) FROM span_sources WHERE source = ? AND count > 0")
        spans_matched = one("SELECT count(*) FROM span_sources WHERE source = ? AND count > 0")
        docs = one("SELECT count(DISTINCT doc_id) FROM span_documents WHERE source = ? AND doc_id IS NOT NULL AND NOT blocked")
        blocked = one("SELECT count(*) FROM span_documents WHERE source = ? AND blocked")
        share, cf = con.execute("SELECT avg(routing_share), avg(counterfactual) FROM span_experts WHERE source = ?",
                                [source]).fetchone()
        agree = one("""SELECT avg(CASE WHEN s.top_expert_source = ss.source THEN 1.0 ELSE 0.0 END)
                       FROM span_sources ss JOIN spans s USING (trace_id, span_index)
                       WHERE ss.source = ? AND ss.count > 0 AND s.top_expert IS NOT NULL""")
        # one row per distinct span text: how often it was traced, its latest top expert
        cur = con.execute("""SELECT s.text, any_value(s.n_tokens) AS n_tokens, max(ss.count) AS count,
                                    count(*) AS times_traced, arg_max(s.top_expert_source, t.created_at) AS top_expert_source
                             FROM span_sources ss JOIN spans s USING (trace_id, span_index) JOIN traces t USING (trace_id)
                             WHERE ss.source = ? AND ss.count > 0
                             GROUP BY s.text ORDER BY n_tokens DESC, count ASC LIMIT ?""", [source, top])
        cols = [d[0] for d in cur.description]
        top_spans = [dict(zip(cols, r)) for r in cur.fetchall()]
    return Contribution(source, n_traces, traces_matched, spans_matched, docs, blocked,
                        None if share is None else round(share, 4), None if cf is None else round(cf, 4),
                        None if agree is None else round(agree, 4), top_spans)
