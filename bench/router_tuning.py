"""Router tuning on a federation: held-out perplexity and routing share per source domain,
merged model before and after `tune_router` (public model alone as a reference).

    .venv/bin/python bench/router_tuning.py -w flexolmo-work --threads 1
    .venv/bin/python bench/router_tuning.py -w flexolmo-work --skip-tune     # reuse merged-tuned

Tunes `models/merged` into `models/merged-tuned` (never in place: others may be reading
`models/merged`). Evaluation text is each source's *validation* split (never in the
proxy set, which tune_router draws from the train split): non-overlapping windows of
`--seq-len` + 1 tokens, taken round-robin over the validation documents, up to
`--windows` per source. Perplexity = exp(mean of -token_logprobs) over all predicted
tokens of the windows; routing share = share of top-k selections (all layers) per expert
over the same positions (`route`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexolmo.model.generate import route, token_logprobs  # noqa: E402
from flexolmo.model.merge import load_merged  # noqa: E402
from flexolmo.model.moe import expert_names, load_model  # noqa: E402
from flexolmo.model.router_tuning import tune_router  # noqa: E402
from flexolmo.base.sources import iter_texts  # noqa: E402
from flexolmo.base.tokenizer import load_raw_tokenizer, tokenizer_info  # noqa: E402
from flexolmo.base.workspace import Workspace  # noqa: E402


def val_windows(ws: Workspace, source: str, seq_len: int, n: int) -> list[torch.Tensor]:
    """Up to n windows (seq_len + 1 ids) of the validation split, round-robin over documents."""
    tok, eos = load_raw_tokenizer(ws), tokenizer_info(ws).eos_id
    texts = list(iter_texts(ws, source, split="validation"))
    per_doc = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids + [eos]
        chunks = [ids[i : i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
        per_doc.append([torch.tensor(c) for c in chunks if len(c) >= 2])
    out, r = [], 0
    while len(out) < n and any(r < len(d) for d in per_doc):
        out += [d[r] for d in per_doc if r < len(d)]
        r += 1
    return out[:n]


def evaluate(model, windows: dict[str, list[torch.Tensor]]) -> dict:
    names = expert_names(model)
    res = {}
    for source, ws_ in windows.items():
        nll, n_tok, counts = 0.0, 0, torch.zeros(len(names))
        for w in ws_:
            lp = token_logprobs(model, w)
            nll -= lp.sum().item()
            n_tok += lp.numel()
            if len(names) > 1:
                idx = route(model, w).experts[:-1]  # positions that predict tokens 1..T-1
                counts += torch.bincount(idx.reshape(-1), minlength=len(names)).float()
        share = {n: round(counts[i].item() / max(1.0, counts.sum().item()), 4) for i, n in enumerate(names)}
        res[source] = {"ppl": round(math.exp(nll / n_tok), 2), "tokens": n_tok, "share": share}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--workspace", default="flexolmo-work")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--docs-per-source", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=24, help="validation windows per source")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-tune", action="store_true", help="evaluate an existing models/merged-tuned")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from flexolmo.base.hflog import quiet_transformers

    quiet_transformers()
    ws = Workspace.resolve(args.workspace)
    merged, tuned = ws.models_dir / "merged", ws.models_dir / "merged-tuned"

    tune = None
    if not args.skip_tune:
        t0 = time.time()
        r = tune_router(ws, merged, out=tuned, docs_per_source=args.docs_per_source, steps=args.steps, lr=args.lr,
                        seq_len=args.seq_len)
        tune = {**r.card.router_tuning, "wall_seconds": round(time.time() - t0, 1)}
    else:
        tune = json.loads((tuned / "card.json").read_text())["router_tuning"]

    names = expert_names(load_model(merged))
    windows = {s: val_windows(ws, s, args.seq_len, args.windows) for s in names}
    t0 = time.time()
    results = {
        "public": evaluate(load_model(ws.models_dir / "public"), windows),
        "before": evaluate(load_merged(merged, ws=ws), windows),
        "after": evaluate(load_merged(tuned, ws=ws), windows),
    }
    eval_s = time.time() - t0

    print(f"router tuning: {tune['steps']} steps, proxy docs {tune['proxy_set']['docs']}, "
          f"proxy loss {tune['proxy_loss']['before']} -> {tune['proxy_loss']['after']}, {tune['train_seconds']} s training, "
          f"{tune['seconds']} s total")
    print(f"evaluation: {sum(len(w) for w in windows.values())} validation windows, {eval_s:.0f} s\n")
    print("| source | tokens | ppl public | ppl merged | ppl tuned | public share before -> after | own share before -> after | top expert before -> after |")
    print("|---|---|---|---|---|---|---|---|")
    for s in names:
        b, a = results["before"][s], results["after"][s]
        top_b, top_a = max(b["share"], key=b["share"].get), max(a["share"], key=a["share"].get)
        own = "" if s == names[0] else f"{b['share'][s]:.0%} -> {a['share'][s]:.0%}"
        print(f"| {s} | {b['tokens']} | {results['public'][s]['ppl']} | {b['ppl']} | {a['ppl']} | "
              f"{b['share'][names[0]]:.0%} -> {a['share'][names[0]]:.0%} | {own} | {top_b} -> {top_a} |")
    for when in ("before", "after"):
        print(f"\nrouting share per expert ({when}), rows = validation text of a source")
        print("| text \\ expert | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for s in names:
            sh = results[when][s]["share"]
            print(f"| {s} | " + " | ".join(f"{sh[n]:.0%}" for n in names) + " |")
    if args.json:
        args.json.write_text(json.dumps({"tune": tune, "results": results, "args": vars(args) | {"json": str(args.json)}}, indent=2))


if __name__ == "__main__":
    main()
