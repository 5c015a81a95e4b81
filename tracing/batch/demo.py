"""The demo's last step: a batch of held-out passages, traced at once, and its per-source table.

    res, rep = demo_batch(ws, n=300)

The responses are the openings of held-out (validation) documents of every source, which
no model trained on and no index holds: what they share verbatim with the training data is
what any fluent text in these domains shares with it (boilerplate, quotations, code idioms),
the baseline against which a model's own reproduction rate reads. Spans and documents only
(no model), so that a few hundred take seconds, not minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

from flexolmo.base import sources as src_lib
from flexolmo.base.workspace import Workspace

from .layout import batches_dir
from .report import BatchReport, batch_report
from .run import BatchResult, run_batch
from .spec import BatchSpec

WORDS = 80  # words per response


def demo_input(ws: Workspace, n: int = 300) -> Path:
    """Write the demo's responses (JSONL, `id` source:doc_id, `text`) and return its path."""
    names = [s.name for s in src_lib.available_sources(ws) if not s.is_remote]
    pools = {}
    for name in names:
        docs = src_lib.load_documents(ws, name, split="validation", columns=["doc_id", "text"]).to_pylist()
        pools[name] = [d for d in docs if len(d["text"].split()) >= 20]
    rows, i = [], 0
    while len(rows) < n and any(i < len(p) for p in pools.values()):
        for name, docs in pools.items():
            if i < len(docs) and len(rows) < n:
                d = docs[i]
                rows.append({"id": f"{name}:{d['doc_id']}", "text": " ".join(d["text"].split()[:WORDS])})
        i += 1
    path = batches_dir(ws) / "demo-input.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".demo-input.jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def demo_batch(ws: Workspace, n: int = 300, workers: int | None = 1) -> tuple[BatchResult, BatchReport]:
    """Trace the demo's held-out passages as one batch (resumable like any) and report on it.

    One worker by default: a few hundred spans-only rows take a few seconds, in which a pool's
    start-up and a second process's share of shared cores win little (docs/benchmarks.md, Batch)."""
    res = run_batch(ws, demo_input(ws, n), BatchSpec.parse(use_model=False), workers=workers)
    return res, batch_report(ws, res.batch_id)
