"""The demo's merged model (experts trained under bfloat16 autocast) against the evaluation's rows.

    .venv/bin/python bench/demo_experts.py -w flexolmo-work        # after `make demo`

`flexolmo demo` trains the owners' experts in bfloat16 autocast (flexolmo/model/config.py
DEMO_EXPERT_DTYPE); `flexolmo eval` trains its own in float32. This measures the demo's public
and merged models with the evaluation's own code and settings (flexolmo/evaluation/metrics.py:
the validation split, 256-token windows spread over it, 8,192 tokens per domain, float32
measurement) and prints them beside docs/results/eval.json's `public` and `flexolmo` rows: the
public rows must agree (same shipped model, same windows), the flexolmo rows show what bfloat16
training changed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", default=str(ROOT / "flexolmo-work"))
    ap.add_argument("--tokens-per-domain", type=int, default=8192)
    ap.add_argument("--report", default=str(ROOT / "docs" / "results" / "eval.json"))
    args = ap.parse_args()

    from flexolmo.base.workspace import Workspace
    from flexolmo.evaluation import metrics
    from flexolmo.model.artifacts import public_model
    from flexolmo.model.merge import load_merged

    ws = Workspace.resolve(args.workspace)
    ref = json.loads(Path(args.report).read_text())
    domains = ref["domains"]
    public, _ = public_model.load(ws)
    merged = load_merged(ws.models_dir / "merged", respect_catalog=False)
    val = metrics.validation_set(ws, domains, min(256, public.config.max_position_embeddings), args.tokens_per_domain)
    print(f"workspace {ws.root}; experts: {', '.join(merged.experts)}")
    rows = {}
    for label, model in (("public", public), ("flexolmo", merged)):
        t = time.time()
        rows[label] = {d: metrics.score(metrics.window_logprobs(model, val.windows[d]), val.target_bytes[d]).ppl
                       for d in domains}
        print(f"measured {label} in {time.time() - t:.0f} s")

    def gm(r: dict) -> float:
        return math.exp(sum(math.log(v) for v in r.values()) / len(r))

    print("\n| row | " + " | ".join(domains) + " | geometric mean |")
    print("|---" * (len(domains) + 2) + "|")
    for label in ("public", "flexolmo"):
        old = ref["rows"][label]
        print(f"| {label}, docs/results.md (float32 experts) | " + " | ".join(f"{old[d]:.1f}" for d in domains)
              + f" | {gm({d: old[d] for d in domains}):.1f} |")
        new = rows[label]
        print(f"| {label}, the demo's (bfloat16 experts) | " + " | ".join(
            f"{new[d]:.1f} ({new[d] / old[d] - 1:+.1%})" for d in domains) + f" | {gm(new):.1f} |")


if __name__ == "__main__":
    main()
