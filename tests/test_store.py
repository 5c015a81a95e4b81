"""The provenance store under readers and faults: real DuckDB, real Parquet parts, a real tracer
on a tiny federation (indexes only: these tests need no model).

    .venv/bin/python -m pytest tests/test_store.py -x -q
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest_model import build_federation
from typer.testing import CliRunner

from cli.main import app
from flexolmo.base import sources
from flexolmo.base.errors import ConflictError, InputError
from index import takedown as td
from index.build import build_source
from tracing.provenance import governance, parts, store
from tracing.provenance import queries
from tracing.trace import Tracer

NAMES = ("public", "news", "code")

READER = textwrap.dedent("""
    # A hostile analyst: holds a connection to the store open and queries it in a loop,
    # as a notebook would, until the stop file appears; reports what it saw.
    import json, sys, time
    from pathlib import Path
    from flexolmo.base.workspace import Workspace
    from tracing.provenance import store
    ws, stop, out = Workspace(Path(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
    ok = errors = 0
    last = None
    while not stop.exists():
        try:
            with store.reader(ws, sandbox=False) as con:
                for _ in range(5):
                    last = con.execute("SELECT count(*) FROM traces").fetchone()[0]
                    con.execute("SELECT * FROM span_documents").fetchall()
                    ok += 1
                    time.sleep(0.02)
        except Exception as e:  # a compaction between manifest and read: reopen
            errors += 1
            print(repr(e), file=sys.stderr)
    out.write_text(json.dumps({"ok": ok, "errors": errors, "last": last}))
""")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    ws = build_federation(tmp_path_factory.mktemp("store"), sources=NAMES, n_docs=30)
    for s in NAMES:
        build_source(ws, s)
    return ws


@pytest.fixture(scope="module")
def tracer(fed) -> Tracer:
    return Tracer.open(fed, model=None)


def _doc(ws, source: str, i: int) -> dict:
    return sources.load_documents(ws, source, split="train").to_pylist()[i]


def _passage(ws, source: str, i: int) -> str:
    return " " + " ".join(_doc(ws, source, i)["text"].split(" ")[4:26])


def _raw_rows(ws, doc_id: str) -> list[dict]:
    """Every span_documents row of `doc_id` in every Parquet file under traces/, read directly."""
    rows = []
    for f in parts.root(ws).rglob("span_documents.parquet"):
        rows += [r for r in pq.read_table(f).to_pylist() if r["doc_id"] == doc_id]
    return rows


class Reader:
    """A concurrent reader process holding the store (started once the store exists)."""

    def __init__(self, ws, tmp: Path):
        self.stop, self.out = tmp / "stop", tmp / "reader.json"
        self.proc = subprocess.Popen([sys.executable, "-c", READER, str(ws.root), str(self.stop), str(self.out)],
                                     stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)  # imported and reading

    def finish(self) -> dict:
        self.stop.touch()
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return json.loads(self.out.read_text())


def test_traces_succeed_while_a_reader_holds_the_store(fed, tracer, tmp_path):
    tracer.trace(_passage(fed, "code", 1))  # the store exists
    before = queries.query(fed, "SELECT count(*) FROM traces").rows[0][0]
    reader = Reader(fed, tmp_path)
    ids = [tracer.trace(_passage(fed, src, i)).trace_id for i in range(6) for src in ("news", "code")]
    seen = reader.finish()
    assert seen["ok"] > 10 and seen["errors"] == 0 and seen["last"] >= before
    rows = queries.query(fed, "SELECT trace_id, count(*) FROM traces GROUP BY 1").rows
    counts = dict(rows)
    assert all(counts.get(i) == 1 for i in ids) and len(rows) == before + len(ids)


def test_takedown_while_a_reader_holds_the_store_redacts_every_stored_row(fed, tracer, tmp_path):
    doc = _doc(fed, "news", 6)
    t = tracer.trace(_passage(fed, "news", 6))
    assert any(r["snippet"] for r in _raw_rows(fed, doc["doc_id"]))
    reader = Reader(fed, tmp_path)
    governance.takedown(fed, "news", doc["doc_id"], reason="owner request", by="news-owner")
    reader.finish()
    rows = _raw_rows(fed, doc["doc_id"])
    assert rows and all(r["blocked"] and r["snippet"] is None and r["title"] is None for r in rows)
    stored = queries.trace_rows(fed, t.trace_id)["span_documents"]
    assert doc["text"][20:60] not in json.dumps(stored.rows, default=str)
    with pytest.raises(ConflictError, match="already taken down"):  # whole: a repeat is refused
        governance.takedown(fed, "news", doc["doc_id"], reason="again")


def test_half_applied_takedown_is_finished_by_a_retry_a_reader_or_repair(fed, tracer):
    docs = [_doc(fed, "code", i) for i in (10, 11, 12)]
    for i in (10, 11, 12):
        tracer.trace(_passage(fed, "code", i))
    # a crash between the catalog and the store: the takedown is recorded, the store untouched
    for d in docs:
        td.takedown(fed, "code", d["doc_id"], reason="owner request")
        assert any(r["snippet"] for r in _raw_rows(fed, d["doc_id"]))
    # 1. the retry finishes it (not refused), and the takedown comes back as recorded
    t = governance.takedown(fed, "code", docs[0]["doc_id"], reason="retry")
    assert t.doc_id == docs[0]["doc_id"] and t.reason == "owner request"
    # ... and every pending one with it: the store agrees with the catalog as a whole
    assert all(not r["snippet"] for d in docs for r in _raw_rows(fed, d["doc_id"]))


def test_the_catalog_is_read_once_per_change_and_a_takedown_still_reaches_the_next_stored_trace(fed, tracer,
                                                                                               monkeypatch):
    """Storing a trace reads the catalog's redactions only when its files changed (and were not
    written within a clock tick's doubt): a takedown recorded after a cached read still
    redacts the next stored trace, settled or not."""
    from index import catalog as index_catalog
    from test_trace import _settle

    reads = []
    real = index_catalog.list_takedowns
    def counted(ws, *source):  # the store reads every source's (one argument); a takedown, its source's
        if not source:
            reads.append(1)
        return real(ws, *source)

    monkeypatch.setattr(index_catalog, "list_takedowns", counted)
    _settle(fed)
    for i in (14, 15, 16):
        tracer.trace(_passage(fed, "news", i))
    assert len(reads) == 1, reads  # the first save read the catalog, the next two its stamp only
    doc = _doc(fed, "news", 17)
    td.takedown(fed, "news", doc["doc_id"], reason="after a cached read")
    t = tracer.trace(_passage(fed, "news", 17))  # just written: the catalog is read
    assert len(reads) == 2 and all(not r["snippet"] for r in _raw_rows(fed, doc["doc_id"])), t.trace_id
    doc = _doc(fed, "news", 18)
    td.takedown(fed, "news", doc["doc_id"], reason="settled before the next save")
    _settle(fed)
    tracer.trace(_passage(fed, "news", 18))
    assert len(reads) == 3 and all(not r["snippet"] for r in _raw_rows(fed, doc["doc_id"]))


def test_pending_redaction_is_applied_before_any_read_or_by_repair(fed, tracer):
    a, b = _doc(fed, "public", 3), _doc(fed, "public", 4)
    tracer.trace(_passage(fed, "public", 3))
    tracer.trace(_passage(fed, "public", 4))
    td.takedown(fed, "public", a["doc_id"], reason="x")  # recorded, store not yet redacted
    res = queries.query(fed, f"SELECT count(*) FROM span_documents WHERE doc_id = '{a['doc_id']}' AND snippet IS NOT NULL")
    assert res.rows[0][0] == 0  # the reader finished it first
    td.takedown(fed, "public", b["doc_id"], reason="x")
    r = CliRunner().invoke(app, ["--workspace", str(fed.root), "traces", "repair", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["rows_redacted"] >= 1 and report["redactions"] >= 2
    assert all(not x["snippet"] for x in _raw_rows(fed, b["doc_id"]))


def test_trace_computed_before_a_takedown_is_redacted_when_stored(fed):
    doc = _doc(fed, "news", 9)
    stale = Tracer.open(fed, model=None)
    t = stale.trace(_passage(fed, "news", 9), store=False)  # computed with the text
    assert any(d.snippet for s in t.spans for d in s.documents if d.doc_id == doc["doc_id"])
    governance.takedown(fed, "news", doc["doc_id"], reason="owner request")
    store.save_trace(fed, t)
    hits = [d for s in t.spans for d in s.documents if d.doc_id == doc["doc_id"]]
    assert hits and all(d.blocked and d.snippet is None and d.context is None for d in hits)
    assert all(r["blocked"] and r["snippet"] is None for r in _raw_rows(fed, doc["doc_id"]))


def test_counts_policy_recorded_but_not_applied_is_applied_and_reapplied(fed, tracer):
    passage = _passage(fed, "code", 20)
    count = "SELECT count(*) FROM span_documents WHERE source = 'code' AND doc_id IS NOT NULL"
    try:
        tracer.trace(passage)
        sources.set_policy(fed, "code", visibility="counts")  # the catalog only (as if crashed)
        assert queries.query(fed, count).rows[0][0] == 0
        sources.set_policy(fed, "code", visibility="full")
        Tracer.open(fed, model=None).trace(passage)
        assert queries.query(fed, count).rows[0][0] > 0  # full again: new traces keep documents
        governance.set_policy(fed, "code", visibility="counts")  # switched back: redacted again
        assert queries.query(fed, count).rows[0][0] == 0
    finally:
        sources.set_policy(fed, "code", visibility="full")


def test_sql_errors_are_clear_and_a_slow_query_is_interrupted(fed):
    with pytest.raises(InputError, match="no SQL statement"):
        queries.query(fed, "-- only a comment")
    with pytest.raises(InputError, match="no SQL statement"):
        queries.query(fed, "   ")
    with pytest.raises(InputError, match="one statement at a time"):
        queries.query(fed, "SELECT 1; SELECT 2")
    with pytest.raises(InputError, match="read-only"):
        queries.query(fed, "CREATE TABLE x (a INT)")
    t0 = time.perf_counter()
    with pytest.raises(queries.QueryTimeout, match="budget"):
        queries.query(fed, "SELECT count(*) FROM range(1000000000) a, range(1000) b WHERE a.range + b.range = 7",
                    timeout_s=0.5)
    assert time.perf_counter() - t0 < 3
    r = CliRunner().invoke(app, ["--workspace", str(fed.root), "query", "/* nothing */"])
    assert r.exit_code == 1 and "no SQL statement" in r.output and "Traceback" not in r.output


def test_export_refuses_to_overwrite_without_force(fed, tmp_path):
    base = ["--workspace", str(fed.root), "traces", "export", "--out"]
    f = tmp_path / "taken"
    f.write_text("keep me")
    r = CliRunner().invoke(app, base + [str(f)])
    assert r.exit_code == 1 and "is a file" in r.output and f.read_text() == "keep me"
    assert CliRunner().invoke(app, base + [str(f), "--force"]).exit_code == 0 and (f / "spans.parquet").exists()
    r = CliRunner().invoke(app, base + [str(f)])
    assert r.exit_code == 1 and "already holds an export" in r.output
    n = queries.query(fed, "SELECT count(*) FROM traces").rows[0][0]
    assert pq.read_table(f / "traces.parquet").num_rows == n


def test_binary_stdin_is_refused_clearly(fed):
    r = CliRunner().invoke(app, ["--workspace", str(fed.root), "trace"], input=b"\xff\xfe\x00\x01binary")
    assert r.exit_code == 1 and "not UTF-8" in r.output and "Traceback" not in r.output


def test_compaction_keeps_every_trace_once(fed, tracer, monkeypatch, tmp_path):
    monkeypatch.setattr(parts, "COMPACT_AT", 3)
    ids = [tracer.trace(_passage(fed, "public", i)).trace_id for i in range(10, 16)]
    m = parts.Manifest.read(parts.root(fed))
    # merged a size tier at a time: no tier holds more than COMPACT_AT parts, and merged parts
    # (4 traces or more) sit in a tier above the newest ones, which the next merge reads alone
    tiers = [parts._tier(p["n"]) for p in m.parts if p["n"] < parts.SMALL_PART]
    assert tiers and max(tiers.count(t) for t in set(tiers)) <= 3 and max(tiers) >= 1, sorted(tiers)
    assert [parts._tier(n) for n in (1, 2, 3, 8, 9, 26, 27)] == [0, 0, 1, 1, 2, 2, 3]
    on_disk = {d.name for d in (parts.root(fed) / "parts").iterdir()}
    assert m.retired and on_disk == {p["id"] for p in m.parts} | {p["id"] for p in m.retired}  # kept for readers
    store.repair(fed)  # no grace: merged-away parts go
    m = parts.Manifest.read(parts.root(fed))
    assert not m.retired and {d.name for d in (parts.root(fed) / "parts").iterdir()} == {p["id"] for p in m.parts}
    rows = dict(queries.query(fed, "SELECT trace_id, count(*) FROM traces GROUP BY 1", limit=None).rows)
    assert all(rows[i] == 1 for i in ids) and set(rows.values()) == {1}


def test_a_merge_apart_lets_writers_commit_and_is_dropped_when_a_redaction_came_meanwhile(fed, tracer, monkeypatch):
    """`compact_apart` (the service's merge) holds the writer lock only to choose and to swap:
    a trace commits while the merged part is written (it would wait out WRITE_WAIT_S and fail
    if the lock were held). A takedown applied meanwhile drops the merge: its parts predate it."""
    monkeypatch.setattr(parts, "COMPACT_AT", 3)
    monkeypatch.setattr(parts, "WRITE_WAIT_S", 2.0)
    r = parts.root(fed)

    def save(i: int) -> str:
        t = tracer.trace(_passage(fed, "public", i), store=False)
        store.save_trace(fed, t, compact=False)
        return t.trace_id

    ids = [save(i) for i in (20, 21, 22, 23)]
    assert parts.overflowing(parts.Manifest.read(r))
    merge, during = parts._merge, []
    monkeypatch.setattr(parts, "_merge", lambda *a: during.append(save(24)) or merge(*a))
    assert parts.compact_apart(fed, store.TABLES) >= 1 and during
    m = parts.Manifest.read(r)
    assert not parts.overflowing(m) and not list((r / "tmp").iterdir())
    rows = dict(queries.query(fed, "SELECT trace_id, count(*) FROM traces GROUP BY 1", limit=None).rows)
    assert all(rows[i] == 1 for i in ids + during)

    ids = [save(i) for i in (25, 26, 27, 28)]  # due again; a takedown lands while it merges
    doc = _doc(fed, "public", 26)
    before = parts.Manifest.read(r).parts
    monkeypatch.setattr(parts, "_merge", lambda *a: governance.takedown(fed, "public", doc["doc_id"],
                                                                        reason="during a merge") and merge(*a))
    assert parts.compact_apart(fed, store.TABLES) == 0
    assert parts.Manifest.read(r).parts == before and not list((r / "tmp").iterdir())
    assert all(not x["snippet"] for x in _raw_rows(fed, doc["doc_id"]))
    monkeypatch.setattr(parts, "_merge", merge)
    assert parts.compact_soon(fed, store.TABLES)  # the next one merges (on its thread)
    deadline = time.monotonic() + 30
    while parts.overflowing(parts.Manifest.read(r)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert all(not x["snippet"] for x in _raw_rows(fed, doc["doc_id"]))


def test_old_duckdb_store_is_imported_and_redacted(tmp_path):
    ws = build_federation(tmp_path / "old", sources=("public", "news"), n_docs=20)
    for s in ("public", "news"):
        build_source(ws, s)
    doc = _doc(ws, "news", 2)
    t = Tracer.open(ws, model=None).trace(_passage(ws, "news", 2), store=False)
    # the store as the DuckDB-file era wrote it (JSON columns, primary keys)
    ws.traces_path.parent.mkdir(parents=True)
    con = duckdb.connect(str(ws.traces_path))
    con.execute(store.SCHEMA.replace("timings_ms        VARCHAR", "timings_ms        JSON")
                .replace("trace_id          VARCHAR NOT NULL,", "trace_id          VARCHAR PRIMARY KEY,"))
    for name, table in store._tables(t).items():
        con.register("x", table)
        con.execute(f"INSERT INTO {name} SELECT * FROM x")
        con.unregister("x")
    con.close()
    td.takedown(ws, "news", doc["doc_id"], reason="taken down while the old store held it")
    report = governance.repair(ws)
    assert report["imported_old_store"] and report["traces"] == 1 and not ws.traces_path.exists()
    rows = queries.trace_rows(ws, t.trace_id)
    assert len(rows["spans"].rows) == len(t.spans)
    assert all(r["blocked"] and r["snippet"] is None for r in _raw_rows(ws, doc["doc_id"]))


def test_parts_from_before_a_column_was_added_still_read_and_compact(fed, tracer, monkeypatch):
    """spans.top_expert_by/top_by_* and span_documents.repeat_of were added later: an old part
    without them reads as NULL there, and compaction merges old and new parts."""
    old = tracer.trace(_passage(fed, "news", 2))
    m = parts.Manifest.read(parts.root(fed))
    part = next(p for p in m.parts if old.trace_id in
                pq.read_table(parts.root(fed) / "parts" / p["id"] / "traces.parquet").column("trace_id").to_pylist())
    new_cols = {"spans": ("top_expert_by", "top_by_routing", "top_by_counterfactual"), "span_documents": ("repeat_of",)}
    for table, cols in new_cols.items():  # rewrite the part as the old schema wrote it
        parts.rewrite_table(parts.root(fed) / "parts" / part["id"] / f"{table}.parquet", lambda t: t.drop_columns(list(cols)))
    new = tracer.trace(_passage(fed, "news", 3))
    q = "SELECT trace_id, count(*), count(top_expert_by) FROM spans WHERE trace_id IN (?, ?) GROUP BY 1"
    with store.reader(fed) as con:
        rows = dict((t, (n, k)) for t, n, k in con.execute(q, [old.trace_id, new.trace_id]).fetchall())
        assert rows[old.trace_id][1] == 0 and rows[old.trace_id][0] >= 1  # no model: no top expert, NULLs
        assert con.execute("SELECT count(repeat_of) FROM span_documents WHERE trace_id = ?", [old.trace_id]).fetchone() == (0,)
    monkeypatch.setattr(parts, "COMPACT_AT", 0)
    with parts.writer(fed) as r:
        parts.compact(r, parts.Manifest.read(r), store.TABLES)
    assert {old.trace_id, new.trace_id} <= {r[0] for r in queries.query(fed, "SELECT trace_id FROM spans").rows}
    assert queries.trace_rows(fed, old.trace_id)["spans"].rows
