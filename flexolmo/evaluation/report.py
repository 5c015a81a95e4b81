"""The evaluation's outputs: the raw numbers as JSON, a Markdown report with tables, and
PNG plots (perplexity change against the public model, the opt-out heat map, routing).

    write_report(result, out_dir=Path("docs"))   # docs/results.md, docs/results/eval.json, *.png

The JSON object (also what `flexolmo eval --json` prints):
    {"profile", "domains": [...], "rows": {row: {domain: ppl}}, "bpb": {row: {domain: bpb}},
     "optout": {expert: {domain: ppl}}, "public_in_topk": {row: {domain: fraction}},
     "routing_share": {row: {domain: {expert: share}}}, "owner_routing": {owner: {
     "public_text_to_public_expert", "own_text_to_own_expert", "bias_per_layer"}}, "task": {...},
     "meta": {...}}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from flexolmo.base.workspace import atomic_dir

ROW_NOTES = {
    "public": "the public model alone (1 expert)",
    "soup": "model soup: the owners' 2-expert models averaged (public FFN + mean of the owners' FFNs and router rows)",
    "btm": "BTM: the owners' 2-expert models as an ensemble, weighted by the domain posterior of the context, top-2",
    "dense": "dense: the public model trained further on all sources with the owners' total token budget",
    "flexolmo": "FlexOlmo: public + every owner's expert, merged, top-k as in the card",
    "flexolmo_tuned": "FlexOlmo + router tuning (router rows only, every expert active, public proxy data)",
    "no_bias": "ablation: owners trained with the router bias at 0 (the previous recipe)",
    "random_init": "ablation: owners' router rows initialised at random instead of the domain embedding",
    "embedder_init": "ablation: owners' router rows from an off-the-shelf embedder (all-MiniLM-L6-v2, through a fixed "
                     "public projection) instead of the public model's hidden states",
}


def _pct(x: float, base: float) -> str:
    return f"{100 * (x / base - 1):+.1f}%"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def markdown(result: dict) -> str:
    """The report: tables with the change relative to the public model, and a plain reading."""
    domains, rows = result["domains"], result["rows"]
    meta = result.get("meta", {})
    lines = ["# Evaluation results", ""]
    lines += [f"- command: `{meta.get('command', 'flexolmo eval')}`",
              f"- profile: `{result['profile']}`; date: {meta.get('date', '?')}; wall time: {meta.get('seconds', 0):.0f} s",
              f"- validation tokens per domain: {meta.get('tokens_per_domain', '?')} (the validation split: never trained on, never indexed"
              + {"spread": "; windows spread evenly over each split)", "first bytes": "; the first bytes of each split)"}
              .get(meta.get("windows", ""), ")"),
              *([f"- their bytes of text: {meta['bytes_per_domain']} (bits per byte compare across tokenizers on the same bytes: "
                 "`--bytes-per-domain`)"] if "bytes_per_domain" in meta else []),
              ""]
    if meta.get("complete") is False:
        lines += ["**Partial: the run is still going (or was stopped); rows appear as they are measured.**", ""]
    if meta.get("notes"):
        lines += [f"- {n}" for n in meta["notes"]] + [""]
    lines += ["## Held-out perplexity per domain", "",
              "Each cell: perplexity (change against the public model). Lower is better.", ""]
    lines.append("| row | " + " | ".join(domains) + " | mean |")
    lines.append("|---" * (len(domains) + 2) + "|")
    base = rows.get("public")
    for name, r in rows.items():
        cells = []
        for d in domains:
            v = r.get(d)
            cells.append("–" if v is None else (f"{v:.1f}" if base is None or name == "public" else f"{v:.1f} ({_pct(v, base[d])})"))
        mean = _mean(math.log(r[d]) for d in domains if d in r) if r else float("nan")
        cells.append(f"{math.exp(mean):.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Rows:", ""] + [f"- `{k}`: {ROW_NOTES.get(k, k)}" for k in rows] + [""]
    if result.get("bpb"):
        lines += ["## Bits per byte", "", "| row | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
        for name, r in result["bpb"].items():
            lines.append(f"| {name} | " + " | ".join(f"{r[d]:.3f}" if d in r else "–" for d in domains) + " |")
        lines.append("")
    if result.get("public_in_topk"):
        lines += ["## Routing: how often the public expert is among the top-k", "",
                  "| row | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
        for name, r in result["public_in_topk"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * r[d]:.0f}%" if d in r else "–" for d in domains) + " |")
        lines.append("")
    share = (result.get("routing_share") or {}).get("flexolmo")
    if share:
        experts = list(next(iter(share.values())))
        lines += ["## Routing share of each expert per domain (FlexOlmo)", "",
                  "| domain | " + " | ".join(experts) + " |", "|---" * (len(experts) + 1) + "|"]
        for d in domains:
            lines.append(f"| {d} | " + " | ".join(f"{100 * share[d][e]:.0f}%" for e in experts) + " |")
        lines.append("")
    if result.get("owner_routing"):
        lines += ["## The owners' own models: routing at the end of training", "",
                  "Share of tokens each owner's 2-expert model sends to the public expert on public text, and to "
                  "its own expert on its own text (its calibration windows, every layer pooled; the recipe aims at "
                  ">= 70% for both). From the packages' cards.", "",
                  "| owner | public text -> public expert | own text -> own expert | bias per layer |", "|---|---|---|---|"]
        for s, r in result["owner_routing"].items():
            bias = ", ".join(f"{b:.2f}" for b in r.get("bias_per_layer") or [])
            lines.append(f"| {s} | {100 * r['public_text_to_public_expert']:.0f}% | {100 * r['own_text_to_own_expert']:.0f}% | {bias} |")
        lines.append("")
    if result.get("optout"):
        lines += ["## Opt-out: each owner's expert removed in turn", "",
                  "Change of every domain's perplexity against the full FlexOlmo model.", "",
                  "| expert removed | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
        full = rows["flexolmo"]
        for e, r in result["optout"].items():
            lines.append(f"| {e} | " + " | ".join(_pct(r[d], full[d]) for d in domains) + " |")
        lines.append("")
    if result.get("task"):
        t = result["task"]
        lines += [f"## Task: {t['name']}", "", t.get("what", ""), "", "| row | " + " | ".join(t["rows"][next(iter(t["rows"]))]) + " |"]
        first = next(iter(t["rows"].values()))
        lines.append("|---" * (len(first) + 1) + "|")
        for name, r in t["rows"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}%" for v in r.values()) + " |")
        lines.append("")
    lines += ["## Reading", ""] + [f"- {c}" for c in checks(result)] + [""]
    lines += ["Plots: `results/ppl-change.png`, `results/optout.png`, `results/routing.png`, `results/loss-curves.png`.", "",
              "![perplexity change](results/ppl-change.png)", "", "![opt-out](results/optout.png)", "",
              "![routing](results/routing.png)", "", "![loss curves](results/loss-curves.png)", ""]
    return "\n".join(lines)


def checks(result: dict) -> list[str]:
    """The claims of the FlexOlmo paper, each checked against the numbers: held or not."""
    out = []
    domains, rows = result["domains"], result["rows"]
    pub_name = result.get("public_domain", "public")
    owners = [d for d in domains if d != pub_name]
    fx, pub = rows.get("flexolmo"), rows.get("public")
    if fx and pub:
        beat = [d for d in owners if fx[d] < pub[d]]
        out.append(f"FlexOlmo beats the public model on {len(beat)}/{len(owners)} owner domains"
                   + ("" if len(beat) == len(owners) else f" (not on: {', '.join(d for d in owners if d not in beat)})") + ".")
        if pub_name in fx:
            ch = fx[pub_name] / pub[pub_name] - 1
            out.append(f"On public text FlexOlmo is {100 * ch:+.1f}% against the public model "
                       f"({'within' if ch <= 0.05 else 'outside'} the 5% target).")
    for other in ("soup", "btm", "dense"):
        if fx and rows.get(other):
            a = _mean(math.log(fx[d]) for d in domains)
            b = _mean(math.log(rows[other][d]) for d in domains)
            out.append(f"FlexOlmo vs {other}: geometric-mean perplexity {math.exp(a):.1f} vs {math.exp(b):.1f} "
                       f"({'better' if a < b else 'worse'}).")
    own = result.get("owner_routing") or {}
    if own:
        short = {s: [f"{what} {100 * r[key]:.0f}%" for key, what in (("public_text_to_public_expert", "public text"),
                                                                       ("own_text_to_own_expert", "own text"))
                     if r[key] < 0.7] for s, r in own.items()}
        short = {s: v for s, v in short.items() if v}
        out.append(f"The owners' own models send at least 70% of public text to the public expert and of their own text "
                   f"to their own expert for {len(own) - len(short)}/{len(own)} owners"
                   + ("." if not short else " (short: " + "; ".join(f"{s} {', '.join(v)}" for s, v in short.items()) + ")."))
    pit = (result.get("public_in_topk") or {}).get("flexolmo")
    if pit:
        low = [d for d in domains if pit[d] < 0.5]
        out.append(f"The public expert is among the top-k for {100 * min(pit.values()):.0f}-{100 * max(pit.values()):.0f}% "
                   f"of router decisions per domain ({'at least half everywhere' if not low else 'under half on ' + ', '.join(low)}).")
    if result.get("optout") and fx:
        worst_ok, spill = [], []
        for e, r in result["optout"].items():
            change = {d: r[d] / fx[d] - 1 for d in domains}
            if e in change and max(change, key=change.get) == e:
                worst_ok.append(e)
            spill += [(e, d, c) for d, c in change.items() if d != e and abs(c) > 0.02]
        out.append(f"Removing an owner's expert hurts that owner's domain most for {len(worst_ok)}/{len(result['optout'])} experts.")
        out.append("Other domains move by at most 2% on every removal." if not spill else
                   "Other domains moved by more than 2% in " + f"{len(spill)} cases, the largest: "
                   + ", ".join(f"{e} off -> {d} {100 * c:+.1f}%" for e, d, c in sorted(spill, key=lambda x: -abs(x[2]))[:3]) + ".")
    return out


def plots(result: dict, folder: Path) -> list[Path]:
    """ppl-change.png (bars per row and domain), optout.png and routing.png (heat maps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains, rows = result["domains"], result["rows"]
    written = []
    names = [r for r in rows if r != "public"]
    if "public" in rows and names:  # a partial report with the public row alone has nothing to compare
        fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(domains)), 5.5))
        width = 0.8 / max(1, len(names))
        colors = plt.get_cmap("tab20").colors  # one colour per row (up to 20): tab10 repeats after 10
        for i, n in enumerate(names):
            ch = [100 * (rows[n][d] / rows["public"][d] - 1) for d in domains]
            ax.bar(np.arange(len(domains)) + i * width - 0.4 + width / 2, ch, width, label=n, color=colors[i % len(colors)])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(domains)), domains)
        ax.set_ylabel("perplexity change vs public model (%)")
        ax.set_title(f"Held-out perplexity against the public model ({result['profile']} profile); lower is better")
        ax.legend(fontsize=8, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.08))
        fig.tight_layout()
        written.append(folder / "ppl-change.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    curves = result.get("loss_curves")
    if curves:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, pts in curves.items():
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=name, lw=2 if name in ("public", "dense") else 1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/token)")
        ax.set_title("Training loss: the public model, each owner's expert (from the public model), dense")
        ax.legend(fontsize=7, ncol=3)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(folder / "loss-curves.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    heat = []
    if result.get("optout") and "flexolmo" in rows:
        experts = list(result["optout"])
        m = np.array([[100 * (result["optout"][e][d] / rows["flexolmo"][d] - 1) for d in domains] for e in experts])
        heat.append(("optout.png", m, experts, "expert switched off", "perplexity change vs full FlexOlmo (%)", "RdBu_r"))
    share = (result.get("routing_share") or {}).get("flexolmo")
    if share:
        experts = list(next(iter(share.values())))
        m = np.array([[100 * share[d][e] for e in experts] for d in domains])
        heat.append(("routing.png", m, domains, "domain", "share of top-k selections (%)", "viridis"))
    for fname, m, ylabels, ylabel, title, cmap in heat:
        xlabels = domains if fname == "optout.png" else experts
        fig, ax = plt.subplots(figsize=(1.1 * len(xlabels) + 2, 0.55 * len(ylabels) + 1.8))
        lim = max(1.0, float(np.abs(m).max()))
        im = ax.imshow(m, cmap=cmap, vmin=-lim if cmap == "RdBu_r" else 0, vmax=lim)
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=30, ha="right")
        ax.set_yticks(range(len(ylabels)), ylabels)
        ax.set_ylabel(ylabel)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        written.append(folder / fname)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_report(result: dict, out_dir: Path) -> dict[str, Path]:
    """Write `<out_dir>/results.md` and `<out_dir>/results/{eval.json, *.png}` atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir / "results") as tmp:
        (tmp / "eval.json").write_text(json.dumps(result, indent=2))
        plots(result, tmp)
    md = out_dir / "results.md"
    tmp_md = out_dir / ".results.md.tmp"
    tmp_md.write_text(markdown(result))
    tmp_md.replace(md)
    return {"markdown": md, "json": out_dir / "results" / "eval.json", "folder": out_dir / "results"}
