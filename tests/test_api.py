"""The API in-process (TestClient) over a tiny federation: tiny model, tiny indexes, real engine.

    .venv/bin/python -m pytest tests/test_api.py -x -q
"""

from __future__ import annotations

import logging
from typing import Iterator

import pytest
from conftest_model import build_served_federation
from fastapi.testclient import TestClient

from api.app import create_app
from api.deps import Settings
from flexolmo.base import sources
from index.keys import KeyStore
from tracing.provenance.access import TOKEN_HEADER, new_token

NAMES = ("public", "news", "code")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return build_served_federation(tmp_path_factory.mktemp("api"), sources=NAMES)


@pytest.fixture(scope="module")
def client(fed) -> Iterator[TestClient]:
    # one capability token for every request: the traces it stores are this client's to read back
    with TestClient(create_app(fed), headers={TOKEN_HEADER: new_token()}) as c:  # `with` runs the lifespan
        yield c


@pytest.fixture(scope="module")
def keys(fed) -> dict[str, str]:
    """Owner keys of news and code, a tracer key of news's owner, and the admin key."""
    store = KeyStore.for_workspace(fed)
    out = {name: store.create(f"{name}-owner", "owner")[1] for name in ("news", "code")}
    out["tracer"] = store.create("news-owner", "index")[1]
    out["admin"] = store.ensure_admin()[1]
    return out


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _doc(ws, source: str, i: int) -> dict:
    return sources.load_documents(ws, source, split="train").to_pylist()[i]


def _passage(ws, source: str, i: int, a: int = 4, b: int = 26) -> str:
    return " " + " ".join(_doc(ws, source, i)["text"].split(" ")[a:b])  # starts at a word boundary


def _trace(client: TestClient, text: str, prompt: str | None = None) -> dict:
    r = client.post("/api/trace", json={"text": text, "prompt": prompt})
    assert r.status_code == 200, r.text
    return r.json()


def test_page_and_script_are_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert '<script src="/static/app.js">' in r.text
    js, css = client.get("/static/app.js"), client.get("/static/style.css")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and css.status_code == 200
    assert "/api/trace" in js.text and "/api/generate" in js.text and "/contribution" in js.text
    for body in (r.text, js.text, css.text):  # nothing is fetched from elsewhere
        assert "http://" not in body and "https://" not in body and "//cdn" not in body


def test_trace_points_at_the_document_and_is_stored(client, fed):
    doc = _doc(fed, "news", 3)
    t = _trace(client, _passage(fed, "news", 3), prompt="what did the president say")
    assert t["spans"] and t["groups"] and t["prompt"] == "what did the president say"
    longest = max(t["spans"], key=lambda s: s["end"] - s["start"])
    assert longest["end"] - longest["start"] >= 15 and longest["count_by_source"]["news"] >= 1
    hit = next(d for d in longest["documents"] if d["doc_id"] == doc["doc_id"])
    assert hit["source"] == "news" and not hit["blocked"]
    a, b = hit["snippet_span"]
    assert hit["snippet"][a:b] == longest["text"]
    shares = {e["source"]: e["routing_share"] for e in longest["experts"]}
    assert set(shares) == set(NAMES) and abs(sum(shares.values()) - 1) < 1e-3

    r = client.get(f"/api/traces/{t['trace_id']}")
    assert r.status_code == 200
    tables = r.json()["tables"]
    assert len(tables["traces"]["rows"]) == 1 and len(tables["spans"]["rows"]) == len(t["spans"])
    doc_col = tables["span_documents"]["columns"].index("doc_id")
    assert doc["doc_id"] in {row[doc_col] for row in tables["span_documents"]["rows"]}
    assert client.get("/api/traces/0123abcd").status_code == 404
    assert client.get("/api/traces/x'; DROP TABLE spans; --").status_code == 422


def test_query_is_read_only(client, fed):
    _trace(client, _passage(fed, "code", 2))
    r = client.post("/api/query", json={"sql": "SELECT count(*) AS n FROM spans"})
    assert r.status_code == 200 and r.json()["columns"] == ["n"] and r.json()["rows"][0][0] >= 1
    for sql in ("DROP TABLE spans", "DELETE FROM traces", "INSERT INTO span_sources VALUES ('x', 0, 'y', 1)"):
        r = client.post("/api/query", json={"sql": sql})
        assert r.status_code == 400 and "read-only" in r.json()["detail"], r.text
    assert client.post("/api/query", json={"sql": "SELECT count(*) FROM spans"}).json()["rows"][0][0] >= 1


def test_inactive_source_is_neither_searched_nor_routed(client, fed, keys):
    passage = _passage(fed, "news", 8)
    try:
        r = client.patch("/api/sources/news", json={"active": False}, headers=_auth(keys["news"]))
        assert r.status_code == 200 and r.json()["active"] is False and r.json()["available"] is False
        assert client.get("/api/health").json()["sources_skipped"] == {"news": "inactive"}
        t = _trace(client, passage)
        assert "news" not in t["sources_searched"] and t["sources_skipped"] == {"news": "inactive"}
        assert "news" in t["experts_off"]
        assert all("news" not in s["count_by_source"] for s in t["spans"])
        assert all(d["source"] != "news" for s in t["spans"] for d in s["documents"])
        news = [e for s in t["spans"] for e in s["experts"] if e["source"] == "news"]
        assert all(e["routing_share"] == 0 and not e["active"] for e in news)
        log = client.get("/api/sources/news/policy-log").json()
        assert log[-1]["field"] == "active" and log[-1]["changed_by"] == "news-owner"
    finally:
        r = client.patch("/api/sources/news", json={"active": True}, headers=_auth(keys["admin"]))
    assert r.status_code == 200 and r.json()["available"] and r.json()["updated_by"] == "admin"
    t = _trace(client, passage)  # switched back on: searched and routed again
    assert "news" in t["sources_searched"] and not t["experts_off"]
    assert any(s["count_by_source"].get("news") for s in t["spans"])


def test_policy_errors(client, keys):
    admin = _auth(keys["admin"])
    assert client.patch("/api/sources/nope", json={"active": False}, headers=admin).status_code == 404
    assert client.patch("/api/sources/nope", json={"active": False}, headers=_auth(keys["news"])).status_code == 404
    assert client.patch("/api/sources/news", json={"visibility": "secret"}, headers=admin).status_code == 422
    r = client.patch("/api/sources/news", json={"expires": "next tuesday"}, headers=admin)
    assert r.status_code == 422 and "YYYY-MM-DD" in r.text
    r = client.patch("/api/sources/news", json={"expires": "never"}, headers=admin)  # null is "no expiry"
    assert r.status_code == 422 and "null" in r.text
    assert client.post("/api/trace", json={"text": "   "}).status_code == 400
    assert client.get("/api/sources/nope").status_code == 404


def test_every_policy_field_is_in_the_api(client, keys):
    """The verbatim guard's limit too: set, shown, lifted (null: the one spelling of "no limit")
    through PATCH like any other field; 0 is refused, an omitted field is kept."""
    owner = _auth(keys["news"])
    r = client.patch("/api/sources/news", json={"max_verbatim": 12}, headers=owner)
    assert r.status_code == 200 and r.json()["max_verbatim"] == 12
    assert client.get("/api/sources/news").json()["max_verbatim"] == 12
    assert client.patch("/api/sources/news", json={"max_verbatim": -1}, headers=owner).status_code == 422
    r = client.patch("/api/sources/news", json={"max_verbatim": 0}, headers=owner)
    assert r.status_code == 422 and "null" in r.text and "none" in r.text
    r = client.patch("/api/sources/news", json={"active": True}, headers=owner)
    assert r.status_code == 200 and r.json()["max_verbatim"] == 12  # left out: kept
    r = client.patch("/api/sources/news", json={"max_verbatim": None}, headers=owner)
    assert r.status_code == 200 and r.json()["max_verbatim"] is None
    fields = set(client.get("/openapi.json").json()["components"]["schemas"]["PolicyUpdate"]["properties"])
    assert {"active", "visibility", "expires", "max_verbatim"} <= fields


def test_takedown_blocks_the_document(client, fed, keys):
    doc = _doc(fed, "news", 6)
    owner = _auth(keys["news"])
    r = client.post("/api/sources/news/takedowns", json={"doc_id": doc["doc_id"], "reason": "owner request",
                                                         "by": "someone else"}, headers=owner)
    assert r.status_code == 201 and r.json()["doc_id"] == doc["doc_id"]
    assert r.json()["requested_by"] == "news-owner"  # the key's owner, whatever the body says
    assert [x["doc_id"] for x in client.get("/api/sources/news/takedowns").json()] == [doc["doc_id"]]
    t = _trace(client, _passage(fed, "news", 6))
    hits = [d for s in t["spans"] for d in s["documents"] if d["doc_id"] == doc["doc_id"]]
    assert hits and all(d["blocked"] and d["snippet"] is None and d["context"] is None for d in hits)
    assert doc["text"][20:60] not in str(t["spans"])
    again = client.post("/api/sources/news/takedowns", json={"doc_id": doc["doc_id"], "reason": "again"}, headers=owner)
    assert again.status_code == 409
    missing = client.post("/api/sources/news/takedowns", json={"doc_id": "no-such-doc", "reason": "x"}, headers=owner)
    assert missing.status_code == 404


def test_generate_and_contribution(client, fed, keys):
    r = client.post("/api/generate", json={"prompt": "The president", "generation": {"max_new_tokens": 12}})
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["generated"] and 1 <= t["n_tokens"] <= 12 and t["prompt"] == "The president"
    _trace(client, _passage(fed, "code", 5))
    c = client.get("/api/sources/code/contribution", headers=_auth(keys["code"])).json()
    assert c["source"] == "code" and c["n_traces"] >= 3 and c["spans_matched"] >= 1
    assert c["mean_routing_share"] is not None and c["top_spans"]
    news = client.get("/api/sources/news/contribution", headers=_auth(keys["news"])).json()
    assert news["blocked_hits"] >= 1  # the takedown above
    assert client.get("/api/sources/nope/contribution", headers=_auth(keys["admin"])).status_code == 404
    assert client.get("/api/sources/code/contribution.png", headers=_auth(keys["news"])).status_code == 403


def test_workspace_from_environment_and_serve_command(fed, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app as cli

    monkeypatch.setenv("FLEXOLMO_HOME", str(fed.root))
    assert create_app().state.service.ws.root == fed.root
    r = CliRunner().invoke(cli, ["serve", "--help"])
    assert r.exit_code == 0 and "127.0.0.1" in r.output


ROUTES = {  # every route, and the test that covers it (here, tests/test_search_api.py, tests/test_browser.py)
    ("post", "/api/trace"), ("post", "/api/generate"), ("post", "/api/search"), ("post", "/api/search/next-tokens"),
    ("get", "/api/traces"), ("get", "/api/traces/{trace_id}"), ("get", "/api/traces/{trace_id}/report"),
    ("post", "/api/query"), ("get", "/api/sources"), ("get", "/api/sources/{name}"), ("patch", "/api/sources/{name}"),
    ("get", "/api/sources/{name}/takedowns"), ("post", "/api/sources/{name}/takedowns"),
    ("get", "/api/sources/{name}/policy-log"), ("get", "/api/sources/{name}/contribution"),
    ("get", "/api/sources/{name}/contribution.png"), ("get", "/api/health"),
    ("get", "/api/keys"), ("post", "/api/keys"), ("delete", "/api/keys/{key_id}"),
    ("post", "/api/batches"), ("get", "/api/batches/{batch_id}"), ("get", "/api/batches/{batch_id}/report"),  # test_batch_api.py
    ("get", "/api/batches/{batch_id}/plot.png"), ("get", "/api/batches/{batch_id}/parquet/{table}"),
    ("post", "/api/trace/stream"),  # tests/test_progressive.py
}


def test_every_route_is_known_and_sources_are_listed(client):
    spec = client.get("/openapi.json").json()["paths"]
    assert {(m, p) for p, ms in spec.items() for m in ms} == ROUTES  # a new route needs its tests (and a row here)
    listed = client.get("/api/sources").json()
    assert [s["name"] for s in listed] and set(NAMES) <= {s["name"] for s in listed}
    assert all({"owner", "licence", "visibility", "available"} <= set(s) for s in listed)
    r = client.post("/api/trace", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.text


def test_a_new_workspace_locks_owner_routes_until_a_key_is_given(fed, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXOLMO_KEYS", str(tmp_path / "keys.json"))  # a keys file no key was ever written to
    with TestClient(create_app(fed)) as c:
        def patch(key=None, **body):
            return c.patch("/api/sources/news", json=body or {"active": False}, headers=_auth(key))

        r = patch()
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "admin key" in r.json()["detail"]
        assert patch("flx_00000000_" + "y" * 43).status_code == 401
        doc = _doc(fed, "news", 1)["doc_id"]
        for method, path, body in (("post", "/api/sources/news/takedowns", {"doc_id": doc, "reason": "x"}),
                                   ("get", "/api/sources/news/contribution", None), ("get", "/api/keys", None),
                                   ("post", "/api/keys", {"owner": "mallory"}), ("delete", "/api/keys/0123abcd", None)):
            assert c.request(method, path, json=body).status_code == 401, path
        assert sources.get_source(fed, "news").active
        assert doc not in {t["doc_id"] for t in c.get("/api/sources/news/takedowns").json()}
        assert not (tmp_path / "keys.json").exists()  # refusing wrote nothing

        store = KeyStore.for_workspace(fed)
        _, news = store.create("news-owner", "owner")
        _, code = store.create("code-owner", "owner")
        _, tracer = store.create("news-owner", "index")
        assert patch(code).status_code == 403 and "another owner" in patch(code).json()["detail"]
        assert patch(tracer).status_code == 403
        assert sources.get_source(fed, "news").active
        try:
            r = patch(news, active=False, by="ticket 42")  # `by` is a comment; who acted is the key's owner
            assert r.status_code == 200 and r.json()["updated_by"] == "news-owner"
            last = c.get("/api/sources/news/policy-log").json()[-1]
            assert (last["field"], last["changed_by"], last["key_id"], last["comment"]) == (
                "active", "news-owner", news[4:12], "ticket 42")
        finally:
            assert patch(news, active=True).status_code == 200
        assert c.get("/api/sources/news").status_code == 200  # read routes stay open


def test_keys_are_managed_with_the_admin_key_only(client, fed, keys):
    assert client.get("/api/keys", headers=_auth(keys["news"])).status_code == 403  # an owner key is not enough
    r = client.post("/api/keys", json={"owner": "code-owner", "label": "code's intern"}, headers=_auth(keys["admin"]))
    assert r.status_code == 201 and r.json()["scope"] == "owner" and r.json()["key"].startswith("flx_")
    new, key_id = r.json()["key"], r.json()["key_id"]
    listed = client.get("/api/keys", headers=_auth(keys["admin"])).json()
    assert key_id in {k["key_id"] for k in listed} and "admin" in {k["scope"] for k in listed}
    assert not any("key" in k or "sha256" in k for k in listed)  # ids, never secrets
    assert client.get("/api/sources/code/contribution", headers=_auth(new)).status_code == 200
    assert client.post("/api/keys", json={"owner": "x", "scope": "admin"}, headers=_auth(keys["admin"])).status_code == 422
    r = client.delete(f"/api/keys/{key_id}", headers=_auth(keys["admin"]))
    assert r.status_code == 200 and r.json()["revoked"]
    assert client.get("/api/sources/code/contribution", headers=_auth(new)).status_code == 401
    assert KeyStore.for_workspace(fed).ensure_admin() is None  # the admin key is made once


def test_a_client_over_its_rate_gets_429_while_another_is_served_and_refusals_are_logged(fed, keys, caplog):
    settings = Settings(workspace=fed, client_rps=0.2, client_burst=4, max_body_bytes=5_000)
    app = create_app(fed, settings=settings)
    with TestClient(app, client=("10.0.0.1", 1000)) as a, caplog.at_level(logging.WARNING, logger="flexolmo.api"):
        b = TestClient(app, client=("10.0.0.2", 1000))  # another address, same server
        assert a.patch("/api/sources/news", json={"active": False, "by": "SECRET-1"}).status_code == 401
        assert a.post("/api/trace", content=b'{"text": "' + b"SECRET-2 " * 1000 + b'"}',
                      headers={"content-type": "application/json"}).status_code == 413
        assert a.post("/api/trace", json={"text": ["SECRET-3"]}).status_code == 422
        statuses = [a.get("/api/sources").status_code for _ in range(3)]
        assert statuses[0] == 200 and 429 in statuses, statuses  # 4 requests of the burst, then refused
        r = a.get("/api/sources")
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 5 and "0.2 a second" in r.json()["detail"]
        assert b.get("/api/sources").status_code == 200  # the other client is served
        # a key is its own client: same address, its own budget; another owner's key is 403
        r = a.patch("/api/sources/news", json={"active": False, "by": "SECRET-4"}, headers=_auth(keys["code"]))
        assert r.status_code == 403
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "flexolmo.api"]
    for status, route, who in ((401, "PATCH /api/sources/news", "addr:10.0.0.1"), (413, "POST /api/trace", "addr:10.0.0.1"),
                               (422, "POST /api/trace", "addr:10.0.0.1"), (429, "GET /api/sources", "addr:10.0.0.1"),
                               (403, "PATCH /api/sources/news", f"key:{keys['code'][4:12]}")):
        assert any(f"refused {status} {route} client={who}:" in m for m in lines), (status, lines)
    assert any("body.text (string_type)" in m for m in lines)  # where and what, for a 422
    assert not any("SECRET" in m for m in lines)  # never the body


def test_serve_beyond_loopback_needs_keys_and_the_admin_key_is_shown_once(fed, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app as cli
    from cli.serve import is_loopback

    keys_file = tmp_path / "keys.json"
    monkeypatch.setenv("FLEXOLMO_KEYS", str(keys_file))
    run = lambda *args: CliRunner().invoke(cli, ["--workspace", str(fed.root), *args])  # noqa: E731
    r = run("serve", "--host", "0.0.0.0", "--port", "1")
    assert r.exit_code == 1 and "refusing to serve on 0.0.0.0" in r.output and "flexolmo keys admin" in r.output
    assert not keys_file.exists()  # refused before anything was made or bound
    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "0.0.0.0", "::",
                                     "10.1.2.3", "example.org")] == [True] * 5 + [False] * 4

    first = run("keys", "admin")
    key = next(w for w in first.output.split() if w.startswith("flx_"))
    assert first.exit_code == 0 and "shown this once" in first.output and "keys admin --rotate" in first.output
    assert KeyStore(keys_file).verify(key).scope == "admin"
    again = run("keys", "admin")
    assert again.exit_code == 0 and "flx_" not in again.output and "--rotate" in again.output
    listed = run("keys", "list", "--json")
    assert listed.exit_code == 0 and key[4:12] in listed.output and key not in listed.output  # ids, never secrets
    rotated = run("keys", "admin", "--rotate")
    new = next(w for w in rotated.output.split() if w.startswith("flx_"))
    assert new != key and KeyStore(keys_file).verify(key) is None and KeyStore(keys_file).verify(new).scope == "admin"
