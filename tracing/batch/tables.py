"""A batch's result tables, defined once: the committer writes them, the reports read them.

    responses  one row per input row: status, error, tokens, spans, longest span, sources hit, top experts
    spans      one row per kept span: tokens, text, count, the sources holding it, top expert
    documents  one row per retrieved document of a span: source, doc_id, blocked, relevance
    experts    one row per (span, expert): routing share, counterfactual drop
    items, item_sources   the contamination mode's: per benchmark item, its longest match per source

The documents table holds no document text (no snippet, no title): the provenance store holds
those and redacts them when an owner takes a document down; a batch's Parquet must not keep a
copy outside its reach.

The tracer's output per row is plain JSON (a trace's `to_dict`), so that a local worker and
a Ray actor hand back the same thing; `trace_from_dict` rebuilds the `Trace` for the store.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa

from ..results import DocHit, ExpertLink, Span, SpanGroup, Trace

TRACE_TABLES = ("responses", "spans", "documents", "experts")
CONTAMINATION_TABLES = ("items", "item_sources")
# the columns of the tracer's output batch (tracer.py), one value per input row
OUTPUT_COLUMNS = ("row", "id", "status", "error", "trace_id", "result")

_KEY = [("row", pa.int64()), ("id", pa.string())]
SCHEMAS: dict[str, pa.Schema] = {
    "responses": pa.schema(_KEY + [
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),  # why the row was not traced (null: ok)
        ("trace_id", pa.string()),  # in the provenance store
        ("prompt", pa.string()), ("response", pa.string()), ("generated", pa.bool_()),
        ("n_tokens", pa.int32()), ("n_spans", pa.int32()),
        ("longest_span", pa.int32()),  # tokens of the longest kept span (0: none)
        ("longest_span_text", pa.string()),
        ("sources_hit", pa.list_(pa.string())),  # sources holding at least one kept span
        ("top_experts", pa.list_(pa.string())),  # the spans' top experts' sources, most frequent first
        ("trace_ms", pa.float64())]),
    "spans": pa.schema(_KEY + [
        ("trace_id", pa.string()), ("span_index", pa.int32()), ("start_token", pa.int32()), ("end_token", pa.int32()),
        ("n_tokens", pa.int32()), ("char_start", pa.int32()), ("char_end", pa.int32()), ("text", pa.string()),
        ("count", pa.int64()), ("sources", pa.list_(pa.string())), ("source_counts", pa.list_(pa.int64())),
        ("unigram_logprob_sum", pa.float64()), ("top_expert_source", pa.string()), ("top_expert_by", pa.string()),
        ("agreement", pa.bool_())]),
    "documents": pa.schema(_KEY + [
        ("trace_id", pa.string()), ("span_index", pa.int32()), ("position", pa.int32()), ("source", pa.string()),
        ("doc_id", pa.string()), ("token_offset", pa.int64()), ("blocked", pa.bool_()), ("relevance", pa.float64()),
        ("bucket", pa.string()), ("repeat_of", pa.int32())]),
    "experts": pa.schema(_KEY + [
        ("trace_id", pa.string()), ("span_index", pa.int32()), ("expert", pa.int32()), ("source", pa.string()),
        ("routing_share", pa.float64()), ("counterfactual", pa.float64()), ("active", pa.bool_())]),
    "items": pa.schema(_KEY + [
        ("status", pa.string()), ("error", pa.string()), ("n_tokens", pa.int32()),
        ("longest", pa.int32()),  # the longest verbatim match over the sources, in tokens
        ("longest_source", pa.string()), ("longest_text", pa.string()), ("flagged", pa.bool_())]),
    "item_sources": pa.schema(_KEY + [
        ("source", pa.string()), ("longest", pa.int32()), ("count", pa.int64()),  # occurrences of that match
        ("available", pa.bool_())]),  # False: the source did not answer (an owner node down)
}


def trace_from_dict(d: dict) -> Trace:
    """The `Trace` whose `to_dict()` gave `d` (JSON-decoded)."""
    spans = []
    for s in d["spans"]:
        s = {k: v for k, v in s.items() if k != "sources"}  # a property, added by to_dict
        docs = [DocHit(**{**h, "snippet_span": _tuple(h["snippet_span"]), "context_span": _tuple(h["context_span"])})
                for h in s.pop("documents")]
        experts = [ExpertLink(**e) for e in s.pop("experts")]
        spans.append(Span(**s, documents=docs, experts=experts))
    groups = [SpanGroup(**g) for g in d["groups"]]
    return Trace(**{**d, "spans": spans, "groups": groups})


def _tuple(v):
    return None if v is None else tuple(v)


def tables_of(mode: str, out: dict, traces: dict[int, Trace] | None = None) -> dict[str, pa.Table]:
    """The result tables of one output batch of the tracer (`OUTPUT_COLUMNS`).

    :param traces: row -> the trace of each ok row (already redacted by the store); None: decoded here
    """
    n = len(out["row"])
    rows = [{k: _py(out[k][i]) for k in OUTPUT_COLUMNS} for i in range(n)]
    acc: dict[str, list[dict]] = {t: [] for t in (CONTAMINATION_TABLES if mode == "contamination" else TRACE_TABLES)}
    for r in rows:
        key = {"row": int(r["row"]), "id": r["id"]}
        if mode == "contamination":
            _item_rows(acc, key, r)
            continue
        if r["status"] != "ok":
            acc["responses"].append({**key, "status": "error", "error": r["error"]})
            continue
        t = (traces or {}).get(key["row"]) or trace_from_dict(json.loads(r["result"]))
        _trace_rows(acc, key, t)
    return {name: pa.Table.from_pylist(v, schema=SCHEMAS[name]) for name, v in acc.items()}


def _py(v):
    return v.item() if hasattr(v, "item") else v


def _trace_rows(acc: dict[str, list[dict]], key: dict, t: Trace) -> None:
    longest = max(t.spans, key=lambda s: s.end - s.start, default=None)
    tops = Counter(s.experts[s.top_expert].source for s in t.spans if s.top_expert is not None and s.experts)
    hit = sorted({src for s in t.spans for src in s.sources})
    acc["responses"].append({
        **key, "status": "ok", "error": None, "trace_id": t.trace_id, "prompt": t.prompt, "response": t.response,
        "generated": t.generated, "n_tokens": t.n_tokens, "n_spans": len(t.spans),
        "longest_span": 0 if longest is None else longest.end - longest.start,
        "longest_span_text": None if longest is None else longest.text, "sources_hit": hit,
        "top_experts": [src for src, _ in sorted(tops.items(), key=lambda kv: (-kv[1], kv[0]))],
        "trace_ms": t.timings_ms.get("total")})
    ids = {**key, "trace_id": t.trace_id}
    for s in t.spans:
        held = [(src, c) for src, c in s.count_by_source.items() if c > 0]
        acc["spans"].append({
            **ids, "span_index": s.index, "start_token": s.start, "end_token": s.end, "n_tokens": s.end - s.start,
            "char_start": s.char_start, "char_end": s.char_end, "text": s.text, "count": s.count,
            "sources": [a for a, _ in held], "source_counts": [c for _, c in held],
            "unigram_logprob_sum": s.unigram_logprob_sum,
            "top_expert_source": s.experts[s.top_expert].source if s.top_expert is not None and s.experts else None,
            "top_expert_by": s.top_expert_by, "agreement": s.agreement})
        acc["documents"] += [{**ids, "span_index": s.index, "position": i, "source": d.source, "doc_id": d.doc_id,
                              "token_offset": d.token_offset, "blocked": d.blocked, "relevance": d.relevance,
                              "bucket": d.bucket, "repeat_of": d.repeat_of} for i, d in enumerate(s.documents)]
        acc["experts"] += [{**ids, "span_index": s.index, "expert": e.expert, "source": e.source,
                            "routing_share": e.routing_share, "counterfactual": e.counterfactual, "active": e.active}
                           for e in s.experts]


def _item_rows(acc: dict[str, list[dict]], key: dict, r: dict) -> None:
    if r["status"] != "ok":
        acc["items"].append({**key, "status": "error", "error": r["error"]})
        return
    m = json.loads(r["result"])
    acc["items"].append({**key, "status": "ok", "error": None, "n_tokens": m["n_tokens"], "longest": m["longest"],
                         "longest_source": m["longest_source"], "longest_text": m["longest_text"],
                         "flagged": m["flagged"]})
    acc["item_sources"] += [{**key, **s} for s in m["sources"]]
