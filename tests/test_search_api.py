"""Search, filters, reports, options and bad input through the API (in-process TestClient) and
the CLI, over a tiny federation with a merged model and a source holding repeated documents.

    .venv/bin/python -m pytest tests/test_search_api.py -x -q
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Iterator

import pytest
from conftest_model import build_federation
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.app import create_app
from api.deps import Settings
from cli.main import app as cli
from flexolmo.base import sources, tokenizer
from flexolmo.base.errors import InputError
from flexolmo.model.merge import merge
from flexolmo.model.train import train_expert, train_public
from index import takedown
from index.build import build_source
from index.engine import Federation
from index.keys import KeyStore
from tracing.options import TraceOptions

NAMES = ("public", "news", "code")
REPEATED = ("Budget senate vote union tax president congress economy nation report law policy state union vote "
            "senate congress tax budget economy")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    ws = build_federation(tmp_path_factory.mktemp("search-api"), sources=NAMES, n_docs=30)
    train_public(ws, "tiny", progress=False)
    for s in ("news", "code"):
        train_expert(ws, s, "tiny", progress=False)
    merge(ws, ["news", "code"])
    # a source without an expert: the same text under three doc_ids, and a takedown
    recs = [{"doc_id": f"dup-{i}", "text": REPEATED} for i in range(3)]
    recs += [{"doc_id": "secret", "text": "Zebra quartz violin harbor lantern meadow orbit saffron."},
             {"doc_id": "other", "text": "Lantern meadow orbit and more words here."}]
    sources.add_records(ws, "forum", recs, owner="forum-owner", domain="forum", licence="CC-BY", origin="test")
    for s in NAMES + ("forum",):
        build_source(ws, s)
    takedown.takedown(ws, "forum", "secret", "owner request")
    return ws


@pytest.fixture(scope="module")
def client(fed) -> Iterator[TestClient]:
    admin = KeyStore.for_workspace(fed).ensure_admin()[1]  # owner routes (policy, contribution) need a key
    with TestClient(create_app(fed, settings=Settings(workspace=fed, max_body_bytes=300_000)),
                    headers={"Authorization": f"Bearer {admin}"}) as c:
        yield c


def _passage(ws, source: str, i: int, a: int = 3, b: int = 20) -> str:
    return " " + " ".join(sources.load_documents(ws, source, split="train").to_pylist()[i]["text"].split(" ")[a:b])


def _ok(r):
    assert r.status_code == 200, r.text
    return r.json()


# -- search ---------------------------------------------------------------------------------


def test_search_counts_documents_and_policy(client, fed):
    phrase = " ".join(_passage(fed, "news", 2).split()[2:5])
    r = _ok(client.post("/api/search", json={"query": phrase, "n_docs": 3}))
    word = re.compile(r"(?<!\S)" + re.escape(phrase) + r"(?!\w)")  # the phrase as whole words, anywhere
    want = {n: sum(len(word.findall(t)) for t in sources.load_documents(fed, n, split="train").column("text").to_pylist())
            for n in Federation.open(fed).indexes}
    got = {s["source"]: s["count"] for s in r["sources"]}
    assert got == want and got["news"] >= 1 and r["total"] == sum(want.values())
    news = next(s for s in r["sources"] if s["source"] == "news")
    assert 1 <= len(news["documents"]) <= 3
    for h in news["documents"]:
        a, b = h["snippet_span"]
        assert h["snippet"][a:b].strip() == phrase and "\ufffd" not in h["snippet"]

    # the same text under three doc_ids: one hit, "repeated 3 times"
    forum = _ok(client.post("/api/search", json={"query": "senate vote union tax", "source": "forum"}))["sources"]
    assert [(h["repeats"], len(h["same_text"])) for h in forum[0]["documents"]] == [(3, 2)]

    # a taken-down document: counted, blocked, no text
    hit = _ok(client.post("/api/search", json={"query": "quartz violin", "source": "forum"}))["sources"][0]
    assert hit["count"] == 1 and hit["documents"][0]["blocked"] and hit["documents"][0]["snippet"] is None
    assert "quartz" not in json.dumps(hit["documents"])

    # a counts-only source: the count, no documents
    try:
        assert client.patch("/api/sources/news", json={"visibility": "counts"}).status_code == 200
        news = next(s for s in _ok(client.post("/api/search", json={"query": phrase}))["sources"] if s["source"] == "news")
        assert news["count"] == want["news"] and news["documents"] == [] and "counts only" in news["note"]
    finally:
        client.patch("/api/sources/news", json={"visibility": "full"})


def test_cnf_query_and_limits(client, fed):
    one = _ok(client.post("/api/search", json={"query": "president", "n_docs": 0}))["total"]
    both = _ok(client.post("/api/search", json={"query": "president OR congress", "n_docs": 0}))["total"]
    anded = _ok(client.post("/api/search", json={"cnf": [["president"], ["congress"]], "n_docs": 2}))
    assert one <= both and 0 < anded["total"] <= both and anded["clauses"] == [["president"], ["congress"]]
    assert _ok(client.post("/api/search", json={"query": '"president AND congress"', "n_docs": 0}))["clauses"] == [
        ["president AND congress"]]
    for body, status, words in (
            ({"query": " AND ".join("abcde")}, 400, "at most 4"),
            ({"query": " OR ".join("abcde")}, 400, "at most 4"),
            ({"query": "a OR  OR b"}, 400, "empty phrase"),
            ({"query": "x " * 200}, 400, "tokens"),
            ({"query": "   "}, 400, "empty"),
            ({}, 422, "either"),
            ({"query": "a", "cnf": [["a"]]}, 422, "either"),
            ({"cnf": [[]]}, 400, "empty clause"),
            ({"query": "a", "n_docs": 500}, 422, "less than"),
            ({"query": "a", "source": "nope"}, 404, "not served"),
            ({"query": 5}, 422, "string")):
        r = client.post("/api/search", json=body)
        assert r.status_code == status and words in r.text, (body, r.text)


def test_next_tokens_match_the_engine(client, fed):
    tok = tokenizer.load_tokenizer(fed)
    r = _ok(client.post("/api/search/next-tokens", json={"phrase": "congress", "source": "news", "top": 200}))
    assert r["phrase"] == " congress"  # the more frequent spelling: a word in running text
    ntd = Federation.open(fed).source("news").engine.ntd(tok(" congress", add_special_tokens=False)["input_ids"])
    assert r["prompt_count"]["news"] == ntd["prompt_cnt"]
    assert {t["token_id"]: t["count"] for t in r["tokens"]} == {
        t: v["cont_cnt"] for t, v in ntd["result_by_token_id"].items() if t != 65535}
    assert client.post("/api/search/next-tokens", json={"phrase": ""}).status_code == 422
    assert client.post("/api/search/next-tokens", json={"phrase": "a", "source": "nope"}).status_code == 404


# -- filters, reports, plots ------------------------------------------------------------------


def test_filters_report_and_plot(client, fed):
    news = _ok(client.post("/api/trace", json={"text": _passage(fed, "news", 4)}))
    code = _ok(client.post("/api/trace", json={"text": _passage(fed, "code", 4)}))
    rep = _ok(client.post("/api/trace", json={"text": " " + REPEATED}))

    def ids(**params):
        return {row[0] for row in _ok(client.get("/api/traces", params=params))["rows"]}

    assert news["trace_id"] in ids(source="news") and code["trace_id"] not in ids(source="news")
    assert ids(owner="news-owner") == ids(source="news") and rep["trace_id"] in ids(licence="CC-BY")
    assert ids(owner="nobody") == set()
    assert {news["trace_id"], code["trace_id"]} <= ids(since="2000-01-01", until="2999-12-31")
    assert ids(since="2999-01-01") == set()
    spans = _ok(client.get("/api/traces", params={"source": "code", "level": "spans"}))
    assert "top_expert_by" in spans["columns"] and all(r[0] != news["trace_id"] for r in spans["rows"])
    docs = _ok(client.get("/api/traces", params={"source": "news", "level": "documents", "bucket": "high"}))
    col = docs["columns"].index
    assert all(r[col("source")] == "news" and r[col("bucket")] == "high" for r in docs["rows"])
    for params, status in (({"source": "nope"}, 404), ({"bucket": "huge"}, 422), ({"since": "2020-13-01"}, 422),
                           ({"since": "2021-01-02", "until": "2021-01-01"}, 400), ({"level": "rows"}, 422),
                           ({"limit": 0}, 422)):
        assert client.get("/api/traces", params=params).status_code == status, params

    # one response's report: repeated documents grouped, JSON and CSV
    r = _ok(client.get(f"/api/traces/{rep['trace_id']}/report"))
    forum_docs = [d for s in r["spans"] for d in s["documents"] if d["source"] == "forum"]
    assert any(d["repeated"] == 3 and len(d["same_text_doc_ids"]) == 2 for d in forum_docs)
    assert all(s["top_expert_by"] == "counterfactual" for s in r["spans"])
    c = client.get(f"/api/traces/{rep['trace_id']}/report", params={"format": "csv"})
    assert c.status_code == 200 and c.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(c.text)))
    assert any(row["repeated"] == "3" for row in rows) and {row["trace_id"] for row in rows} == {rep["trace_id"]}
    assert client.get("/api/traces/0123abcd/report").status_code == 404
    assert client.get(f"/api/traces/{rep['trace_id']}/report", params={"format": "xml"}).status_code == 422

    # an owner's contribution: series for the page's plots, and a PNG
    cj = _ok(client.get("/api/sources/news/contribution"))
    assert cj["over_time"] and cj["over_time"][0]["spans"] >= 1
    assert {d["domain"] for d in cj["by_domain"]} >= {"news"}
    png = client.get("/api/sources/news/contribution.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert client.get("/api/sources/nope/contribution.png").status_code == 404


# -- one options model for the CLI and the API --------------------------------------------------


def test_trace_options_parity(client, fed):
    text = _passage(fed, "news", 6)
    t = _ok(client.post("/api/trace", json={"text": text, "options": {"counterfactual": False, "max_docs": 2}}))
    assert t["settings"]["counterfactual"] is False and t["settings"]["max_docs"] == 2
    assert all(s["top_expert_by"] == "routing" and len(s["documents"]) <= 2 for s in t["spans"])
    assert all(e["counterfactual"] is None for s in t["spans"] for e in s["experts"])
    t = _ok(client.post("/api/trace", json={"text": text, "options": {"exclude": ["news"]}}))
    assert t["experts_off"] == ["news"]
    assert all(e["routing_share"] == 0 and not e["active"] for s in t["spans"] for e in s["experts"] if e["source"] == "news")
    t = _ok(client.post("/api/trace", json={"text": text}))  # the next trace: news back on
    assert t["experts_off"] == [] and t["settings"]["counterfactual"] is True
    assert client.post("/api/trace", json={"text": text, "options": {"exclude": ["nope"]}}).status_code == 400

    # the same bad option: 422 naming the field from the API, InputError naming it from the CLI
    r = client.post("/api/trace", json={"text": text, "options": {"max_docs": 500}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "options", "max_docs"]
    with pytest.raises(InputError, match="max_docs"):
        TraceOptions.parse(max_docs=500)
    res = CliRunner().invoke(cli, ["-w", str(fed.root), "trace", "--text", text, "--max-docs", "500"])
    assert res.exit_code == 1 and "max_docs" in res.output
    for bad in ({"exclude": ["a"], "include": ["a"]}, {"temperature": 0}, {"colour": "red"}):
        assert client.post("/api/trace", json={"text": text, "options": bad}).status_code == 422, bad

    g = {"prompt": "The president", "generation": {"do_sample": True, "seed": 7, "max_new_tokens": 6},
         "options": {"counterfactual": False}}
    a, b = _ok(client.post("/api/generate", json=g)), _ok(client.post("/api/generate", json=g))
    assert a["response"] == b["response"] and 1 <= a["n_tokens"] <= 6
    assert a["settings"]["generation"]["do_sample"] is True and a["settings"]["counterfactual"] is False
    r = client.post("/api/generate", json={"prompt": "x", "generation": {"max_new_tokens": 4000}})
    assert r.status_code == 422 and "max_new_tokens" in r.text  # over this service's budget
    r = client.post("/api/generate", json={"prompt": "x", "generation": {"max_new_tokens": 5000}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "generation", "max_new_tokens"]  # over the schema's
    r = client.post("/api/generate", json={"prompt": "x", "max_new_tokens": 5}).json()  # one spelling per option
    assert r["detail"][0]["loc"] == ["body", "max_new_tokens"] and "not permitted" in r["detail"][0]["msg"]
    # the generation options are the CLI's: same names, same limits
    res = CliRunner().invoke(cli, ["-w", str(fed.root), "generate", "x", "--max-new-tokens", "5000"])
    assert res.exit_code == 1 and "max_new_tokens" in res.output


def test_cli_search_traces_list_report_and_plot(fed, tmp_path):
    run = lambda *a: CliRunner().invoke(cli, ["-w", str(fed.root), *a])  # noqa: E731
    r = run("search", "president OR congress", "--json", "--docs", "1")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["total"] > 0
    r = run("search", "congress", "--next", "--source", "news")
    assert r.exit_code == 0 and "congress" in r.output
    r = run("search", " AND ".join("abcde"))
    assert r.exit_code == 1 and "at most 4" in r.output
    t = run("trace", "--text", _passage(fed, "news", 9), "--no-counterfactual")
    assert t.exit_code == 0 and "top: " in t.output and "(by" in t.output and "routing)" in t.output, t.output
    rows = json.loads(run("traces", "list", "--source", "news", "--json").output)
    assert rows and all("trace_id" in x for x in rows)
    r = run("traces", "list", "--source", "nope")
    assert r.exit_code == 1 and "nope" in r.output
    out = tmp_path / "rep.csv"
    assert run("traces", "report", rows[0]["trace_id"], "--format", "csv", "--out", str(out)).exit_code == 0
    assert out.read_text().startswith("trace_id,span_index")
    png = tmp_path / "news.png"
    r = run("report", "contribution", "--source", "news", "--plot", str(png))
    assert r.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG"


# -- bad input: a clear JSON error, nothing stored, still serving ------------------------------------


def test_bad_input_is_refused_and_nothing_is_stored(client):
    before = _ok(client.post("/api/query", json={"sql": "SELECT count(*) FROM traces"}))["rows"][0][0]
    h = {"content-type": "application/json"}
    for body, status, words in ((b"{not json", 422, "not valid JSON"), (b'{"text": "caf\xe9"}', 400, "not UTF-8"),
                                (b'{"text": 5}', 422, "string"), (b'{"text": ""}', 400, "empty"),
                                (b'["text"]', 422, "object"), (b'{"text": "' + b"a" * 310_000 + b'"}', 413, "limit")):
        r = client.post("/api/trace", content=body, headers=h)
        assert r.status_code == status and words in r.text and "detail" in r.json(), (body[:20], r.text[:300])
    assert client.post("/api/search", content=b'{"query": "caf\xe9"}', headers=h).status_code == 400
    assert client.patch("/api/sources/news", content=b"{bad", headers=h).status_code == 422
    assert _ok(client.post("/api/query", json={"sql": "SELECT count(*) FROM traces"}))["rows"][0][0] == before
    assert _ok(client.get("/api/health"))["status"] == "ok"


def test_snippets_never_split_a_character(fed):
    """A window cut inside a multi-byte character (the byte-level BPE splits them over tokens)
    shows no U+FFFD, and the marked part is still the match."""
    from index.snippets import marked

    tok = tokenizer.load_tokenizer(fed)
    text = " café naïve — 日本語 und 😀 über"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[i:j]) for i in range(len(ids)) for j in range(i, len(ids)))  # the problem
    for i in range(len(ids)):
        for j in range(i, len(ids) + 1):
            for k in range(j, len(ids) + 1):
                t, (a, b) = marked(tok, ids[i:j], ids[j:k], ids[k:])
                assert "\ufffd" not in t and t in text and 0 <= a <= b <= len(t) and t[a:b] in text
