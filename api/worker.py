"""The tracer thread: one thread owns the Tracer; traces and generations are handed to it.

The Tracer is not thread-safe (the model's routing hooks, the tokenizer, the engines), so a
process runs one trace at a time, in arrival order, on this thread. Every job carries a
deadline and a cancel flag:

- a job still waiting when its deadline passes never starts (the route answers 503, busy);
- a running job checks its deadline before every decoder layer of every model pass
  (generation, routing, the counterfactual rows: about 90% of a trace; the tracer hands its
  `checkpoint` to `generate` and flexolmo/model/passes.py) and before each span is assembled
  (its documents come in one call for all spans), and stops with 504; the span search itself
  is bounded by the input caps, which are derived from the same budget;
- a job whose client went away is stopped the same way, and what it computed is not stored.

Readers (SQL, stored traces, reports) never come here: they read the store's committed
parts on other threads, so an expensive query cannot hold a trace, nor a trace a query.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from flexolmo.base.errors import FlexolmoError
from flexolmo.base.workspace import Workspace
from tracing.trace import Tracer


class Busy(FlexolmoError):
    """The tracer was busy with earlier requests for this request's whole budget."""

    http_status = 503


class Stopped(FlexolmoError):
    """A running job passed its deadline (or its client left) and was stopped; nothing was stored."""

    http_status = 504


@dataclass
class Job:
    fn: Callable[[Tracer, "Job"], Any]
    what: str  # "trace" | "generation" | "search" | "reopen"
    budget_s: float
    deadline: float  # time.monotonic()
    cancel: threading.Event = field(default_factory=threading.Event)
    started: bool = False

    def check(self) -> None:
        """Raise Stopped when the client left or the deadline passed (called from hooks)."""
        if self.cancel.is_set():
            raise Stopped(f"the {self.what} was stopped (the client went away or gave up); nothing was stored")
        if time.monotonic() > self.deadline:
            raise Stopped(f"the {self.what} ran past its {self.budget_s:g} s budget and was stopped; nothing was "
                          "stored. Send a shorter text, or use `flexolmo trace` on the command line (no budget)")


class ServiceTracer(Tracer):
    """A Tracer that checks the current job's deadline before each span's documents (and, as
    every Tracer, at its `checkpoint` before every decoder layer)."""

    def _span(self, *args, **kwargs):
        self.checkpoint()
        return super()._span(*args, **kwargs)


class TraceWorker:
    """The Tracer and the one thread that uses it."""

    def __init__(self, ws: Workspace, open_tracer: Callable[[Workspace], Tracer] = ServiceTracer.open):
        self.ws = ws
        self._open_tracer = open_tracer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracer")
        self.tracer: Tracer | None = None
        self.error: str | None = None  # why the tracer could not be opened
        self._job: Job | None = None  # the running job (read by the hooks, on this thread)
        self._reopen = False
        self._waiting = 0
        self._lock = threading.Lock()

    @property
    def queued(self) -> int:
        """Jobs submitted and not finished (running included)."""
        return self._waiting

    def start(self) -> None:
        self._pool.submit(self._open).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.tracer is not None:
            self.tracer.fed.close()
            self.tracer = None

    def reopen_soon(self) -> None:
        """Reopen before the next job (a policy or a takedown changed what the tracer may show)."""
        self._reopen = True

    def submit(self, fn: Callable[[Tracer, Job], Any], what: str, budget_s: float) -> tuple[Job, Future]:
        job = Job(fn=fn, what=what, budget_s=budget_s, deadline=time.monotonic() + budget_s)
        with self._lock:
            self._waiting += 1
        fut = self._pool.submit(self._run, job)
        fut.add_done_callback(self._done)
        return job, fut

    def _done(self, _fut: Future) -> None:
        with self._lock:
            self._waiting -= 1

    # -- on the tracer thread ------------------------------------------------------------------

    def _run(self, job: Job) -> Any:
        if job.cancel.is_set() or time.monotonic() > job.deadline:
            raise Busy(f"the tracer was busy with earlier requests for this {job.what}'s whole {job.budget_s:g} s "
                       "budget; retry in a moment")
        job.started = True
        if self._reopen or (self.tracer is not None and self.tracer.stale()):
            self._open()  # a policy, takedown, index or the date changed
        if job.what == "reopen":
            return None
        if self.tracer is None:
            raise Busy(f"the tracer is not open: {self.error or 'not started'}")
        self._job = job
        try:
            return job.fn(self.tracer, job)
        finally:
            self._job = None

    def _check(self) -> None:
        job = self._job
        if job is not None:
            job.check()

    def _open(self) -> None:
        """(Re)open the Tracer: indexes, model and policies as the catalog says now. The old
        one serves /api/health until the new one is ready."""
        self._reopen = False
        old = self.tracer
        try:
            new = self._open_tracer(self.ws)
        except FlexolmoError as e:  # served anyway: /api/health and the sources still answer
            self.tracer, self.error = None, str(e)
        else:
            new.checkpoint = self._check  # before every decoder layer of every model pass
            self.tracer, self.error = new, None
        if old is not None and old is not self.tracer:
            old.fed.close()

