"""Progressive traces over server-sent events: the spans as soon as they are found, the experts after.

    POST /api/trace/stream      the body of POST /api/trace; the answer is text/event-stream:

    event: spans    data: the Trace without its expert linkage (spans, documents, relevance;
                          every span's `experts` empty, "experts_pending": true)
    event: experts  data: {"trace_id", "spans": [{"index", "experts", "top_expert", ...}], "timings_ms"}
    event: done     data: {"trace_id", "stored": true}
    event: error    data: {"trace_id", "status", "detail", "retry_after"}   (the expert stage was
                          stopped, failed, or not started because the model lane was full)

The trace is one job within the trace budget (api/worker.py): its first stage (spans,
documents, relevance: no model pass) runs on the index lane and its part is sent the moment
it is ready; the second (routing share, counterfactuals) follows on the model lane, and the
trace is stored once, complete, before `experts` is sent (`Service.keep`). When the model lane cannot take the
trace within its target but the index lane can, the spans are still sent, followed by an
`error` event with status 503 and `retry_after` (nothing is stored). Errors before the first
part (busy: 503, a client over its limits: 429, each with Retry-After) are plain HTTP errors.
A client that disconnects sets the job's cancel flag, which the worker checks before every
decoder layer of every model pass (`Job.check`), so the model work stops there and nothing is
stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import StreamingResponse

from flexolmo.base.errors import FlexolmoError
from tracing.provenance.access import TOKEN_HEADER, owner_of
from tracing.results import Trace
from tracing.trace import Tracer

from .auth import CallerDep
from .clients import client_of
from .deps import ServiceDep, watch
from .routes import _cap
from .schemas import TraceRequest
from .worker import Busy, Job, Stage, Stopped

router = APIRouter(prefix="/api")

# what the second stage fills in on every span
EXPERT_FIELDS = ("experts", "top_expert", "top_expert_by", "top_by_routing", "top_by_counterfactual", "agreement")


def experts_part(t: Trace) -> dict[str, Any]:
    """The `experts` event: each span's expert linkage, and the trace's timings."""
    spans = jsonable_encoder(t)["spans"]
    return {"trace_id": t.trace_id, "spans": [{"index": s["index"], **{k: s[k] for k in EXPERT_FIELDS}} for s in spans],
            "timings_ms": t.timings_ms}


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


@router.post("/trace/stream", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "`spans`, then `experts`, then `done` (or `error`)"}})
async def trace_stream(req: TraceRequest, svc: ServiceDep, request: Request, who: CallerDep) -> StreamingResponse:
    """Trace a response, sending its spans and documents at once and its experts when ready; stored once complete."""
    st = svc.settings
    _cap("text", req.text, st.max_trace_chars, st.trace_budget_s)
    _cap("prompt", req.prompt, st.max_trace_chars, st.trace_budget_s)
    opts = req.options  # its set fields over the service's

    loop = asyncio.get_running_loop()
    parts: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(kind: str, data: Any) -> None:  # from the tracer's lanes
        loop.call_soon_threadsafe(parts.put_nowait, (kind, data))

    def shown(first: Trace) -> None:  # as POST /api/trace shapes a Trace
        put("spans", {**jsonable_encoder(first), "experts_pending": True})

    gate = contextlib.ExitStack()
    gate.enter_context(svc.limits.model_pass(client_of(request.scope, svc.keys)))  # 429 over the client's limit
    try:
        stages = svc.trace_stages(req.text, req.prompt, opts, first_seen=shown)
        try:
            job = svc.worker.submit(stages, "trace", st.trace_budget_s)
        except Busy as busy:
            if len(stages) == 1:
                raise
            # the model lane is full: the spans alone, if the index lane can find them in time
            job = svc.worker.submit([_then_refuse(stages[0], put, busy)], "trace", st.trace_budget_s)
        job.future.add_done_callback(lambda f: f.cancelled() or put(*(("error", f.exception()) if f.exception() else
                                                                      ("linked", f.result()))))
        kind, first = await _next(parts, job, request, svc)
        if kind == "error":
            raise first
    except BaseException:
        gate.close()
        raise

    async def events() -> AsyncIterator[bytes]:
        try:
            yield sse("spans", first)
            while True:
                try:
                    kind, data = await _next(parts, job, request, svc)
                except Stopped as e:
                    kind, data = "error", e
                if kind == "linked" and data is None:  # the spans alone (the experts were refused: said before)
                    return
                if kind == "linked":  # the trace is complete: stored, then sent
                    try:
                        if req.store:
                            await svc.keep(request, data, owner_of(who))  # readable by its maker
                    except Stopped:
                        return  # the client left
                    except Exception as e:  # noqa: BLE001  told to the client below
                        kind, data = "error", e
                    else:
                        yield sse("experts", experts_part(data))
                        yield sse("done", {"trace_id": data.trace_id, "stored": req.store})
                        return
                if kind == "error":
                    yield sse("error", {"trace_id": first["trace_id"], "status": getattr(data, "http_status", 500),
                                        "detail": str(data) if isinstance(data, FlexolmoError) else
                                        f"the trace could not be completed: {type(data).__name__}",
                                        "retry_after": getattr(data, "retry_after", None)})
                    return
        finally:
            if not job.future.done():  # the client went away (or the stream was closed): stop the model work
                svc.worker.forget(job)
            gate.close()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if req.store and who.token:  # a client without a key reads its trace back with this token
        headers[TOKEN_HEADER] = who.token
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _then_refuse(first: Stage, put, busy: Busy) -> Stage:
    """The index stage alone, followed by the `error` event saying why the experts will not come."""
    def run(tracer: Tracer, job: Job, prev: Any) -> None:
        first.fn(tracer, job, prev)
        put("error", Busy(f"the spans are shown but the experts were not linked: {busy}", busy.retry_after))

    return Stage(first.lane, first.kind, first.units, run)


async def _next(parts: asyncio.Queue, job: Job, request: Request, svc) -> tuple[str, Any]:
    """The job's next part; the job is stopped when its client disconnects or it overruns its budget."""
    while True:
        try:
            return await asyncio.wait_for(parts.get(), timeout=0.25)
        except asyncio.TimeoutError:
            await watch(job, request, svc.worker)
