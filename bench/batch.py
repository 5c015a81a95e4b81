"""Batch tracing throughput: responses/s spans-only and with counterfactuals, 1 vs 2 workers,
Ray Data on a local cluster vs the local pool, on the same input in one process.

    .venv/bin/python bench/batch.py                      # builds a small federation in a temp folder
    .venv/bin/python bench/batch.py --workspace flexolmo-work --rows 2000 --cf-rows 100
    .venv/bin/python bench/batch.py --workspace /tmp/bw --skip-cf     # builds /tmp/bw once, then reuses it

Without --workspace: four sources of 300 documents of random domain words, the tiny model
profile (trained here, ~1 min), every source indexed. Responses: half are passages copied from
training documents (20-40 words), half new text from the same words (short matches only).
Every run is a new batch (a distinct batch id; nothing is skipped as done) committed to the
store as `trace-batch` does; the figures are end to end (worker start, model load, store
commits included) and each is printed with the ratio to its baseline measured in this run.
The machine's cores may be shared: the load average is printed with the figures, and the CPU
seconds of this process (the driver; with one local worker, the tracing too).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexolmo.base import sources  # noqa: E402
from flexolmo.base.workspace import Workspace  # noqa: E402
from tracing.batch import BatchSpec, run_batch  # noqa: E402
from tracing.batch.spec import MAX_CHARS  # noqa: E402

WORDS = {
    "public": "the a of and to in is was for on with as by history city river people world year king war science".split(),
    "news": "president congress nation economy policy tax vote law union state budget report senate".split(),
    "code": "def return import class self if else for while print list dict value none true false".split(),
    "math": "theorem proof lemma set function integer prime sum equal implies axiom group ring".split(),
}


def build(root: Path, n_docs: int) -> Workspace:
    from flexolmo.base.sources import add_records
    from flexolmo.base.tokenizer import train_tokenizer
    from flexolmo.model.merge import merge
    from flexolmo.model.train import train_expert, train_public
    from index.build import build_source

    ws = Workspace(root).ensure()
    texts = []
    for k, (name, words) in enumerate(WORDS.items()):
        rng = random.Random(k)
        docs = [{"doc_id": f"{name}-{i}", "text": " ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) + "."}
                for i in range(n_docs)]
        add_records(ws, name, docs, owner=f"{name}-owner", domain=name, licence="CC0", origin="bench")
        texts += [d["text"] for d in docs]
    train_tokenizer(ws, vocab_size=400, texts=texts)
    train_public(ws, "tiny", progress=False)
    for s in list(WORDS)[1:]:
        train_expert(ws, s, "tiny", progress=False)
    merge(ws, list(WORDS)[1:])
    for s in WORDS:
        build_source(ws, s)
    return ws


def responses(ws: Workspace, n: int, path: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    names = [s.name for s in sources.available_sources(ws)]
    docs = {s: sources.load_documents(ws, s, split="train", columns=["text"]).column("text").to_pylist() for s in names}
    vocab = sorted({w for s in names for d in docs[s][:50] for w in d.split()})
    rows = []
    for i in range(n):
        s = names[i % len(names)]
        if i % 2 == 0:
            w = rng.choice(docs[s]).split()
            a = rng.randrange(0, max(1, len(w) - 40))
            text = " ".join(w[a: a + rng.randint(20, 40)])
        else:
            text = " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 40)))
        rows.append({"id": f"r{i}", "text": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


_RUN = [0]


def timed(ws: Workspace, inp: Path, engine: str, workers: int, counterfactual: bool, use_model: bool,
          chunk: int) -> dict:
    _RUN[0] += 1  # a distinct spec, so a new batch: every row traced and stored in every run
    spec = BatchSpec.parse(use_model=use_model, options={"counterfactual": counterfactual},
                           max_chars=MAX_CHARS - _RUN[0])
    t0, c0 = time.perf_counter(), time.process_time()
    r = run_batch(ws, inp, spec, workers=workers, engine=engine, chunk_rows=chunk, stream=open(os.devnull, "w"))
    s, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert r.complete and r.run_rows == r.total, r
    return {"engine": engine, "workers": workers, "rows": r.total, "seconds": round(s, 2), "rows_per_s": r.total / s,
            "driver_cpu_s": round(cpu, 2), "load_after": round(os.getloadavg()[0], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, help="a workspace with indexes and a merged model (default: one built "
                                                   "in a temporary folder; a path that does not exist: built there)")
    ap.add_argument("--docs", type=int, default=300, help="documents per source of the built federation")
    ap.add_argument("--rows", type=int, default=1000, help="responses of the spans-only runs")
    ap.add_argument("--cf-rows", type=int, default=80, help="responses of the runs with counterfactuals")
    ap.add_argument("--chunk", type=int, default=None, help="rows per committed chunk (default: trace-batch's)")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-cf", action="store_true", help="spans-only runs only")
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="bench-batch-")
    t = time.perf_counter()
    if a.workspace is not None and a.workspace.exists():
        ws = Workspace(a.workspace)
    else:
        ws = build(a.workspace or Path(tmp.name) / "ws", a.docs)
    print(f"workspace {ws.root} ready in {time.perf_counter() - t:.0f} s; cores {os.cpu_count()}, "
          f"load average before {os.getloadavg()[0]:.1f}", flush=True)
    _RUN[0] = len(list((ws.root / "batches").glob("b*")))  # past the batches of earlier runs on this workspace
    big = responses(ws, a.rows, Path(tmp.name) / "rows.jsonl")
    small = responses(ws, a.cf_rows, Path(tmp.name) / "cf.jsonl", seed=1)
    out = {}
    out["spans_1"] = timed(ws, big, "local", 1, False, False, a.chunk)
    out["spans_2"] = timed(ws, big, "local", 2, False, False, a.chunk)
    if not a.skip_cf:
        out["cf_1"] = timed(ws, small, "local", 1, True, True, a.chunk)
        out["cf_2"] = timed(ws, small, "local", 2, True, True, a.chunk)
    if not a.skip_ray:
        out["ray_2"] = timed(ws, big, "ray", 2, False, False, a.chunk)
    for k, v in out.items():
        print(f"{k:8s} {v['engine']:5s} x{v['workers']}  {v['rows']:5d} rows  {v['seconds']:7.1f} s  "
              f"{v['rows_per_s']:7.2f} rows/s  (this process's CPU {v['driver_cpu_s']:.1f} s, load after "
              f"{v['load_after']})", flush=True)
    print(f"spans-only 2 workers / 1: {out['spans_2']['rows_per_s'] / out['spans_1']['rows_per_s']:.2f}x"
          + (f"; with counterfactuals 2 / 1: {out['cf_2']['rows_per_s'] / out['cf_1']['rows_per_s']:.2f}x"
             if "cf_1" in out else "")
          + (f"; Ray x2 / local pool x2: {out['ray_2']['rows_per_s'] / out['spans_2']['rows_per_s']:.2f}x"
             if "ray_2" in out else ""))
    print(f"load average after {os.getloadavg()[0]:.1f} (the cores are shared: ratios, not absolute rates)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
