"""How many tokens do runs of spaces cost each source, with and without whitespace-run tokens?

    .venv/bin/python bench/tokenizer_runs.py --workspace flexolmo-work [--docs 200]

Reads the workspace's shared tokenizer (trained without `--whitespace-runs`), builds the same
tokenizer with the whitespace-run merges in memory (`flexolmo.base.tokenizer.with_whitespace_runs`),
and encodes the same seeded sample of every source's documents with both. Prints, per source,
the share of single-space tokens and the token count with runs against without (the ratio is
the baseline of this run), and checks that both decode back to the text.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexolmo.base import tokenizer as tok_lib# noqa: E402
from flexolmo.base.sources import iter_texts, list_sources  # noqa: E402
from flexolmo.base.workspace import Workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", default="flexolmo-work")
    ap.add_argument("--docs", type=int, default=200, help="documents sampled per source (seeded)")
    args = ap.parse_args()
    ws = Workspace(Path(args.workspace))
    if tok_lib.artifact.read(ws).whitespace_runs:
        sys.exit("this workspace's tokenizer already has whitespace runs; point --workspace at one without")
    plain = tok_lib.load_raw_tokenizer(ws)
    runs = tok_lib.with_whitespace_runs(plain)  # a new tokenizer; `plain` is left as it is
    space = plain.token_to_id(tok_lib.SPACE)
    print(f"{'source':<12} {'docs':>5} {'tokens':>10} {'single spaces':>14} {'with runs':>10} {'change':>8}")
    for src in list_sources(ws):
        texts = list(iter_texts(ws, src.name, split="train"))
        texts = random.Random(0).sample(texts, min(args.docs, len(texts)))
        a = plain.encode_batch(texts)
        b = runs.encode_batch(texts)
        n_a, n_b = sum(len(e.ids) for e in a), sum(len(e.ids) for e in b)
        spaces = sum(e.ids.count(space) for e in a)
        if any(runs.decode(e.ids) != t for e, t in zip(b, texts)):
            sys.exit(f"{src.name}: the tokenizer with runs does not decode back to the text")
        print(f"{src.name:<12} {len(texts):>5} {n_a:>10,} {100 * spaces / n_a:>13.1f}% {n_b:>10,} {100 * (n_b / n_a - 1):>+7.1f}%")


if __name__ == "__main__":
    main()
