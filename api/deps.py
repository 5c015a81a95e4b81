"""What every route shares: settings from the environment, the tracer thread, the budgets,
the keys file and the per-client limits (api/clients.py).

Every request has a time budget (`Settings`): traces and generations run on the one tracer
thread (api/worker.py) and are stopped at their deadline; reads (SQL, stored traces,
reports, sources) run on the server's thread pool against the store's committed parts, with
DuckDB interrupted at the deadline, so neither kind holds the other. Input caps follow from
the budgets: a text is accepted only if an idle service can trace it within its budget.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable

from fastapi import Depends, Request

from flexolmo.base.errors import InputError
from flexolmo.base.workspace import Workspace
from flexolmo.model.generate import MAX_NEW_TOKENS
from flexolmo.model.loading import ModelSpec
from index.keys import KeyStore
from tracing.trace import Tracer

from .clients import ClientLimits, client_of
from .worker import Busy, Job, ServiceTracer, Stopped, TraceWorker

GRACE_S = 2.0  # after a deadline, how long a route waits for the tracer thread to stop the job


def _env(name: str, default: float, zero_means: str | None = None) -> float:
    """A positive number from the environment; 0 too where `zero_means` says what it does."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"${name}={raw!r} is not a number") from None
    if value < 0 or (value == 0 and zero_means is None) or value != value:
        raise InputError(f"${name} must be positive{f' (or 0: {zero_means})' if zero_means else ''}, got {raw}")
    return value


@dataclass(frozen=True)
class Settings:
    """Service settings; `from_env` reads them as `flexolmo` does (the workspace: $FLEXOLMO_HOME)."""

    workspace: Workspace
    trace_budget_s: float = 30.0  # FLEXOLMO_TRACE_BUDGET_S: a trace, queueing included
    generate_budget_s: float = 60.0  # FLEXOLMO_GENERATE_BUDGET_S: generation + its trace
    query_budget_s: float = 10.0  # FLEXOLMO_QUERY_BUDGET_S: SQL, stored traces, reports
    # Trace speed of an idle service, conservative: the demo workspace (8 experts, every
    # counterfactual pass) traces 300-word passages at about 500 characters/s.
    chars_per_s: float = 400.0  # FLEXOLMO_TRACE_CHARS_PER_S
    tokens_per_s: float = 20.0  # FLEXOLMO_GENERATE_TOKENS_PER_S: generation on the demo model
    max_body_bytes: int = 1_000_000  # FLEXOLMO_MAX_BODY_BYTES
    max_queries: int = 2  # SQL statements running at once (each on one DuckDB thread)
    # the model traced: FLEXOLMO_MODEL (a folder; default the merged model), FLEXOLMO_EXPERTS,
    # FLEXOLMO_DEVICE, FLEXOLMO_DTYPE (`flexolmo serve --model ... --device ...` sets them)
    model: ModelSpec = field(default_factory=ModelSpec)
    # Per client (its key, else its address) and worker process; 0: no limit (api/clients.py).
    # A person at the page makes a few requests a second; a loopback benchmark sets 0.
    client_rps: float = 20.0  # FLEXOLMO_CLIENT_RPS: sustained requests per second
    client_burst: int = 40  # FLEXOLMO_CLIENT_BURST: requests at once before the rate applies
    client_passes: int = 2  # FLEXOLMO_CLIENT_PASSES: traces, generations, searches running or queued

    @classmethod
    def from_env(cls, workspace: str | os.PathLike | Workspace | None = None) -> "Settings":
        ws = workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace)
        return cls(workspace=ws, trace_budget_s=_env("FLEXOLMO_TRACE_BUDGET_S", cls.trace_budget_s),
                   generate_budget_s=_env("FLEXOLMO_GENERATE_BUDGET_S", cls.generate_budget_s),
                   query_budget_s=_env("FLEXOLMO_QUERY_BUDGET_S", cls.query_budget_s),
                   chars_per_s=_env("FLEXOLMO_TRACE_CHARS_PER_S", cls.chars_per_s),
                   tokens_per_s=_env("FLEXOLMO_GENERATE_TOKENS_PER_S", cls.tokens_per_s),
                   max_body_bytes=int(_env("FLEXOLMO_MAX_BODY_BYTES", cls.max_body_bytes)),
                   model=ModelSpec.parse(os.environ.get("FLEXOLMO_MODEL") or None, os.environ.get("FLEXOLMO_EXPERTS") or None,
                                         os.environ.get("FLEXOLMO_DEVICE") or None, os.environ.get("FLEXOLMO_DTYPE") or None),
                   client_rps=_env("FLEXOLMO_CLIENT_RPS", cls.client_rps, "no rate limit"),
                   client_burst=int(_env("FLEXOLMO_CLIENT_BURST", cls.client_burst)),
                   client_passes=int(_env("FLEXOLMO_CLIENT_PASSES", cls.client_passes, "no limit")))

    @property
    def max_trace_chars(self) -> int:
        """The longest response (or prompt) a trace accepts: what an idle service traces in budget."""
        return int(self.trace_budget_s * self.chars_per_s)

    @property
    def max_new_tokens(self) -> int:
        """Generation cap: generate n tokens and trace them (~4 characters each) within budget."""
        per_token = 1 / self.tokens_per_s + 4 / self.chars_per_s
        return max(1, min(MAX_NEW_TOKENS, int(self.generate_budget_s / per_token)))

    def caps(self) -> dict[str, Any]:
        return {"trace_budget_s": self.trace_budget_s, "generate_budget_s": self.generate_budget_s,
                "query_budget_s": self.query_budget_s, "max_trace_chars": self.max_trace_chars,
                "max_new_tokens": self.max_new_tokens, "max_body_bytes": self.max_body_bytes,
                "client_rps": self.client_rps, "client_burst": self.client_burst, "client_passes": self.client_passes}


async def watch(job: Job, fut, request: Request) -> None:
    """One look at a job its route is waiting for: stop it (and raise) when its client went
    away (Stopped), when it could not start within its budget (Busy: 503) or when it ran past
    its budget (Stopped: 504). A route calls it between waits of a fraction of a second."""
    if await request.is_disconnected():
        job.cancel.set()
        fut.cancel()
        raise Stopped(f"the client went away; the {job.what} was stopped and not stored")
    now = time.monotonic()
    if now > job.deadline and not job.started and fut.cancel():
        raise Busy(f"the tracer was busy with earlier requests for this {job.what}'s whole "
                   f"{job.budget_s:g} s budget; retry in a moment")
    if now > job.deadline + GRACE_S:
        job.cancel.set()
        raise Stopped(f"the {job.what} ran past its {job.budget_s:g} s budget and was stopped; nothing was stored")


class Service:
    """The workspace, its tracer thread, its keys and the limits, shared by every request."""

    def __init__(self, settings: Settings, open_tracer: Callable[[Workspace], Tracer] = ServiceTracer.open):
        self.settings = settings
        self.ws = settings.workspace
        if settings.model != ModelSpec():  # another model than the workspace's merged one, or on a GPU
            open_tracer = functools.partial(open_tracer, model=settings.model)
        self.keys = KeyStore.for_workspace(self.ws)
        self.limits = ClientLimits(settings.client_rps, settings.client_burst, settings.client_passes)
        self.worker = TraceWorker(self.ws, open_tracer)
        self._queries = threading.BoundedSemaphore(settings.max_queries)

    @property
    def tracer(self) -> Tracer | None:
        return self.worker.tracer

    @property
    def error(self) -> str | None:
        return self.worker.error

    def open(self) -> None:
        self.worker.start()

    def close(self) -> None:
        self.worker.close()

    async def traced(self, request: Request, what: str, budget_s: float, fn: Callable[[Tracer, Job], Any]) -> Any:
        """Run fn(tracer, job) on the tracer thread within `budget_s`, queueing included.

        503 when it could not start in time, 504 when it was stopped at its deadline; a
        client that disconnects stops it too; 429 when the client has its model passes running."""
        with self.limits.model_pass(client_of(request.scope, self.keys)):
            return await self._traced(request, what, budget_s, fn)

    async def _traced(self, request: Request, what: str, budget_s: float, fn: Callable[[Tracer, Job], Any]) -> Any:
        job, fut = self.worker.submit(fn, what, budget_s)
        afut = asyncio.wrap_future(fut)
        afut.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, even when abandoned
        try:
            while True:
                done, _ = await asyncio.wait({afut}, timeout=0.25)
                if done:
                    return afut.result()
                await watch(job, fut, request)
        except asyncio.CancelledError:
            job.cancel.set()
            fut.cancel()
            raise

    def read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a store read (SQL, report) when one of `max_queries` slots frees within budget."""
        if not self._queries.acquire(timeout=self.settings.query_budget_s):
            raise Busy(f"{self.settings.max_queries} queries were running for the whole "
                       f"{self.settings.query_budget_s:g} s budget; retry in a moment")
        try:
            return fn(*args, **kwargs)
        finally:
            self._queries.release()

    def reopen(self) -> None:
        """After a policy change or a takedown: reopen the tracer (waits up to a trace budget)."""
        self.worker.reopen_soon()
        _, fut = self.worker.submit(lambda t, j: None, "reopen", self.settings.trace_budget_s)
        try:
            fut.result(timeout=self.settings.trace_budget_s + GRACE_S)
        except Exception:  # noqa: BLE001  the next trace reopens anyway (reopen_soon)
            pass


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
