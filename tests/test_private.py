"""Stored traces are private: each read route shows a caller its own traces (its key, or the
capability token returned with its trace), all of them to an analyst or admin key, and to an
owner key also its sources' span rows; the SQL route cannot reach rows outside the caller's
tables. In-process TestClient over a tiny federation (indexes, no model: tracing is fast).

    .venv/bin/python -m pytest tests/test_private.py -q
"""

from __future__ import annotations

import json
import shutil
from typing import Iterator

import pyarrow.parquet as pq
import pytest
from conftest_model import build_federation
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.app import create_app
from cli.main import app as cli
from flexolmo.base import sources
from flexolmo.base.workspace import Workspace
from index.build import build_source
from index.keys import KeyStore
from tracing.provenance import parts, queries, store
from tracing.provenance.access import OPERATOR, TOKEN_HEADER, TOKEN_RE, Caller, token_owner
from tracing.trace import Tracer

NAMES = ("public", "news", "code")
SECRET = " and my unpublished draft says qwertyuiop zxcvbnm"  # in no source: only the response holds it


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Workspace:
    ws = build_federation(tmp_path_factory.mktemp("private"), sources=NAMES, n_docs=30)
    for s in NAMES:
        build_source(ws, s)
    return ws


@pytest.fixture(scope="module")
def client(fed) -> Iterator[TestClient]:
    with TestClient(create_app(fed)) as c:
        yield c


@pytest.fixture(scope="module")
def keys(fed) -> dict[str, str]:
    ks = KeyStore.for_workspace(fed)
    return {"analyst": ks.create("audit team", "analyst")[1], "news": ks.create("news-owner", "owner")[1],
            "tracer": ks.create("news-owner", "index")[1], "admin": ks.ensure_admin()[1]}


def _passage(ws, source: str, i: int) -> str:
    text = sources.load_documents(ws, source, split="train").to_pylist()[i]["text"]
    return " " + " ".join(text.split(" ")[3:24])


def _as(token: str | None = None, key: str | None = None) -> dict[str, str]:
    return {**({TOKEN_HEADER: token} if token else {}), **({"Authorization": f"Bearer {key}"} if key else {})}


def _trace(client, text: str, **who) -> tuple[dict, str | None]:
    store_it = who.pop("store", True)
    r = client.post("/api/trace", json={"text": text, "store": store_it}, headers=_as(**who))
    assert r.status_code == 200, r.text
    return r.json(), r.headers.get(TOKEN_HEADER)


def _ids(client, level: str = "traces", **who) -> set[str]:
    r = client.get("/api/traces", params={"level": level}, headers=_as(**who))
    assert r.status_code == 200, r.text
    return {row[0] for row in r.json()["rows"]}


def _sql(client, sql: str, **who):
    return client.post("/api/query", json={"sql": sql}, headers=_as(**who))


def _rows(r) -> list[list]:
    assert r.status_code == 200, r.text
    return r.json()["rows"]


@pytest.fixture(scope="module")
def two(client, fed) -> dict:
    """Two clients without keys, each with its own stored trace (a news and a code passage)."""
    a, tok_a = _trace(client, _passage(fed, "news", 3) + SECRET)
    b, tok_b = _trace(client, _passage(fed, "code", 3))
    return {"a": a, "b": b, "tok_a": tok_a, "tok_b": tok_b}


def test_each_client_without_a_key_reads_only_its_own_traces_through_every_route(client, fed, two):
    a, b, tok_a, tok_b = two["a"], two["b"], two["tok_a"], two["tok_b"]
    assert TOKEN_RE.match(tok_a) and TOKEN_RE.match(tok_b) and tok_a != tok_b
    # the same token again: the client's second trace is its own too, and the token comes back unchanged
    a2, again = _trace(client, _passage(fed, "news", 5), token=tok_a)
    assert again == tok_a
    for mine, other, tok in (({a["trace_id"], a2["trace_id"]}, b, tok_a), ({b["trace_id"]}, a, tok_b)):
        for level in ("traces", "spans", "documents"):
            seen = _ids(client, level, token=tok)
            assert seen <= mine and other["trace_id"] not in seen, level
        assert _ids(client, token=tok) == mine
        assert {r[0] for r in _rows(_sql(client, "SELECT trace_id FROM traces", token=tok))} == mine
        assert {r[0] for r in _rows(_sql(client, "SELECT DISTINCT trace_id FROM span_documents", token=tok))} <= mine
        for t in mine:
            r = client.get(f"/api/traces/{t}", headers=_as(token=tok))
            assert r.status_code == 200 and len(r.json()["tables"]["traces"]["rows"]) == 1
            assert client.get(f"/api/traces/{t}/report", headers=_as(token=tok)).json()["trace_id"] == t
        # another's trace is "not found", as one that never existed: no route tells it exists
        for path in (f"/api/traces/{other['trace_id']}", f"/api/traces/{other['trace_id']}/report",
                     f"/api/traces/{other['trace_id']}/report?format=csv"):
            r = client.get(path, headers=_as(token=tok))
            assert r.status_code == 404 and other["response"][:30] not in r.text, path
        r = _sql(client, "SELECT response FROM traces", token=tok)
        assert other["response"] not in json.dumps(r.json())
    # no token, no key: nothing to read (and a new token is not handed out on a read)
    r = client.get("/api/traces")
    assert r.status_code == 200 and r.json()["rows"] == [] and TOKEN_HEADER not in r.headers
    assert _rows(_sql(client, "SELECT count(*) FROM traces UNION ALL SELECT count(*) FROM span_documents")) == [[0], [0]]
    # a made-up token is refused clearly; a key that is not valid is 401, not read as "no key"
    r = client.get("/api/traces", headers={TOKEN_HEADER: "let-me-in"})
    assert r.status_code == 400 and TOKEN_HEADER in r.json()["detail"]
    r = client.get("/api/traces", headers={"Authorization": "Bearer flx_00000000_" + "x" * 43})
    assert r.status_code == 401 and "not valid" in r.json()["detail"]


def test_analyst_and_admin_keys_read_every_trace_a_tracer_key_its_own(client, fed, keys, two):
    both = {two["a"]["trace_id"], two["b"]["trace_id"]}
    for k in ("analyst", "admin"):
        assert both <= _ids(client, key=keys[k]) and both <= _ids(client, "documents", key=keys[k])
        assert both <= {r[0] for r in _rows(_sql(client, "SELECT trace_id FROM traces", key=keys[k]))}
        assert client.get(f"/api/traces/{two['b']['trace_id']}/report", headers=_as(key=keys[k])).status_code == 200
    # a key's traces are its key's: no token is handed out, and another key does not see them
    t, tok = _trace(client, _passage(fed, "code", 7), key=keys["tracer"])
    assert tok is None
    assert _ids(client, key=keys["tracer"]) == {t["trace_id"]}
    assert t["trace_id"] not in _ids(client, token=two["tok_a"]) and t["trace_id"] in _ids(client, key=keys["analyst"])
    owner = _rows(_sql(client, f"SELECT owner FROM traces WHERE trace_id = '{t['trace_id']}'", key=keys["analyst"]))
    assert owner[0][0].startswith("key:") and owner[0][0][4:] in keys["tracer"]


def test_an_owner_key_reads_its_sources_rows_and_never_others_responses(client, fed, keys, two):
    a = two["a"]  # a news passage, traced by a client without a key
    assert any(s["count_by_source"].get("news", 0) > 0 for s in a["spans"])
    k = keys["news"]
    r = client.get(f"/api/traces/{a['trace_id']}", headers=_as(key=k))
    assert r.status_code == 200, r.text
    tables = r.json()["tables"]
    assert tables["traces"]["rows"] == [] and tables["spans"]["rows"] == [] and tables["span_experts"]["rows"] == []
    src = {t: {row[tables[t]["columns"].index("source")] for row in tables[t]["rows"]}
           for t in ("span_sources", "span_documents")}
    assert src["span_sources"] == {"news"} and src["span_documents"] == {"news"}
    assert "qwertyuiop" not in r.text and "unpublished" not in r.text
    # the report is the response's provenance: not the owner's to read
    assert client.get(f"/api/traces/{a['trace_id']}/report", headers=_as(key=k)).status_code == 404
    # listings: no trace or span of another; its source's documents, without span text or date
    assert a["trace_id"] not in _ids(client, key=k) | _ids(client, "spans", key=k)
    docs = client.get("/api/traces", params={"level": "documents"}, headers=_as(key=k)).json()
    col = docs["columns"].index
    theirs = [row for row in docs["rows"] if row[0] == a["trace_id"]]
    assert theirs and all(row[col("source")] == "news" and row[col("span_text")] is None for row in theirs)
    # SQL: the same rows, nothing else
    assert _rows(_sql(client, "SELECT count(*) FROM traces UNION ALL SELECT count(*) FROM spans", key=k)) == [[0], [0]]
    assert {r[0] for r in _rows(_sql(client, "SELECT DISTINCT source FROM span_sources", key=k))} == {"news"}
    assert _rows(_sql(client, f"SELECT count(*) FROM span_sources WHERE trace_id = '{two['b']['trace_id']}' "
                              "AND source <> 'news'", key=k)) == [[0]]


def test_store_false_keeps_nothing(client, fed, keys):
    def count():
        return _rows(_sql(client, "SELECT count(*) FROM traces", key=keys["admin"]))[0][0]

    before = count()
    t, tok = _trace(client, _passage(fed, "news", 9), store=False)
    assert t["spans"] and tok is None  # traced and answered, nothing to read back
    assert count() == before
    assert client.get(f"/api/traces/{t['trace_id']}", headers=_as(key=keys["admin"])).status_code == 404
    for table in store.TABLES:
        n = _rows(_sql(client, f"SELECT count(*) FROM {table} WHERE trace_id = '{t['trace_id']}'", key=keys["admin"]))
        assert n == [[0]], table


ESCAPES = [
    "SELECT a.trace_id, a.response FROM traces a CROSS JOIN traces b",
    "SELECT * FROM spans s FULL OUTER JOIN span_experts e USING (trace_id)",
    "SELECT (SELECT string_agg(response, '|') FROM traces) AS r",
    "SELECT * FROM span_documents WHERE trace_id IN (SELECT trace_id FROM span_documents)",
    "WITH RECURSIVE x(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM x WHERE n < 3) SELECT t.* FROM x, traces t",
    "WITH t AS (SELECT * FROM traces) SELECT * FROM t",
    "SELECT * FROM information_schema.tables",
    "SELECT table_name, column_name FROM information_schema.columns",
    "SELECT * FROM information_schema.views",
    "SELECT * FROM duckdb_tables()",
    "SELECT * FROM duckdb_views()",
    "SELECT * FROM duckdb_databases()",
    "SELECT * FROM duckdb_columns()",
    "SELECT name, value FROM duckdb_settings() WHERE name IN ('allowed_directories', 'enable_external_access')",
    "SELECT * FROM _all_traces",
    "SELECT * FROM query_table('traces')",
    "SELECT * FROM query('SELECT * FROM traces')",
    "SELECT * FROM read_parquet('{parts}/*/traces.parquet')",
    "SELECT * FROM parquet_scan('{parts}/*/span_documents.parquet')",
    "SELECT * FROM parquet_metadata('{parts}/*/traces.parquet')",
    "SELECT * FROM '{parts}/*/traces.parquet'",
    "SELECT * FROM glob('{parts}/*')",
    "SELECT * FROM glob('/proc/self/fd/*')",
    "SELECT * FROM read_text('{root}/manifest.json')",
    "SELECT * FROM read_csv_auto('{root}/manifest.json')",
    "SELECT * FROM read_blob('{parts}/*/traces.parquet')",
    "ATTACH '{ws}/catalog.duckdb' AS c",
    "ATTACH ':memory:' AS m",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "RESET lock_configuration",
    "PRAGMA show_tables",
    "CALL pragma_table_info('traces')",
    "COPY traces TO '{ws}/leak.csv'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "EXPORT DATABASE '{ws}/leak'",
    "SUMMARIZE traces",
    "DESCRIBE SELECT * FROM traces",
    "SHOW ALL TABLES",
    "EXPLAIN SELECT * FROM traces",
    "EXPLAIN ANALYZE SELECT * FROM traces",
    "SELECT current_setting('allowed_directories')",
]


def test_the_sql_route_cannot_escape_the_callers_tables(client, fed, two):
    """A client with a token of its own (no trace yet) tries every way out: each is refused (400)
    or answers without a row, a response, a trace id or a file path of anyone else."""
    secrets_ = [two["a"]["trace_id"], two["b"]["trace_id"], two["a"]["response"][5:40], two["b"]["response"][5:40],
                token_owner(two["tok_a"]), token_owner(two["tok_b"]), ".parquet", "/parts"]
    _, mine = _trace(client, " zzqx unfound words only here", store=True)
    root = parts.root(fed)
    refused = 0
    for sql in ESCAPES:
        q = sql.format(parts=root / "parts", root=root, ws=fed.root)
        r = _sql(client, q, token=mine)
        assert r.status_code in (200, 400), (q, r.status_code, r.text)
        if r.status_code == 400:
            refused += 1
            continue
        text = json.dumps(r.json())
        assert not any(s in text for s in secrets_), (q, text[:500])
    assert refused >= 20  # the file functions, ATTACH, SET, PRAGMA, COPY, ...
    assert not (fed.root / "leak.csv").exists() and not (fed.root / "leak").exists()
    # what it may read, it reads: its own trace, in the five tables of the store
    assert _rows(_sql(client, "SELECT count(*) FROM traces", token=mine)) == [[1]]
    shown = {r[0] for r in _rows(_sql(client, "SELECT table_name FROM information_schema.tables", token=mine))}
    assert shown == set(store.TABLES)


def test_traces_without_an_owner_are_for_analysts_and_the_cli_reads_everything(client, fed, keys, two, tmp_path):
    # a trace made on the workspace (the operator's CLI) has no owner
    t = Tracer.open(fed, model=None).trace(_passage(fed, "news", 11))
    assert t.trace_id in _ids(client, key=keys["analyst"])
    assert client.get(f"/api/traces/{t.trace_id}", headers=_as(token=two["tok_a"])).status_code == 404
    res = CliRunner().invoke(cli, ["-w", str(fed.root), "query", "SELECT count(DISTINCT trace_id) FROM traces"])
    n_all = _rows(_sql(client, "SELECT count(*) FROM traces", key=keys["admin"]))[0][0]
    assert res.exit_code == 0 and str(n_all) in res.output and n_all >= 4
    res = CliRunner().invoke(cli, ["-w", str(fed.root), "traces", "list", "--json"])
    assert res.exit_code == 0 and two["a"]["trace_id"] in res.output and two["b"]["trace_id"] in res.output

    # parts written before traces had owners (no `owner` column in any part) still read:
    # analysts and the operator read every trace, a token reads none
    old = Workspace(tmp_path / "old")
    shutil.copytree(fed.root, old.root)
    r = parts.root(old)
    for p in parts.Manifest.read(r).parts:
        parts.rewrite_table(r / "parts" / p["id"] / "traces.parquet", lambda tb: tb.drop_columns(["owner"]))
    assert all("owner" not in pq.read_schema(r / "parts" / p["id"] / "traces.parquet").names
               for p in parts.Manifest.read(r).parts)
    analyst = Caller.for_request(old, KeyStore.for_workspace(old).verify(keys["analyst"]), None)
    assert queries.query(old, "SELECT count(*), count(owner) FROM traces", caller=analyst).rows == [(n_all, 0)]
    assert queries.query(old, "SELECT count(*) FROM traces", caller=OPERATOR).rows == [(n_all,)]
    token = Caller.for_request(old, None, two["tok_a"])
    assert queries.query(old, "SELECT count(*) FROM traces", caller=token).rows == [(0,)]
    assert queries.trace_rows(old, two["a"]["trace_id"], caller=analyst)["traces"].rows


def test_new_scope_is_issued_by_the_admin_and_the_cli(client, fed, keys, two):
    r = client.post("/api/keys", json={"owner": "audit", "scope": "analyst"}, headers=_as(key=keys["admin"]))
    assert r.status_code == 201 and r.json()["scope"] == "analyst"
    assert client.get("/api/traces", headers=_as(key=r.json()["key"])).status_code == 200
    res = CliRunner().invoke(cli, ["-w", str(fed.root), "keys", "create", "--owner", "audit", "--scope", "analyst"])
    assert res.exit_code == 0 and "scope analyst" in res.output
    # an analyst key reads; it does not act as an owner
    r = client.patch("/api/sources/news", json={"active": True}, headers=_as(key=keys["analyst"]))
    assert r.status_code == 403 and "analyst" in r.json()["detail"]


def test_serve_says_which_scopes_exist(fed, keys, monkeypatch):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(kw))  # the command, not a server
    res = CliRunner().invoke(cli, ["-w", str(fed.root), "serve", "--port", "1"])
    out = " ".join(res.output.split())
    assert res.exit_code == 0 and served and served[0]["port"] == 1, res.output
    assert "scope analyst or admin every trace" in out and "index, owner, analyst, admin" in out
