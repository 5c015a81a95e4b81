"""An owner's contribution as a picture: matches over time, and its expert per domain.

    flexolmo report contribution --source news --plot news.png

Three panels from `store.contribution` (tracing/provenance/queries.py): spans matched in the source per
day; the mean routing share of the source's expert on spans of each domain; the mean drop in
a span's log-probability when that expert is switched off, per domain. The page draws the
same series itself (api/static/app.js).
"""

from __future__ import annotations

from pathlib import Path

from .queries import Contribution


def contribution_png(c: Contribution, path: Path) -> Path:
    """Write the three panels of `c` as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    days = [r["day"] for r in c.over_time]
    ax = axes[0]
    if days:
        ax.bar(range(len(days)), [r["spans"] for r in c.over_time], color="#3a7bd5", label="spans")
        ax.plot(range(len(days)), [r["traces"] for r in c.over_time], "o-", color="#e07b39", label="traces")
        ax.set_xticks(range(len(days)), days, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no stored trace matched", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"matches in {c.source} over time", fontsize=10)
    domains = [r["domain"] for r in c.by_domain]
    for ax, key, title, color in ((axes[1], "routing_share", "routing share of its expert", "#2a9d8f"),
                                  (axes[2], "counterfactual", "log-prob drop with its expert off", "#9b5de5")):
        values = [r[key] if r[key] is not None else 0.0 for r in c.by_domain]
        if domains:
            ax.bar(range(len(domains)), values, color=color)
            ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right", fontsize=8)
            ax.axhline(0, color="#888", linewidth=0.6)
        else:
            ax.text(0.5, 0.5, "no routed span yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title}, per domain of the text", fontsize=10)
    fig.suptitle(f"{c.source}: {c.spans_matched} spans in {c.traces_matched} of {c.n_traces} stored traces", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
