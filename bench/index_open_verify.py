"""Benchmark: what opening, verifying and searching one large built index costs, and whether its
spans are infini-gram's.

    .venv/bin/python bench/index_open_verify.py --workspace /tmp/fx-scale/ws --sources s30,s100,s300 \
        --attribute 3 --json docs/results/index-open-verify.json

Run on a workspace `bench/index_scale.py --keep` left. Prints, each in a fresh child process
(so the index's own cost is measured, not what an earlier step left in memory): the time
to open each source (`SourceIndex`: sizes, manifest, sampled suffix-array order; files under
64 MB checksummed in the background, collected by `settle`), `index verify` (whole-file
sha256 of every file, structure, the stock engine, 64 brute-force counts) of the last, and, for
--attribute queries of 450 tokens (the scale bench's), `find_spans` against the stock
engine's `attribute` with OLMoTrace's settings: the same (l, r, count) for every span, or not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = r"""
import json, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/bench")
from flexolmo.base.workspace import Workspace
from index.source import SourceIndex
from index.verify import verify_index
ws, name, step, n = Workspace(__import__("pathlib").Path({ws!r})), {name!r}, {step!r}, {n}
t0 = time.perf_counter()
if step == "open":
    ix = SourceIndex(ws, name)
    opened = time.perf_counter() - t0
    ix.settle()
    print(json.dumps({{"open_s": opened, "open_and_settle_s": time.perf_counter() - t0}}))
elif step == "verify":
    r = verify_index(ws, name)
    print(json.dumps({{"verify_s": time.perf_counter() - t0, "verify_ok": r.ok, "problems": r.problems[:3]}}))
else:
    import numpy as np
    from flexolmo.base import tokenizer as tok_lib
    from index.engine import Federation
    from index_scale import TOKENS_PER_DOC, queries
    fed = Federation.open(ws, [name])
    bow, delim = np.asarray(tok_lib.read_bow_ids(ws)), tok_lib.read_delimiter_ids(ws)
    qs = queries(ws, 30 * 1_000_000 // TOKENS_PER_DOC)[:n]
    same, secs = 0, []
    for q in qs:
        mine = fed.find_spans(q, delim, bow)
        t = time.perf_counter()
        ref = fed.source(name).attribute(q, delim, min_len=1, max_cnt=1_000_000, enforce_bow=True)
        secs.append(time.perf_counter() - t)
        same += [(s.l, s.r, s.count) for s in ref] == [(s.l, s.r, s.count) for s in mine]
    print(json.dumps({{"attribute_identical": same, "attribute_compared": len(qs), "attribute_s": secs}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--sources", required=True, help="comma-separated; verify and attribute run on the last")
    ap.add_argument("--attribute", type=int, default=3, help="queries compared with engine.attribute")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    names = a.sources.split(",")
    out = {"command": " ".join(sys.argv), "source": names[-1]}
    for name, step in [(n, "open") for n in names] + [(names[-1], "verify"), (names[-1], "attribute")]:
        load = os.getloadavg()[0]
        code = STEP.format(root=str(ROOT), ws=a.workspace, name=name, step=step, n=a.attribute)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                                                                                               "PYTHONPATH": str(ROOT)})
        if r.returncode != 0:
            raise SystemExit(f"{step} failed:\n{r.stderr[-2000:]}")
        got = json.loads(r.stdout.strip().splitlines()[-1])
        key = f"{step}_{name}" if step == "open" else step
        out[key] = {**got, "load": round(load, 2)}
        print(name, step, got, f"(load {load:.1f})", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
