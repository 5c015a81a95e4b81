"""Owner-recipe sweep: retrain every owner's expert with a variant of the profile's expert
recipe, merge, and measure the merged model and the owners' own models on held-out text.

    .venv/bin/python bench/recipe_sweep.py --workspace flexolmo-work --name mix25 --set public_mix=0.25
    .venv/bin/python bench/recipe_sweep.py --workspace flexolmo-work --name base --measure-only \
        --merged flexolmo-work/eval/demo/flexolmo

A cheaper loop than `flexolmo eval` for choosing a recipe (about 12 minutes for the demo's 7
owners on 2 cores, against ~50 for the whole evaluation): only the rows a recipe changes.
Packages and the merged model go to `<out>/<name>/` (default out: /tmp/recipe-sweep), never
into the workspace's `experts/`; the numbers (per-domain perplexity of the merged model and of
each owner's model, the public expert's share of the top-k per domain, the owners' routing
checks) are printed and written to `<out>/<name>/sweep.json`. Validation splits only, as in
`flexolmo eval`; fewer tokens per domain (4,096 by default), so compare runs of this script
with each other, not with docs/results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default="flexolmo-work")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--name", required=True, help="name of this variant (a folder under --out)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="an expert TrainConfig field to change, e.g. public_mix=0.25 (repeatable)")
    ap.add_argument("--out", default="/tmp/recipe-sweep")
    ap.add_argument("--tokens-per-domain", type=int, default=4096)
    ap.add_argument("--measure-only", action="store_true", help="measure --merged (and the workspace's packages)")
    ap.add_argument("--merged", help="with --measure-only: the merged model folder to measure")
    args = ap.parse_args()

    import torch

    from flexolmo.model.artifacts import public_model
    from flexolmo.model.config import get_profile, override
    from flexolmo.evaluation import metrics
    from flexolmo.model.merge import load_expert_model, load_merged, merge
    from flexolmo.base.sources import list_sources
    from flexolmo.model.train import train_expert
    from flexolmo.base.workspace import Workspace

    torch.set_num_threads(2)
    ws = Workspace(Path(args.workspace))
    p = get_profile(args.profile)
    change = dict(kv.split("=", 1) for kv in args.set)
    p.expert = override(p.expert, **{k: _value(v) for k, v in change.items()})
    out = Path(args.out) / args.name
    public, _ = public_model.load(ws)
    public_source = public.experts[0]
    owners = [s.name for s in list_sources(ws) if s.name != public_source]
    result: dict = {"name": args.name, "profile": p.name, "change": change, "tokens_per_domain": args.tokens_per_domain,
                    "owners": {}, "rows": {}, "public_in_topk": {}}
    t0 = time.time()

    if args.measure_only:
        if not args.merged:
            ap.error("--measure-only needs --merged")
        packages, merged_dir = None, Path(args.merged)
    else:
        packages, merged_dir = out / "experts", out / "merged"
        for s in owners:
            r = train_expert(ws, s, p, packages_dir=packages, progress=False)
            check = r.card.router_bias["at_end"]
            result["owners"][s] = {"final_loss": r.final_loss, **{k: check[k] for k in
                                   ("public_text_to_public_expert", "own_text_to_own_expert")}}
            print(f"{s:>12}: loss {r.final_loss:.3f}, public text -> public expert {check['public_text_to_public_expert']:.2f}, "
                  f"own text -> own expert {check['own_text_to_own_expert']:.2f} ({time.time() - t0:.0f} s)", flush=True)
        merge(ws, owners, out=merged_dir, top_k=min(p.model.top_k, 1 + len(owners)), packages_dir=packages)

    domains = [public_source] + owners
    val = metrics.validation_set(ws, domains, min(256, public.config.max_position_embeddings), args.tokens_per_domain)

    def measure(tag: str, model) -> None:
        ppl = {d: round(metrics.score(metrics.window_logprobs(model, val.windows[d]), val.target_bytes[d]).ppl, 1)
               for d in domains}
        result["rows"][tag] = ppl
        gm = math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl))
        print(f"{tag:>20}: gm {gm:7.1f}  " + "  ".join(f"{d[:5]} {v:.1f}" for d, v in ppl.items()), flush=True)

    measure("public", public)
    merged = load_merged(merged_dir, respect_catalog=False)
    measure("merged", merged)
    for d in domains:
        _, with_public = metrics.routing_stats(merged, val.windows[d])
        result["public_in_topk"][d] = round(with_public, 3)
    print("public expert in the top-k: " + "  ".join(f"{d[:5]} {v:.2f}" for d, v in result["public_in_topk"].items()))
    for s in owners:
        measure(f"expert:{s}", load_expert_model(ws, s, packages_dir=packages))
    result["seconds"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    print(f"written {out / 'sweep.json'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
