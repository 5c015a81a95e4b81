"""Routing + exact counterfactuals as now (flexolmo/model/passes.py) against a git revision's
`tracing/experts.py` (e.g. before the passes moved into the model layer), interleaved in one process.

    .venv/bin/python bench/model_passes.py --before 028b941~1 [--inputs 10] [--profile demo] [--experts 8]

A random model of the profile's size (its routing means nothing; the arithmetic is the same),
450-token random inputs, 23 spans of 2-7 tokens each (a trace's K = ceil(0.05 x 450)). Prints
both p50s, their ratio and the largest difference between the two drops (the same algorithm:
0 up to float rounding); the routing shares must be identical. Timings on shared cores are noisy:
read the ratio, which is measured on the same inputs, alternating which runs first.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexolmo.model.config import get_profile  # noqa: E402
from flexolmo.model.moe import LoadedModel, build_model  # noqa: E402
from tracing.experts import link_experts  # noqa: E402
from tracing.results import Span  # noqa: E402


def before(rev: str, into: Path):
    """`link_experts` of revision `rev`, importable as `tracing_before.experts`."""
    pkg = into / "tracing_before"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "results.py").write_text("from tracing.results import *  # noqa: F401,F403\n")
    for name in ("experts.py", "counterfactual.py"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:tracing/{name}"], capture_output=True,
                              text=True, check=True).stdout
        (pkg / name).write_text(text)
    sys.path.insert(0, str(into))
    from tracing_before.experts import link_experts as old

    return old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="A git revision whose tracing/ holds counterfactual.py.")
    ap.add_argument("--inputs", type=int, default=10)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args()
    old = before(args.before, Path(tempfile.mkdtemp()))
    cfg = get_profile(args.profile).model.hf_config(vocab_size=8192, eos_id=0, pad_id=1, num_experts=args.experts)
    model = LoadedModel(module=build_model(cfg, seed=0).eval(),
                        experts=["public"] + [f"x{i}" for i in range(1, args.experts)])
    g = np.random.default_rng(0)
    ms: dict[str, list[float]] = {"before": [], "now": []}
    diff = 0.0
    for i in range(args.inputs):
        ids = g.integers(2, 8192, 450).tolist()
        starts = sorted(g.choice(np.arange(0, 442), 23, replace=False).tolist())
        spans = [Span(index=j, start=a, end=a + int(g.integers(2, 8)), char_start=0, char_end=0, text="", count=1,
                      count_by_source={}, unigram_logprob_sum=0.0, group=0) for j, a in enumerate(starts)]
        out = {}
        for name, fn in (("before", old), ("now", link_experts))[:: 1 if i % 2 == 0 else -1]:
            s = copy.deepcopy(spans)
            t0 = time.perf_counter()
            fn(model, s, ids, [], None, counterfactual=True, bos_id=0)
            ms[name].append((time.perf_counter() - t0) * 1000)
            out[name] = s
        for a, b in zip(out["before"], out["now"]):
            for x, y in zip(a.experts, b.experts):
                assert x.routing_share == y.routing_share, (x, y)
                if x.counterfactual is not None or y.counterfactual is not None:
                    diff = max(diff, abs(x.counterfactual - y.counterfactual))
        print(f"  input {i + 1}: before {ms['before'][-1]:.0f} ms, now {ms['now'][-1]:.0f} ms", flush=True)
    b, n = np.median(ms["before"]), np.median(ms["now"])
    print(f"{args.profile}-size random model, {args.experts} experts, {cfg.max_position_embeddings} positions, 450 tokens: "
          f"routing + counterfactuals p50 before ({args.before}) {b:.0f} ms, now {n:.0f} ms (now/before {n / b:.2f}); "
          f"max |drop difference| {diff:.1e}")


if __name__ == "__main__":
    main()
