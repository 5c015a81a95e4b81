"""What each expert contributes to a merged model's feed-forward output, and what moving the
owners' biases or the top-k does to held-out perplexity.

    .venv/bin/python bench/mixing_probe.py --workspace flexolmo-work
    .venv/bin/python bench/mixing_probe.py --workspace flexolmo-work --merged /tmp/recipe-sweep/cap1/merged \
        --json docs/eval-runs/mixing-probe-cap1.json

A layer adds RMSNorm(sum_k w_k E_k(x)) to the residual stream, so an expert's say in it is its
weight *times its output norm* (flexolmo/model/scale.py). Per domain (validation windows, never
trained on), averaged over layers and tokens:

- weight share: mean router weight of each expert (zero where it is not in the top-k);
- effect share: w_k ||E_k(x)|| / sum_j w_j ||E_j(x)||, the expert's share of what is mixed;
- loudness: ||E_k(x)|| / ||E_public(x)||.

Then perplexity per domain with every owner's bias moved down by each `--shifts` value (a
merge-time recalibration: the bias stays <= 0), and with each `--top-k` instead of the
model's own. Numbers go to stdout and, with --json, to a file.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def shares(model, windows, batch_size: int = 8):
    """(weight share, effect share, loudness), each (E,), over `windows`, every layer pooled."""
    import torch

    from flexolmo.model.bias import router_inputs
    from flexolmo.model.moe import as_module
    from flexolmo.model.scale import expert_output

    module = as_module(model)
    with torch.no_grad():
        out = []
        for layer, x in zip(module.model.layers, router_inputs(module, windows, batch_size)):
            _, w, idx = layer.mlp.gate(x)
            n_exp = layer.mlp.experts.gate_up_proj.shape[0]
            norms = torch.stack([expert_output(layer.mlp.experts, e, x).norm(dim=-1) for e in range(n_exp)], 1)
            weight = torch.zeros_like(norms).scatter_(1, idx, w.float())
            effect = weight * norms
            out.append((weight.mean(0), (effect / effect.sum(1, keepdim=True)).mean(0), (norms / norms[:, :1]).mean(0)))
    return [torch.stack(t).mean(0) for t in zip(*out)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default="flexolmo-work")
    ap.add_argument("--merged", help="merged model folder (default: the workspace's models/merged)")
    ap.add_argument("--tokens-per-domain", type=int, default=4096)
    ap.add_argument("--shifts", default="0,0.5,1,2", help="comma-separated downward moves of every owner's bias")
    ap.add_argument("--top-k", default="1,2,8", help="comma-separated top-k values to measure besides the model's own")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()

    import torch

    from flexolmo.evaluation import metrics
    from flexolmo.model.merge import load_merged
    from flexolmo.model.moe import routers
    from flexolmo.base.workspace import Workspace

    torch.set_num_threads(2)
    t0 = time.time()
    ws = Workspace(Path(args.workspace))
    folder = Path(args.merged) if args.merged else ws.root / "models" / "merged"
    merged = load_merged(folder, respect_catalog=False)
    names = merged.experts
    val = metrics.validation_set(ws, names, 256, args.tokens_per_domain)
    out: dict = {"merged": str(folder), "tokens_per_domain": args.tokens_per_domain, "experts": names,
                 "shares": {}, "shifted": {}, "top_k": {}}

    print(f"{'domain':>12}  {'':>13} " + " ".join(f"{n[:6]:>6}" for n in names))
    for d in names:
        weight, effect, loud = shares(merged, val.windows[d])
        out["shares"][d] = {"weight": [round(float(v), 4) for v in weight], "effect": [round(float(v), 4) for v in effect],
                            "loudness": [round(float(v), 3) for v in loud]}
        for tag, v in (("weight share", weight), ("effect share", effect), ("loudness", loud)):
            print(f"{d if tag == 'weight share' else '':>12}  {tag:>13} " + " ".join(f"{float(x):6.2f}" for x in v))

    def measure(model) -> dict:
        ppl = {d: round(metrics.score(metrics.window_logprobs(model, val.windows[d]), val.target_bytes[d]).ppl, 2) for d in names}
        top = {d: round(metrics.routing_stats(model, val.windows[d])[1], 3) for d in names}
        return {"ppl": ppl, "gm": round(math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl)), 2), "public_in_topk": top}

    def show(tag: str, r: dict) -> None:
        print(f"{tag:>14}: gm {r['gm']:7.1f}  " + "  ".join(f"{d[:5]} {v:.1f}" for d, v in r["ppl"].items())
              + "  | public in top-k " + " ".join(f"{v:.2f}" for v in r["public_in_topk"].values()), flush=True)

    k0 = routers(merged)[0].top_k
    for delta in (float(s) for s in args.shifts.split(",") if s):
        m = copy.deepcopy(merged)
        with torch.no_grad():
            for r in routers(m):
                r.bias[1:] -= delta
        out["shifted"][str(delta)] = res = measure(m)
        show(f"shift {delta:g}", res)
    for k in (int(s) for s in args.top_k.split(",") if s):
        m = copy.deepcopy(merged)
        for r in routers(m):
            r.top_k = k
        out["top_k"][str(k)] = res = measure(m)
        show(f"top-{k} (of {k0})", res)
    out["seconds"] = round(time.time() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"written {args.json} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
