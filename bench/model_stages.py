"""The model stages of a trace (routing pass, exact counterfactual rows) as now against a baseline
revision of the same code, interleaved on the same inputs in one process: per stage the p50 time
of each and the p50 of the per-input ratio now / baseline, with the largest difference between
their outputs (routing equal, log-probs and drops to float tolerance).

    .venv/bin/python bench/model_stages.py --workspace W --baseline REV [--inputs 6] [--repeats 3]
    .venv/bin/python bench/model_stages.py --workspace W --baseline REV --threads 1 --cpu-time

The baseline is flexolmo/model/counterfactual.py and flexolmo/model/passes.py as they are at git
revision REV, loaded from git next to the current ones. Inputs and their kept spans are
bench/trace.py's (held-out 450-token windows, spans of the workspace's federation); the targets
are the kept spans' tokens after an end-of-text token, as tracing/experts.py asks for them.
Timings on shared cores are noisy: read the ratios (each input's fastest of --repeats runs of
each), and the load average printed with them. When other processes hold the cores, torch's
threads stall one another (a parallel region waits for a descheduled thread), so wall times with 2
threads can grow several-fold; `--threads 1 --cpu-time` measures the stages in the thread's CPU
time instead (what the work costs, whoever else runs), a proxy for the quiet-core wall time.
Nothing is written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.trace import inputs  # noqa: E402
from flexolmo.base.hflog import quiet_transformers  # noqa: E402
from flexolmo.base.workspace import Workspace  # noqa: E402
from flexolmo.model import passes as now_passes  # noqa: E402
from tracing.trace import Tracer  # noqa: E402


def baseline_passes(rev: str) -> types.ModuleType:
    """flexolmo/model/passes.py at `rev`, calling flexolmo/model/counterfactual.py at `rev`."""
    def load(name: str, path: str, replace_from: str = "", replace_to: str = "") -> types.ModuleType:
        src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout
        mod = types.ModuleType(name)
        mod.__file__ = f"{rev}:{path}"
        sys.modules[name] = mod
        exec(compile(src.replace(replace_from, replace_to), mod.__file__, "exec"), mod.__dict__)
        return mod

    load("baseline_counterfactual", "flexolmo/model/counterfactual.py")
    return load("baseline_passes", "flexolmo/model/passes.py", "flexolmo.model.counterfactual", "baseline_counterfactual")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--baseline", required=True, help="git revision of the code to compare with")
    ap.add_argument("--inputs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each per input, interleaved")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true", help="stage times in CPU time of this thread (with --threads 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if torch.get_num_threads() != 1:
            raise SystemExit("--cpu-time needs --threads 1 (the stages' timings read this thread's clock)")
        time.perf_counter = time.thread_time  # the stages' own timings (passes.py) read this clock
    quiet_transformers()
    ws = Workspace.resolve(args.workspace)
    tracer = Tracer.open(ws)
    if tracer.model is None:
        raise SystemExit("no merged model in the workspace")
    model, eos = tracer.model, tracer.tokenizer.eos_token_id
    old = baseline_passes(args.baseline)
    bare = replace(tracer, model=None)
    print(f"model {tracer.model_name}: {len(model.experts)} experts, top-{model.config.num_experts_per_tok}; "
          f"torch threads {torch.get_num_threads()}{', CPU time' if args.cpu_time else ''}; baseline {args.baseline}; load average {load()}", flush=True)
    ms = {(who, stage): [] for who in ("baseline", "now") for stage in ("routing", "counterfactual")}
    ratio = {"routing": [], "counterfactual": []}
    diff = {"logprobs": 0.0, "weights": 0.0, "drops": 0.0}
    for n, ids in enumerate(inputs(ws, tracer, args.inputs)):
        spans = bare.trace_ids(ids, prompt=None, prompt_ids=[], routing=None, generated=False, store=False).spans
        if not spans:
            continue
        need = np.zeros(len(ids), dtype=bool)
        for s in spans:
            need[s.start: s.end] = True
        tokens = [int(eos)] + list(ids)
        want = now_passes.Need(targets=(np.flatnonzero(need) + 1).tolist(), drops="routed", start=1)
        got = {}
        for r in range(args.repeats + 1):  # the first run of each warms up
            for who, mod in (("baseline", old), ("now", now_passes)) if r % 2 else (("now", now_passes), ("baseline", old)):
                out = mod.model_passes(model, tokens, mod.Need(**want.__dict__))
                got[who] = out
                if r and n:
                    for stage in ratio:
                        ms[(who, stage)].append(out.timings[stage])
        a, b = got["baseline"], got["now"]
        assert np.array_equal(a.experts, b.experts), "routing differs"
        assert sorted(a.drops) == sorted(b.drops), "different experts' drops"
        diff["logprobs"] = max(diff["logprobs"], float(np.abs(a.logprobs - b.logprobs).max()))
        diff["weights"] = max(diff["weights"], float(np.abs(a.weights - b.weights).max()))
        diff["drops"] = max([diff["drops"]] + [float(np.abs(a.drops[e] - b.drops[e]).max()) for e in a.drops])
        if n:
            k = args.repeats
            for stage in ratio:
                ratio[stage].append(min(ms[("now", stage)][-k:]) /
                                    min(ms[("baseline", stage)][-k:]))
        print(f"  input {n + 1}: {len(want.targets)} targets, now/baseline routing "
              f"{ratio['routing'][-1] if n else float('nan'):.2f}, counterfactual "
              f"{ratio['counterfactual'][-1] if n else float('nan'):.2f}; load {load()}", flush=True)
    for stage in ratio:
        b, a = statistics.median(ms[("baseline", stage)]), statistics.median(ms[("now", stage)])
        print(f"{stage}: baseline p50 {b:.0f} ms, now p50 {a:.0f} ms; per-input now/baseline p50 "
              f"{statistics.median(ratio[stage]):.3f} (range {min(ratio[stage]):.3f}-{max(ratio[stage]):.3f})")
    print(f"routing identical; largest |difference| now vs baseline: log-probs {diff['logprobs']:.1e}, weights "
          f"{diff['weights']:.1e}, drops {diff['drops']:.1e}; load average {load()}")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
