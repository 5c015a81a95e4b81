"""What reading as a caller costs: the same SQL read by the operator (views over the Parquet
parts) and by callers that read part of the store (tables of their rows, copied in memory).

    .venv/bin/python bench/private_reads.py                    # 2000 stored traces, 20 reads each
    .venv/bin/python bench/private_reads.py --traces 5000 --reads 10

Builds the tests' tiny federation (tests/conftest_model.py: three sources, indexes, no model)
in a temporary folder, traces one real passage per source, and stores --traces copies of
those traces under new ids: a tenth made with one client's token, the rest with other
tokens. Then times, in this process, `queries.query` of a few statements for: the operator,
an analyst key (reads all: the operator's path), the one client (its tenth), a client with
no trace, and an owner key of `news` (its source's span rows in every trace). Prints median
milliseconds per read and the ratio to the operator's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest_model import build_federation  # noqa: E402

from flexolmo.base import sources  # noqa: E402
from index.build import build_source  # noqa: E402
from index.keys import KeyRecord  # noqa: E402
from tracing.provenance import queries, store  # noqa: E402
from tracing.provenance.access import OPERATOR, Caller, new_token  # noqa: E402
from tracing.trace import Tracer  # noqa: E402

SQL = {"count": "SELECT count(*) FROM traces",
       "join": "SELECT d.source, count(*) FROM span_documents d JOIN spans s USING (trace_id, span_index) GROUP BY 1",
       "sources": "SELECT source, sum(count) FROM span_sources GROUP BY 1"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", type=int, default=2000)
    ap.add_argument("--reads", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ws = build_federation(Path(d) / "ws", sources=("public", "news", "code"), n_docs=30)
        for s in ("public", "news", "code"):
            build_source(ws, s)
        tracer = Tracer.open(ws, model=None)
        base = []
        for s in ("public", "news", "code"):
            text = sources.load_documents(ws, s, split="train").to_pylist()[3]["text"]
            base.append(tracer.trace(" " + " ".join(text.split(" ")[3:40]), store=False))
        mine = new_token()
        t0 = time.perf_counter()
        for i in range(args.traces):
            t = dataclasses.replace(base[i % 3], trace_id=uuid.uuid4().hex[:16])
            store.save_trace(ws, t, owner=store.Caller.for_request(ws, None, mine if i % 10 == 0 else None).owner)
        print(f"stored {args.traces} traces in {time.perf_counter() - t0:.1f} s")
        owner_rec = KeyRecord("0000aaaa", "news-owner", "owner", "", "")
        analyst_rec = KeyRecord("0000bbbb", "team", "analyst", "", "")
        callers = {"operator": OPERATOR, "analyst": Caller.for_request(ws, analyst_rec, None),
                   "client (a tenth)": Caller.for_request(ws, None, mine),
                   "client (no trace)": Caller.for_request(ws, None, None),
                   "owner key (news)": Caller.for_request(ws, owner_rec, None)}
        for name, sql in SQL.items():
            base_ms = None
            for who, caller in callers.items():
                queries.query(ws, sql, caller=caller)  # warm
                ms = []
                for _ in range(args.reads):
                    t0 = time.perf_counter()
                    queries.query(ws, sql, caller=caller)
                    ms.append(1000 * (time.perf_counter() - t0))
                med = statistics.median(ms)
                base_ms = base_ms or med
                print(f"{name:8s} {who:18s} {med:8.1f} ms  {med / base_ms:5.2f}x the operator's")


if __name__ == "__main__":
    main()
