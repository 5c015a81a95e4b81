"""The batch routes in-process: submit with a key, poll, report, plot, Parquet; who may read a batch."""

from __future__ import annotations

import io
import json
import time

import pyarrow.parquet as pq
import pytest
from conftest_model import build_federation
from fastapi.testclient import TestClient

from api.app import create_app
from flexolmo.base import sources
from index.build import build_source
from index.keys import KeyStore

NAMES = ("public", "news", "code")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    ws = build_federation(tmp_path_factory.mktemp("batchapi"), sources=NAMES, n_docs=30)
    for s in NAMES:
        build_source(ws, s)
    return ws


@pytest.fixture(scope="module")
def client(fed):
    mp = pytest.MonkeyPatch()
    mp.setenv("FLEXOLMO_MAX_BODY_BYTES", "50000")
    with TestClient(create_app(fed)) as c:
        yield c
    mp.undo()


@pytest.fixture(scope="module")
def keys(fed) -> dict[str, str]:
    store = KeyStore.for_workspace(fed)
    return {"news": store.create("news-owner", "owner")[1], "code": store.create("code-owner", "owner")[1],
            "admin": store.ensure_admin()[1]}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _jsonl(fed, n: int) -> str:
    docs = sources.load_documents(fed, "news", split="train").column("text").to_pylist()
    rows = [{"id": f"a{i}", "text": " " + " ".join(docs[i % len(docs)].split()[2:20])} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows + [{"id": "bad", "text": ""}])


def _wait(client, bid: str, key: str) -> dict:
    deadline = time.monotonic() + 180
    while True:
        st = client.get(f"/api/batches/{bid}", headers=_auth(key)).json()
        if st["complete"] or (st["progress"] or {}).get("state") == "failed" or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def test_submit_poll_report_plot_parquet_and_who_reads_a_batch(client, fed, keys):
    body = {"jsonl": _jsonl(fed, 20), "spec": {"use_model": False}, "workers": 1}
    assert client.post("/api/batches", json=body).status_code == 401
    r = client.post("/api/batches", json=body, headers=_auth(keys["news"]))
    assert r.status_code == 202, r.text
    bid = r.json()["batch_id"]
    st = _wait(client, bid, keys["news"])
    assert st["complete"] and st["progress"]["done"] == 21 and st["progress"]["errors"] == 1, st
    assert st["submitted_by"].startswith("key:")
    rep = client.get(f"/api/batches/{bid}/report", headers=_auth(keys["news"])).json()
    assert rep["n_ok"] == 20 and rep["sources"][0]["source"] == "news" and rep["sources"][0]["share_ge_8"] == 1.0
    png = client.get(f"/api/batches/{bid}/plot.png", headers=_auth(keys["news"]))
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    pqr = client.get(f"/api/batches/{bid}/parquet/responses", headers=_auth(keys["news"]))
    assert pqr.status_code == 200 and pq.read_table(io.BytesIO(pqr.content)).num_rows == 21
    assert client.get(f"/api/batches/{bid}/parquet/nope", headers=_auth(keys["news"])).status_code == 400
    # another owner's key may not read it; the admin key may
    assert client.get(f"/api/batches/{bid}", headers=_auth(keys["code"])).status_code == 403
    assert client.get(f"/api/batches/{bid}/report", headers=_auth(keys["admin"])).status_code == 200
    assert client.get("/api/batches/bnothere", headers=_auth(keys["admin"])).status_code == 404


def test_paths_need_the_admin_key_and_uploads_are_capped(client, fed, keys, tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text(_jsonl(fed, 3))
    r = client.post("/api/batches", json={"path": str(f), "spec": {"use_model": False}}, headers=_auth(keys["news"]))
    assert r.status_code == 403 and "admin key" in r.json()["detail"]
    r = client.post("/api/batches", json={"path": str(f), "spec": {"use_model": False}, "workers": 1},
                    headers=_auth(keys["admin"]))
    assert r.status_code == 202
    st = _wait(client, r.json()["batch_id"], keys["admin"])
    admin = [r for r in KeyStore.for_workspace(fed).records().values() if r.scope == "admin"][0]
    assert st["submitted_by"] == f"key:{admin.key_id}"  # a batch's owner is recorded as a trace's (access.key_owner)
    assert st["complete"] and st["submitted_by"].startswith("key:") and st["progress"]["done"] == 4
    big = {"jsonl": _jsonl(fed, 3) * 1000, "spec": {"use_model": False}}
    r = client.post("/api/batches", json=big, headers=_auth(keys["news"]))
    assert r.status_code == 413
    r = client.post("/api/batches", json={"jsonl": "{\"x\": 1}\n"}, headers=_auth(keys["news"]))
    assert r.status_code == 400 and "no record has a 'text' field" in r.json()["detail"]
