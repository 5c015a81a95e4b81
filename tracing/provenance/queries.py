"""The read side of the provenance store: SQL for analysts, one trace's rows, exports, reports.

    flexolmo query "SELECT source, count(*) FROM span_sources GROUP BY 1"
    flexolmo traces export --out provenance-export

Every read goes through `store.reader` (pending redactions first, then an in-memory DuckDB
over the committed parts, holding only the rows its `caller` may read: access.py); a read
that raced a compaction is retried. Analysts' SQL is one
read-only statement, checked before it runs, with a time budget enforced by DuckDB's
`interrupt()`.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import duckdb

from flexolmo.base.errors import FlexolmoError, InputError, NotFoundError
from flexolmo.base.workspace import Workspace

from .access import OPERATOR, TOKEN_HEADER, Caller
from .store import reader

T = TypeVar("T")

TABLES = ("traces", "spans", "span_sources", "span_documents", "span_experts")  # as store.TABLES
# What an analyst may run: SELECT (WITH, DESCRIBE, SHOW, SUMMARIZE parse as SELECT) and EXPLAIN.
READ_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)


class QueryTimeout(FlexolmoError):
    """A query ran past its time budget and was interrupted."""

    http_status = 504


_MISSING = ("No files found", "No such file", "Cannot open file")


def read_store(ws: Workspace, fn: Callable[[duckdb.DuckDBPyConnection], T], sandbox: bool = True,
               caller: Caller = OPERATOR) -> T:
    """fn(reader); retried when a compaction removed a part between manifest and read.

    :param caller: whose read: the rows it may read only (access.py; default the operator, every row)
    """
    for attempt in range(4):
        try:
            with reader(ws, sandbox=sandbox, caller=caller) as con:
                return fn(con)
        except duckdb.IOException as e:
            if attempt == 3 or not any(s in str(e) for s in _MISSING):
                raise
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple]


def check_sql(sql: str) -> None:
    """Refuse, with a clear message, what is not one read-only statement."""
    try:
        stmts = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise InputError(f"query failed: {str(e).splitlines()[0]} (tables: {', '.join(TABLES)})") from None
    if not stmts:
        raise InputError("the query holds no SQL statement (empty, or only a comment); "
                         "e.g. flexolmo query \"SELECT * FROM spans LIMIT 5\"")
    if len(stmts) > 1:
        raise InputError(f"query failed: give one statement at a time (found {len(stmts)})")
    if stmts[0].type not in READ_STATEMENTS:
        raise InputError(f"query failed: the provenance store is read-only here: only SELECT (WITH, DESCRIBE, "
                         f"SHOW, SUMMARIZE) and EXPLAIN are run, not {stmts[0].type.name}")


def query(ws: Workspace, sql: str, limit: int | None = 1000, timeout_s: float | None = None,
          caller: Caller = OPERATOR) -> QueryResult:
    """Run one read-only SQL statement over the store; interrupted after `timeout_s` seconds.

    :param caller: the tables hold only the rows this caller may read (access.py); the operator reads all
    """
    check_sql(sql)

    def run(con: duckdb.DuckDBPyConnection) -> QueryResult:
        timer = threading.Timer(timeout_s, con.interrupt) if timeout_s else None
        if timer:
            timer.start()
        try:
            cur = con.execute(sql)
            if cur.description is None:
                return QueryResult([], [])
            rows = cur.fetchmany(limit) if limit else cur.fetchall()
            return QueryResult([d[0] for d in cur.description], rows)
        except duckdb.InterruptException:
            raise QueryTimeout(f"the query ran past its {timeout_s:g} s budget and was stopped; narrow it "
                               "(a WHERE on trace_id or source, fewer joins) or run it with `flexolmo query`") from None
        except duckdb.IOException:
            raise
        except duckdb.Error as e:
            raise InputError(f"query failed: {str(e).splitlines()[0]} (tables: {', '.join(TABLES)})") from None
        finally:
            if timer:
                timer.cancel()

    return read_store(ws, run, caller=caller)


def trace_rows(ws: Workspace, trace_id: str, caller: Caller = OPERATOR) -> dict[str, QueryResult]:
    """Every table's rows for one stored trace that `caller` may read (NotFoundError when there are none).

    An owner key reading another's trace that touched its sources gets those sources' span_sources
    and span_documents rows, and no row of the other tables."""
    def run(con: duckdb.DuckDBPyConnection) -> dict[str, QueryResult]:
        out = {}
        for table in TABLES:
            cur = con.execute(f"SELECT * FROM {table} WHERE trace_id = ?", [trace_id])
            out[table] = QueryResult([d[0] for d in cur.description], cur.fetchall())
        return out

    out = read_store(ws, run, caller=caller)
    if not any(r.rows for r in out.values()):
        raise not_found(trace_id, caller)
    return out


def not_found(trace_id: str, caller: Caller) -> NotFoundError:
    """No trace `trace_id` that `caller` may read (whether another's exists is not told)."""
    if caller.reads_all:
        return NotFoundError(f"no stored trace {trace_id!r}; list them with "
                             "flexolmo query \"SELECT trace_id, created_at FROM traces\"")
    return NotFoundError(f"no stored trace {trace_id!r} made with this request's key or {TOKEN_HEADER} token "
                         "(a trace is read back with the key or token that made it; GET /api/traces lists yours)")


def export_parquet(ws: Workspace, out: Path, force: bool = False) -> list[Path]:
    """Write every table to `out/<table>.parquet` (a consistent snapshot of the store).

    :param force: replace a file at `out`, or an earlier export in the folder
    """
    import os

    import pyarrow.parquet as pq

    out = Path(out)
    names = [out / f"{t}.parquet" for t in TABLES]
    if out.exists() and not out.is_dir():
        if not force:
            raise InputError(f"{out} is a file; --out names a folder (one Parquet file per table): "
                             "choose another path, or --force to replace the file")
        out.unlink()
    existing = [p.name for p in names if p.exists()]
    if existing and not force:
        raise InputError(f"{out} already holds an export ({', '.join(existing)}); choose another folder, "
                         "or --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)

    def run(con: duckdb.DuckDBPyConnection) -> list[Path]:
        tables = {t: con.sql(f"SELECT * FROM {t}").to_arrow_table() for t in TABLES}
        for t, path in zip(TABLES, names):
            tmp = out / f".tmp-{t}.parquet"
            pq.write_table(tables[t], tmp)
            os.replace(tmp, path)
        return names

    return read_store(ws, run)


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
    # for plots: per day, traces and spans matched in the source; per domain of the text (the
    # domain of a source the span was found in), this source's expert's mean routing share
    # and mean counterfactual drop over those spans
    over_time: list[dict] = field(default_factory=list)  # {day, traces, spans}
    by_domain: list[dict] = field(default_factory=list)  # {domain, spans, routing_share, counterfactual}
    # the latest extraction audit of the source (`flexolmo audit extraction`): per model row,
    # the extraction rate continuation-only and with the prefix, and the longest verbatim runs
    audit: dict | None = None


def contribution(ws: Workspace, source: str, top: int = 10, timeout_s: float | None = None) -> Contribution:
    """What `source` contributed over every stored trace (counts, means, top spans, series for plots)."""
    from flexolmo.base.sources import list_sources

    domains = {s.name: s.domain for s in list_sources(ws)}

    def run(con: duckdb.DuckDBPyConnection) -> Contribution:
        timer = threading.Timer(timeout_s, con.interrupt) if timeout_s else None
        if timer:
            timer.start()
        try:
            return dataclasses.replace(_contribution(con, source, top, domains), audit=_audit_summary(ws, source))
        except duckdb.InterruptException:
            raise QueryTimeout(f"the contribution report ran past its {timeout_s:g} s budget; "
                               f"run `flexolmo report contribution --source {source}`") from None
        finally:
            if timer:
                timer.cancel()

    return read_store(ws, run)


def _contribution(con: duckdb.DuckDBPyConnection, source: str, top: int, domains: dict[str, str]) -> Contribution:
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
    over_time = [dict(day=str(d), traces=n, spans=m) for d, n, m in con.execute(
        """SELECT CAST(t.created_at AS DATE) AS day, count(DISTINCT ss.trace_id), count(*)
           FROM span_sources ss JOIN traces t USING (trace_id) WHERE ss.source = ? AND ss.count > 0
           GROUP BY 1 ORDER BY 1""", [source]).fetchall()]
    per_found: dict[str, list] = {}  # domain -> [spans, sum share, sum drop, spans with a drop]
    for found_in, n, s_share, s_cf, n_cf in con.execute(
            """SELECT ss.source, count(*), sum(e.routing_share), sum(e.counterfactual), count(e.counterfactual)
               FROM span_experts e JOIN span_sources ss USING (trace_id, span_index)
               WHERE e.source = ? AND ss.count > 0 GROUP BY 1""", [source]).fetchall():
        acc = per_found.setdefault(domains.get(found_in, found_in), [0, 0.0, 0.0, 0])
        acc[0] += n
        acc[1] += s_share or 0.0
        acc[2] += s_cf or 0.0
        acc[3] += n_cf
    by_domain = [dict(domain=d, spans=n, routing_share=round(sh / n, 4), counterfactual=round(cf / k, 4) if k else None)
                 for d, (n, sh, cf, k) in sorted(per_found.items())]
    return Contribution(source, n_traces, traces_matched, spans_matched, docs, blocked,
                        None if share is None else round(share, 4), None if cf is None else round(cf, 4),
                        None if agree is None else round(agree, 4), top_spans, over_time, by_domain)


def _audit_summary(ws: Workspace, source: str) -> dict | None:
    """The latest extraction audit's figures per model row, or None when none was run."""
    from tracing.audit import latest

    a = latest(ws, source)
    if a is None:
        return None
    rows = {name: {k: r.get(k) for k in ("rate_continuation", "rate_with_prefix", "longest_verbatim_run")}
            for name, r in a.get("rows", {}).items() if "rate_continuation" in r}
    return {"created_at": a.get("created_at"), "n_prompts": a.get("n_prompts"), "dp_package": a.get("dp_package"),
            "rows": rows}
