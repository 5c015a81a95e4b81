"""How exact are the counterfactual drops? The float32 methods and a bfloat16 model against float64.

    .venv/bin/python bench/cf_exactness.py [--workspace W] [--inputs 10]

On held-out 450-token inputs (bench/trace.py's), every kept span's drop in log-probability
when each expert is switched off, three ways: as now (flexolmo/model/counterfactual.py, float32), the
reference (one full transformers pass per expert, float32) and the same reference with the
model in float64; and as now with the model in bfloat16 (`--dtype bfloat16`: an approximate
mode, the CPU here has avx512_bf16). Prints the largest and the 99th-percentile |difference| of each float32
method to float64 and to each other, over (span, expert) pairs, and the drops' own size: the
float32 reference's distance to float64 is the floor any float32 method can be held to. Also
the routing + counterfactual time p50 of the float32 and bfloat16 runs as now, and how often
bfloat16 names the same top expert (largest drop) for a span as float32 does.
Nothing is written. Needs `make demo`'s workspace (indexes and a merged model).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.trace import inputs  # noqa: E402
from flexolmo.base.hflog import quiet_transformers  # noqa: E402
from flexolmo.base.workspace import Workspace  # noqa: E402
from flexolmo.model.moe import experts_implementation  # noqa: E402
from tracing.experts import link_experts  # noqa: E402
from tracing.trace import Tracer  # noqa: E402


def drops(model, spans, ids, eos: int, method: str) -> dict[tuple[int, int], float]:
    """(span index, expert) -> counterfactual drop, for experts with a computed drop."""
    spans = copy.deepcopy(spans)
    link_experts(model, spans, ids, [], None, counterfactual=True, bos_id=eos, method=method)
    return {(i, x.expert): x.counterfactual for i, s in enumerate(spans) for x in s.experts
            if x.counterfactual is not None and x.active}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--inputs", type=int, default=10)
    args = ap.parse_args()
    quiet_transformers()
    ws = Workspace.resolve(args.workspace)
    tracer = Tracer.open(ws)
    if tracer.model is None:
        raise SystemExit("no merged model: run `make demo` first")
    f64 = replace(tracer.model, module=copy.deepcopy(tracer.model.module).to(torch.float64))
    bf16 = replace(tracer.model, module=copy.deepcopy(tracer.model.module).to(torch.bfloat16))
    eos = tracer.tokenizer.eos_token_id
    bare = replace(tracer, model=None)
    pairs = {"now vs float64": [], "reference vs float64": [], "now vs reference": [], "bfloat16 now vs float64": []}
    size, ms, same_top = [], {"float32": [], "bfloat16": []}, []
    for k, ids in enumerate(inputs(ws, tracer, args.inputs)):
        spans = bare.trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False, store=False,
                               response=tracer.tokenizer.decode(ids)).spans
        if not spans:
            continue
        t0 = time.perf_counter()
        now = drops(tracer.model, spans, ids, eos, "batched")
        ms["float32"].append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        low = drops(bf16, spans, ids, eos, "batched")
        ms["bfloat16"].append((time.perf_counter() - t0) * 1000)
        ref = drops(tracer.model, spans, ids, eos, "per_expert")
        with experts_implementation(f64, "eager"):  # grouped_mm has no float64 kernel
            exact = drops(f64, spans, ids, eos, "per_expert")
        for key in now:  # experts with routing weight on a kept span (the others are not recomputed)
            pairs["now vs float64"].append(abs(now[key] - exact[key]))
            pairs["reference vs float64"].append(abs(ref[key] - exact[key]))
            pairs["now vs reference"].append(abs(now[key] - ref[key]))
            pairs["bfloat16 now vs float64"].append(abs(low.get(key, 0.0) - exact[key]))
            size.append(abs(exact[key]))
        for i in range(len(spans)):  # does bfloat16 name the same top expert (largest drop) as float32?
            top = [max((e for (j, e) in d if j == i), key=lambda e: d[(i, e)], default=None) for d in (now, low)]
            same_top.append(top[0] == top[1])
        print(f"  input {k + 1}: {len(spans)} spans, {len(now)} (span, expert) pairs", flush=True)
    print(f"{len(size)} (span, expert) pairs; |drop| median {np.median(size):.3f} nats, max {max(size):.2f}")
    for name, d in pairs.items():
        print(f"  {name:24s} max |diff| {max(d):.2e}   p99 {np.percentile(d, 99):.2e}   median {np.median(d):.2e}")
    print(f"bfloat16 names float32's top expert on {sum(same_top)}/{len(same_top)} spans")
    print("routing + counterfactuals as now, p50: " + ", ".join(f"{k} {np.median(v):.0f} ms" for k, v in ms.items()))
    # rounding of the stored drops (5 decimals: tracing/experts.py) is part of every figure: 5e-6 at most


if __name__ == "__main__":
    main()
