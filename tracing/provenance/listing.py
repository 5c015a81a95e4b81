"""Provenance for people: stored traces, spans and documents filtered, and one response's report.

    flexolmo traces list --source news --bucket high --since 2026-01-01
    flexolmo traces list --level documents --owner news-owner --json
    flexolmo traces report TRACE_ID --format csv > provenance.csv

Filters (all optional, combined with AND): a source, an owner or a licence (the sources the
catalog gives that owner or licence), a relevance bucket, and a date range on the trace's
creation (`since` and `until` inclusive). At the `traces` and `spans` levels a row is kept
when one of its spans was found in a chosen source (and, with a bucket, retrieved a
document of that bucket there); at the `documents` level each document row is tested.

The report lists every span of one trace with its documents; documents of a span with the
same text under several doc_ids (`repeat_of` in the store) are one row, "repeated N times".
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass
from typing import Literal

import duckdb

from flexolmo.base import sources as src_lib
from flexolmo.base.errors import InputError

from .access import OPERATOR, Caller
from .queries import QueryResult, not_found, read_store, trace_rows

Level = Literal["traces", "spans", "documents"]
BUCKETS = ("high", "medium", "low")
MAX_ROWS = 10_000


@dataclass(frozen=True)
class TraceFilter:
    source: str | None = None
    owner: str | None = None
    licence: str | None = None
    bucket: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None
    level: Level = "traces"
    limit: int = 100

    def sources(self, ws) -> list[str] | None:
        """The sources the filter names (None: any); an unknown source is a NotFoundError."""
        if self.bucket is not None and self.bucket not in BUCKETS:
            raise InputError(f"bucket must be one of {', '.join(BUCKETS)}, got {self.bucket!r}")
        if self.level not in ("traces", "spans", "documents"):
            raise InputError(f"level must be traces, spans or documents, got {self.level!r}")
        if not 1 <= self.limit <= MAX_ROWS:
            raise InputError(f"limit must be between 1 and {MAX_ROWS:,}, got {self.limit}")
        if self.since and self.until and self.since > self.until:
            raise InputError(f"since ({self.since}) is after until ({self.until})")
        if self.source is None and self.owner is None and self.licence is None:
            return None
        if self.source is not None:
            src_lib.get_source(ws, self.source)  # 404 for an unknown source
        return [s.name for s in src_lib.list_sources(ws)
                if (self.source is None or s.name == self.source) and (self.owner is None or s.owner == self.owner)
                and (self.licence is None or s.licence == self.licence)]


def _where(f: TraceFilter, names: list[str] | None, doc: str) -> tuple[list[str], list]:
    """SQL conditions on traces `t` and, at the documents level, documents `doc`."""
    cond, args = [], []
    if f.since:
        cond.append("t.created_at >= ?")
        args.append(dt.datetime.combine(f.since, dt.time()))
    if f.until:
        cond.append("t.created_at < ?")
        args.append(dt.datetime.combine(f.until + dt.timedelta(days=1), dt.time()))
    if f.level == "documents":
        if names is not None:
            cond.append(f"list_contains(?, {doc}.source)")
            args.append(names)
        if f.bucket:
            cond.append(f"{doc}.bucket = ?")
            args.append(f.bucket)
    return cond, args


def _span_match(f: TraceFilter, names: list[str] | None) -> tuple[str, list]:
    """A condition on span `s`: found in a chosen source, with a document of the bucket there."""
    cond, args = [], []
    if names is not None:
        cond.append("EXISTS (SELECT 1 FROM span_sources x WHERE x.trace_id = s.trace_id AND x.span_index = s.span_index "
                    "AND x.count > 0 AND list_contains(?, x.source))")
        args.append(names)
    if f.bucket:
        src = " AND list_contains(?, y.source)" if names is not None else ""
        cond.append("EXISTS (SELECT 1 FROM span_documents y WHERE y.trace_id = s.trace_id AND "
                    f"y.span_index = s.span_index AND y.bucket = ?{src})")
        args += [f.bucket] + ([names] if names is not None else [])
    return " AND ".join(cond) or "TRUE", args


def list_provenance(ws, f: TraceFilter, caller: Caller = OPERATOR) -> QueryResult:
    """Stored traces, spans or documents (`f.level`) that pass the filter, newest first.

    :param caller: lists only what it may read (access.py); an owner key's documents of its sources
        in others' traces are listed without the span text and date, which are not its to read
    """
    names = f.sources(ws)
    if names == []:  # an owner or licence no source has
        return QueryResult(_COLUMNS[f.level], [])
    cond, args = _where(f, names, "d")
    span_cond, span_args = _span_match(f, names)
    where = " AND ".join(cond) or "TRUE"
    if f.level == "documents":
        sql = f"""SELECT d.trace_id, t.created_at, d.span_index, s.text AS span_text, d.position, d.source, d.doc_id,
                         d.title, d.blocked, d.bucket, round(d.relevance_norm, 4) AS relevance_norm, d.repeat_of
                  FROM span_documents d LEFT JOIN spans s ON s.trace_id = d.trace_id AND s.span_index = d.span_index
                  LEFT JOIN traces t ON t.trace_id = d.trace_id
                  WHERE {where} ORDER BY t.created_at DESC, d.trace_id, d.span_index, d.position LIMIT ?"""
        params = args + [f.limit]
    elif f.level == "spans":
        sql = f"""SELECT t.trace_id, t.created_at, s.span_index, s.text, s.count, s.top_expert_source, s.top_expert_by,
                         (SELECT string_agg(x.source, ',' ORDER BY x.source) FROM span_sources x
                          WHERE x.trace_id = s.trace_id AND x.span_index = s.span_index AND x.count > 0) AS sources
                  FROM spans s JOIN traces t USING (trace_id)
                  WHERE {where} AND {span_cond} ORDER BY t.created_at DESC, t.trace_id, s.span_index LIMIT ?"""
        params = args + span_args + [f.limit]
    else:
        sql = f"""SELECT t.trace_id, t.created_at, left(t.response, 120) AS response, t.n_tokens, t.n_spans,
                         count(s.span_index) AS spans_matched, t.model
                  FROM traces t JOIN spans s USING (trace_id)
                  WHERE {where} AND {span_cond}
                  GROUP BY ALL ORDER BY t.created_at DESC, t.trace_id LIMIT ?"""
        params = args + span_args + [f.limit]
        if names is None and not f.bucket:  # traces without a span are listed too
            sql = f"""SELECT t.trace_id, t.created_at, left(t.response, 120) AS response, t.n_tokens, t.n_spans,
                             t.n_spans AS spans_matched, t.model
                      FROM traces t WHERE {where} ORDER BY t.created_at DESC, t.trace_id LIMIT ?"""
            params = args + [f.limit]

    def run(con: duckdb.DuckDBPyConnection) -> QueryResult:
        cur = con.execute(sql, params)
        return QueryResult([d[0] for d in cur.description], cur.fetchall())

    return read_store(ws, run, caller=caller)


_COLUMNS = {
    "traces": ["trace_id", "created_at", "response", "n_tokens", "n_spans", "spans_matched", "model"],
    "spans": ["trace_id", "created_at", "span_index", "text", "count", "top_expert_source", "top_expert_by", "sources"],
    "documents": ["trace_id", "created_at", "span_index", "span_text", "position", "source", "doc_id", "title",
                  "blocked", "bucket", "relevance_norm", "repeat_of"],
}

# -- one response's report --------------------------------------------------------------------

REPORT_COLUMNS = ["trace_id", "span_index", "span_text", "span_count", "sources", "top_expert_source", "top_expert_by",
                  "source", "doc_id", "title", "bucket", "relevance_norm", "blocked", "repeated", "same_text_doc_ids",
                  "snippet"]


def report(ws, trace_id: str, caller: Caller = OPERATOR) -> dict:
    """One stored trace as a provenance report: the response, then each span with its sources,
    top expert (and the signal that chose it), experts and documents (repeats grouped).

    :param caller: must be able to read the trace itself (access.py), else NotFoundError
    """
    tables = {t: [dict(zip(r.columns, row)) for row in r.rows]
              for t, r in trace_rows(ws, trace_id, caller=caller).items()}
    if not tables["traces"]:  # an owner key's rows of another's trace: no report of its response
        raise not_found(trace_id, caller)
    t = tables["traces"][0]
    spans = []
    for s in sorted(tables["spans"], key=lambda s: s["span_index"]):
        i = s["span_index"]
        docs = sorted((d for d in tables["span_documents"] if d["span_index"] == i), key=lambda d: d["position"])
        grouped: list[dict] = []
        by_pos: dict[int, dict] = {}
        for d in docs:
            row = dict(source=d["source"], doc_id=d["doc_id"], title=d["title"], bucket=d["bucket"],
                       relevance_norm=round(d["relevance_norm"], 4), blocked=d["blocked"], snippet=d["snippet"],
                       repeated=1, same_text_doc_ids=[])
            first = d.get("repeat_of")
            if first is not None and first in by_pos:
                by_pos[first]["repeated"] += 1
                by_pos[first]["same_text_doc_ids"].append(d["doc_id"])
                continue
            by_pos[d["position"]] = row
            grouped.append(row)
        spans.append(dict(
            span_index=i, text=s["text"], start_token=s["start_token"], end_token=s["end_token"], count=s["count"],
            sources={x["source"]: x["count"] for x in tables["span_sources"] if x["span_index"] == i and x["count"] > 0},
            top_expert_source=s["top_expert_source"], top_expert_by=s.get("top_expert_by"),
            experts=[dict(source=e["source"], routing_share=round(e["routing_share"], 4),
                          counterfactual=None if e["counterfactual"] is None else round(e["counterfactual"], 4),
                          active=e["active"]) for e in tables["span_experts"] if e["span_index"] == i],
            documents=grouped))
    return dict(trace_id=trace_id, created_at=str(t["created_at"]), prompt=t["prompt"], response=t["response"],
                model=t["model"], sources_searched=list(t["sources_searched"]), experts_off=list(t["experts_off"]),
                spans=spans)


def report_csv(rep: dict) -> str:
    """The report as CSV: one row per (span, distinct document text); a span without documents
    has one row with empty document columns."""
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    w.writeheader()
    for s in rep["spans"]:
        base = dict(trace_id=rep["trace_id"], span_index=s["span_index"], span_text=s["text"], span_count=s["count"],
                    sources=";".join(f"{k}:{v}" for k, v in s["sources"].items()),
                    top_expert_source=s["top_expert_source"] or "", top_expert_by=s["top_expert_by"] or "")
        for d in s["documents"] or [{}]:
            row = dict(base, **{k: d.get(k, "") for k in ("source", "doc_id", "title", "bucket", "relevance_norm",
                                                           "blocked", "repeated", "snippet")})
            row["same_text_doc_ids"] = ";".join(d.get("same_text_doc_ids", []))
            w.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()
