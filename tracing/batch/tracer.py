"""`BatchTracer`: trace a batch of rows with a tracer opened once (a local worker's, a Ray actor's).

    bt = BatchTracer(str(ws.root), spec.model_dump(mode="json"), "b0123456789ab")  # opens indexes + model
    out = bt({"row": np.array([0, 1]), "id": np.array(["a", "b"], dtype=object),
              "text": np.array(["...", "..."], dtype=object), "prompt": ..., "error": ...})
    # out: row, id, status ('ok' | 'error'), error, trace_id, result (the trace as JSON)

The class has the shape Ray Data's `map_batches` takes as it is (a callable class: the
constructor runs once per actor, `__call__` maps a dict of numpy columns to another). Every
row is traced by `tracing.trace.Tracer`, exactly as `flexolmo trace` traces it; the trace's
id is derived from the batch id and the row, so a row traced twice (a batch resumed after a
crash) has one id and is stored once. A row that cannot be traced (a bad row from the input,
or one the tracer refuses, e.g. a prompt the model answers with nothing) comes back with
status 'error' and the reason; the batch goes on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from flexolmo.base.errors import FlexolmoError
from flexolmo.base.workspace import Workspace

from .inputs import row_problem
from .spec import BatchSpec
from .tables import OUTPUT_COLUMNS, trace_from_dict


def trace_id_of(batch_id: str, row: int) -> str:
    """The stored trace id of a batch row: the same on every run of the batch."""
    return hashlib.sha256(f"{batch_id}/{row}".encode()).hexdigest()[:16]


class BatchTracer:
    """Opens the federation and the model once; maps batches of rows to traced results."""

    def __init__(self, workspace: str, spec: dict, batch_id: str, with_traces: bool = False):
        """:param with_traces: add a column `trace`: each ok row's `Trace` as the driver rebuilds it from
            `result` (`tables.trace_from_dict`), so that a local worker does that work, not the driver"""
        self.ws = Workspace(Path(workspace))
        self.spec = BatchSpec.parse(**spec)
        self.batch_id = batch_id
        self.with_traces = with_traces and self.spec.mode != "contamination"
        if self.spec.mode == "contamination":
            from .contamination import ItemMatcher

            self.matcher, self.tracer = ItemMatcher.open(self.ws), None
        else:
            from ..trace import Tracer

            self.matcher = None
            self.tracer = Tracer.open(self.ws, options=self.spec.options, model=self.spec.model_spec())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["row"])
        col = {k: batch.get(k) for k in ("row", "id", "text", "prompt", "error")}
        rows = [self.one(int(col["row"][i]), str(col["id"][i]), _str(col["text"], i), _str(col["prompt"], i),
                         _str(col["error"], i)) for i in range(n)]
        out = {k: np.array([r[k] for r in rows], dtype=object) for k in OUTPUT_COLUMNS}
        out["row"] = np.array([r["row"] for r in rows], dtype=np.int64)
        if self.with_traces:
            out["trace"] = np.empty(n, dtype=object)
            for i, r in enumerate(rows):
                out["trace"][i] = trace_from_dict(json.loads(r["result"])) if r["status"] == "ok" else None
        return out

    def one(self, row: int, rid: str, text: str | None, prompt: str | None, error: str | None) -> dict:
        """One row's output: traced, or the reason it was not."""
        what = "prompt" if self.spec.mode == "generate" else "text"
        error = error or row_problem(text, self.spec.max_chars, what)
        if error:
            return _row(row, rid, "error", error, "", "")
        try:
            if self.matcher is not None:
                return _row(row, rid, "ok", "", "", json.dumps(self.matcher.longest(text, self.spec.min_match)))
            if self.spec.mode == "generate":
                t = self.tracer.generate_and_trace(text, self.spec.generation, store=False)
            else:
                t = self.tracer.trace(text, prompt=prompt or None, store=False)
        except FlexolmoError as e:  # the row's own problem (a bug or a broken model raises and stops the batch)
            return _row(row, rid, "error", str(e), "", "")
        t.trace_id = trace_id_of(self.batch_id, row)
        t.settings["batch"] = {"id": self.batch_id, "row": row, "row_id": rid}
        return _row(row, rid, "ok", "", t.trace_id, json.dumps(t.to_dict(), default=str))


def _str(col, i: int) -> str | None:
    if col is None:
        return None
    v = col[i]
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _row(row: int, rid: str, status: str, error: str, trace_id: str, result: str) -> dict:
    return {"row": row, "id": rid, "status": status, "error": error, "trace_id": trace_id, "result": result}
