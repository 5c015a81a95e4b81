"""The API's routes: each a few lines over a library function.

    POST  /api/trace                          trace a pasted response (stored)
    POST  /api/generate                       generate a response, then trace it (stored)
    POST  /api/search                         phrase / CNF counts per source, documents under each policy
    POST  /api/search/next-tokens             next-token distribution after a phrase, per source
    GET   /api/traces?source=&owner=&licence=&bucket=&since=&until=&level=&limit=
    GET   /api/traces/{trace_id}              a stored trace's rows, table by table
    GET   /api/traces/{trace_id}/report       one response's provenance report (?format=json|csv)
    POST  /api/query                          read-only SQL over the provenance store
    GET   /api/sources                        every source with its policy
    GET   /api/sources/{name}
    PATCH /api/sources/{name}                 owner: on/off, visibility, expiry
    GET   /api/sources/{name}/takedowns
    POST  /api/sources/{name}/takedowns       owner: take a document down
    GET   /api/sources/{name}/policy-log
    GET   /api/sources/{name}/contribution    owner: what the source contributed to stored traces
    GET   /api/sources/{name}/contribution.png owner: the same as three plots
    GET   /api/keys                           admin: issued keys (ids, owners, scopes; never a key)
    POST  /api/keys                           admin: issue a key (shown once)
    DELETE /api/keys/{key_id}                 admin: revoke a key
    GET   /api/health

Owner routes take the source owner's key or the admin key, admin routes the admin key
(`Authorization: Bearer <key>`; api/auth.py). Stored traces belong to whoever made them (its
key, or the capability token a client without a key gets back as header X-Flexolmo-Token and
sends again): the four read routes above (traces, a trace, its report, SQL) show a caller
only what tracing/provenance/access.py lets it read. Every other route is open.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Request, Response
from fastapi import Query as Query_

from flexolmo.base import sources as src_lib
from index.results import Takedown
from index import query as index_query
from index.query import NextTokens, Query, SearchResult
from index.takedown import list_takedowns
from tracing.provenance import governance
from tracing.provenance import listing
from tracing.provenance import queries
from tracing.provenance.access import TOKEN_HEADER, Caller, owner_of
from tracing.results import Trace
from flexolmo.model.generate import GenerationOptions
from tracing.provenance.listing import TraceFilter, list_provenance
from tracing.provenance.queries import Contribution
from .auth import AdminKey, CallerDep, OwnerKey
from .deps import ServiceDep
from .schemas import (GenerateRequest, Health, KeyCreate, KeyIssued, KeyOut, NextTokensRequest, PolicyUpdate,
                      QueryRequest, QueryResponse, SearchRequest, SourceOut, StoredTrace, TakedownRequest, TraceRequest)

router = APIRouter(prefix="/api")

SourceName = Annotated[str, Path(description="A source name, e.g. 'news'.", max_length=40)]
TraceId = Annotated[str, Path(pattern=r"^[0-9a-f]{1,32}$", description="The trace_id of a stored trace.")]


def _cap(what: str, text: str | None, limit: int, budget_s: float) -> None:
    if text is not None and len(text) > limit:
        raise HTTPException(422, detail=f"the {what} is {len(text):,} characters; this service traces at most "
                                        f"{limit:,} within its {budget_s:g} s budget: split it, or use "
                                        "`flexolmo trace` on the command line (no budget)")


# -- tracing (on the tracer's lanes, admitted at arrival, within a budget) ------------------------


@router.post("/trace", response_model=Trace)
async def trace(req: TraceRequest, svc: ServiceDep, request: Request, who: CallerDep, response: Response) -> Trace:
    """Trace a response to the training documents and experts that shaped it; the record is stored."""
    st = svc.settings
    _cap("text", req.text, st.max_trace_chars, st.trace_budget_s)
    _cap("prompt", req.prompt, st.max_trace_chars, st.trace_budget_s)
    if req.store and who.token:  # a client without a key reads its trace back with this token
        response.headers[TOKEN_HEADER] = who.token
    t = await svc.run(request, "trace", st.trace_budget_s, svc.trace_stages(req.text, req.prompt, req.options))
    return await svc.keep(request, t, owner_of(who)) if req.store else t  # readable by its maker


@router.post("/generate", response_model=Trace)
async def generate(req: GenerateRequest, svc: ServiceDep, request: Request, who: CallerDep, response: Response) -> Trace:
    """Generate a response with the merged model (routing captured), then trace it; the record is stored."""
    st = svc.settings
    _cap("prompt", req.prompt, st.max_trace_chars, st.generate_budget_s)
    gen = req.generation or GenerationOptions()
    if gen.max_new_tokens > st.max_new_tokens:
        raise HTTPException(422, detail=f"max_new_tokens is {gen.max_new_tokens}; this service generates and traces "
                                        f"at most {st.max_new_tokens} within its {st.generate_budget_s:g} s budget")
    if req.store and who.token:
        response.headers[TOKEN_HEADER] = who.token
    t = await svc.run(request, "generation", st.generate_budget_s, svc.generation_stages(req.prompt, gen, req.options))
    return await svc.keep(request, t, owner_of(who)) if req.store else t


# -- searching the training data (on the tracer's index lane) ----------------------------------


@router.post("/search", response_model=SearchResult)
async def search(req: SearchRequest, svc: ServiceDep, request: Request) -> SearchResult:
    """Count a phrase or an AND of ORs of phrases in every source, with documents under each source's policy."""
    if (req.query is None) == (req.cnf is None):
        raise HTTPException(422, detail="give either `query` (a phrase, or `a OR b AND c`) or `cnf` "
                                        '([["a", "b"], ["c"]]), not both and not neither')
    q = Query.parse(req.query) if req.query is not None else Query.from_cnf(req.cnf)
    stages = svc.index_stages(lambda t: index_query.search(t.fed, t.tokenizer, q, source=req.source, n_docs=req.n_docs,
                                                           seed=req.seed))
    return await svc.run(request, "search", svc.settings.query_budget_s, stages)


@router.post("/search/next-tokens", response_model=NextTokens)
async def next_tokens(req: NextTokensRequest, svc: ServiceDep, request: Request) -> NextTokens:
    """Which tokens follow a phrase in each source (infini-gram's next-token distribution)."""
    stages = svc.index_stages(lambda t: index_query.next_tokens(t.fed, t.tokenizer, req.phrase, source=req.source,
                                                                top=req.top))
    return await svc.run(request, "search", svc.settings.query_budget_s, stages)


# -- reading the store (thread pool, never the tracer's lanes) -----------------------------------


@router.get("/traces", response_model=QueryResponse)
def traces(svc: ServiceDep, who: CallerDep, source: str | None = Query_(None, max_length=40), owner: str | None = Query_(None, max_length=200),
           licence: str | None = Query_(None, max_length=200),
           bucket: Literal["high", "medium", "low"] | None = None, since: dt.date | None = None,
           until: dt.date | None = None, level: Literal["traces", "spans", "documents"] = "traces",
           limit: int = Query_(100, ge=1, le=10_000)) -> QueryResponse:
    """The caller's stored traces, spans or documents, filtered by source, owner, licence, relevance bucket and date."""
    f = TraceFilter(source=source, owner=owner, licence=licence, bucket=bucket, since=since, until=until,
                    level=level, limit=limit)
    res = svc.read(list_provenance, svc.ws, f, caller=who)
    return QueryResponse(columns=res.columns, rows=[list(r) for r in res.rows])


@router.get("/traces/{trace_id}/report", response_model=None)
def trace_report(trace_id: TraceId, svc: ServiceDep, who: CallerDep, format: Literal["json", "csv"] = "json") -> Any:
    """One of the caller's responses' provenance: spans, sources, top expert (and its signal), documents."""
    rep = svc.read(listing.report, svc.ws, trace_id, caller=who)
    if format == "csv":
        return Response(listing.report_csv(rep), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="trace-{trace_id}.csv"'})
    return rep


@router.get("/traces/{trace_id}", response_model=StoredTrace)
def stored_trace(trace_id: TraceId, svc: ServiceDep, who: CallerDep) -> StoredTrace:
    """The stored rows of one trace that the caller may read, from every provenance table."""
    return StoredTrace(trace_id=trace_id, tables=svc.read(_trace_rows, svc.ws, trace_id, who))


@router.post("/query", response_model=QueryResponse)
def query(req: QueryRequest, svc: ServiceDep, who: CallerDep) -> QueryResponse:
    """Run one read-only SQL statement over the caller's rows of the provenance store (writes are refused)."""
    res = svc.read(queries.query, svc.ws, req.sql, limit=req.limit, timeout_s=svc.settings.query_budget_s, caller=who)
    return QueryResponse(columns=res.columns, rows=[list(r) for r in res.rows])


# -- sources and their owners ------------------------------------------------------------------


@router.get("/sources", response_model=list[SourceOut])
def sources(svc: ServiceDep) -> list[dict]:
    """Every source with its policy."""
    return [s.to_dict() for s in src_lib.list_sources(svc.ws)]


@router.get("/sources/{name}", response_model=SourceOut)
def source(name: SourceName, svc: ServiceDep) -> dict:
    """One source with its policy."""
    return src_lib.get_source(svc.ws, name).to_dict()


@router.patch("/sources/{name}", response_model=SourceOut)
def set_policy(name: SourceName, req: PolicyUpdate, svc: ServiceDep, key: OwnerKey) -> dict:
    """Change a source's policy; later traces follow it (an inactive source is neither searched nor routed)."""
    src = governance.set_policy(svc.ws, name, **req.changes(), by=key.owner,
                                key_id=key.key_id, comment=req.comment)
    svc.reopen()
    return src.to_dict()


@router.get("/sources/{name}/takedowns", response_model=list[Takedown])
def takedowns(name: SourceName, svc: ServiceDep) -> list[Takedown]:
    """The documents taken down from a source."""
    return list_takedowns(svc.ws, name)


@router.post("/sources/{name}/takedowns", response_model=Takedown, status_code=201)
def add_takedown(name: SourceName, req: TakedownRequest, svc: ServiceDep, key: OwnerKey) -> Takedown:
    """Take a document down: later traces show it as blocked, and stored traces lose its text.

    A retry of a takedown whose redaction was interrupted finishes it; once whole, a repeat is 409."""
    t = governance.takedown(svc.ws, name, req.doc_id, req.reason, by=key.owner)
    svc.reopen()
    return t


@router.get("/sources/{name}/policy-log")
def policy_log(name: SourceName, svc: ServiceDep) -> list[dict[str, Any]]:
    """Every policy change of a source: who, when, what (as stored data, never markup)."""
    src_lib.get_source(svc.ws, name)
    return src_lib.policy_log(svc.ws, name)


@router.get("/sources/{name}/contribution", response_model=Contribution)
def contribution(name: SourceName, svc: ServiceDep, _: OwnerKey) -> Contribution:
    """What a source contributed over every stored trace: matches, routing share, counterfactual drop."""
    src_lib.get_source(svc.ws, name)
    return svc.read(queries.contribution, svc.ws, name, timeout_s=svc.settings.query_budget_s)


@router.get("/sources/{name}/contribution.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def contribution_png(name: SourceName, svc: ServiceDep, _: OwnerKey) -> Response:
    """The source's contribution as plots: matches over time, routing share and counterfactual drop per domain."""
    import tempfile
    from pathlib import Path as P

    from tracing.provenance.plots import contribution_png as draw

    src_lib.get_source(svc.ws, name)
    c = svc.read(queries.contribution, svc.ws, name, timeout_s=svc.settings.query_budget_s)
    with tempfile.TemporaryDirectory() as d:
        png = draw(c, P(d) / "c.png").read_bytes()
    return Response(png, media_type="image/png")


# -- keys (the admin key) ----------------------------------------------------------------------

KeyId = Annotated[str, Path(pattern=r"^[0-9a-f]{8}$", description="A key_id, as `flexolmo keys list` shows it.")]


@router.get("/keys", response_model=list[KeyOut])
def keys(svc: ServiceDep, _: AdminKey) -> list[dict]:
    """Every issued key: ids, owners, scopes, labels; never a key or its hash."""
    return [r.public() for r in svc.keys.list()]


@router.post("/keys", response_model=KeyIssued, status_code=201)
def create_key(req: KeyCreate, svc: ServiceDep, _: AdminKey) -> dict:
    """Issue a key for an owner: the answer holds the key this once; it is stored only hashed."""
    rec, key = svc.keys.create(req.owner, req.scope, req.label)
    return {**rec.public(), "key": key}


@router.delete("/keys/{key_id}", response_model=KeyOut)
def revoke_key(key_id: KeyId, svc: ServiceDep, _: AdminKey) -> dict:
    """Revoke a key: the next request that carries it gets 401."""
    return svc.keys.revoke(key_id).public()


@router.get("/health", response_model=Health)
async def health(svc: ServiceDep) -> Health:
    """Whether the tracer is open and what it searches; answers at once (never waits on a trace)."""
    t = svc.tracer
    return Health(status="ok" if t is not None else "degraded", workspace=str(svc.ws.root), tracer_open=t is not None,
                  error=svc.error, sources_searched=list(t.fed.names) if t else [],
                  sources_skipped=dict(t.fed.skipped) if t else {}, model=t.model_name if t else None,
                  queued=svc.worker.queued, lanes=svc.worker.lanes(), estimates=svc.worker.estimates.snapshot(),
                  admission=svc.worker.admission(),
                  pid=os.getpid(), limits=svc.settings.caps())


def _trace_rows(ws, trace_id: str, who: Caller) -> dict[str, QueryResponse]:
    return {t: QueryResponse(columns=r.columns, rows=[list(x) for x in r.rows])
            for t, r in queries.trace_rows(ws, trace_id, caller=who).items()}
