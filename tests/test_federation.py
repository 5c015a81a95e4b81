"""Owner-held indexes: real owner nodes on 127.0.0.1, a tracer that asks them, and faults.

    .venv/bin/python -m pytest tests/test_federation.py -q

One owner workspace holds four sources (public, alpha: full, beta: counts, gamma:
snippets), each of another owner. alpha, beta and gamma are served by node processes
(`flexolmo index serve`); the tracer's workspace holds `public` locally and the three
others as remote sources. The local federation over the owner workspace is the reference:
spans and documents must be identical. Tests that change the owner's policy undo it; the
takedown and the node kill come last.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app
from textcorpus import word_records, word_text

from flexolmo.base.tokenizer import import_tokenizer
from flexolmo.base import sources, tokenizer
from flexolmo.base.errors import ConflictError, InputError
from flexolmo.base.workspace import Workspace
from index import build, catalog
from index import protocol as P
from index.cluster import issue_keys, restart_node, start_nodes, stop_nodes
from index.engine import Federation
from index.keys import KeyStore, write_secret
from index.remote import RemoteSettings, add_remote
from tracing.provenance import governance

SOURCES = {"public": ("Wiki", "full"), "alpha": ("Lab A", "full"), "beta": ("Lab B", "counts"),
           "gamma": ("Lab C", "snippets")}
REMOTE = ("alpha", "beta", "gamma")
FAST = RemoteSettings(deadline_s=1.5, retries=1, cooldown_s=0.5)


def _records(name: str, rng: random.Random) -> list[dict]:
    return word_records(name, rng, n_docs=80, max_sentences=30)


def _tracer_ws(root: Path, owner_ws: Workspace, records: dict | None = None) -> Workspace:
    tws = Workspace(root)
    import_tokenizer(tws, owner_ws.tokenizer_dir)
    if records is not None:
        sources.add_records(tws, "public", records, owner="Wiki", domain="d", licence="l", origin="test")
        build.build_source(tws, "public")
    return tws


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    ws = Workspace(root / "owner")
    rng = random.Random(0)
    records = {n: _records(n, rng) for n in SOURCES}
    for n, (owner, vis) in SOURCES.items():
        sources.add_records(ws, n, records[n], owner=owner, domain="d", licence="l", origin="test", visibility=vis)
    tokenizer.train_tokenizer(ws, vocab_size=400)
    for n in SOURCES:
        build.build_source(ws, n)
    keys_file = root / "keys.json"
    keys = issue_keys(ws, keys_file, [o for o, _ in SOURCES.values()])
    nodes = start_nodes(ws, REMOTE, keys_file, root / "logs")
    try:
        tws = _tracer_ws(root / "tracer", ws, records["public"])
        for n in REMOTE:
            write_secret(root / f"{n}.key", keys[SOURCES[n][0]])
            add_remote(tws, n, nodes[n].url, root / f"{n}.key", owner=SOURCES[n][0], domain="d", licence="l")
        tok = tokenizer.load_raw_tokenizer(ws)
        yield dict(ws=ws, tws=tws, root=root, keys=keys, keys_file=keys_file, nodes=nodes, records=records, tok=tok,
                   bow=tokenizer.read_bow_ids(ws), delim=[tok.token_to_id("Ċ"), tok.token_to_id(".")])
    finally:
        stop_nodes(nodes)


def _inputs(fx, n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.7:
                d = rng.choice(fx["records"][rng.choice(list(SOURCES))])["text"]
                a = rng.randint(0, len(d) - 1)
                parts.append(d[a: a + rng.randint(5, 300)])
            else:
                parts.append(word_text(rng, 2))
        yield fx["tok"].encode("".join(parts)).ids


def _raw(fx, source: str, path: str, body: dict | None = None, key: str | None = "own") -> httpx.Response:
    key = fx["keys"][SOURCES[source][0]] if key == "own" else key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = fx["nodes"][source].url + path
    with httpx.Client(timeout=10, trust_env=False) as c:
        return c.post(url, json=body, headers=headers) if body is not None else c.get(url, headers=headers)


def _span_in(fx, source: str, i: int, n_tokens: int = 6) -> list[int]:
    ids = fx["tok"].encode(fx["records"][source][i]["text"]).ids
    return ids[2: 2 + n_tokens]


# -- identical results ---------------------------------------------------------------------


def test_identical_spans_and_documents_local_vs_federated(fx):
    local = Federation.open(fx["ws"])
    fed = Federation.open(fx["tws"], remote=FAST)
    assert set(fed.remote) == set(REMOTE) and set(fed.local) == {"public"}
    n_spans = 0
    for ids in _inputs(fx, 25, seed=1):
        a = local.find_spans(ids, fx["delim"], fx["bow"])
        b = fed.find_spans(ids, fx["delim"], fx["bow"])
        assert a == b and not fed.unavailable  # positions, lengths, counts per source, log-probs
        assert local.documents_many(a, 5, seed=3) == fed.documents_many(b, 5, seed=3)
        n_spans += len(a)
    assert n_spans > 100
    counted = [s for s in b if s.count_by_source["beta"] > 0]
    assert counted and all(d.source != "beta" for docs in fed.documents_many(counted, 10) for d in docs)
    fed.close()


def test_trace_through_nodes_equals_local_trace(fx):
    from tracing.trace import Tracer

    ids = next(_inputs(fx, 1, seed=7))
    prompt = "which words are these: w1 w7 the of"  # prompt words count as locally (index/doc_freq.py)
    a = Tracer.open(fx["ws"], model=None).trace_ids(ids, prompt=prompt, prompt_ids=[], routing=None, generated=False,
                                                    store=False)
    tracer = Tracer.open(fx["tws"], model=None)
    b = tracer.trace_ids(ids, prompt=prompt, prompt_ids=[], routing=None, generated=False, store=False)
    assert [(s.start, s.end, s.count, s.count_by_source) for s in a.spans] == \
        [(s.start, s.end, s.count, s.count_by_source) for s in b.spans]
    assert [[(d.doc_id, d.snippet, d.context, d.blocked) for d in s.documents] for s in a.spans] == \
        [[(d.doc_id, d.snippet, d.context, d.blocked) for d in s.documents] for s in b.spans]
    assert b.sources_searched == sorted(SOURCES) and b.sources_skipped == {}
    # relevance: the nodes' document frequencies (/v1/doc_freq) rate every window as the local indexes do
    assert [[(d.relevance, d.relevance_norm, d.bucket) for d in s.documents] for s in a.spans] == \
        [[(d.relevance, d.relevance_norm, d.bucket) for d in s.documents] for s in b.spans]
    assert "relevance_fallback" not in b.settings and any(d.relevance > 0 for s in b.spans for d in s.documents)


def test_the_widest_document_window_a_trace_allows_is_served_by_every_node(fx):
    from tracing.options import TraceOptions
    from tracing.trace import Tracer

    def most(name: str) -> int:
        return next(m.le for m in TraceOptions.model_fields[name].metadata if getattr(m, "le", None) is not None)

    widest = TraceOptions(max_docs=most("max_docs"), context_tokens=most("context_tokens"),
                          snippet_tokens=most("snippet_tokens"))
    ids = next(_inputs(fx, 1, seed=11))
    kw = dict(prompt=None, prompt_ids=[], routing=None, generated=False, store=False, options=widest)
    a = Tracer.open(fx["ws"], model=None).trace_ids(ids, **kw)
    b = Tracer.open(fx["tws"], model=None).trace_ids(ids, **kw)
    assert b.sources_skipped == {} and b.sources_searched == sorted(SOURCES)  # no node refused the window
    assert [[(d.doc_id, d.context) for d in s.documents] for s in a.spans] == \
        [[(d.doc_id, d.context) for d in s.documents] for s in b.spans]
    assert any(s.documents for s in b.spans if s.count_by_source["alpha"])


# -- keys and bad input --------------------------------------------------------------------


def test_keys_401_403_and_revocation(fx):
    assert _raw(fx, "alpha", "/v1/identity", key=None).status_code == 401
    assert _raw(fx, "alpha", "/v1/identity", key="flx_00000000_" + "x" * 43).status_code == 401
    r = _raw(fx, "alpha", "/v1/identity", key=fx["keys"]["Lab B"])
    assert r.status_code == 403 and "another owner" in r.json()["detail"]
    store = KeyStore(fx["keys_file"])
    rec, person = store.create("Lab A", "owner")
    assert _raw(fx, "alpha", "/v1/identity", key=person).status_code == 403  # a person's key is not a tracer's
    rec, extra = store.create("Lab A", "index")
    assert _raw(fx, "alpha", "/v1/matches", {"ids": [1, 2]}, key=extra).status_code == 200
    store.revoke(rec.key_id)
    assert _raw(fx, "alpha", "/v1/matches", {"ids": [1, 2]}, key=extra).status_code == 401  # the next request
    assert extra not in fx["keys_file"].read_text() and (fx["keys_file"].stat().st_mode & 0o777) == 0o600


def test_bad_requests_are_clear_errors(fx):
    span = _span_in(fx, "alpha", 0)
    cases = [
        ({"ids": [1, 70000]}, "/v1/matches", 400, "[0, 65534]"),
        ({"ids": [1] * (P.MAX_QUERY_TOKENS + 1)}, "/v1/matches", 422, "at most"),
        ({"spans": [{"span_ids": span, "picks": [0], "n": P.MAX_DOCS + 1}]}, "/v1/documents", 422, "less than"),
        ({"spans": [{"span_ids": span, "picks": [10 ** 9], "n": 1}]}, "/v1/documents", 400, "out of range"),
        ({"spans": [{"span_ids": [], "picks": [0]}]}, "/v1/documents", 422, "at least"),
        ({"ids": [1], "extra": "field"}, "/v1/matches", 422, "not permitted"),
    ]
    for body, path, status, words in cases:
        r = _raw(fx, "alpha", path, body)
        assert r.status_code == status and words in json.dumps(r.json()), (body.keys(), r.text[:200])
    r = _raw(fx, "alpha", "/v1/matches", {"ids": [1] * 1_200_000})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert _raw(fx, "alpha", "/v1/identity").json()["takedowns"] == 0  # nothing changed on the node


# -- policy on the owner's side ------------------------------------------------------------


def test_counts_source_sends_no_text(fx):
    span = _span_in(fx, "beta", 3)
    m = _raw(fx, "beta", "/v1/matches", {"ids": span, "bow_ids": None}).json()
    assert m["visibility"] == "counts" and m["counts"][0] > 0
    r = _raw(fx, "beta", "/v1/documents", {"spans": [{"span_ids": span, "picks": list(range(m["counts"][0])),
                                                       "n": 10}], "max_visibility": "full"})
    assert r.status_code == 200 and r.json()["documents"] == [[]]
    assert "beta" not in r.text.replace('"source":"beta"', "")  # no doc_id, no title, nothing else


def test_snippets_source_and_tracer_cap(fx):
    span = _span_in(fx, "gamma", 1, 4)
    picks = {"span_ids": span, "picks": [0], "n": 1}
    docs = _raw(fx, "gamma", "/v1/documents", {"spans": [picks], "context_tokens": 250, "snippet_tokens": 20}).json()
    (d,) = docs["documents"][0]
    assert d["visibility"] == "snippets" and len(d["token_ids"]) <= 20 + len(span)
    capped = _raw(fx, "alpha", "/v1/documents", {"spans": [{**picks, "span_ids": _span_in(fx, "alpha", 1, 4)}],
                                                 "max_visibility": "snippets", "snippet_tokens": 20}).json()
    assert capped["visibility"] == "snippets" and all(len(x["token_ids"]) <= 24 for x in capped["documents"][0])


def test_owner_switch_and_visibility_followed_by_next_answer(fx):
    fed = Federation.open(fx["tws"], remote=FAST)
    ids = _span_in(fx, "alpha", 5, 8)
    try:
        governance.set_policy(fx["ws"], "alpha", active=False, by="owner")
        fed.find_spans(ids, fx["delim"], fx["bow"])
        assert "switched off by its owner" in fed.unavailable["alpha"] and "alpha" not in fed.names
        assert fed.skipped["alpha"].startswith("unavailable: ")
        governance.set_policy(fx["ws"], "alpha", active=True, visibility="snippets", by="owner")
        spans = fed.find_spans(ids, fx["delim"], fx["bow"])
        assert "alpha" in fed.names and not fed.unavailable
        docs = [d for ds in fed.documents_many(spans, 5) for d in ds if d.source == "alpha"]
        assert docs and all(d.visibility == "snippets" for d in docs)
    finally:
        governance.set_policy(fx["ws"], "alpha", active=True, visibility="full", by="owner")
        fed.close()


# -- registering remote sources ------------------------------------------------------------


@contextlib.contextmanager
def _web_server(handler: type):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


class _NotANode(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 -- http.server's name
        self.send_response(404)
        self.end_headers()
        self.wfile.write(b"<html>nothing here</html>")

    def log_message(self, *a):
        pass


def test_add_remote_checks_the_node_and_stores_nothing_on_failure(fx, tmp_path):
    tws = _tracer_ws(tmp_path / "t", fx["ws"])
    key = fx["root"] / "alpha.key"
    url = fx["nodes"]["alpha"].url
    before = (sources.list_sources(tws), catalog.list_remote_sources(tws))
    with _web_server(_NotANode) as other:
        bad = [
            (dict(name="alpha", url=other), InputError, "not a flexolmo owner node"),
            (dict(name="alpha", url="http://127.0.0.1:9"), InputError, "cannot reach"),
            (dict(name="alpha", url="ftp://127.0.0.1:1"), InputError, "not a node URL"),
            (dict(name="beta", url=url), ConflictError, "serves source 'alpha', not 'beta'"),
            (dict(name="alpha", url=url, owner="Lab B"), ConflictError, "belongs to owner 'Lab A'"),
            (dict(name="alpha", url=url, key_file=fx["root"] / "beta.key"), InputError, "(403)"),
            (dict(name="alpha", url=url, key_file=tmp_path / "none.key"), InputError, "no such key file"),
        ]
        for kw, exc, words in bad:
            args = dict(key_file=key, owner="Lab A", domain="d", licence="l") | kw
            with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
                add_remote(tws, args.pop("name"), args.pop("url"), args.pop("key_file"), **args)
    assert (sources.list_sources(tws), catalog.list_remote_sources(tws)) == before
    assert not list(tws.root.glob("remotes/*.key"))


def test_node_with_another_tokenizer_is_refused(fx, tmp_path):
    other = Workspace(tmp_path / "other")
    sources.add_records(other, "alpha", fx["records"]["alpha"], owner="Lab A", domain="d", licence="l", origin="t")
    tokenizer.train_tokenizer(other, vocab_size=300, source="alpha")
    build.build_source(other, "alpha")
    keys_file = tmp_path / "keys.json"
    write_secret(tmp_path / "k", issue_keys(other, keys_file, ["Lab A"])["Lab A"])
    nodes = start_nodes(other, ["alpha"], keys_file, tmp_path / "logs")
    try:
        tws = _tracer_ws(tmp_path / "t", fx["ws"])
        ours, theirs = tokenizer.tokenizer_hash(tws), tokenizer.tokenizer_hash(other)
        with pytest.raises(ConflictError, match=f"tokenizes with {theirs}, this workspace with {ours}"):
            add_remote(tws, "alpha", nodes["alpha"].url, tmp_path / "k", owner="Lab A", domain="d", licence="l")
        assert catalog.list_remote_sources(tws) == {} and sources.list_sources(tws) == []
    finally:
        stop_nodes(nodes)


def test_cli_keys_tokenizer_import_and_sources_add_remote(fx, tmp_path):
    run = CliRunner().invoke
    w = ["-w", str(tmp_path / "t")]
    r = run(app, w + ["keys", "create", "--owner", "Lab A", "--keys", str(tmp_path / "k.json")])
    assert r.exit_code == 0 and r.stdout.startswith("flx_")
    assert r.stdout.strip().split()[0] not in (tmp_path / "k.json").read_text()
    bad = tmp_path / "badtok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{}")
    r = run(app, w + ["tokenizer", "import", str(bad)])
    assert r.exit_code == 1 and "not a tokenizer folder" in r.output
    r = run(app, w + ["tokenizer", "import", str(fx["ws"].tokenizer_dir)])
    assert r.exit_code == 0, r.output
    r = run(app, w + ["sources", "add", "alpha", "--remote", fx["nodes"]["alpha"].url, "--key-file",
                      str(tmp_path / "missing"), "--owner", "Lab A", "--domain", "d", "--licence", "l"])
    assert r.exit_code == 1 and "no such key file" in r.output
    r = run(app, w + ["sources", "add", "alpha", "--remote", fx["nodes"]["alpha"].url, "--key-file",
                      str(fx["root"] / "alpha.key"), "--owner", "Lab A", "--domain", "d", "--licence", "l"])
    assert r.exit_code == 0 and "stay with their owner" in " ".join(r.output.split())


def test_commands_that_walk_every_source_treat_remote_ones(fx):
    """A tracer with remote sources: build --all, verify, list and takedowns say what is remote."""
    run = CliRunner().invoke
    w = ["-w", str(fx["tws"].root)]
    r = run(app, w + ["index", "build", "--all"])
    out = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert "public: unchanged, kept" in out
    for n in REMOTE:
        assert f"{n}: not built here (remote: held by its owner's node at {fx['nodes'][n].url}; built there)" in out
    r = run(app, w + ["index", "verify"])
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "public: ok" in out and "alpha: not verified here (remote: held by its owner's node" in out
    r = run(app, w + ["index", "list", "--json"])
    rows = {x["source"]: x for x in json.loads(r.stdout)}
    assert r.exit_code == 0 and rows["alpha"]["remote"] == fx["nodes"]["alpha"].url and not rows["alpha"]["indexed"]
    assert rows["public"]["remote"] is None and rows["public"]["indexed"] and not rows["public"]["stale"]
    r = run(app, w + ["index", "list"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and r.output.count(" remote ") == len(REMOTE)
    r = run(app, w + ["index", "build", "--source", "alpha"])
    assert r.exit_code == 1 and "built there" in " ".join(r.output.split())
    r = run(app, w + ["index", "takedown", "--source", "alpha", "--doc-id", "alpha1", "--reason", "r"])
    assert r.exit_code == 1 and "its owner takes documents down there" in " ".join(r.output.split())
    assert run(app, w + ["index", "takedowns"]).exit_code == 0


# -- faults --------------------------------------------------------------------------------


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A node's address that can turn slow or answer garbage: forwards to the real node otherwise."""

    target = ""
    mode = "pass"

    def _serve(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.mode == "slow":
            time.sleep(3)
        if self.mode == "garbage":
            out, status = b'{"protocol": "flexolmo-node/1", "lengths": "none"}', 200
        else:
            with httpx.Client(timeout=10, trust_env=False) as c:
                r = c.request(self.command, self.target + self.path, content=body or None,
                              headers={k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")})
            out, status = r.content, r.status_code
        self.send_response(status)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _serve

    def log_message(self, *a):
        pass


def test_slow_or_garbage_node_is_unavailable_then_used_again(fx, tmp_path):
    _Proxy.target = fx["nodes"]["gamma"].url
    with _web_server(_Proxy) as url:
        tws = _tracer_ws(tmp_path / "t", fx["ws"], fx["records"]["public"])
        add_remote(tws, "gamma", url, fx["root"] / "gamma.key", owner="Lab C", domain="d", licence="l")
        fed = Federation.open(tws, remote=FAST)
        ids = next(_inputs(fx, 1, seed=11))
        whole = fed.find_spans(ids, fx["delim"], fx["bow"])
        for mode, why in (("slow", "within 1.5s"), ("garbage", "garbage")):
            _Proxy.mode = mode
            t0 = time.monotonic()
            spans = fed.find_spans(ids, fx["delim"], fx["bow"])
            assert time.monotonic() - t0 < FAST.deadline_s + 1.5  # never a hang
            assert why in fed.unavailable["gamma"] and fed.names == ["public"]
            assert spans == Federation.open(fx["tws"], ["public"]).find_spans(ids, fx["delim"], fx["bow"])
            time.sleep(FAST.cooldown_s)
        _Proxy.mode = "pass"
        assert fed.find_spans(ids, fx["delim"], fx["bow"]) == whole and not fed.unavailable
        fed.close()


def test_takedown_blocked_with_no_text_on_the_wire(fx):
    doc = fx["records"]["alpha"][7]
    span = _span_in(fx, "alpha", 7, 10)
    governance.takedown(fx["ws"], "alpha", doc["doc_id"], "owner request", by="owner")
    n = _raw(fx, "alpha", "/v1/matches", {"ids": span, "bow_ids": None}).json()["counts"][0]
    r = _raw(fx, "alpha", "/v1/documents", {"spans": [{"span_ids": span, "picks": list(range(min(n, 400))),
                                                        "n": 100}]})
    hit = [d for d in r.json()["documents"][0] if d["doc_id"] == doc["doc_id"]]
    assert hit and hit[0]["blocked"] and hit[0]["token_ids"] == [] and hit[0]["title"] is None
    assert json.dumps(doc["title"]) not in r.text
    fed = Federation.open(fx["tws"], remote=FAST)
    (s,) = [s for s in fed.find_spans(span, [], None, enforce_bow=False) if s.l == 0]
    got = [d for d in fed.documents(s, 100) if d.doc_id == doc["doc_id"]]
    assert got and got[0].blocked and got[0].token_ids == []
    fed.close()


def test_node_killed_mid_trace_costs_only_its_source_and_comes_back(fx):
    fed = Federation.open(fx["tws"], remote=FAST)
    inputs = list(_inputs(fx, 12, seed=5))
    errors, results = [], []

    def traces():
        for ids in inputs:
            try:
                spans = fed.find_spans(ids, fx["delim"], fx["bow"])
                names = fed.names
                results.append((ids, spans, names, fed.documents_many(spans, 5), dict(fed.unavailable)))
            except Exception as e:  # noqa: BLE001 -- any failure of a trace fails the test
                errors.append(e)

    t = threading.Thread(target=traces)
    t.start()
    time.sleep(0.05)
    fx["nodes"]["alpha"].kill()
    t.join(60)
    assert not t.is_alive() and not errors and len(results) == len(inputs)
    others = Federation.open(fx["ws"], ["beta", "gamma", "public"])
    down = [(ids, spans) for ids, spans, names, _, _ in results if "alpha" not in names]
    assert down and set().union(*(u for *_, u in results)) <= {"alpha"}
    for ids, spans in down:  # exactly the trace without alpha: every other source's results intact
        assert spans == others.find_spans(ids, fx["delim"], fx["bow"])
    fx["nodes"]["alpha"] = restart_node(fx["ws"], fx["nodes"]["alpha"], fx["keys_file"])
    ids = inputs[0]
    assert fed.find_spans(ids, fx["delim"], fx["bow"]) == Federation.open(fx["ws"]).find_spans(ids, fx["delim"], fx["bow"])
    assert not fed.unavailable and "alpha" in fed.names
    fed.close()


def test_api_owner_routes_need_that_owners_key(fx, tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app

    tws = _tracer_ws(tmp_path / "t", fx["ws"], fx["records"]["public"])
    with TestClient(create_app(tws)) as client:
        patch = lambda key=None: client.patch("/api/sources/public", json={"visibility": "snippets", "by": "x"},  # noqa: E731
                                              headers={"Authorization": f"Bearer {key}"} if key else {})
        assert patch().status_code == 401  # no key issued yet: locked from the first start all the same
        store = KeyStore.for_workspace(tws)
        _, wiki = store.create("Wiki", "owner")
        _, lab = store.create("Lab A", "owner")
        _, tracer_key = store.create("Wiki", "index")
        assert patch().status_code == 401 and "owner's key" in patch().json()["detail"]
        assert sources.get_source(tws, "public").visibility != "snippets"
        assert patch("flx_00000000_" + "y" * 43).status_code == 401
        assert patch(lab).status_code == 403 and patch(tracer_key).status_code == 403
        assert patch(wiki).status_code == 200
        doc = fx["records"]["public"][0]
        body = {"doc_id": doc["doc_id"], "reason": "owner request"}
        assert client.post("/api/sources/public/takedowns", json=body).status_code == 401
        assert client.post("/api/sources/public/takedowns", json=body,
                           headers={"Authorization": f"Bearer {lab}"}).status_code == 403
        assert catalog.list_takedowns(tws) == []  # nothing changed by the refused calls
        assert client.get("/api/sources/public/contribution").status_code == 401
        assert client.get("/api/sources/public").status_code == 200  # read routes stay open
