"""The tracer's two lanes: one thread for the index stages, one for the model stages.

A request is a chain of stages (`Stage`), each on a lane:

    pasted trace     [first @ index, last @ model]     (spans, documents, relevance; then experts)
    spans only       [first @ index]                   (options.link_experts false, or no model)
    generation       [generate @ model, first @ index, last @ model]
    search           [search @ index]

Each lane is one thread running its ready stages earliest-due first (api/admission.py sets
each request's due time when it is admitted), so the spans of a new trace are found while the
model lane computes another trace's counterfactuals: the index stage never waits behind model
passes. The Tracer's parts are used apart: index stages touch the indexes and the tokenizer,
model stages the model (tracing/trace.py `first_part`, `last_part`, `generate_part`).

A request is admitted at arrival or refused at once (`Busy`, 503 with Retry-After): it is
taken only if the plan of every admitted request says it will be answered within its target
(api/admission.py). Every job still carries its budget and a cancel flag:

- a job whose budget passes before its next stage starts never runs it (503 if it had not
  started, else 504: stopped);
- a running stage checks the deadline before every decoder layer of every model pass and
  before each span is assembled, and stops with 504;
- a job whose client went away is stopped the same way, and what it computed is not stored.

A policy change or a takedown reopens the tracer: jobs already under way finish on the tracer
they began with; new ones wait for the reopened one. Readers (SQL, stored traces, reports)
never come here: they read the store's committed parts on other threads.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Callable

from flexolmo.base.errors import FlexolmoError
from flexolmo.base.workspace import Workspace
from tracing.trace import Tracer

from .admission import LANES, MIN_TARGET_S, Estimates, Planned, admit


class Busy(FlexolmoError):
    """The service could not take or start this request within its target or budget."""

    http_status = 503

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after  # seconds (the Retry-After header, api/app.py)


class Stopped(FlexolmoError):
    """A running job passed its deadline (or its client left) and was stopped; nothing was stored."""

    http_status = 504


@dataclass(frozen=True)
class Stage:
    """One step of a request: `fn(tracer, job, previous stage's result)` on `lane`; `kind` and
    `units` (characters traced, tokens generated) are what its time is estimated from."""

    lane: str
    kind: str
    units: float
    fn: Callable[[Tracer, "Job", Any], Any]


@dataclass
class Job:
    stages: list[Stage]
    what: str  # "trace" | "generation" | "search"
    budget_s: float
    deadline: float  # time.monotonic() at which the budget is spent
    due: float = 0.0  # time.monotonic() by which admission planned to answer it
    key: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    at: int = 0  # the next stage to run
    running: bool = False
    ready: bool = True  # its next stage may start (not waiting for another lane)
    seconds: list[float] = field(default_factory=list)  # each stage's estimate when admitted
    value: Any = None  # the last finished stage's result
    tracer: Tracer | None = None  # the tracer its first stage ran on (the later ones use it too)

    @property
    def started(self) -> bool:
        return self.at > 0 or self.running

    def check(self) -> None:
        """Raise Stopped when the client left or the deadline passed (called from the passes)."""
        if self.cancel.is_set():
            raise Stopped(f"the {self.what} was stopped (the client went away or gave up); nothing was stored")
        if time.monotonic() > self.deadline:
            raise Stopped(f"the {self.what} ran past its {self.budget_s:g} s budget and was stopped; nothing was "
                          "stored. Send a shorter text, or use `flexolmo trace` on the command line (no budget)")


class TraceWorker:
    """The Tracer, its two lane threads and the admitted jobs."""

    def __init__(self, ws: Workspace, open_tracer: Callable[[Workspace], Tracer], estimates: Estimates,
                 factor: float):
        """:param factor: a request's target is `factor` x its idle time (0: its budget only)"""
        self.ws = ws
        self._open_tracer = open_tracer
        self.estimates = estimates
        self.factor = factor
        self.tracer: Tracer | None = None
        self.error: str | None = None  # why the tracer could not be opened
        self._jobs: list[Job] = []  # admitted, unfinished, in arrival order
        self._running: dict[str, tuple[Job, float, float] | None] = {lane: None for lane in LANES}  # job, start, estimate
        self._runs = {lane: 0 for lane in LANES}  # stages started per lane (to tell a stage that ran alone)
        self._cond = threading.Condition()
        self._keys = count(1)
        self._reopen = False
        self._reopening = False
        self._stop = False
        self._threads = [threading.Thread(target=self._loop, args=(lane,), name=f"tracer-{lane}", daemon=True)
                         for lane in LANES]

    @property
    def queued(self) -> int:
        """Jobs admitted and not finished (running included)."""
        with self._cond:
            return len(self._jobs)

    def lanes(self) -> dict[str, dict[str, int]]:
        """Per lane: stages running and waiting (for /api/health)."""
        with self._cond:
            return {lane: {"running": int(self._running[lane] is not None),
                           "waiting": sum(1 for j in self._jobs if not j.running and j.at < len(j.stages)
                                          and j.stages[j.at].lane == lane)} for lane in LANES}

    def start(self) -> None:
        self._open()
        for t in self._threads:
            t.start()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            for j in self._jobs:
                j.cancel.set()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=60)
        if self.tracer is not None:
            self.tracer.fed.close()
            self.tracer = None

    def reopen_soon(self) -> None:
        """Reopen before the next job starts (a policy or a takedown changed what the tracer may show)."""
        with self._cond:
            self._reopen = True
            self._cond.notify_all()

    def wait_reopened(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._reopen and not self._reopening, timeout=timeout)

    def submit(self, stages: list[Stage], what: str, budget_s: float) -> Job:
        """Admit a job or refuse it at once (Busy with a Retry-After); its result comes in `job.future`."""
        now = time.monotonic()
        est = self.estimates
        idle = sum(est.seconds(s.kind, s.units, idle=True) for s in stages)
        target = min(budget_s, max(MIN_TARGET_S, self.factor * idle)) if self.factor > 0 else budget_s
        job = Job(stages=stages, what=what, budget_s=budget_s, deadline=now + budget_s, due=now + target,
                  seconds=[est.seconds(s.kind, s.units) for s in stages])
        with self._cond:
            if self._stop:
                raise Busy("the service is shutting down; retry in a moment")
            job.key = next(self._keys)
            free, admitted = self._planned(now)
            verdict = admit(now, free, admitted, self._as_planned(job, now))
            if not verdict.admitted:
                raise Busy(f"the service is busy: it expects to answer this {what} in {verdict.finish - now:.1f} s, "
                           f"over its target of {target:.1f} s ({self._target_rule(budget_s)}); retry in "
                           f"{verdict.retry_after_s} s", retry_after=verdict.retry_after_s)
            self._jobs.append(job)
            self._cond.notify_all()
        return job

    def _target_rule(self, budget_s: float) -> str:
        if self.factor > 0:
            return f"{self.factor:g}x its time on an idle service, within its {budget_s:g} s budget"
        return f"its {budget_s:g} s budget"

    def forget(self, job: Job) -> None:
        """The route gave up on a job (its client left): it stops at its next checkpoint or stage."""
        job.cancel.set()
        with self._cond:
            self._cond.notify_all()

    # -- planning (under the lock) --------------------------------------------------------------

    def _planned(self, now: float) -> tuple[dict[str, float], list[Planned]]:
        free = {}
        for lane, run in self._running.items():
            free[lane] = now if run is None else now + max(0.1 * run[2], run[1] + run[2] - now)
        return free, [self._as_planned(j, now, free) for j in self._jobs if not j.cancel.is_set()]

    @staticmethod
    def _as_planned(job: Job, now: float, free: dict[str, float] | None = None) -> Planned:
        if job.running:  # its running stage ends when its lane is free
            at, ready = job.at + 1, free[job.stages[job.at].lane]
        else:
            at, ready = job.at, now
        return Planned(key=job.key, due=job.due, order=job.key, ready=ready,
                       steps=[(s.lane, job.seconds[i]) for i, s in enumerate(job.stages) if i >= at])

    # -- on the lane threads --------------------------------------------------------------------

    def _next(self, lane: str) -> Job | None:
        """The ready job whose next stage is on `lane` and due first (under the lock)."""
        best = None
        for j in self._jobs:
            if j.running or not j.ready or j.stages[j.at].lane != lane:
                continue
            if self._reopen and not j.started:
                continue  # new jobs wait for the reopened tracer
            later = sum(j.seconds[j.at + 1:])
            if best is None or (j.due - later, j.key) < best[0]:
                best = ((j.due - later, j.key), j)
        return None if best is None else best[1]

    def _loop(self, lane: str) -> None:
        other = next(x for x in LANES if x != lane)
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    self._drop_abandoned()
                    if self._reopen and not self._reopening and not any(j.started for j in self._jobs):
                        self._reopening = True
                        break
                    job = self._next(lane) if not self._reopening else None
                    if job is not None:
                        break
                    self._cond.wait(0.5)
                if self._reopening:
                    job = None
                else:
                    job.running = True
                    est = job.seconds[job.at]
                    self._running[lane] = (job, time.monotonic(), est)
                    self._runs[lane] += 1
                    alone_from = (self._running[other] is None, self._runs[other])
            if job is None:
                self._do_reopen()
                continue
            self._run(lane, other, job, alone_from)

    def _run(self, lane: str, other: str, job: Job, alone_from: tuple[bool, int]) -> None:
        stage = job.stages[job.at]
        t0 = time.monotonic()
        ok, value = False, None
        try:
            if job.at == 0 and t0 > job.deadline and not job.cancel.is_set():
                raise Busy(f"the tracer was busy with earlier requests for this {job.what}'s whole "
                           f"{job.budget_s:g} s budget; retry in a moment")
            job.check()  # the client left, or the budget passed between stages
            if job.tracer is None:
                if self.tracer is not None and self.tracer.stale():  # a policy, takedown, index or the date changed
                    with self._cond:
                        job.running = False
                        self._running[lane] = None
                        self._reopen = True
                        self._cond.notify_all()
                    return
                if self.tracer is None:
                    raise Busy(f"the tracer is not open: {self.error or 'not started'}")
                job.tracer = self.tracer
            _current.job = job
            value = stage.fn(job.tracer, job, job.value)
            ok = True
        except BaseException as e:  # noqa: BLE001  handed to the route
            value = e
        finally:
            _current.job = None
        secs = time.monotonic() - t0
        with self._cond:
            alone = alone_from[0] and self._running[other] is None and self._runs[other] == alone_from[1]
            self._running[lane] = None
            job.running = False
            if ok:
                self.estimates.observe(stage.kind, stage.units, secs, alone)
                job.at += 1
                job.value = value
            if not ok or job.at == len(job.stages):
                self._jobs.remove(job)
            self._cond.notify_all()
        if not ok:
            _fail(job, value)
        elif job.at == len(job.stages):
            _finish(job, value)

    def _drop_abandoned(self) -> None:
        """Jobs cancelled while waiting: out of the plan, their routes told (under the lock)."""
        for j in [j for j in self._jobs if j.cancel.is_set() and not j.running]:
            self._jobs.remove(j)
            _fail(j, Stopped(f"the client went away; the {j.what} was stopped and not stored"))

    def _do_reopen(self) -> None:
        try:
            self._open()
        finally:
            with self._cond:
                self._reopen = self._reopening = False
                self._cond.notify_all()

    def _open(self) -> None:
        """(Re)open the Tracer: indexes, model and policies as the catalog says now. The old
        one serves /api/health until the new one is ready."""
        old = self.tracer
        try:
            new = self._open_tracer(self.ws)
        except FlexolmoError as e:  # served anyway: /api/health and the sources still answer
            self.tracer, self.error = None, str(e)
        else:
            new.checkpoint = _check  # before every decoder layer of every model pass
            self.tracer, self.error = new, None
        if old is not None and old is not self.tracer:
            old.fed.close()


_current = threading.local()  # the job a lane thread is running (read by the tracer's checkpoint)


def _check() -> None:
    job = getattr(_current, "job", None)
    if job is not None:
        job.check()


def _finish(job: Job, value: Any) -> None:
    if not job.future.done():
        job.future.set_result(value)


def _fail(job: Job, e: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(e)
