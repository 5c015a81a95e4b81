"""What every route shares: settings from the environment, the tracer's lanes, the budgets,
the keys file and the per-client limits (api/clients.py).

Every request has a time budget (`Settings`): traces, generations and searches run as stages
on the tracer's two lanes (api/worker.py: index and model), are admitted at arrival only if
they can be answered within their target (api/admission.py: `queue_factor` x their idle time,
within the budget; else 503 with Retry-After at once) and are stopped at their deadline;
reads (SQL, stored traces, reports, sources) run on the server's thread pool against the
store's committed parts, with DuckDB interrupted at the deadline, so neither kind holds the
other. Input caps follow from the budgets: a text is accepted only if an idle service can
trace it within its budget.
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
from fastapi.concurrency import run_in_threadpool

from flexolmo.base.errors import InputError
from flexolmo.base.workspace import Workspace
from flexolmo.model.generate import MAX_NEW_TOKENS
from flexolmo.model.loading import ModelSpec
from flexolmo.model.specs import GenerationOptions
from index.keys import KeyStore
from tracing.options import TraceOptions
from tracing.provenance import parts, store
from tracing.results import Trace
from tracing.trace import Pending, Tracer

from .admission import Estimates
from .clients import ClientLimits, client_of
from .worker import Busy, Job, Stage, Stopped, TraceWorker

GRACE_S = 2.0  # after a deadline, how long a route waits for the tracer's lanes to stop the job


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
    # A request is admitted only if it can be answered within queue_factor x its time on an idle
    # service (and its budget); else 503 with Retry-After at once. 0: within its budget only.
    queue_factor: float = 2.5  # FLEXOLMO_QUEUE_FACTOR
    # The model lane's thread (and the torch threads it starts) run this much nicer than the rest,
    # so that span searches, storage and HTTP keep the cores while model passes wait (0: equal).
    model_nice: int = 10  # FLEXOLMO_MODEL_NICE

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
                   client_passes=int(_env("FLEXOLMO_CLIENT_PASSES", cls.client_passes, "no limit")),
                   queue_factor=_env("FLEXOLMO_QUEUE_FACTOR", cls.queue_factor, "admit what fits the budget"),
                   model_nice=int(_env("FLEXOLMO_MODEL_NICE", cls.model_nice, "model passes at the same priority")))

    def __post_init__(self) -> None:
        if not 0 <= self.model_nice <= 19:
            raise InputError(f"$FLEXOLMO_MODEL_NICE (serve --model-nice) must be between 0 and 19 (a Linux nice "
                             f"value), got {self.model_nice}")

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
                "client_rps": self.client_rps, "client_burst": self.client_burst, "client_passes": self.client_passes,
                "queue_factor": self.queue_factor, "model_nice": self.model_nice}

    def priors(self) -> dict[str, float]:
        """Seconds per unit of each stage kind until the service has timed one (api/admission.py):
        `chars_per_s` is a whole trace with counterfactuals, about 10% of it the index stage."""
        per_char = 1 / self.chars_per_s
        return {"first": 0.1 * per_char, "routing": 0.25 * per_char, "counterfactual": 0.9 * per_char,
                "generate": 1 / self.tokens_per_s, "search": 0.2}


async def watch(job: Job, request: Request, worker: TraceWorker) -> None:
    """One look at a job its route is waiting for: stop it (and raise) when its client went
    away (Stopped), when it could not start within its budget (Busy: 503) or when it ran past
    its budget (Stopped: 504). A route calls it between waits of a fraction of a second."""
    if await request.is_disconnected():
        worker.forget(job)
        raise Stopped(f"the client went away; the {job.what} was stopped and not stored")
    now = time.monotonic()
    if now > job.deadline and not job.started:
        worker.forget(job)
        raise Busy(f"the tracer was busy with earlier requests for this {job.what}'s whole "
                   f"{job.budget_s:g} s budget; retry in a moment")
    if now > job.deadline + GRACE_S:
        worker.forget(job)
        raise Stopped(f"the {job.what} ran past its {job.budget_s:g} s budget and was stopped; nothing was stored")


class Service:
    """The workspace, its tracer lanes, its keys and the limits, shared by every request."""

    def __init__(self, settings: Settings, open_tracer: Callable[[Workspace], Tracer] = Tracer.open):
        self.settings = settings
        self.ws = settings.workspace
        if settings.model != ModelSpec():  # another model than the workspace's merged one, or on a GPU
            open_tracer = functools.partial(open_tracer, model=settings.model)
        self.keys = KeyStore.for_workspace(self.ws)
        self.limits = ClientLimits(settings.client_rps, settings.client_burst, settings.client_passes)
        self.worker = TraceWorker(self.ws, open_tracer, Estimates(settings.priors()), settings.queue_factor,
                                  settings.model_nice)
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

    # -- the stages of each request kind (api/worker.py) -----------------------------------------

    def trace_stages(self, text: str, prompt: str | None, options: TraceOptions | None,
                     first_seen: Callable[[Trace], None] | None = None) -> list[Stage]:
        """A pasted trace: its index stage, then its model stage when it links experts; the last
        stage's result is the Trace (not stored: `keep`). `first_seen(trace)` gets the first
        part (spans, documents, relevance) the moment it is ready."""
        units = len(text) + len(prompt or "")

        def first(tracer: Tracer, job: Job, _: Any) -> Pending:
            p = tracer.first_part(text, prompt, options=options, check=job.check)
            if first_seen is not None:
                first_seen(p.trace)
            return p

        return self._linked([Stage("index", "first", units, first)], options, units)

    def generation_stages(self, prompt: str, generation: GenerationOptions, options: TraceOptions | None) -> list[Stage]:
        """A generation: the model generates, the index stage traces, the model stage links experts."""
        units = len(prompt) + 4 * generation.max_new_tokens  # characters traced, about 4 a token
        return self._linked([
            Stage("model", "generate", generation.max_new_tokens,
                  lambda t, j, _: t.generate_part(prompt, generation, options=options, check=j.check),
                  nestable=self._shares_model(options)),  # never pauses: its capture hooks stay on the model
            Stage("index", "first", units, lambda t, j, g: t.first_part_of(g, check=j.check))], options, units)

    def _linked(self, stages: list[Stage], options: TraceOptions | None, units: float) -> list[Stage]:
        """`stages` followed by expert linkage on the model lane, or closed on their own lane when
        the trace links no experts (no model, or `link_experts` false)."""
        def last(tracer: Tracer, job: Job, p: Pending) -> Trace:
            return tracer.last_part(p, check=job.check)

        tracer = self.tracer
        if tracer is not None and tracer.needs_model(options):
            kind = "counterfactual" if tracer.options.merged(options).counterfactual else "routing"
            shares = self._shares_model(options)
            return stages + [Stage("model", kind, units, last, pausable=shares, nestable=shares)]
        *head, tail = stages
        return head + [Stage(tail.lane, tail.kind, tail.units, lambda t, j, prev: last(t, j, tail.fn(t, j, prev)))]

    def _shares_model(self, options: TraceOptions | None) -> bool:
        """May this request's model stages pause for others, or run in their pause? Not when it
        switches experts off for itself (the model's routers then hold its exclusions)."""
        o = (self.tracer.options if self.tracer is not None else TraceOptions()).merged(options)
        return not o.exclude and o.include is None

    async def keep(self, request: Request, t: Trace, owner: str | None) -> Trace:
        """Store a finished trace as `owner`'s (tracing/provenance/access.py), off the tracer's
        lanes (a commit takes tens of milliseconds); nothing is stored for a client that left."""
        if await request.is_disconnected():
            raise Stopped("the client went away; the trace was not stored")
        await run_in_threadpool(store.save_trace, self.ws, t, owner=owner, compact=False)
        parts.compact_soon(self.ws, store.TABLES)  # small parts merge on a thread of their own: no answer waits
        return t

    @staticmethod
    def index_stages(fn: Callable[[Tracer], Any]) -> list[Stage]:
        """A search or a next-token query: one stage on the index lane."""
        return [Stage("index", "search", 1, lambda t, j, _: fn(t))]

    # -- running them ---------------------------------------------------------------------------

    async def run(self, request: Request, what: str, budget_s: float, stages: list[Stage]) -> Any:
        """Run a request's stages within `budget_s`, queueing included: 503 at once when it cannot
        be answered within its target (Retry-After says when it could), 504 when stopped at its
        deadline; a client that disconnects stops it too; 429 when the client has its passes running."""
        with self.limits.model_pass(client_of(request.scope, self.keys)):
            return await self.wait(self.worker.submit(stages, what, budget_s), request)

    async def wait(self, job: Job, request: Request) -> Any:
        """The job's result; the job is stopped when its client leaves or it overruns its budget."""
        afut = asyncio.wrap_future(job.future)
        afut.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, even when abandoned
        try:
            while True:
                done, _ = await asyncio.wait({afut}, timeout=0.25)
                if done:
                    return afut.result()
                await watch(job, request, self.worker)
        except asyncio.CancelledError:
            self.worker.forget(job)
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
        """After a policy change or a takedown: reopen the tracer before the next job starts
        (waits up to a trace budget for the jobs under way to finish and the tracer to open)."""
        self.worker.reopen_soon()
        self.worker.wait_reopened(self.settings.trace_budget_s + GRACE_S)


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
