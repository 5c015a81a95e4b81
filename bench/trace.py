"""Trace latency with counterfactuals by the reference and as now, first trace of a new process,
speed-up over the bare `engine.attribute`, and source-expert agreement by routing and by
counterfactual.

    .venv/bin/python bench/trace.py [--workspace W] [--inputs 40] [--bare 20] [--responses 200]
    .venv/bin/python bench/trace.py --workspace W --random-model demo --skip-agreement
    .venv/bin/python bench/trace.py --workspace W --random-model demo --floors-only --inputs 6
    .venv/bin/python bench/trace.py --workspace W --floors-only --inputs 6 --threads 1 --cpu-time

Needs indexes of every source and a merged model (`make demo`); `--random-model demo` builds
a demo-sized 8-expert model with random weights instead (latency only: its routing means
nothing, so agreement is skipped). Nothing is written: traces are not stored.

1. Inputs: 450-token windows of held-out (validation) documents of every source.
2. Latency p50/p95: spans + documents + relevance; + routing pass; + counterfactuals by the
   reference (one full forward pass per switched-on expert, plus one for the base log-probs)
   and as now (flexolmo/model/counterfactual.py), interleaved on the same inputs, with the largest
   difference between the two drops (the same numbers, to float tolerance), the counterfactual
   stage alone, the FLOPs of both on one input, the warm traces' stage breakdown (p50 over
   inputs after the first) and the load average (timings on shared cores are noisy); then each
   model stage against its arithmetic floor: the FLOPs it must do (torch's FlopCounterMode) and
   the rate it achieves, against the cores' float32 matmul rate measured in the same run, and
   against its shape floor: its own matmul and attention calls replayed alone at their recorded
   shapes (what the shapes cost on these cores; the rest is the stage's overhead).
3. First trace of a new process against a warm one (fresh interpreter, run twice: the first
   run may fill numba's on-disk cache, the second shows a normal start).
4. The bare `InfiniGramEngine.attribute` with the same delimiters: latency, speed-up, same spans.
5. Agreement on generated responses: does the top expert's source hold the span, with the
   top expert by routing share and by counterfactual drop; all spans and single-source spans,
   against a uniformly drawn switched-on expert.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexolmo.base import sources  # noqa: E402
from flexolmo.base.workspace import Workspace  # noqa: E402
from flexolmo.model.generate import GenerationOptions  # noqa: E402
from tracing.experts import link_experts  # noqa: E402
from tracing.trace import Tracer  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def inputs(ws: Workspace, tracer: Tracer, n: int, length: int = 450, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    tok = tracer.tokenizer
    pools = {}
    for name in tracer.fed.names:
        load = lambda split: sources.load_documents(ws, name, split=split,  # noqa: E731
                                                    columns=["text"]).column("text").to_pylist()
        texts = load("validation") or load("train")  # tiny test federations hold no validation
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        pools[name] = [x for x in ids if len(x) >= length] or [sum(ids, [])]
    out = []
    names = sorted(pools)
    for i in range(n):
        doc = rng.choice(pools[names[i % len(names)]])
        a = rng.randint(0, max(0, len(doc) - length))
        out.append(doc[a: a + length])
    return out


def random_model(ws: Workspace, tracer: Tracer, profile: str):
    """A `profile`-sized merged model with random weights, one expert per served source."""
    from flexolmo.model.config import get_profile
    from flexolmo.model.moe import LoadedModel, build_model

    names = ["public"] + [n for n in tracer.fed.names if n != "public"]
    tok = tracer.tokenizer
    cfg = get_profile(profile).model.hf_config(vocab_size=len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                               num_experts=len(names))
    return LoadedModel(module=build_model(cfg, seed=0).eval(), experts=names)


def open_tracer(ws: Workspace, args) -> Tracer:
    if args.random_model:
        tracer = Tracer.open(ws, model=None)
        tracer.model = random_model(ws, tracer, args.random_model)
        tracer.model_name = f"random {args.random_model}"
        return tracer
    from flexolmo.model.loading import ModelSpec

    return Tracer.open(ws, model=ModelSpec.parse(args.model))  # None: the workspace's merged model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--inputs", type=int, default=40)
    ap.add_argument("--bare", type=int, default=20)
    ap.add_argument("--responses", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=12)
    ap.add_argument("--model", default=None, help="A merged model folder (default: <workspace>/models/merged).")
    ap.add_argument("--random-model", choices=["tiny", "demo", "paper"], default=None,
                    help="Latency with a random-weight model of this profile (no merged model needed).")
    ap.add_argument("--agreement-only", action="store_true", help="Skip the latency parts.")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--floors-only", action="store_true",
                    help="Only the model stages against their arithmetic floor (warm traces of --inputs inputs).")
    ap.add_argument("--threads", type=int, default=None, help="--floors-only: torch threads (default: torch's).")
    ap.add_argument("--cpu-time", action="store_true",
                    help="--floors-only with --threads 1: every time in this thread's CPU time (other processes "
                         "on the cores then cost nothing; torch's threads stall one another when they are busy).")
    ap.add_argument("--first-trace-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bigtok-first", default=None, metavar="SCRATCH",
                    help="Only: first trace vs warm with a 111,059-id tokenizer (u32 index built in SCRATCH).")
    ap.add_argument("--bigtok-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bigtok_first:
        return bigtok_first(Path(args.bigtok_first), child=args.bigtok_child)
    t_import = time.perf_counter()
    from flexolmo.base.hflog import quiet_transformers

    quiet_transformers()
    ws = Workspace.resolve(args.workspace)
    if args.first_trace_child:
        return first_trace_child(ws, args, t_import)
    tracer = open_tracer(ws, args)
    if tracer.model is None:
        raise SystemExit("no merged model: run `make demo` first, or pass --random-model demo")
    print(f"workspace {ws.root}: {len(tracer.fed.names)} sources, "
          f"{sum(tracer.fed.source(n).n_tokens for n in tracer.fed.names):,} indexed tokens; model {tracer.model_name}, "
          f"{len(tracer.model.experts)} experts, top-{tracer.model.config.num_experts_per_tok}")
    if args.floors_only:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.cpu_time:
            if torch.get_num_threads() != 1:
                raise SystemExit("--cpu-time needs --threads 1 (the timings read this thread's clock)")
            time.perf_counter = time.thread_time  # the stages' timings, the matmul rate and the replays
        print(f"torch threads {torch.get_num_threads()}{'; times in CPU time' if args.cpu_time else ''}")
        data = inputs(ws, tracer, args.inputs)
        stages = [tracer.trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False,
                                   store=False).timings_ms for ids in data]
        return floors(tracer, data[1:], stages[1:], tracer.tokenizer.eos_token_id)
    if not args.agreement_only:
        latency(ws, tracer, args)
        first_trace(args)
        bare(ws, tracer, args)
    if not args.skip_agreement and not args.random_model:
        agreement(ws, tracer, args)


def latency(ws: Workspace, tracer: Tracer, args) -> None:
    """2. pipeline latency; counterfactuals by the reference (one full pass per expert) and now
    (flexolmo/model/counterfactual.py) on the same inputs, interleaved; warm stage breakdown."""
    data = inputs(ws, tracer, args.inputs)
    dec = tracer.tokenizer.decode
    tracer.trace_ids(data[0], prompt=None, prompt_ids=[], routing=None, generated=False, store=False)  # warm-up
    eos = tracer.tokenizer.eos_token_id
    rows: dict[str, list[float]] = {k: [] for k in ("spans+docs+BM25", "+ routing pass", "+ counterfactuals, reference",
                                                  "+ counterfactuals, now")}
    cf_ms: dict[str, list[float]] = {"per_expert": [], "batched": []}  # the counterfactual stage alone
    diffs, skipped, n_spans, stages = [], 0, [], []
    bare_tracer = replace(tracer, model=None)
    print(f"  load average before: {load()}")
    for ids in data:
        t0 = time.perf_counter()
        tr = bare_tracer.trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False, store=False,
                                   response=dec(ids))
        base_ms = (time.perf_counter() - t0) * 1000
        rows["spans+docs+BM25"].append(base_ms)
        n_spans.append(len(tr.spans))
        out = {}
        for label, cf, method in (("+ routing pass", False, "batched"), ("+ counterfactuals, reference", True, "per_expert"),
                                  ("+ counterfactuals, now", True, "batched")):
            spans = copy.deepcopy(tr.spans)
            t0 = time.perf_counter()
            sub = link_experts(tracer.model, spans, ids, [], None, counterfactual=cf, bos_id=eos, method=method) if spans else {}
            rows[label].append(base_ms + (time.perf_counter() - t0) * 1000)
            if cf:
                cf_ms[method].append(sub.get("counterfactual", 0.0))
            out[method if cf else "routing"] = spans
        for a, b in zip(out["batched"], out["per_expert"]):
            for x, y in zip(a.experts, b.experts):
                if x.counterfactual is None:
                    skipped += x.active
                else:
                    diffs.append(abs(x.counterfactual - y.counterfactual))
        stages.append(tracer.trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False,
                                       store=False).timings_ms)
    for label, ms in rows.items():
        print(f"pipeline {label:28s} p50 {pct(ms, 50):8.1f} ms  p95 {pct(ms, 95):8.1f} ms")
    print(f"  spans kept per input: {statistics.mean(n_spans):.1f}; now vs reference drops: max |diff| "
          f"{max(diffs, default=0):.2e} over {len(diffs)} (span, expert) pairs; skipped (no routing weight on any "
          f"kept span): {skipped}")
    ratio = [r / max(n, 1e-9) for r, n in zip(cf_ms["per_expert"], cf_ms["batched"])]
    print(f"  counterfactual stage alone p50: reference {pct(cf_ms['per_expert'], 50):.0f} ms, now "
          f"{pct(cf_ms['batched'], 50):.0f} ms (per input reference/now p50 {pct(ratio, 50):.1f}x)")
    b, a = pct(rows["+ counterfactuals, reference"], 50), pct(rows["+ counterfactuals, now"], 50)
    print(f"  full trace with counterfactuals p50: {b:.0f} ms -> {a:.0f} ms ({b / a:.1f}x)")
    flops(tracer, data[0], eos)
    print(f"warm traces (Tracer.trace_ids, inputs 2..{len(stages)}), p50 per stage (ms): "
          f"{warm_stages(stages[1:])}; load average after: {load()}")
    floors(tracer, data[1: 1 + min(8, len(data) - 1)], stages[1:], eos)


def matmul_rate(n: int = 1024, reps: int = 8) -> float:
    """The cores' float32 matmul rate (GFLOP/s): the best of several timed (n x n) @ (n x n) products
    with torch's threads, as the model runs."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def floors(tracer: Tracer, data: list[list[int]], stages: list[dict[str, float]], eos: int) -> None:
    """Each model stage against its arithmetic floor: per input, the stage's FLOPs (matmuls and
    attention, torch's FlopCounterMode, which counts attention as its two full products, causal or
    not) over its warm time (the same inputs' `timings_ms`), against the cores' matmul rate measured
    now (the best of before and after). The floor is the time the FLOPs take at that rate.

    Then the reason for the rest: the stage's own matmul and attention calls, recorded at their exact
    shapes and strides (`Calls`), replayed alone on random data, each distinct call timed in a loop
    and summed count x time: the "shape floor", what these products cost on these cores with
    nothing else around them. Time over it is the stage's own overhead (indexing, elementwise ops,
    Python); the shape floor over the arithmetic floor is what the shapes themselves cost (thin or
    small products run below the 1024^3 rate)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    peak = matmul_rate()
    got: dict[str, list[tuple[float, float, float]]] = {"routing": [], "counterfactual": []}  # (GFLOP, ms, shape ms)
    timed: dict = {}  # a call's key -> its replayed ms (shared by the inputs)
    for ids, st in zip(data, stages):
        tr = replace(tracer, model=None).trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False,
                                                   store=False)
        if not tr.spans:
            continue
        total, shape = {}, {}
        for cf in (False, True):
            with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as fc, Calls() as calls:
                link_experts(tracer.model, copy.deepcopy(tr.spans), ids, [], None, counterfactual=cf, bos_id=eos)
            total[cf] = fc.get_total_flops() / 1e9
            shape[cf] = calls.replay_ms(timed)
        got["routing"].append((total[False], st["experts.routing"], shape[False]))
        if "experts.counterfactual" in st:
            got["counterfactual"].append((total[True] - total[False], st["experts.counterfactual"],
                                          shape[True] - shape[False]))
    peak = max(peak, matmul_rate())
    print(f"model stages against their arithmetic floor (float32 matmul rate of the cores now, {torch.get_num_threads()} "
          f"threads: {peak:.0f} GFLOP/s; "
          f"p50 over {len(got['routing'])} warm inputs; load average {load()}):")
    for stage, xs in got.items():
        if not xs:
            continue
        gflop = pct([g for g, _, _ in xs], 50)
        rate = pct([g / (ms / 1000) for g, ms, _ in xs], 50)
        sms = pct([s for _, _, s in xs], 50)
        print(f"  {stage}: {gflop:.1f} GFLOP at {rate:.0f} GFLOP/s, {peak / rate:.1f}x its arithmetic floor "
              f"(p50 {pct([ms for _, ms, _ in xs], 50):.0f} ms, floor {gflop / peak * 1000:.0f} ms); its own matmuls "
              f"alone at their shapes: {sms:.0f} ms ({gflop / (sms / 1000):.0f} GFLOP/s, "
              f"{sms / (gflop / peak * 1000):.2f}x the arithmetic floor) -> {pct([ms / s for _, ms, s in xs], 50):.2f}x "
              f"of that")


def _attention_flops():
    """FlopCounterMode's formula for CPU attention (it counts the CUDA kernels only)."""
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    def flops(query, key, value, *args, out_shape=None, **kwargs) -> int:  # shapes, as the counter passes them
        return sdpa_flop_count(query, key, value)

    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: flops}


ATTENTION_FLOPS = _attention_flops()
TIMED_OPS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default",
             "aten._scaled_dot_product_flash_attention_for_cpu.default")


def _timed_ops_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class Calls(_timed_ops_mode()):
    """Records the matmul and attention calls (`TIMED_OPS`) run inside it: each distinct (op, its
    arguments' shapes, strides and dtypes, its other arguments) with how often it ran; tensors
    that are not floating point (masks) are kept as they were."""

    def __init__(self):
        super().__init__()
        self.count: dict = {}
        self.example: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func) in TIMED_OPS:
            key = (func, _spec((args, kwargs)))
            self.count[key] = self.count.get(key, 0) + 1
            if key not in self.example:
                self.example[key] = _keep((args, kwargs))
        return func(*args, **kwargs)

    def replay_ms(self, timed: dict) -> float:
        """Sum over the recorded calls of count x each call's time alone (`timed` caches a key's time)."""
        total = 0.0
        for key, n in self.count.items():
            if key not in timed:
                timed[key] = _time_call(key[0], self.example[key])
            total += n * timed[key]
        return total


def _spec(x):
    import torch

    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), tuple(x.stride()), str(x.dtype))
    if isinstance(x, (list, tuple)):
        return tuple(_spec(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _spec(v)) for k, v in x.items()))
    return x


def _keep(x):
    """An argument to replay: floating-point tensors as (shape, stride, dtype), others cloned."""
    import torch

    if isinstance(x, torch.Tensor):
        return ("float", tuple(x.shape), tuple(x.stride()), x.dtype) if x.is_floating_point() else x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_keep(v) for v in x)
    if isinstance(x, dict):
        return {k: _keep(v) for k, v in x.items()}
    return x


def _build(x):
    """`_keep`'s argument made real: random data laid out with the recorded shape and strides."""
    import torch

    if isinstance(x, tuple) and len(x) == 4 and x[0] == "float":
        _, shape, stride, dtype = x
        span = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        return torch.randn(span, dtype=dtype).as_strided(shape, stride)
    if isinstance(x, (list, tuple)):
        return type(x)(_build(v) for v in x)
    if isinstance(x, dict):
        return {k: _build(v) for k, v in x.items()}
    return x


def _time_call(func, example, total_s: float = 0.01) -> float:
    """One call's time alone (ms): the fastest of calls timed one by one for about `total_s`, at
    least 7 (the fastest, as the matmul rate is the best of several: on shared cores a descheduled
    thread stalls single calls by a time slice)."""
    args, kwargs = _build(example)
    func(*args, **kwargs)  # warm-up
    ts: list[float] = []
    while len(ts) < 7 or sum(ts) < total_s:
        t0 = time.perf_counter()
        func(*args, **kwargs)
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1000


def warm_stages(timings: list[dict[str, float]]) -> dict[str, float]:
    """p50 of each stage over traces (each trace's `timings_ms`)."""
    keys = [k for k in timings[0]] if timings else []
    return {k: round(pct([t[k] for t in timings if k in t], 50), 1) for k in keys}


def flops(tracer: Tracer, ids: list[int], eos: int) -> None:
    """Floating-point operations of the routing + counterfactual stages, now against the reference,
    on one input (torch's FlopCounterMode: matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    tr = replace(tracer, model=None).trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False, store=False)
    if not tr.spans:
        return
    cfg = tracer.model.config
    impl = cfg._experts_implementation
    cfg._experts_implementation = "eager"  # the counter does not see transformers' grouped_mm kernel
    try:
        got = {}
        for method in ("per_expert", "batched"):
            with FlopCounterMode(display=False) as fc:
                link_experts(tracer.model, copy.deepcopy(tr.spans), ids, [], None, counterfactual=True, bos_id=eos,
                             method=method)
            got[method] = fc.get_total_flops() / 1e9
    finally:
        cfg._experts_implementation = impl
    print(f"  routing + counterfactuals on input 1: reference {got['per_expert']:.1f} GFLOP, now {got['batched']:.1f} GFLOP "
          f"({1 - got['batched'] / got['per_expert']:.0%} fewer)")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def first_trace(args) -> None:
    """3. the first trace of a new process against a warm one, in fresh interpreters."""
    cmd = [sys.executable, __file__, "--first-trace-child"]
    for k in ("workspace", "model", "random_model"):
        if getattr(args, k):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    for run in (1, 2):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"first-trace run {run} failed: {r.stderr[-500:]}")
            return
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"new process, run {run}: imports {d['import_s']:.1f} s, open {d['open_s']:.1f} s; first trace "
              f"{d['first_ms']:.0f} ms, warm p50 {d['warm_ms']:.0f} ms ({d['first_ms'] / d['warm_ms']:.2f}x); "
              f"first trace's stages {d['first_timings']}; warm traces' stages, p50 {d['warm_timings']}")


def first_trace_child(ws: Workspace, args, t_import: float) -> None:
    t0 = time.perf_counter()
    tracer = open_tracer(ws, args)
    t1 = time.perf_counter()
    print(json.dumps(dict(import_s=t0 - t_import, open_s=t1 - t0, **first_and_warm(ws, tracer, 6))))


def first_and_warm(ws: Workspace, tracer: Tracer, n: int) -> dict:
    """A new tracer's first trace and the warm ones after it (ms, and their stages) on n inputs."""
    ms, stages = [], []
    for ids in inputs(ws, tracer, n, seed=7):
        t = time.perf_counter()
        tr = tracer.trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False, store=False)
        ms.append((time.perf_counter() - t) * 1000)
        stages.append(tr.timings_ms)
    return dict(first_ms=ms[0], warm_ms=statistics.median(ms[1:]), first_timings=stages[0],
                warm_timings=warm_stages(stages[1:]))


def bigtok_first(scratch: Path, child: bool = False) -> None:
    """--bigtok-first: the first trace of a new process against a warm one with a tokenizer of more
    than 65,535 ids (bench/synthetic_corpus.py's byte-level BPE of 111,059 ids, `tokenizer import`,
    a u32 index of 600 documents), spans and documents (no model). Each figure is from a fresh
    interpreter; with the tokenizer's stored byte table (token_bytes.bin) and without it (the table
    built in the process, as a tokenizer folder without the file gets), run twice each."""
    from flexolmo.base import tokenizer as tok_lib
    from index import build

    ws = Workspace(scratch / "ws")
    if child:
        from flexolmo.base.hflog import quiet_transformers

        quiet_transformers()
        t0 = time.perf_counter()
        tracer = Tracer.open(ws, model=None)
        open_s = time.perf_counter() - t0
        print(json.dumps(dict(open_s=open_s, **first_and_warm(ws, tracer, 8))))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic_corpus import document_batches, tokenizer_folder

    if not (ws.root / "indexes").exists():
        ws.ensure()
        sources.add_document_batches(ws, "synthetic", document_batches(600), owner="bench", domain="synthetic",
                                     licence="cc0", origin="bench/synthetic_corpus.py")
        tok_lib.import_tokenizer(ws, tokenizer_folder(scratch / "hf-tokenizer"))
        build.build_source(ws, "synthetic")
    info = tok_lib.tokenizer_info(ws)
    stored = ws.tokenizer_dir / tok_lib.TOKEN_BYTES_FILE
    print(f"--bigtok-first: {info.vocab_size:,} ids (u32 index), load {load()}")
    for label in ("stored byte table", "no stored table", "stored byte table", "no stored table"):
        if label.startswith("no"):
            stored.unlink(missing_ok=True)
        else:
            tok_lib.ensure_token_bytes(ws)
        r = subprocess.run([sys.executable, __file__, "--bigtok-first", str(scratch), "--bigtok-child"],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"{label}: failed: {r.stderr[-500:]}")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{label:18s} new process: open {d['open_s']:.2f} s; first trace {d['first_ms']:.0f} ms, warm p50 "
              f"{d['warm_ms']:.0f} ms: first / warm {d['first_ms'] / d['warm_ms']:.2f}x; first trace's stages "
              f"{ {k: round(v) for k, v in d['first_timings'].items()} }; load {load()}", flush=True)
    tok_lib.ensure_token_bytes(ws)


def bare(ws: Workspace, tracer: Tracer, args) -> None:
    """4. the bare engine call with the production settings and the same delimiters."""
    from infini_gram.engine import InfiniGramEngine

    from index.format import index_dir

    data = inputs(ws, tracer, args.bare)
    eng = InfiniGramEngine(index_dir=[str(index_dir(ws, n)) for n in tracer.fed.names], eos_token_id=0,
                           bow_ids_path=str(ws.tokenizer_dir / "bow_ids.txt"), precompute_unigram_logprobs=True)
    bare_ms, pipe_ms, whole_ms, same = [], [], [], 0
    bare_tracer = replace(tracer, model=None)
    for ids in data:
        t0 = time.perf_counter()
        ref = eng.attribute(ids, delim_ids=tracer.delims, min_len=1, max_cnt=1_000_000, enforce_bow=True)["spans"]
        bare_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        mine = tracer.fed.find_spans(ids, tracer.delims, tracer.bow)
        pipe_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        bare_tracer.trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False, store=False,
                              response=tracer.tokenizer.decode(ids))
        whole_ms.append((time.perf_counter() - t0) * 1000)
        same += [(s["l"], s["r"], s["count"]) for s in ref] == [(s.l, s.r, s.count) for s in mine]
    print(f"bare engine.attribute      p50 {pct(bare_ms, 50):8.1f} ms  p95 {pct(bare_ms, 95):8.1f} ms  on {len(bare_ms)} inputs")
    print(f"span search alone          p50 {pct(pipe_ms, 50):8.1f} ms  p95 {pct(pipe_ms, 95):8.1f} ms; speed-up "
          f"{pct(bare_ms, 50) / pct(pipe_ms, 50):.0f}x; identical spans on {same}/{len(bare_ms)} inputs "
          f"({len(tracer.delims)} delimiter ids)")
    print(f"whole pipeline (no model)  p50 {pct(whole_ms, 50):8.1f} ms  p95 {pct(whole_ms, 95):8.1f} ms; speed-up "
          f"{pct(bare_ms, 50) / pct(whole_ms, 50):.0f}x over the bare engine on the same inputs")


def agreement(ws: Workspace, tracer: Tracer, args) -> None:
    """5. source-expert agreement over generated responses, by routing and by counterfactual."""
    rng = random.Random(1)
    names = sorted(tracer.fed.names)
    prompts = []
    for i in range(args.responses):
        load = lambda split: sources.load_documents(ws, names[i % len(names)], split=split,  # noqa: E731
                                                    columns=["text"]).column("text").to_pylist()
        words = rng.choice(load("validation") or load("train")).split()  # tiny test federations hold no validation
        a = rng.randint(0, max(0, len(words) - args.prompt_words))
        prompts.append(" ".join(words[a: a + args.prompt_words]))
    # [all spans, single-source spans] x [routing, counterfactual]
    agree = {k: [0, 0] for k in ("routing", "counterfactual")}
    chance, n = [0.0, 0.0], [0, 0]
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        tr = tracer.generate_and_trace(p, GenerationOptions(max_new_tokens=args.new_tokens, do_sample=True, seed=i), store=False)
        for s in tr.spans:
            active = {e.source for e in s.experts if e.active}
            for j in (0, 1) if len(s.sources) == 1 else (0,):
                agree["routing"][j] += s.experts[s.top_by_routing].source in s.sources
                if s.top_by_counterfactual is not None:
                    agree["counterfactual"][j] += s.experts[s.top_by_counterfactual].source in s.sources
                chance[j] += len(set(s.sources) & active) / len(active)
                n[j] += 1
    print(f"agreement, {len(prompts)} generated responses ({time.perf_counter() - t0:.0f}s), model {tracer.model_name}:")
    for j, label in enumerate(("all spans", "single-source spans")):
        by = ", ".join(f"by {k} {agree[k][j] / max(1, n[j]):.1%}" for k in agree)
        print(f"  {label:20s} {n[j]:5d} spans: {by} (chance {chance[j] / max(1, n[j]):.1%})")


if __name__ == "__main__":
    main()
