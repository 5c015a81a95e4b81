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

Prints per level: requests/s and completed traces/s, p50 and p99 latency (of 2xx traces and of
everything), refusals (429/503: a refused client waits its Retry-After, then goes on), errors
(anything else not 2xx except the bad requests' expected 4xx; 504 is a trace stopped at its
budget), the reader's failures, and whether every 2xx trace is in the store exactly once.

Closed-loop clients measure capacity (each waits for its answer before the next request: by
Little's law the latency grows with the clients). What a user sees when the service is busy
is measured open-loop: requests arrive as a Poisson process at a set rate, whatever the
answers, a mix of request kinds (KINDS: pasted traces with and without counterfactuals, the
first part of a streamed trace, spans-only traces (no expert linkage), generations when there
is a model):

    .venv/bin/python bench/load_api.py -w WS --open-loop 0.8,2 --seconds 30   # x the measured capacity

Each kind's idle p50 is measured first (one request at a time); the capacity is the rate
that keeps the tracer's model lane busy (1 / the mix's mean idle time on it; api/worker.py).
Prints per load and kind: p50 and p99 of the admitted requests and their ratio to the kind's
idle p50, refusals (429/503) with the p99 time to the refusal and whether each carried
Retry-After, errors, what became of the streamed traces' experts (linked, or 503: refused
after the spans were sent) and whether every admitted trace is stored exactly once.
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


def start_server(ws: Workspace, workers: int, client_rps: float = 0, client_passes: int = 0,
                 serve_options: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
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
                             "--client-passes", str(client_passes), *serve_options],
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
            refused = status in (429, 503) and kind != "bad"
            out.append({"kind": kind, "status": status, "expect": expect, "secs": secs, "trace_id": tid,
                        "refused": refused, "detail": None if status == expect or refused else str(data.get("detail"))[:200]})
            if refused:  # as a client should: back after Retry-After (or the budget's end)
                time.sleep(min(float(resp.headers.get("retry-after", 1)), max(0.0, until - time.monotonic())))


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
    errors = [r for r in out if r["status"] != r["expect"] and not r["refused"]]
    lat_t = [r["secs"] for r in ok_traces if r["kind"] == "trace"]
    lat_all = [r["secs"] for r in out]
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 3) if xs else None  # noqa: E731
    return {"clients": c, "requests": len(out), "wall_s": round(wall, 1), "req_per_s": round(len(out) / wall, 2),
            "traces_ok": len([r for r in ok_traces if r["kind"] == "trace"]),
            "traces_per_s": round(len([r for r in ok_traces if r["kind"] == "trace"]) / wall, 2),
            "refused": sum(1 for r in out if r["refused"]),
            "generates_ok": len([r for r in ok_traces if r["kind"] == "generate"]),
            "queries": len([r for r in out if r["kind"] == "query"]), "bad": len([r for r in out if r["kind"] == "bad"]),
            "trace_p50_s": pct(lat_t, 50), "trace_p99_s": pct(lat_t, 99),
            "all_p50_s": pct(lat_all, 50), "all_p99_s": pct(lat_all, 99),
            "errors": len(errors), "errors_by_status": {str(s): sum(1 for e in errors if e["status"] == s)
                                                        for s in sorted({e["status"] for e in errors})},
            "error_examples": sorted({f"{e['kind']} {e['status']}: {e['detail']}" for e in errors})[:3],
            "stored_exactly_once": all(counts.get(i) == 1 for i in ids)}


# open-loop request kinds: (share of arrivals, path, body fields, holds the model lane); "spans" is
# the time to a streamed trace's first part (its spans, documents and relevance), the rest the
# whole answer; "spans-only" asks for no expert linkage (index lane only)
KINDS = {"trace": (0.35, "/api/trace", {"options": {"counterfactual": True}}, True),
         "trace-nocf": (0.25, "/api/trace", {"options": {"counterfactual": False}}, True),
         "spans": (0.15, "/api/trace/stream", {"options": {"counterfactual": True}}, True),
         "spans-only": (0.15, "/api/trace", {"options": {"link_experts": False}}, False),
         "generate": (0.1, "/api/generate", {"generation": {"max_new_tokens": 24}}, True)}


def one(c: httpx.Client, kind: str, text: str) -> dict:
    """Send one request of `kind`; its status, seconds to the answer (to the first part for
    "spans"), Retry-After, the trace id it stored (None if none) and, for a streamed trace, what
    became of its experts ("done", or the `error` event's status: 503 not started, 504 stopped)."""
    _, path, extra, _ = KINDS[kind]
    body = {"prompt": " ".join(text.split()[:8]), **extra} if kind == "generate" else {"text": text, **extra}
    t0 = time.perf_counter()
    tid, secs, experts = None, None, None
    try:
        if kind == "spans":
            with c.stream("POST", path, json=body) as r:
                status, retry, event = r.status_code, r.headers.get("retry-after"), None
                for line in r.iter_lines():  # read to the end: the trace is stored after the last part
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                        if event == "spans":
                            secs = time.perf_counter() - t0
                        elif event == "done":
                            experts, tid = "done", data["trace_id"] if data.get("stored") else None
                        elif event == "error":
                            experts = data.get("status")
        else:
            r = c.post(path, json=body)
            status, retry = r.status_code, r.headers.get("retry-after")
            tid = r.json().get("trace_id") if status == 200 else None
    except httpx.HTTPError:
        status, retry = 0, None
    secs = secs if secs is not None else time.perf_counter() - t0
    return {"kind": kind, "status": status, "secs": secs, "retry_after": retry, "experts": experts,
            "trace_id": tid if status == 200 else None}


def idle_p50(url: str, texts: list[str], kinds: list[str], n: int = 5) -> dict[str, float]:
    """Each kind's p50 over `n` requests, one at a time on an otherwise idle service, after one
    not counted (it warms the kind's code paths; the service times its stages from it on)."""
    out = {}
    with httpx.Client(base_url=url, timeout=httpx.Timeout(180.0)) as c:
        for k in kinds:
            one(c, k, texts[-1])
            out[k] = float(np.median([one(c, k, texts[i % len(texts)])["secs"] for i in range(n)]))
    return out


def open_loop(url: str, ws: Workspace, rate: float, seconds: float, texts: list[str], kinds: list[str],
              idle: dict[str, float], seed: int = 0) -> dict:
    """Poisson arrivals at `rate` per second for `seconds`, each request on its own thread."""
    rng = random.Random(seed)
    before = httpx.get(url + "/api/health").json()["admission"]
    shares = [KINDS[k][0] for k in kinds]
    out: list[dict] = []
    threads = []
    c = httpx.Client(base_url=url, timeout=httpx.Timeout(180.0), limits=httpx.Limits(max_connections=1000))
    t_end = time.monotonic() + seconds
    at = time.monotonic()
    while True:
        at += rng.expovariate(rate)
        if at > t_end:
            break
        time.sleep(max(0.0, at - time.monotonic()))
        kind = rng.choices(kinds, shares)[0]
        th = threading.Thread(target=lambda k=kind, t=rng.choice(texts): out.append(one(c, k, t)))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    c.close()
    counts = dict(queries.query(ws, "SELECT trace_id, count(*) FROM traces GROUP BY 1", limit=None).rows)
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 3) if xs else None  # noqa: E731
    per = {}
    for k in kinds:
        rs = [r for r in out if r["kind"] == k]
        ok = [r["secs"] for r in rs if r["status"] == 200]
        refused = [r for r in rs if r["status"] in (429, 503)]
        streamed = [r["experts"] for r in rs if r["status"] == 200 and k == "spans"]
        per[k] = {"n": len(rs), "ok": len(ok), "idle_p50_s": round(idle[k], 3), "p50_s": pct(ok, 50),
                  **({"experts": {str(x): streamed.count(x) for x in sorted(set(streamed), key=str)}} if streamed else {}),
                  "p99_s": pct(ok, 99), "p99_x_idle": round(pct(ok, 99) / idle[k], 1) if ok else None,
                  "refused": len(refused), "refused_p99_s": pct([r["secs"] for r in refused], 99),
                  "refused_with_retry_after": sum(1 for r in refused if r["retry_after"]),
                  "errors": sum(1 for r in rs if r["status"] not in (200, 429, 503)),
                  "errors_by_status": {str(s): sum(1 for r in rs if r["status"] == s)
                                       for s in sorted({r["status"] for r in rs} - {200, 429, 503})}}
    ids = [r["trace_id"] for r in out if r["trace_id"]]
    after = httpx.get(url + "/api/health").json()["admission"]
    late = {k: after[k] - before[k] for k in ("answered", "late")}  # after their planned due, as the service saw it
    return {"rate_per_s": round(rate, 3), "requests": len(out), "kinds": per, "service": {
        **late, "worst_late_s_since_start": after["worst_late_s"]}, "stored_exactly_once": all(counts.get(i) == 1 for i in ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-w", "--workspace", default=None, help="a workspace with built indexes")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    ap.add_argument("--seconds", type=float, default=25.0, help="duration of each level (max 60)")
    ap.add_argument("--words", type=int, default=100, help="words per traced passage")
    ap.add_argument("--client-rps", type=float, default=0, help="the server's requests/s per client (0: no limit)")
    ap.add_argument("--client-passes", type=int, default=0, help="the server's model passes per client (0: no limit)")
    ap.add_argument("--open-loop", default=None, metavar="X,Y",
                    help="open-loop instead: Poisson arrivals at these multiples of the measured capacity")
    ap.add_argument("--queue-factor", type=float, default=None, help="the server's admission factor (default: serve's)")
    ap.add_argument("--model-nice", type=int, default=None, help="the server's model-lane nice value (default: serve's)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    ws = Workspace.resolve(args.workspace)
    levels = [int(x) for x in args.levels.split(",")]
    seconds = min(args.seconds, 60.0)
    texts = passages(ws, args.words, 64)
    serve_options = tuple(x for name in ("queue_factor", "model_nice") if getattr(args, name) is not None
                          for x in (f"--{name.replace('_', '-')}", str(getattr(args, name))))
    proc, url = start_server(ws, args.workers, args.client_rps, args.client_passes, serve_options)
    tmp = Path(tempfile.mkdtemp(prefix="load-api-"))
    reader = None
    try:
        health = httpx.get(url + "/api/health").json()
        has_model, cap = health["model"] is not None, health["limits"]["max_trace_chars"]
        httpx.post(url + "/api/trace", json={"text": texts[0]}, timeout=180)  # warm up; the store exists
        if args.open_loop:
            kinds = [k for k in KINDS if has_model or k != "generate"]
            idle = idle_p50(url, texts, kinds)
            share = sum(KINDS[k][0] for k in kinds)
            # a streamed trace holds the tracer thread as long as a whole trace with counterfactuals
            # the model lane's time per request: a streamed trace holds it as long as a whole trace
            busy = {k: (idle["trace"] if k == "spans" else idle[k]) if KINDS[k][3] else 0.0 for k in kinds}
            capacity = 1 / sum(KINDS[k][0] / share * busy[k] for k in kinds)
            loads = [float(x) for x in args.open_loop.split(",")]
            runs = [{"load": x, **open_loop(url, ws, x * capacity, seconds, texts, kinds, idle, seed=i)}
                    for i, x in enumerate(loads)]
            report = {"workspace": str(ws.root), "workers": args.workers, "model": has_model, "words": args.words,
                      "seconds": seconds, "cores": os.cpu_count(), "capacity_per_s": round(capacity, 3),
                      "serve": {k: health["limits"][k] for k in ("queue_factor", "model_nice")},
                      "idle_p50_s": {k: round(v, 3) for k, v in idle.items()}, "runs": runs}
            print(json.dumps(report) if args.json else _open_loop_table(report))
            return
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
    print(f"{'C':>3} {'req/s':>6} {'req':>5} {'traces':>6} {'tr/s':>5} {'p50 s':>6} {'p99 s':>6} {'all p99':>7} "
          f"{'refused':>7} {'errors':>6}  stored once")
    for r in results:
        print(f"{r['clients']:>3} {r['req_per_s']:>6} {r['requests']:>5} {r['traces_ok']:>6} {r['traces_per_s']:>5} "
              f"{r['trace_p50_s'] or '-':>6} {r['trace_p99_s'] or '-':>6} {r['all_p99_s'] or '-':>7} {r['refused']:>7} "
              f"{r['errors']:>6}  {r['stored_exactly_once']}"
              + (f"  {r['errors_by_status']} {r['error_examples']}" if r["errors"] else ""))


def _open_loop_table(rep: dict) -> str:
    lines = [f"{rep['workspace']}: {rep['workers']} worker(s), model: {'yes' if rep['model'] else 'no'}, "
             f"{rep['words']}-word passages, {rep['seconds']:g} s per load, {rep['cores']} cores; capacity "
             f"{rep['capacity_per_s']} req/s (1 / the mix's mean idle time on the model lane); queue factor "
             f"{rep['serve']['queue_factor']:g}, model lane nice {rep['serve']['model_nice']}",
             f"{'load':>5} {'req/s':>6} {'kind':<10} {'n':>4} {'ok':>4} {'idle p50':>8} {'p50':>6} {'p99':>6} "
             f"{'p99/idle':>8} {'refused':>7} {'ref p99':>7} {'errors':>6}  stored once"]
    for run in rep["runs"]:
        for k, r in run["kinds"].items():
            lines.append(f"{run['load']:>5} {run['rate_per_s']:>6} {k:<10} {r['n']:>4} {r['ok']:>4} {r['idle_p50_s']:>8} "
                         f"{r['p50_s'] or '-':>6} {r['p99_s'] or '-':>6} {r['p99_x_idle'] or '-':>8} "
                         f"{r['refused']:>7} {r['refused_p99_s'] or '-':>7} {r['errors']:>6}  {run['stored_exactly_once']}"
                         + (f" {r['errors_by_status']}" if r["errors"] else "")
                         + (f"  experts: {r['experts']}" if r.get("experts") else ""))
        sv = run["service"]
        lines.append(f"{run['load']:>5} the service answered {sv['answered']}, {sv['late']} after their planned due time "
                     f"(worst since its start: {sv['worst_late_s_since_start']} s late)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
