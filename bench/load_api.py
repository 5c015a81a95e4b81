"""Load on the API: C concurrent clients, a mix of requests, a reader holding the store.

    .venv/bin/python bench/load_api.py -w flexolmo-work                  # C = 1, 4, 16; 25 s each
    .venv/bin/python bench/load_api.py -w flexolmo-work --workers 2 --seconds 20 --words 300

Starts `flexolmo serve` on 127.0.0.1 (never another address) over the workspace (it needs
built indexes; `make demo` builds them, a model is used when there is one), then for each
level C runs C client threads for --seconds, each sending, at random with a fixed seed:
traces of --words-word passages of the workspace's documents (60%), SQL queries (20%),
generations when there is a merged model (10%, else traces), and bad requests (10%: a
comment-only query, a lone surrogate, a text over the cap; each must get its 4xx). A
separate process holds the store and reads it in a loop the whole time, as a notebook would.

The per-client limits (api/clients.py) are off unless asked (--client-rps, --client-passes):
every bench client shares one address. The bench touches no owner route, so it needs no key;
a workspace without an admin key gets one here, printed once on stderr (else the server would
print it to nobody).

Prints per level: requests/s, p50 and p99 latency (of 2xx traces and of everything), errors
(anything not 2xx except the bad requests' expected 4xx; 503/504 are budget refusals),
the reader's failures, and whether every 2xx trace is in the store exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexolmo.base import sources# noqa: E402
from flexolmo.base.workspace import Workspace  # noqa: E402
from index.keys import KeyStore  # noqa: E402
from tracing.provenance import queries

HOST = "127.0.0.1"  # the only address this bench ever binds or calls

READER = """
import json, sys, time
from pathlib import Path
from flexolmo.base.workspace import Workspace
from tracing.provenance import store
ws, stop, out = Workspace(Path(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
ok = errors = 0
while not stop.exists():
    try:
        with store.reader(ws, sandbox=False) as con:  # held open, queried in a loop
            for _ in range(10):
                con.execute("SELECT source, count(*) FROM span_documents GROUP BY 1").fetchall()
                ok += 1
                time.sleep(0.05)
    except Exception as e:
        errors += 1
        print(repr(e), file=sys.stderr)
out.write_text(json.dumps({"ok": ok, "errors": errors}))
"""

QUERIES = ["SELECT count(*) FROM traces",
           "SELECT source, count(*) AS n FROM span_sources WHERE count > 0 GROUP BY 1 ORDER BY n DESC",
           "SELECT s.text, d.source, d.doc_id FROM spans s JOIN span_documents d USING (trace_id, span_index) LIMIT 20",
           "SELECT expert, avg(routing_share) FROM span_experts GROUP BY 1"]


def passages(ws: Workspace, words: int, n: int, seed: int = 0) -> list[str]:
    """n passages of `words` words from the train documents of every source (word boundaries)."""
    rng = random.Random(seed)
    pools = []
    for s in sources.list_sources(ws):
        texts = sources.load_documents(ws, s.name, split="train", columns=["text"]).column("text").to_pylist()
        pools.append([t.split() for t in rng.sample(texts, min(len(texts), 50))])
    out = []
    for i in range(n):
        doc = max(rng.sample(pools[i % len(pools)], min(3, len(pools[i % len(pools)]))), key=len)
        a = rng.randint(0, max(0, len(doc) - words))
        out.append(" " + " ".join(doc[a: a + words]))
    return out


def start_server(ws: Workspace, workers: int, client_rps: float = 0,
                 client_passes: int = 0) -> tuple[subprocess.Popen, str]:
    made = KeyStore.for_workspace(ws).ensure_admin()
    if made is not None:
        print(f"load_api: created the workspace's admin key (shown once; `flexolmo keys admin --rotate` replaces it):"
              f" {made[1]}", file=sys.stderr)
    sock = socket.socket()
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--workspace", str(ws.root), "serve", "--host", HOST,
                             "--port", str(port), "--workers", str(workers), "--client-rps", str(client_rps),
                             "--client-passes", str(client_passes)],
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/api/health", timeout=1).json().get("tracer_open"):
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not open its tracer within 300 s")


def client(url: str, until: float, seed: int, texts: list[str], has_model: bool, cap: int, out: list) -> None:
    rng = random.Random(seed)
    bad = [("query", {"sql": "-- only a comment"}, 400), ("trace", {"text": "lone \ud800 surrogate"}, 422),
           ("trace", {"text": "x " * (cap // 2 + 1)}, 422)]
    with httpx.Client(base_url=url, timeout=httpx.Timeout(180.0)) as c:
        while time.monotonic() < until:
            r = rng.random()
            if r < 0.1:
                kind, body, expect = rng.choice(bad)
                kind = "bad"
            elif r < 0.3:
                kind, body, expect = "query", {"sql": rng.choice(QUERIES)}, 200
            elif r < 0.4 and has_model:
                prompt = " ".join(rng.choice(texts).split()[:8])  # short: fits small models' positions
                kind, body, expect = "generate", {"prompt": prompt, "generation": {"max_new_tokens": 24}}, 200
            else:
                kind, body, expect = "trace", {"text": rng.choice(texts)}, 200
            path = "/api/query" if kind == "query" or (kind == "bad" and "sql" in body) else (
                "/api/generate" if kind == "generate" else "/api/trace")
            if kind == "bad" and "text" in body and "\ud800" in body["text"]:
                content = json.dumps(body).encode()  # ensure_ascii: the surrogate goes as \\ud800
            else:
                content = json.dumps(body, ensure_ascii=False).encode()
            t0 = time.perf_counter()
            try:
                resp = c.post(path, content=content, headers={"content-type": "application/json"})
                status, data = resp.status_code, resp.json() if resp.headers.get("content-type", "").startswith(
                    "application/json") else {}
            except httpx.HTTPError as e:
                status, data = 0, {"detail": repr(e)}
            secs = time.perf_counter() - t0
            tid = data.get("trace_id") if status == 200 and kind in ("trace", "generate") else None
            out.append({"kind": kind, "status": status, "expect": expect, "secs": secs, "trace_id": tid,
                        "detail": None if status == expect else str(data.get("detail"))[:200]})


def run_level(url: str, ws: Workspace, c: int, seconds: float, texts: list[str], has_model: bool, cap: int) -> dict:
    out: list[dict] = []
    until = time.monotonic() + seconds
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(url, until, 1000 * c + i, texts, has_model, cap, out))
               for i in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok_traces = [r for r in out if r["trace_id"]]
    ids = [r["trace_id"] for r in ok_traces]
    counts = dict(queries.query(ws, "SELECT trace_id, count(*) FROM traces GROUP BY 1", limit=None).rows)
    errors = [r for r in out if r["status"] != r["expect"]]
    lat_t = [r["secs"] for r in ok_traces if r["kind"] == "trace"]
    lat_all = [r["secs"] for r in out]
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 3) if xs else None  # noqa: E731
    return {"clients": c, "requests": len(out), "wall_s": round(wall, 1), "req_per_s": round(len(out) / wall, 2),
            "traces_ok": len([r for r in ok_traces if r["kind"] == "trace"]),
            "generates_ok": len([r for r in ok_traces if r["kind"] == "generate"]),
            "queries": len([r for r in out if r["kind"] == "query"]), "bad": len([r for r in out if r["kind"] == "bad"]),
            "trace_p50_s": pct(lat_t, 50), "trace_p99_s": pct(lat_t, 99),
            "all_p50_s": pct(lat_all, 50), "all_p99_s": pct(lat_all, 99),
            "errors": len(errors), "errors_by_status": {str(s): sum(1 for e in errors if e["status"] == s)
                                                        for s in sorted({e["status"] for e in errors})},
            "error_examples": sorted({f"{e['kind']} {e['status']}: {e['detail']}" for e in errors})[:3],
            "stored_exactly_once": all(counts.get(i) == 1 for i in ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-w", "--workspace", default=None, help="a workspace with built indexes")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    ap.add_argument("--seconds", type=float, default=25.0, help="duration of each level (max 60)")
    ap.add_argument("--words", type=int, default=100, help="words per traced passage")
    ap.add_argument("--client-rps", type=float, default=0, help="the server's requests/s per client (0: no limit)")
    ap.add_argument("--client-passes", type=int, default=0, help="the server's model passes per client (0: no limit)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    ws = Workspace.resolve(args.workspace)
    levels = [int(x) for x in args.levels.split(",")]
    seconds = min(args.seconds, 60.0)
    texts = passages(ws, args.words, 64)
    proc, url = start_server(ws, args.workers, args.client_rps, args.client_passes)
    tmp = Path(tempfile.mkdtemp(prefix="load-api-"))
    reader = None
    try:
        health = httpx.get(url + "/api/health").json()
        has_model, cap = health["model"] is not None, health["limits"]["max_trace_chars"]
        httpx.post(url + "/api/trace", json={"text": texts[0]}, timeout=180)  # warm up; the store exists
        reader = subprocess.Popen([sys.executable, "-c", READER, str(ws.root), str(tmp / "stop"), str(tmp / "r.json")],
                                  cwd=Path(__file__).resolve().parent.parent, stderr=open(tmp / "reader.err", "w"))
        results = [run_level(url, ws, c, seconds, texts, has_model, cap) for c in levels]
    finally:
        (tmp / "stop").touch()
        if reader is not None:
            reader.wait(60)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    seen = json.loads((tmp / "r.json").read_text()) if (tmp / "r.json").exists() else {"ok": 0, "errors": -1}
    if reader is not None and seen["errors"]:
        seen["messages"] = sorted(set((tmp / "reader.err").read_text().strip().splitlines()))[:3]
    report = {"workspace": str(ws.root), "workers": args.workers, "model": has_model, "words": args.words,
              "seconds_per_level": seconds, "cores": os.cpu_count(), "reader": seen, "levels": results}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{ws.root}: {args.workers} worker(s), model: {'yes' if has_model else 'no'}, {args.words}-word passages, "
          f"{seconds:g} s per level; reader: {seen['ok']} reads, {seen['errors']} failures {seen.get('messages', '')}")
    print(f"{'C':>3} {'req/s':>6} {'req':>5} {'traces':>6} {'p50 s':>6} {'p99 s':>6} {'all p99':>7} "
          f"{'errors':>6}  stored once")
    for r in results:
        print(f"{r['clients']:>3} {r['req_per_s']:>6} {r['requests']:>5} {r['traces_ok']:>6} {r['trace_p50_s'] or '-':>6} "
              f"{r['trace_p99_s'] or '-':>6} {r['all_p99_s'] or '-':>7} {r['errors']:>6}  {r['stored_exactly_once']}"
              + (f"  {r['errors_by_status']} {r['error_examples']}" if r["errors"] else ""))


if __name__ == "__main__":
    main()
