"""Plot query latency against index size from the JSON that bench/index_build.py writes.

    .venv/bin/python bench/index_build.py --workspace flexolmo-work --scratch /tmp/fxb --with-100m --json /tmp/fxb.json
    .venv/bin/python bench/plot_latency.py /tmp/fxb.json docs/latency-by-size.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, out: str) -> None:
    rows = sorted(json.load(open(src))["latency"], key=lambda r: r["n_tokens"])
    size = [r["n_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    series = (("engine.attribute p50 (production settings)", "attribute_ms_p50", "o-", "tab:red"),
              ("compiled span search p50 (tracing/spans.py)", "find_spans_ms_p50", "s-", "tab:blue"),
              ("engine.count p50 (450 ids)", "count_ms_p50", "^-", "tab:gray"))
    for label, key, style, color in series:
        ax.plot(size, [r[key] for r in rows], style, color=color, label=label)
    for r in rows:
        ax.annotate(f"{r['attribute_ms_p50'] / r['find_spans_ms_p50']:.0f}x", (r["n_tokens"], r["attribute_ms_p50"]),
                    textcoords="offset points", xytext=(6, 6), fontsize=8, color="tab:red")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("index size (tokens)")
    ax.set_ylabel("latency per 450-token query (ms)")
    ax.set_title("Maximal-span search: latency by index size", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
