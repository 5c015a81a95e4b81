"""Reports over a whole batch: what the model reproduced, from which sources, and what each expert did.

    rep = batch_report(ws, "b0123456789ab")
    rep.sources      # per source: share of responses with a span >= 8 / >= 13 tokens found in it,
                     #             share of response tokens inside such spans
    rep.documents    # the most reproduced documents (spans >= 8 tokens)
    rep.owners       # per expert: routing share and counterfactual drop summed over spans found in
                     #             its own source vs elsewhere
    rep.longest      # the longest-match distribution (one value per response: its longest kept span)
    longest_png(rep, Path("longest.png"))
    export_flagged(ws, batch_id, Path("flagged.jsonl"))   # contamination: the flagged items

Spans are the kept spans of each trace (OLMoTrace's selection, as `flexolmo trace` shows
them); a span "found in" a source is one whose count in that source's index is > 0. Token
shares count a response token once however many qualifying spans cover it.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flexolmo.base.errors import InputError
from flexolmo.base.workspace import Workspace

from .layout import BatchDir

THRESHOLDS = (8, 13)  # ConTAM's n = 8; 13 tokens, the span length OLMoTrace's users read as "long"


@dataclass
class BatchReport:
    batch_id: str
    mode: str
    submitted_by: str
    n_rows: int
    n_done: int
    n_ok: int
    n_errors: int
    errors: list[dict] = field(default_factory=list)  # {reason, rows, example_rows}, most frequent first
    thresholds: tuple[int, ...] = THRESHOLDS
    overall: dict = field(default_factory=dict)  # the per-source figures for "any source"
    sources: list[dict] = field(default_factory=list)
    documents: list[dict] = field(default_factory=list)
    owners: list[dict] = field(default_factory=list)
    longest: dict = field(default_factory=dict)  # {histogram: {length: responses}, mean, p50, p90, max}
    contamination: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def batch_report(ws: Workspace, batch_id: str, *, top_documents: int = 10,
                 thresholds: tuple[int, ...] = THRESHOLDS) -> BatchReport:
    """The report of a batch (complete or not: what has been committed so far)."""
    from flexolmo.base.sources import list_sources

    if not thresholds or any(n < 1 for n in thresholds):
        raise InputError("thresholds are span lengths in tokens, at least 1")
    b = BatchDir.existing(ws, batch_id)
    meta = b.meta()
    first = "items" if meta["mode"] == "contamination" else "responses"
    resp = b.read(first).to_pylist()
    ok = [r for r in resp if r["status"] == "ok"]
    reasons = defaultdict(list)
    for r in resp:
        if r["status"] != "ok":
            reasons[r["error"]].append(r["row"])
    rep = BatchReport(batch_id=batch_id, mode=meta["mode"], submitted_by=meta.get("submitted_by", "operator"),
                      n_rows=meta["n_rows"], n_done=len(resp), n_ok=len(ok), n_errors=len(resp) - len(ok),
                      errors=[{"reason": k, "rows": len(v), "example_rows": v[:5]}
                              for k, v in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0]))][:20],
                      thresholds=tuple(sorted(thresholds)))
    owners = {s.name: s.owner for s in list_sources(ws)}
    if meta["mode"] == "contamination":
        rep.contamination = _contamination(ok, b.read("item_sources").to_pylist(), meta["spec"]["min_match"])
        rep.longest = _distribution([r["longest"] for r in ok])
        return rep
    spans = b.read("spans").to_pylist()
    rep.sources, rep.overall = _reproduction(ok, spans, rep.thresholds, owners)
    rep.documents = _documents(b.read("documents").to_pylist(), spans, min(rep.thresholds), top_documents)
    rep.owners = _owners(b.read("experts").to_pylist(), spans, owners)
    rep.longest = _distribution([r["longest_span"] for r in ok])
    return rep


def _reproduction(ok: list[dict], spans: list[dict], thresholds, owners: dict) -> tuple[list[dict], dict]:
    """Per source (and over any source): responses with a span >= n found in it, tokens inside such spans."""
    traced = {r["row"] for r in ok}
    tokens = sum(r["n_tokens"] for r in ok)
    by_row = defaultdict(list)
    for s in spans:
        if s["row"] in traced:
            by_row[s["row"]].append(s)
    names = sorted({src for s in spans for src in s["sources"]})

    def figures(holds) -> dict:
        out = {}
        for n in thresholds:
            rows = covered = 0
            for ss in by_row.values():
                iv = [(s["start_token"], s["end_token"]) for s in ss if s["n_tokens"] >= n and holds(s)]
                if iv:
                    rows += 1
                    covered += _union(iv)
            out[f"responses_ge_{n}"] = rows
            out[f"share_ge_{n}"] = rows / len(ok) if ok else 0.0
            out[f"token_share_ge_{n}"] = covered / tokens if tokens else 0.0
        return out

    per = [{"source": src, "owner": owners.get(src), **figures(lambda s, src=src: src in s["sources"])} for src in names]
    top = f"share_ge_{thresholds[0]}"
    return sorted(per, key=lambda d: (-d[top], d["source"])), {"source": "any", **figures(lambda s: True)}


def _union(iv: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for a, b in sorted(iv):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _documents(docs: list[dict], spans: list[dict], n: int, top: int) -> list[dict]:
    """The documents most reproduced by spans of >= n tokens: distinct responses, spans, longest span."""
    length = {(s["row"], s["span_index"]): s["n_tokens"] for s in spans}
    agg: dict[tuple, dict] = {}
    for d in docs:
        k = length.get((d["row"], d["span_index"]), 0)
        if k < n or d["doc_id"] is None or d["repeat_of"] is not None:
            continue
        a = agg.setdefault((d["source"], d["doc_id"]), {"source": d["source"], "doc_id": d["doc_id"], "rows": set(),
                                                         "spans": 0, "longest_span": 0, "blocked": d["blocked"]})
        a["rows"].add(d["row"])
        a["spans"] += 1
        a["longest_span"] = max(a["longest_span"], k)
    out = [{**{k: v for k, v in a.items() if k != "rows"}, "responses": len(a["rows"])} for a in agg.values()]
    return sorted(out, key=lambda a: (-a["responses"], -a["spans"], -a["longest_span"], a["source"], a["doc_id"]))[:top]


def _owners(experts: list[dict], spans: list[dict], owners: dict) -> list[dict]:
    """Per expert: its routing share and counterfactual drop summed over the spans found in its own
    source and over the spans found only elsewhere (public: the spans the public source holds)."""
    held = {(s["row"], s["span_index"]): set(s["sources"]) for s in spans}
    acc: dict[str, dict] = {}
    for e in experts:
        a = acc.setdefault(e["source"], {"expert": e["expert"], "source": e["source"], "owner": owners.get(e["source"]),
                                         **{f"{k}_{w}": 0.0 if k != "spans" else 0
                                            for k in ("spans", "routing_share", "counterfactual", "cf_spans")
                                            for w in ("own", "elsewhere")}})
        w = "own" if e["source"] in held.get((e["row"], e["span_index"]), ()) else "elsewhere"
        a[f"spans_{w}"] += 1
        a[f"routing_share_{w}"] += e["routing_share"]
        if e["counterfactual"] is not None:
            a[f"counterfactual_{w}"] += e["counterfactual"]
            a[f"cf_spans_{w}"] += 1
    out = []
    for a in acc.values():
        for w in ("own", "elsewhere"):
            a[f"cf_spans_{w}"] = int(a[f"cf_spans_{w}"])
            a[f"mean_routing_share_{w}"] = a[f"routing_share_{w}"] / a[f"spans_{w}"] if a[f"spans_{w}"] else None
            a[f"mean_counterfactual_{w}"] = (a[f"counterfactual_{w}"] / a[f"cf_spans_{w}"] if a[f"cf_spans_{w}"]
                                             else None)
            if not a[f"cf_spans_{w}"]:
                a[f"counterfactual_{w}"] = None
        out.append(a)
    return sorted(out, key=lambda a: a["expert"])


def _distribution(values: list[int]) -> dict:
    if not values:
        return {"histogram": {}, "n": 0, "mean": None, "p50": None, "p90": None, "max": None}
    v = sorted(values)

    def q(p: float) -> int:
        return v[min(len(v) - 1, round(p * (len(v) - 1)))]

    return {"histogram": {int(k): c for k, c in sorted(Counter(v).items())}, "n": len(v),
            "mean": sum(v) / len(v), "p50": q(0.5), "p90": q(0.9), "max": v[-1]}


def _contamination(ok: list[dict], per_source: list[dict], n: int) -> dict:
    flagged = [r for r in ok if r["flagged"]]
    by_src = Counter(s["source"] for s in per_source if s["longest"] >= n)
    down = Counter(s["source"] for s in per_source if not s["available"])
    return {"min_match": n, "items": len(ok), "flagged": len(flagged),
            "flagged_share": len(flagged) / len(ok) if ok else 0.0,
            "flagged_by_source": dict(sorted(by_src.items())), "unavailable_by_source": dict(sorted(down.items())),
            "flagged_items": [{k: r[k] for k in ("row", "id", "longest", "longest_source", "longest_text")}
                              for r in sorted(flagged, key=lambda r: (-r["longest"], r["row"]))][:50]}


def export_flagged(ws: Workspace, batch_id: str, path: Path) -> tuple[Path, int]:
    """Write a contamination batch's flagged items (row, id, longest, source, text) as JSONL or CSV."""
    import csv

    b = BatchDir.existing(ws, batch_id)
    if b.meta()["mode"] != "contamination":
        raise InputError(f"batch {batch_id} traced responses; flagged items come from `trace-batch --contamination`")
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise InputError(f"write the flagged items to a .jsonl or .csv file, not {path.name!r}")
    rows = [{k: r[k] for k in ("row", "id", "longest", "longest_source", "longest_text")}
            for r in b.read("items").to_pylist() if r["status"] == "ok" and r["flagged"]]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        if path.suffix.lower() == ".csv":
            w = csv.DictWriter(fh, fieldnames=["row", "id", "longest", "longest_source", "longest_text"])
            w.writeheader()
            w.writerows(rows)
        else:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp.replace(path)
    return path, len(rows)


def longest_png(rep: BatchReport, path: Path) -> Path:
    """The longest-match distribution as a histogram, with the thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"the plot is a PNG: give a path ending in .png, not {path.name!r}")
    hist = {int(k): v for k, v in rep.longest.get("histogram", {}).items()}
    fig, ax = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    if hist:
        ax.bar(list(hist), list(hist.values()), width=0.9, color="#3a7bd5")
    for n in rep.thresholds if rep.mode != "contamination" else (rep.contamination.get("min_match", 8),):
        ax.axvline(n - 0.5, color="#e07b39", linestyle="--", linewidth=1)
        ax.text(n - 0.4, ax.get_ylim()[1] * 0.92, f">= {n}", color="#e07b39", fontsize=8)
    what = "item" if rep.mode == "contamination" else "response"
    ax.set_xlabel(f"longest verbatim match per {what} (tokens)")
    ax.set_ylabel(f"{what}s")
    ax.set_title(f"batch {rep.batch_id}: {rep.n_ok:,} {what}s")
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
