"""Batch routes: submit a file of responses, poll its progress, fetch its report, plot and Parquet.

    POST /api/batches                      {"jsonl": "...", "spec": {...}}  or  {"path": "...", "spec": {...}} (admin)
    GET  /api/batches/{id}                 the batch, and its progress (done, total, rate, ETA, state)
    GET  /api/batches/{id}/report          per-source reproduction, documents, experts, longest matches
    GET  /api/batches/{id}/plot.png        the longest-match distribution
    GET  /api/batches/{id}/parquet/{table} responses | spans | documents | experts (items | item_sources)

Every route needs a key. A batch belongs to the key that submitted it: that key and the admin
key read it, no other. An upload is capped by the service's body limit
(FLEXOLMO_MAX_BODY_BYTES); a file in the workspace may be named by the admin key only, as may
a model folder. The batch runs on a background thread of the service (tracing/batch/run.py:
`start_batch`), with the same engine, results and resumability as `flexolmo trace-batch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from flexolmo.base.errors import InputError, NotFoundError
from index.keys import ADMIN, KeyForbidden, KeyRecord, authorize
from tracing.batch.layout import BatchDir
from tracing.batch.spec import BatchSpec

from tracing.provenance.access import Caller, key_owner

from .clients import identify
from .deps import ServiceDep, get_service

router = APIRouter(tags=["batches"])


class BatchSubmit(BaseModel):
    """A batch to run: the rows uploaded as JSONL text, or (admin) a JSONL/Parquet file in the workspace."""

    jsonl: Optional[str] = Field(None, description="The input file's text: one JSON object per line.")
    path: Optional[str] = Field(None, description="Admin key only: a JSONL or Parquet file on the server.")
    spec: BatchSpec = Field(default_factory=BatchSpec, description="Mode, trace options, limits (as trace-batch).")
    workers: Optional[int] = Field(None, ge=1, le=64, description="Worker processes (default: the cores).")
    format: Literal["jsonl"] = "jsonl"


def _key(request: Request) -> KeyRecord:
    rec, _ = identify(request.scope, get_service(request).keys)
    if rec is None:
        authorize(None, None)  # 401 with the message saying which key to use
    return rec


def _owner(rec: KeyRecord) -> str:
    return key_owner(rec)  # the owner a trace made with this key records (tracing/provenance/access.py)


def _batch(svc, request: Request, batch_id: str) -> BatchDir:
    rec = _key(request)
    b = BatchDir.existing(svc.ws, batch_id)
    if not Caller.for_request(svc.ws, rec, None).can_read(b.meta().get("submitted_by")):
        raise KeyForbidden("this batch was submitted with another key; only that key, an analyst key or the admin "
                           "key reads it")
    return b


@router.post("/api/batches", status_code=202)
def submit(body: BatchSubmit, svc: ServiceDep, request: Request) -> dict:
    """Start a batch; poll GET /api/batches/{id} for its progress."""
    from tracing.batch.run import save_upload, start_batch

    rec = _key(request)
    if (body.jsonl is None) == (body.path is None):
        raise InputError("give the rows as `jsonl` (the file's text) or, with the admin key, a `path`; one of them")
    if rec.scope != ADMIN and (body.path is not None or body.spec.model_path is not None):
        raise KeyForbidden("a path on the server (an input file or a model folder) needs the admin key; upload the "
                           "rows as `jsonl` instead")
    path = Path(body.path) if body.path else save_upload(svc.ws, body.jsonl.encode("utf-8"), "jsonl")
    bid = start_batch(svc.ws, path, body.spec, submitted_by=_owner(rec), workers=body.workers)
    return {"batch_id": bid, "status": f"/api/batches/{bid}", "report": f"/api/batches/{bid}/report"}


@router.get("/api/batches/{batch_id}")
def status(batch_id: str, svc: ServiceDep, request: Request) -> dict:
    """The batch (spec, input, who submitted it) and its progress."""
    b = _batch(svc, request, batch_id)
    meta = b.meta()
    first = BatchSpec.parse(**meta["spec"]).tables[0]
    return {**meta, "progress": b.progress(), "complete": (b.root / f"{first}.parquet").is_file()}


@router.get("/api/batches/{batch_id}/report")
def report(batch_id: str, svc: ServiceDep, request: Request) -> dict:
    """The batch's report over the rows committed so far."""
    from tracing.batch.report import batch_report

    _batch(svc, request, batch_id)
    return batch_report(svc.ws, batch_id).to_dict()


@router.get("/api/batches/{batch_id}/plot.png", response_class=FileResponse)
def plot(batch_id: str, svc: ServiceDep, request: Request) -> FileResponse:
    """The longest-match distribution as a PNG."""
    from tracing.batch.report import batch_report, longest_png

    b = _batch(svc, request, batch_id)
    return FileResponse(longest_png(batch_report(svc.ws, batch_id), b.root / "longest.png"), media_type="image/png")


@router.get("/api/batches/{batch_id}/parquet/{table}", response_class=FileResponse)
def parquet(batch_id: str, table: str, svc: ServiceDep, request: Request) -> FileResponse:
    """One of the batch's tables as Parquet (once every row is done)."""
    b = _batch(svc, request, batch_id)
    tables = BatchSpec.parse(**b.meta()["spec"]).tables
    if table not in tables:
        raise InputError(f"table is one of {', '.join(tables)}, not {table!r}")
    f = b.root / f"{table}.parquet"
    if not f.is_file():
        raise NotFoundError(f"batch {batch_id} is not complete yet; its Parquet files are written when every row is done")
    return FileResponse(f, media_type="application/vnd.apache.parquet", filename=f"{batch_id}-{table}.parquet")
