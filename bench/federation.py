"""Federated vs local tracing: owner nodes as separate processes on 127.0.0.1.

    .venv/bin/python bench/federation.py -w /work/ws-exp [--inputs 30] [--kill news] [--scaling 1,2,4,8]

The workspace given by -w is only read: keys, logs, the tracer's workspace and the scaling
workspace go to a fresh folder under /tmp (printed; removed unless --keep).

1. One node per available source of -w (`flexolmo index serve`, its own process); a tracer
   workspace with the same tokenizer and every source added as remote.
2. The same 450-token inputs (windows of held-out documents of every source) traced by the
   local tracer (indexes opened in-process) and the federated one (every index behind a
   node), interleaved: spans must be identical (positions, lengths, counts per source) and so
   must the documents; p50/p95 latency of the whole trace without a model (spans, documents,
   relevance), and of the index part alone with the documents of all kept spans asked in
   one batch per node; request and answer bytes per trace (bodies; HTTP headers not counted).
3. --kill: the inputs again, with one node killed (SIGKILL) a third of the way through: every
   trace must complete, list only that source as unavailable, and give exactly the spans of
   the local federation without it.
4. --scaling: the train documents of every source split round-robin into N sources (N = 1, 2,
   4, 8; the same documents, hence the same total tokens, for every N), indexed once per N
   in the /tmp workspace, served by N nodes: the federated p50 of the index part against N.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from flexolmo.base.tokenizer import import_tokenizer
from flexolmo.base import sources
from flexolmo.base.workspace import Workspace
from index import build
from index.cluster import issue_keys, start_nodes, stop_nodes
from index.engine import Federation
from index.keys import write_secret
from index.remote import add_remote
from tracing.trace import Tracer


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def make_inputs(ws: Workspace, tok, names: list[str], n: int, length: int = 450, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    pools = {}
    for name in names:
        texts = sources.load_documents(ws, name, split="validation", columns=["text"]).column("text").to_pylist()
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[:40]]
        pools[name] = [x for x in ids if len(x) >= length] or [sum(ids, [])]
    out = []
    for i in range(n):
        doc = rng.choice(pools[names[i % len(names)]])
        a = rng.randint(0, max(0, len(doc) - length))
        out.append(doc[a: a + length])
    return out


def federate(ws: Workspace, names: list[str], root: Path) -> tuple[dict, Workspace]:
    """Nodes for `names` of `ws`, and a tracer workspace at root/tracer with each added as remote."""
    owners = {s.name: s.owner for s in sources.list_sources(ws)}
    keys_file = root / "keys.json"
    keys = issue_keys(ws, keys_file, [owners[n] for n in names])
    t0 = time.perf_counter()
    nodes = start_nodes(ws, names, keys_file, root / "logs")  # at the bench's own niceness, as the tracer
    print(f"  {len(nodes)} nodes ready in {time.perf_counter() - t0:.1f}s")
    tws = Workspace(root / "tracer")
    import_tokenizer(tws, ws.tokenizer_dir)
    for n in names:
        write_secret(root / f"{n}.key", keys[owners[n]])
        add_remote(tws, n, nodes[n].url, root / f"{n}.key", owner=owners[n], domain="-", licence="-")
    return nodes, tws


def traffic(fed: Federation) -> tuple[int, int]:
    cs = [ix.client for ix in fed.remote.values()]
    return sum(c.bytes_sent + c.bytes_received for c in cs), sum(c.requests for c in cs)


def span_key(t) -> list:
    return [(s.start, s.end, s.count, s.count_by_source, round(s.unigram_logprob_sum, 9),
             [(d.source, d.doc_id, d.blocked, d.snippet, d.context) for d in s.documents]) for s in t.spans]


def index_part(fed: Federation, tracer: Tracer, ids: list[int]) -> float:
    """find_spans + OLMoTrace's K selection + documents of the kept spans (one batch per node), in ms."""
    t0 = time.perf_counter()
    raw = fed.find_spans(ids, tracer.delims, tracer.bow)
    k = math.ceil(0.05 * len(ids))
    kept = sorted(sorted(raw, key=lambda s: s.unigram_logprob_sum)[:k], key=lambda s: (s.l, s.r))
    fed.documents_many(kept, 10, 0)
    return (time.perf_counter() - t0) * 1000


def compare(ws: Workspace, root: Path, n_inputs: int, kill: str | None) -> dict:
    names = [s.name for s in sources.available_sources(ws)]
    nodes, tws = federate(ws, names, root)
    try:
        local, fed = Tracer.open(ws, model=None), Tracer.open(tws, model=None)
        inputs = make_inputs(ws, local.tokenizer, names, n_inputs)
        for t in (local, fed):  # warm-up: compiled search, connections, unigram counts
            t.trace_ids(inputs[0], prompt=None, prompt_ids=[], routing=None, generated=False, store=False)
        lt, ft, li, fi, nbytes, nreq, same = [], [], [], [], [], [], 0
        for ids in inputs:
            t0 = time.perf_counter()
            a = local.trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False, store=False)
            lt.append((time.perf_counter() - t0) * 1000)
            b0, r0 = traffic(fed.fed)
            t0 = time.perf_counter()
            b = fed.trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False, store=False)
            ft.append((time.perf_counter() - t0) * 1000)
            b1, r1 = traffic(fed.fed)
            nbytes.append(b1 - b0)
            nreq.append(r1 - r0)
            same += span_key(a) == span_key(b) and not b.sources_skipped
            li.append(index_part(local.fed, local, ids))
            fi.append(index_part(fed.fed, fed, ids))
        res = dict(n=len(inputs), sources=len(names), identical=same, local_p50=pct(lt, 50), local_p95=pct(lt, 95),
                   fed_p50=pct(ft, 50), fed_p95=pct(ft, 95), idx_local_p50=pct(li, 50), idx_local_p95=pct(li, 95),
                   idx_fed_p50=pct(fi, 50), idx_fed_p95=pct(fi, 95), bytes_p50=pct(nbytes, 50),
                   bytes_mean=statistics.mean(nbytes), req_p50=pct(nreq, 50))
        if kill:
            res.update(kill_run(ws, local, fed, nodes, inputs, kill, names))
        return res
    finally:
        stop_nodes(nodes)


def kill_run(ws: Workspace, local: Tracer, fed: Tracer, nodes: dict, inputs: list, kill: str, names: list) -> dict:
    others = Federation.open(ws, [n for n in names if n != kill])
    lat, ok, exact = [], 0, 0
    for i, ids in enumerate(inputs):
        if i == len(inputs) // 3:
            nodes[kill].kill()
        t0 = time.perf_counter()
        b = fed.trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False, store=False)
        lat.append((time.perf_counter() - t0) * 1000)
        if i > len(inputs) // 3:
            ok += set(b.sources_skipped) == {kill} and kill not in b.sources_searched
            exact += fed.fed.find_spans(ids, fed.delims, fed.bow) == others.find_spans(ids, local.delims, local.bow)
    after = lat[len(inputs) // 3 + 1:]
    why = fed.fed.skipped.get(kill, "")
    return dict(kill=kill, kill_traces=len(after), kill_ok=ok, kill_exact=exact, kill_p50=pct(after, 50),
                kill_p95=pct(after, 95), kill_why=why)


def scaling(ws: Workspace, root: Path, counts: list[int], n_inputs: int, stride: int) -> list[dict]:
    """The same documents (every `stride`-th) split into N sources, N nodes: index-part p50 local and federated."""
    names = [s.name for s in sources.available_sources(ws)]
    docs = []
    for n in names:
        t = sources.load_documents(ws, n, split="train", columns=["doc_id", "text", "title"])
        docs += [{"doc_id": f"{n}/{d}", "text": x, "title": ti} for d, x, ti in
                 zip(*(t.column(c).to_pylist() for c in ("doc_id", "text", "title")))]
    docs, rows = docs[::stride], []
    tok = Tracer.open(ws, model=None)  # for the tokenizer, delimiters and inputs
    inputs = make_inputs(ws, tok.tokenizer, names, n_inputs, seed=1)
    for N in counts:
        sw = Workspace(root / f"scale{N}")
        import_tokenizer(sw, ws.tokenizer_dir)
        parts = [f"part{k}" for k in range(N)]
        for k, p in enumerate(parts):
            sources.add_records(sw, p, docs[k::N], owner=f"owner{k}", domain="-", licence="-", origin="bench")
        t0 = time.perf_counter()
        n_tokens = sum(build.build_source(sw, p).n_tokens for p in parts)
        print(f"  N={N}: {n_tokens:,} tokens indexed in {time.perf_counter() - t0:.0f}s")
        nodes, tws = federate(sw, parts, root / f"fed{N}")
        try:
            local, fed = Federation.open(sw), Federation.open(tws)
            for f in (local, fed):
                index_part(f, tok, inputs[0])
            li = [index_part(local, tok, ids) for ids in inputs]
            fi = [index_part(fed, tok, ids) for ids in inputs]
            same = sum(local.find_spans(x, tok.delims, tok.bow) == fed.find_spans(x, tok.delims, tok.bow) for x in inputs)
            rows.append(dict(N=N, tokens=n_tokens, local_p50=pct(li, 50), fed_p50=pct(fi, 50), fed_p95=pct(fi, 95),
                             identical=same, n=len(inputs)))
            print(f"  N={N}: local p50 {rows[-1]['local_p50']:.1f} ms, federated p50 {rows[-1]['fed_p50']:.1f} ms")
        finally:
            stop_nodes(nodes)
        shutil.rmtree(sw.root, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-w", "--workspace", required=True)
    ap.add_argument("--inputs", type=int, default=30)
    ap.add_argument("--kill", default="news", help="the source whose node is killed during the second run ('' for none)")
    ap.add_argument("--scaling", default="1,2,4,8", help="node counts, or '' for none")
    ap.add_argument("--scaling-inputs", type=int, default=16)
    ap.add_argument("--scaling-stride", type=int, default=4, help="index every k-th document for the scaling run "
                                                                   "(4 builds of the whole corpus take too long here)")
    ap.add_argument("--keep", action="store_true", help="keep the /tmp folder")
    args = ap.parse_args()
    ws = Workspace.resolve(args.workspace)
    root = Path(tempfile.mkdtemp(prefix="flexolmo-fed-bench-", dir="/tmp"))
    print(f"workspace {ws.root} (read only); scratch {root}")
    try:
        r = compare(ws, root / "compare", args.inputs, args.kill or None)
        print(f"\n{r['sources']} nodes, {r['n']} inputs of 450 tokens; identical spans and documents: "
              f"{r['identical']}/{r['n']}")
        print("| tracer | trace p50 ms | trace p95 ms | index part p50 ms | index part p95 ms |")
        print("|---|---:|---:|---:|---:|")
        print(f"| local | {r['local_p50']:.1f} | {r['local_p95']:.1f} | {r['idx_local_p50']:.1f} | {r['idx_local_p95']:.1f} |")
        print(f"| federated | {r['fed_p50']:.1f} | {r['fed_p95']:.1f} | {r['idx_fed_p50']:.1f} | {r['idx_fed_p95']:.1f} |")
        print(f"ratio p50: trace {r['fed_p50'] / r['local_p50']:.2f}x, index part {r['idx_fed_p50'] / r['idx_local_p50']:.2f}x")
        print(f"bytes per trace (bodies): p50 {r['bytes_p50'] / 1e3:.1f} kB, mean {r['bytes_mean'] / 1e3:.1f} kB; "
              f"requests per trace p50 {r['req_p50']:.0f}")
        if "kill" in r:
            print(f"killed {r['kill']}: {r['kill_ok']}/{r['kill_traces']} later traces list only it as unavailable, "
                  f"{r['kill_exact']}/{r['kill_traces']} exactly the spans without it; p50 {r['kill_p50']:.1f} ms, "
                  f"p95 {r['kill_p95']:.1f} ms; why: {r['kill_why']}")
        counts = [int(x) for x in args.scaling.split(",") if x.strip()]
        if counts:
            rows = scaling(ws, root / "scaling", counts, args.scaling_inputs, args.scaling_stride)
            print("\n| nodes | tokens | local p50 ms | federated p50 ms | federated p95 ms | identical |")
            print("|---:|---:|---:|---:|---:|---:|")
            for x in rows:
                print(f"| {x['N']} | {x['tokens']:,} | {x['local_p50']:.1f} | {x['fed_p50']:.1f} | {x['fed_p95']:.1f} | "
                      f"{x['identical']}/{x['n']} |")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
