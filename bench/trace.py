"""Trace latency, speed-up over the bare `engine.attribute`, and source-expert agreement.

    .venv/bin/python bench/trace.py [--workspace flexolmo-work] [--inputs 40] [--bare 20] [--responses 200]

Needs the demo federation (`make demo`): indexes of every sample source and the merged model.

1. Inputs: 450-token windows of held-out (validation) documents of every source: text in the
   style of the training data that was never indexed, so spans are the n-grams it shares.
2. Latency p50/p95 of the pipeline: spans + documents + relevance; + routing (one forward
   pass); + counterfactual passes (one per expert).
3. The bare `InfiniGramEngine.attribute` over the same indexes with OLMoTrace's production
   settings on the first --bare inputs: its latency, the speed-up, and whether its spans are
   identical to the pipeline's (before the K cap).
4. Agreement: --responses generated responses (prompts: starts of validation documents of
   every source); for each span, does the expert with the highest routing share belong to a
   source whose index contains the span? Against chance: a uniformly drawn active expert.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace

import numpy as np

from flexolmo import sources
from flexolmo.workspace import Workspace
from index.format import index_dir
from tracing.trace import Tracer


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def inputs(ws: Workspace, tracer: Tracer, n: int, length: int = 450, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    tok = tracer.tokenizer
    pools = {}
    for name in tracer.fed.names:
        texts = sources.load_documents(ws, name, split="validation", columns=["text"]).column("text").to_pylist()
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        pools[name] = [x for x in ids if len(x) >= length] or [sum(ids, [])]
    out = []
    names = sorted(pools)
    for i in range(n):
        doc = rng.choice(pools[names[i % len(names)]])
        a = rng.randint(0, max(0, len(doc) - length))
        out.append(doc[a: a + length])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--inputs", type=int, default=40)
    ap.add_argument("--bare", type=int, default=20)
    ap.add_argument("--responses", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="A merged model folder (default: <workspace>/models/merged).")
    ap.add_argument("--agreement-only", action="store_true", help="Skip the latency parts.")
    args = ap.parse_args()
    from flexolmo.hflog import quiet_transformers

    quiet_transformers()
    ws = Workspace.resolve(args.workspace)
    model = "auto"
    if args.model:
        from flexolmo.merge import load_merged

        model = load_merged(args.model, ws=ws)
    tracer = Tracer.open(ws, model=model)
    if tracer.model is None:
        raise SystemExit("no merged model: run `make demo` first")
    print(f"workspace {ws.root}: {len(tracer.fed.names)} sources, "
          f"{sum(tracer.fed.source(n).n_tokens for n in tracer.fed.names):,} indexed tokens")
    if not args.agreement_only:
        latency(ws, tracer, args)
    agreement(ws, tracer, args)


def latency(ws: Workspace, tracer: Tracer, args) -> None:
    data = inputs(ws, tracer, args.inputs)
    dec = tracer.tokenizer.decode
    tracer.trace_ids(data[0], prompt=None, prompt_ids=[], routing=None, generated=False, store=False)  # JIT warm-up

    # 2. pipeline latency at three depths
    rows = {}
    for label, use_model, cf in (("spans+docs+BM25", False, False), ("+ routing pass", True, False),
                                 ("+ counterfactuals", True, True)):
        t = replace(tracer, model=tracer.model if use_model else None,
                    settings=replace(tracer.settings, counterfactual=cf))
        ms, n_spans = [], []
        for ids in data:
            t0 = time.perf_counter()
            tr = t.trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False, store=False, response=dec(ids))
            ms.append((time.perf_counter() - t0) * 1000)
            n_spans.append(len(tr.spans))
        rows[label] = ms
        print(f"pipeline {label:18s} p50 {pct(ms, 50):8.1f} ms  p95 {pct(ms, 95):8.1f} ms  "
              f"(spans kept per input: {statistics.mean(n_spans):.1f})")

    # 3. the bare engine call with the production settings
    from infini_gram.engine import InfiniGramEngine

    eng = InfiniGramEngine(index_dir=[str(index_dir(ws, n)) for n in tracer.fed.names], eos_token_id=0,
                           bow_ids_path=str(ws.tokenizer_dir / "bow_ids.txt"), precompute_unigram_logprobs=True)
    bare_ms, pipe_ms, same = [], [], 0
    for ids in data[: args.bare]:
        t0 = time.perf_counter()
        ref = eng.attribute(ids, delim_ids=tracer.delims, min_len=1, max_cnt=1_000_000, enforce_bow=True)["spans"]
        bare_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        mine = tracer.fed.find_spans(ids, tracer.delims, tracer.bow)
        pipe_ms.append((time.perf_counter() - t0) * 1000)
        same += [(s["l"], s["r"], s["count"]) for s in ref] == [(s.l, s.r, s.count) for s in mine]
    p50_pipe = pct(rows["spans+docs+BM25"][: args.bare], 50)
    print(f"bare engine.attribute      p50 {pct(bare_ms, 50):8.1f} ms  p95 {pct(bare_ms, 95):8.1f} ms  "
          f"on {len(bare_ms)} inputs")
    print(f"span search alone          p50 {pct(pipe_ms, 50):8.1f} ms  p95 {pct(pipe_ms, 95):8.1f} ms")
    print(f"speed-up: span search {pct(bare_ms, 50) / pct(pipe_ms, 50):.0f}x, whole pipeline without model "
          f"{pct(bare_ms, 50) / p50_pipe:.0f}x (p50/p50); identical spans on {same}/{len(bare_ms)} inputs")



def agreement(ws: Workspace, tracer: Tracer, args) -> None:
    """4. source-expert agreement over generated responses, against a uniformly drawn expert."""
    t = replace(tracer, settings=replace(tracer.settings, counterfactual=False))
    rng = random.Random(1)
    names = sorted(tracer.fed.names)
    prompts = []
    for i in range(args.responses):
        texts = sources.load_documents(ws, names[i % len(names)], split="validation", columns=["text"]).column("text").to_pylist()
        words = rng.choice(texts).split()
        a = rng.randint(0, max(0, len(words) - 12))
        prompts.append(" ".join(words[a: a + 12]))
    # all spans, and spans found in exactly one source (where agreement is informative)
    agree, chance, n = [0, 0], [0.0, 0.0], [0, 0]
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        tr = t.generate_and_trace(p, max_new_tokens=args.new_tokens, do_sample=True, seed=i, store=False)
        for s in tr.spans:
            active = {e.source for e in s.experts if e.active}
            for j in (0, 1) if len(s.sources) == 1 else (0,):
                agree[j] += bool(s.agreement)
                chance[j] += len(set(s.sources) & active) / len(active)
                n[j] += 1
    print(f"agreement, {len(prompts)} generated responses ({time.perf_counter() - t0:.0f}s), model {args.model or 'models/merged'}:")
    for j, label in enumerate(("all spans", "single-source spans")):
        print(f"  {label:20s} {n[j]:5d} spans: {agree[j] / max(1, n[j]):.1%} "
              f"(chance {chance[j] / max(1, n[j]):.1%}, ratio {agree[j] / max(chance[j], 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
