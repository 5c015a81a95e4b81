"""The API's routes: each a few lines over a library function.

    POST  /api/trace                          trace a pasted response (stored)
    POST  /api/generate                       generate a response, then trace it (stored)
    GET   /api/traces/{trace_id}              a stored trace's rows, table by table
    POST  /api/query                          read-only SQL over the provenance store
    GET   /api/sources                        every source with its policy
    GET   /api/sources/{name}
    PATCH /api/sources/{name}                 owner: on/off, visibility, expiry
    GET   /api/sources/{name}/takedowns
    POST  /api/sources/{name}/takedowns       owner: take a document down
    GET   /api/sources/{name}/policy-log
    GET   /api/sources/{name}/contribution    owner: what the source contributed to stored traces
    GET   /api/health
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from flexolmo import sources as src_lib
from index.models import Takedown
from index.takedown import list_takedowns
from tracing import governance
from tracing import store
from tracing.models import Trace
from tracing.store import Contribution
from tracing.trace import Tracer

from .deps import ServiceDep
from .schemas import (GenerateRequest, Health, PolicyUpdate, QueryRequest, QueryResponse, SourceOut, StoredTrace,
                      TakedownRequest, TraceRequest)

router = APIRouter(prefix="/api")

SourceName = Annotated[str, Path(description="A source name, e.g. 'news'.")]
TraceId = Annotated[str, Path(pattern=r"^[0-9a-f]{1,32}$", description="The trace_id of a stored trace.")]


# -- tracing ---------------------------------------------------------------------------------


@router.post("/trace", response_model=Trace)
def trace(req: TraceRequest, svc: ServiceDep) -> Trace:
    """Trace a response to the training documents and experts that shaped it; the record is stored."""
    return svc.traced(Tracer.trace, req.text, prompt=req.prompt)


@router.post("/generate", response_model=Trace)
def generate(req: GenerateRequest, svc: ServiceDep) -> Trace:
    """Generate a response with the merged model (routing captured), then trace it; the record is stored."""
    return svc.traced(Tracer.generate_and_trace, req.prompt, max_new_tokens=req.max_new_tokens)


@router.get("/traces/{trace_id}", response_model=StoredTrace)
def stored_trace(trace_id: TraceId, svc: ServiceDep) -> StoredTrace:
    """The stored rows of one trace, from every provenance table."""
    return StoredTrace(trace_id=trace_id, tables=svc.run(_trace_rows, svc.ws, trace_id))


@router.post("/query", response_model=QueryResponse)
def query(req: QueryRequest, svc: ServiceDep) -> QueryResponse:
    """Run read-only SQL over the provenance store (writes are refused)."""
    res = svc.run(store.query, svc.ws, req.sql, limit=req.limit)
    return QueryResponse(columns=res.columns, rows=[list(r) for r in res.rows])


# -- sources and their owners ------------------------------------------------------------------


@router.get("/sources", response_model=list[SourceOut])
def sources(svc: ServiceDep) -> list[dict]:
    """Every source with its policy."""
    return [s.to_dict() for s in svc.run(src_lib.list_sources, svc.ws)]


@router.get("/sources/{name}", response_model=SourceOut)
def source(name: SourceName, svc: ServiceDep) -> dict:
    """One source with its policy."""
    return svc.run(src_lib.get_source, svc.ws, name).to_dict()


@router.patch("/sources/{name}", response_model=SourceOut)
def set_policy(name: SourceName, req: PolicyUpdate, svc: ServiceDep) -> dict:
    """Change a source's policy; later traces follow it (an inactive source is neither searched nor routed)."""
    return svc.run_and_reopen(governance.set_policy, svc.ws, name, **req.model_dump(exclude_none=True)).to_dict()


@router.get("/sources/{name}/takedowns", response_model=list[Takedown])
def takedowns(name: SourceName, svc: ServiceDep) -> list[Takedown]:
    """The documents taken down from a source."""
    return svc.run(list_takedowns, svc.ws, name)


@router.post("/sources/{name}/takedowns", response_model=Takedown, status_code=201)
def add_takedown(name: SourceName, req: TakedownRequest, svc: ServiceDep) -> Takedown:
    """Take a document down: later traces show it as blocked, with no text."""
    return svc.run_and_reopen(governance.takedown, svc.ws, name, req.doc_id, req.reason, by=req.by)


@router.get("/sources/{name}/policy-log")
def policy_log(name: SourceName, svc: ServiceDep) -> list[dict[str, Any]]:
    """Every policy change of a source: who, when, what."""
    svc.run(src_lib.get_source, svc.ws, name)
    return svc.run(src_lib.policy_log, svc.ws, name)


@router.get("/sources/{name}/contribution", response_model=Contribution)
def contribution(name: SourceName, svc: ServiceDep) -> Contribution:
    """What a source contributed over every stored trace: matches, routing share, counterfactual drop."""
    svc.run(src_lib.get_source, svc.ws, name)
    return svc.run(store.contribution, svc.ws, name)


@router.get("/health", response_model=Health)
def health(svc: ServiceDep) -> Health:
    """Whether the tracer is open, and what it searches."""
    t = svc.tracer
    return Health(status="ok" if t is not None else "degraded", workspace=str(svc.ws.root), tracer_open=t is not None,
                  error=svc.error, sources_searched=t.fed.names if t else [],
                  sources_skipped=dict(t.fed.skipped) if t else {}, model=t.model_name if t else None)


def _trace_rows(ws, trace_id: str) -> dict[str, QueryResponse]:
    return {t: QueryResponse(columns=r.columns, rows=[list(x) for x in r.rows])
            for t, r in store.trace_rows(ws, trace_id).items()}
