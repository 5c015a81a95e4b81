"""The API in-process (TestClient) over a tiny federation: tiny model, tiny indexes, real engine.

    .venv/bin/python -m pytest tests/test_api.py -x -q
"""

from __future__ import annotations

from typing import Iterator

import pytest
from conftest_model import build_served_federation
from fastapi.testclient import TestClient

from api.app import create_app
from flexolmo.base import sources

NAMES = ("public", "news", "code")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return build_served_federation(tmp_path_factory.mktemp("api"), sources=NAMES)


@pytest.fixture(scope="module")
def client(fed) -> Iterator[TestClient]:
    with TestClient(create_app(fed)) as c:  # `with` runs the lifespan: the tracer opens once
        yield c


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


def test_inactive_source_is_neither_searched_nor_routed(client, fed):
    passage = _passage(fed, "news", 8)
    try:
        r = client.patch("/api/sources/news", json={"active": False, "by": "news-owner"})
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
        r = client.patch("/api/sources/news", json={"active": True})
    assert r.status_code == 200 and r.json()["available"]
    t = _trace(client, passage)  # switched back on: searched and routed again
    assert "news" in t["sources_searched"] and not t["experts_off"]
    assert any(s["count_by_source"].get("news") for s in t["spans"])


def test_policy_errors(client):
    assert client.patch("/api/sources/nope", json={"active": False}).status_code == 404
    assert client.patch("/api/sources/news", json={"visibility": "secret"}).status_code == 422
    r = client.patch("/api/sources/news", json={"expires": "next tuesday"})
    assert r.status_code == 400 and "YYYY-MM-DD" in r.json()["detail"]
    assert client.post("/api/trace", json={"text": "   "}).status_code == 400
    assert client.get("/api/sources/nope").status_code == 404


def test_takedown_blocks_the_document(client, fed):
    doc = _doc(fed, "news", 6)
    r = client.post("/api/sources/news/takedowns", json={"doc_id": doc["doc_id"], "reason": "owner request"})
    assert r.status_code == 201 and r.json()["doc_id"] == doc["doc_id"]
    assert [x["doc_id"] for x in client.get("/api/sources/news/takedowns").json()] == [doc["doc_id"]]
    t = _trace(client, _passage(fed, "news", 6))
    hits = [d for s in t["spans"] for d in s["documents"] if d["doc_id"] == doc["doc_id"]]
    assert hits and all(d["blocked"] and d["snippet"] is None and d["context"] is None for d in hits)
    assert doc["text"][20:60] not in str(t["spans"])
    again = client.post("/api/sources/news/takedowns", json={"doc_id": doc["doc_id"], "reason": "again"})
    assert again.status_code == 409
    missing = client.post("/api/sources/news/takedowns", json={"doc_id": "no-such-doc", "reason": "x"})
    assert missing.status_code == 404


def test_generate_and_contribution(client, fed):
    r = client.post("/api/generate", json={"prompt": "The president", "max_new_tokens": 12})
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["generated"] and 1 <= t["n_tokens"] <= 12 and t["prompt"] == "The president"
    _trace(client, _passage(fed, "code", 5))
    c = client.get("/api/sources/code/contribution").json()
    assert c["source"] == "code" and c["n_traces"] >= 3 and c["spans_matched"] >= 1
    assert c["mean_routing_share"] is not None and c["top_spans"]
    news = client.get("/api/sources/news/contribution").json()
    assert news["blocked_hits"] >= 1  # the takedown above
    assert client.get("/api/sources/nope/contribution").status_code == 404


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
}


def test_every_route_is_known_and_sources_are_listed(client):
    spec = client.get("/openapi.json").json()["paths"]
    assert {(m, p) for p, ms in spec.items() for m in ms} == ROUTES  # a new route needs its tests (and a row here)
    listed = client.get("/api/sources").json()
    assert [s["name"] for s in listed] and set(NAMES) <= {s["name"] for s in listed}
    assert all({"owner", "licence", "visibility", "available"} <= set(s) for s in listed)
    r = client.post("/api/trace", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.text
