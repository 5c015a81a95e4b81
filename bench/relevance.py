"""Relevance buckets calibrated on inputs of known origin; span hygiene (issue 14, parts 1-2).

    .venv/bin/python bench/relevance.py --workspace /tmp/ws-exp [--per-source 16] [--out /tmp/rel.json]

Needs indexes only (no model; nothing is written to the workspace: traces are not stored).

Inputs, per source, from its documents:
  copied     a passage (25-150 words) copied from a training (indexed) document
  embedded   a passage (30-80 words) copied from a training document, between two pieces of
             unindexed (validation) text of the same source
  held-out   unindexed (validation) text only (60-150 words)

Labels of the retrieved documents (each hit = one document window under one kept span):
  origin     the document a passage was copied from, under a span inside the copied part:
             must rate high
  common     a document whose longest span shared with the input is at most --short tokens
             (a common short phrase), not the origin: must rate low
Other hits (a document that shares a longer run that is not the copied one) are unlabelled.
A `snippets` source returns ~40 tokens around the match, so BM25 rates only that much of
its documents: its origin hits are reported apart (origin_high_full_context excludes them).

The thresholds are fitted on the even-numbered inputs (high: the threshold with the best
balanced accuracy of origin-high vs common-not-high; medium: the 90th percentile of the
common hits' score, capped at high) and the accuracy is reported on the odd-numbered ones,
before (OLMoTrace's score / (0.18 * response chars), 0.7 / 0.5) and after (tracing/relevance.py).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np

from flexolmo.base import sources
from flexolmo.base.workspace import Workspace
from tracing import relevance
from tracing.trace import Tracer, has_words


def make_inputs(ws: Workspace, names: list[str], per_source: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for name in names:
        docs = sources.load_documents(ws, name, columns=["doc_id", "text", "split"]).to_pylist()
        train = [d for d in docs if d["split"] == "train" and len(d["text"].split(" ")) > 60]
        valid = [d for d in docs if d["split"] != "train" and len(d["text"].split(" ")) > 40] or train
        for i in range(per_source):
            kind = ("copied", "embedded", "held-out")[i % 3]
            if kind == "held-out":
                words = rng.choice(valid)["text"].split(" ")
                a = rng.randint(0, max(0, len(words) - 60))
                out.append(dict(kind=kind, source=name, text=" " + " ".join(words[a: a + rng.randint(60, 150)]),
                                origin=None, region=None))
                continue
            doc = rng.choice(train)
            words = doc["text"].split(" ")
            n = rng.randint(25, 150) if kind == "copied" else rng.randint(30, 80)
            a = rng.randint(0, max(0, len(words) - n))
            passage = " " + " ".join(words[a: a + n])
            left = right = ""
            if kind == "embedded":
                other = rng.choice(valid)["text"].split(" ")
                b = rng.randint(0, max(0, len(other) - 80))
                left = " " + " ".join(other[b: b + rng.randint(20, 60)]) + "\n"
                right = "\n" + " ".join(other[b + 60: b + 60 + rng.randint(20, 60)])
            out.append(dict(kind=kind, source=name, text=left + passage + right, origin=(name, doc["doc_id"]),
                            region=(len(left), len(left) + len(passage))))
    return out


def collect(tracer: Tracer, inputs: list[dict], short: int) -> tuple[list[dict], dict]:
    """Every retrieved hit with its label and both scores; and span hygiene counts."""
    hits, hygiene = [], Counter()
    for i, x in enumerate(inputs):
        t = tracer.trace(x["text"], store=False)
        # what OLMoTrace's rules alone (no whitespace/punctuation filter) would have kept
        ids = tracer.tokenizer(x["text"], add_special_tokens=False)["input_ids"]
        raw = tracer.fed.find_spans(ids, tracer.delims, tracer.bow)
        k = math.ceil(tracer.options.span_density * len(ids))
        kept = sorted(raw, key=lambda s: s.unigram_logprob_sum)[:k]
        hygiene["spans kept"] += len(t.spans)
        hygiene["spans kept, OLMoTrace rules only"] += len(kept)
        hygiene["of those, whitespace/punctuation only"] += sum(not has_words(tracer.tokenizer.decode(list(s.ids)))
                                                                for s in kept)
        nl = {j for j, tid in enumerate(ids) if tid in set(tracer.delims) and "\n" in tracer.tokenizer.decode([tid])}
        hygiene["kept spans crossing a newline token"] += sum(any(j in nl for j in range(s.start, s.end - 1))
                                                              for s in t.spans)
        longest: dict[tuple, int] = {}
        for s in t.spans:
            for d in s.documents:
                longest[(d.source, d.doc_id)] = max(longest.get((d.source, d.doc_id), 0), s.end - s.start)
        for s in t.spans:
            for d in s.documents:
                if d.blocked or d.doc_id is None:
                    continue
                key = (d.source, d.doc_id)
                label = None
                if x["origin"] is not None and key == tuple(x["origin"]):
                    if x["region"][0] <= s.char_start and s.char_end <= x["region"][1]:
                        label = "origin"
                elif longest[key] <= short:
                    label = "common"
                hits.append(dict(input=i, kind=x["kind"], label=label, source=d.source, full=d.context is not None, span_len=s.end - s.start,
                                 words=len(x["text"].split()), score=d.relevance,
                                 norm=d.relevance_norm, bucket=d.bucket,
                                 old=relevance.olmotrace_bucket(d.relevance, len(x["text"]))))
    return hits, dict(hygiene)


def fit(hits: list[dict]) -> tuple[float, float]:
    pos = np.array([h["norm"] for h in hits if h["label"] == "origin"])
    neg = np.array([h["norm"] for h in hits if h["label"] == "common"])
    best, high = -1.0, 1.0
    for c in np.unique(np.concatenate([pos, neg])):
        acc = ((pos >= c).mean() + (neg < c).mean()) / 2
        if acc > best:
            best, high = acc, float(c)
    medium = min(high, float(np.quantile(neg, 0.90)))
    return round(high, 2), round(medium, 2)


def accuracy(hits: list[dict], key: str) -> dict:
    by_kind = {k: [h[key] == "high" for h in hits if h["label"] == "origin" and h["kind"] == k]
               for k in ("copied", "embedded")}
    pos = [h[key] == "high" for h in hits if h["label"] == "origin"]
    neg = [h[key] == "low" for h in hits if h["label"] == "common"]
    return dict(origin_high=f"{sum(pos)}/{len(pos)} ({np.mean(pos):.1%})",
                common_low=f"{sum(neg)}/{len(neg)} ({np.mean(neg):.1%})",
                common_high=f"{np.mean([h[key] == 'high' for h in hits if h['label'] == 'common']):.1%}",
                all=f"{(sum(pos) + sum(neg)) / max(1, len(pos) + len(neg)):.1%}",
                **{f"origin_high_{k}": f"{np.mean(v):.1%}" for k, v in by_kind.items() if v},
                origin_high_full_context=f"{np.mean([h[key] == 'high' for h in hits if h['label'] == 'origin' and h['full']]):.1%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--per-source", type=int, default=18)
    ap.add_argument("--short", type=int, default=6, help="A 'common short phrase' is at most this many tokens.")
    ap.add_argument("--out", default=None, help="Write every hit as JSON here.")
    args = ap.parse_args()
    ws = Workspace.resolve(args.workspace)
    tracer = Tracer.open(ws, model=None)
    inputs = make_inputs(ws, tracer.fed.names, args.per_source)
    hits, hygiene = collect(tracer, inputs, args.short)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(hits=hits, hygiene=hygiene)))
    calib = [h for h in hits if h["input"] % 2 == 0]
    held = [h for h in hits if h["input"] % 2 == 1]
    high, medium = fit(calib)
    for h in hits:
        h["refit"] = "high" if h["norm"] >= high else "medium" if h["norm"] >= medium else "low"
    print(f"{len(inputs)} inputs ({Counter(x['kind'] for x in inputs)}), {len(hits)} document hits; "
          f"labelled: {Counter(h['label'] for h in hits)}")
    print("span hygiene:", hygiene)
    for label in ("origin", "common", None):
        xs = np.array([h["norm"] for h in hits if h["label"] == label])
        if xs.size:
            print(f"norm of {label!s:7s} hits: " + " ".join(f"q{q}={np.quantile(xs, q / 100):.3f}" for q in (1, 5, 25, 50, 75, 95, 99)))
    print(f"fitted on even inputs: high >= {high}, medium >= {medium}  (in tracing/relevance.py: "
          f"{relevance.HIGH}, {relevance.MEDIUM})")
    for name, key in (("before (OLMoTrace 0.18 x chars; 0.7/0.5)", "old"), ("after (tracing/relevance.py)", "bucket"),
                      ("refit on this run", "refit")):
        print(f"{name}:\n  buckets, all hits: {dict(Counter(h[key] for h in hits))}\n"
              f"  known-origin accuracy on held-out (odd) inputs: {accuracy(held, key)}")


if __name__ == "__main__":
    main()
