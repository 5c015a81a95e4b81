"""How well can a router at each layer tell the owners' domains apart, token by token?

    .venv/bin/python bench/routing_probe.py --workspace flexolmo-work
    .venv/bin/python bench/routing_probe.py --workspace flexolmo-work --merged /tmp/rt/consent

For every layer of a merged model, on the validation windows of every source (never trained
on), it compares three routers that all read the same router input (the hidden state the
layer's router sees):

- the merged model's own router: how often the text's owner is the top-scoring owner, how
  often it is in the top-k, and its mean weight there;
- a multinomial logistic regression over all domains, fitted on half of the windows (even
  ones) and scored on the other half: what a linear router could reach if one party saw every
  owner's text (the ceiling of router tuning with consented data);
- the same kind of regression fitted the federated way: each owner alone, own vs public text
  (the only data it has; `flexolmo.model.domain.fit_own_vs_public`, the fit `router_init=classifier`
  uses, classes balanced), the owners' log-odds then compared by argmax (one-vs-reference).
  This is what rows fitted apart can reach.

Accuracies are over owner-domain tokens only (7-way among owners for the merged router and
the federated fit, 8-way with public for the joint fit). Numbers go to stdout and, with
--json, to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fit_logistic(x, y, n_classes: int, l2: float = 1e-3):
    """Standardised multinomial logistic regression over all domains (LBFGS); returns a scoring function."""
    import torch
    import torch.nn.functional as F

    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = ((x - mu) / sd).double()
    lin = torch.nn.Linear(z.shape[1], n_classes).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(z), y) + l2 * (lin.weight ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lambda q: lin(((q - mu) / sd).double()).detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default="flexolmo-work")
    ap.add_argument("--merged", help="merged model folder (default: <workspace>/models/merged)")
    ap.add_argument("--tokens-per-domain", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()

    import torch

    from flexolmo.model.bias import per_layer
    from flexolmo.model.domain import fit_own_vs_public
    from flexolmo.evaluation import metrics
    from flexolmo.model.moe import expert_names
    from flexolmo.model.merge import load_merged
    from flexolmo.base.workspace import Workspace

    torch.set_num_threads(2)
    t0 = time.time()
    ws = Workspace(Path(args.workspace))
    merged_dir = Path(args.merged) if args.merged else ws.models_dir / "merged"
    model = load_merged(merged_dir, respect_catalog=False)
    names = expert_names(model)  # 0 is the public expert; the domains are named like the experts
    val = metrics.validation_set(ws, names, args.seq_len, args.tokens_per_domain)
    H = model.config.hidden_size
    xs, logits, label, window = [], [], [], []
    for i, d in enumerate(names):
        w = val.windows[d]
        outs = per_layer(model, w, lambda h, out: torch.cat([h.reshape(-1, H), out[0].reshape(-1, out[0].shape[-1])], 1), 8)
        xs.append(torch.stack([t[:, :H] for t in outs]))
        logits.append(torch.stack([t[:, H:] for t in outs]))
        n = outs[0].shape[0]
        label.append(torch.full((n,), i))
        window.append(torch.arange(n) // w.shape[1])
    x, lg, y, win = torch.cat(xs, 1), torch.cat(logits, 1), torch.cat(label), torch.cat(window)
    train, test = win % 2 == 0, win % 2 == 1
    owner_tok = y > 0
    k = model.config.num_experts_per_tok
    result = {"merged": str(merged_dir), "experts": names, "tokens": int(len(y)), "top_k": k, "layers": []}
    print(f"{merged_dir}: {len(y):,} validation tokens over {len(names)} domains, top-{k}")
    for layer in range(x.shape[0]):
        s = lg[layer][owner_tok]
        truth = y[owner_tok]
        top_owner = s[:, 1:].argmax(1) + 1
        top = s.topk(k, 1).indices
        weights = torch.zeros_like(s).scatter(1, top, torch.softmax(s.gather(1, top), 1))
        joint = fit_logistic(x[layer][train], y[train], len(names))(x[layer][test])
        # federated: owner i fits own vs public alone (the fit of router_init=classifier, with its
        # intercept); the owners' log-odds are then compared
        pub = x[layer][train & (y == 0)]
        fits = [fit_own_vs_public(pub, x[layer][train & (y == i)]) for i in range(1, len(names))]
        fed = torch.stack([x[layer][test] @ w + c for w, c, _ in fits], 1).argmax(1) + 1
        t_owner = owner_tok[test]
        row = {
            "layer": layer,
            "merged_top_owner_acc": round(float((top_owner == truth).float().mean()), 3),
            "merged_owner_in_topk": round(float((top == truth[:, None]).any(1).float().mean()), 3),
            "merged_owner_weight": round(float(weights.gather(1, truth[:, None]).mean()), 3),
            "joint_probe_acc": round(float((joint.argmax(1) == y[test])[t_owner].float().mean()), 3),
            "federated_probe_acc": round(float((fed == y[test])[t_owner].float().mean()), 3),
        }
        result["layers"].append(row)
        print(f"layer {layer}: merged router top owner right {row['merged_top_owner_acc']:.2f}, owner in top-{k} "
              f"{row['merged_owner_in_topk']:.2f}, owner weight {row['merged_owner_weight']:.2f} | linear probe: "
              f"joint {row['joint_probe_acc']:.2f}, federated (own vs public, apart) {row['federated_probe_acc']:.2f}",
              flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    print(f"chance among owners: {1 / (len(names) - 1):.2f}; {result['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
