"""The tracer's two lanes: one thread for the index stages, one for the model stages.

A request is a chain of stages (`Stage`), each on a lane:

    pasted trace     [first @ index, last @ model]     (spans, documents, relevance; then experts)
    spans only       [first @ index]                   (options.link_experts false, or no model)
    generation       [generate @ model, first @ index, last @ model]
    search           [search @ index]

Each lane is one thread running its ready stages earliest-due first (api/admission.py sets
each request's due time when it is admitted), so the spans of a new trace are found while the
model lane computes another trace's counterfactuals: the index stage never waits behind model
passes. On the model lane a stage due sooner does not wait for a long one either: at its next
decoder layer (the checkpoint every model pass calls) the long one pauses and the urgent one
runs on the same thread, nested; then the long one resumes from where it paused. A stage may
pause (`Stage.pausable`) and run nested (`Stage.nestable`) only where nothing else can see the
model's state: a trace that switches experts off for itself does neither, and a generation,
whose routing capture hooks stay on the model while it is paused, never pauses. The Tracer's
parts are used apart: index stages touch the indexes and the tokenizer, model stages the model
(tracing/trace.py `first_part`, `last_part`, `generate_part`). The model lane runs nicer
(`model_nice`), so that index stages, storage and HTTP take the cores from model passes.

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

import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Callable

from flexolmo.base.errors import FlexolmoError
from flexolmo.base.workspace import Workspace
from tracing.trace import Tracer

from .admission import LANES, MIN_TARGET_S, Estimates, Planned, Step, admit

log = logging.getLogger("flexolmo.api")


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
    pausable: bool = False  # may pause at a decoder layer while a stage due sooner runs nested
    nestable: bool = False  # may run inside another stage's pause


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
    running: bool = False  # its stage `at` is under way (running, or paused under a nested one)
    seconds: list[float] = field(default_factory=list)  # each stage's estimate when admitted
    value: Any = None  # the last finished stage's result
    tracer: Tracer | None = None  # the tracer its first stage ran on (the later ones use it too)

    @property
    def started(self) -> bool:
        return self.at > 0 or self.running

    @property
    def stage_due(self) -> float:
        """When its next stage should end: its due, less what its later stages take."""
        return self.due - sum(self.seconds[self.at + 1:])

    def check(self) -> None:
        """Raise Stopped when the client left or the deadline passed (called from the passes)."""
        if self.cancel.is_set():
            raise Stopped(f"the {self.what} was stopped (the client went away or gave up); nothing was stored")
        if time.monotonic() > self.deadline:
            raise Stopped(f"the {self.what} ran past its {self.budget_s:g} s budget and was stopped; nothing was "
                          "stored. Send a shorter text, or use `flexolmo trace` on the command line (no budget)")


@dataclass
class Running:
    """A stage under way on a lane: when it began, its estimate, the seconds it spent paused."""

    job: Job
    start: float
    estimate: float
    paused: float = 0.0


class TraceWorker:
    """The Tracer, its two lane threads and the admitted jobs."""

    def __init__(self, ws: Workspace, open_tracer: Callable[[Workspace], Tracer], estimates: Estimates,
                 factor: float, model_nice: int = 0):
        """:param factor: a request's target is `factor` x its idle time (0: its budget only)
        :param model_nice: how much nicer (lower CPU priority) the model lane's thread runs than the
            index lane's, HTTP and storage: under load a span search then takes the cores from a
            model pass, not waits for them (Linux; the torch threads the lane starts inherit it)"""
        self.ws = ws
        self._open_tracer = open_tracer
        self.estimates = estimates
        self.factor = factor
        self.model_nice = model_nice
        self.tracer: Tracer | None = None
        self.error: str | None = None  # why the tracer could not be opened
        self._jobs: list[Job] = []  # admitted, unfinished, in arrival order
        self._running: dict[str, list[Running]] = {lane: [] for lane in LANES}  # per lane: paused ones, then the running one
        self._runs = {lane: 0 for lane in LANES}  # stages started per lane (to tell a stage that ran alone)
        self._cond = threading.Condition()
        self._keys = count(1)
        self._reopen = False
        self._reopening = False
        self._stop = False
        self.counts = {"admitted": 0, "refused": 0, "answered": 0, "late": 0}  # since the start (for /api/health)
        self.worst_late_s = 0.0  # the most an answer came after its planned due time
        self._threads = [threading.Thread(target=self._loop, args=(lane,), name=f"tracer-{lane}", daemon=True)
                         for lane in LANES]

    @property
    def queued(self) -> int:
        """Jobs admitted and not finished (running included)."""
        with self._cond:
            return len(self._jobs)

    def lanes(self) -> dict[str, dict[str, int]]:
        """Per lane: stages running, paused (under a nested one) and waiting (for /api/health)."""
        with self._cond:
            return {lane: {"running": int(bool(self._running[lane])), "paused": max(0, len(self._running[lane]) - 1),
                           "waiting": sum(1 for j in self._jobs if not j.running and j.stages[j.at].lane == lane)}
                    for lane in LANES}

    def admission(self) -> dict[str, float]:
        """Requests admitted, refused, answered, and answered after their planned due time (for /api/health)."""
        with self._cond:
            return {**self.counts, "worst_late_s": round(self.worst_late_s, 3), "queue_factor": self.factor}

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
            admitted = [self._as_planned(j, now) for j in self._jobs if not j.cancel.is_set()]
            verdict = admit(now, admitted, self._as_planned(job, now), self._holding())
            if not verdict.admitted:
                self.counts["refused"] += 1
                raise Busy(f"the service is busy: it expects to answer this {what} in {verdict.finish - now:.1f} s, "
                           f"over its target of {target:.1f} s ({self._target_rule(budget_s)}); retry in "
                           f"{verdict.retry_after_s} s", retry_after=verdict.retry_after_s)
            self._jobs.append(job)
            self.counts["admitted"] += 1
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

    def _as_planned(self, job: Job, now: float) -> Planned:
        """The job as the planner sees it, its stages timed by the estimates as they are now
        (under load the stages take longer than when it was admitted, and the plan knows)."""
        steps = []
        for i in range(job.at, len(job.stages)):
            s = job.stages[i]
            secs = self.estimates.seconds(s.kind, s.units, safe=True)  # planned as 9 in 10 such stages ran
            started = i == job.at and job.running
            if started:  # what is left of it
                run = next(r for r in self._running[s.lane] if r.job is job)
                secs = max(0.1 * secs, secs - (now - run.start - run.paused))
            steps.append(Step(s.lane, secs, pausable=s.pausable, nestable=s.nestable, started=started))
        return Planned(key=job.key, due=job.due, order=job.key, ready=now, steps=steps)

    def _holding(self) -> dict[str, int | None]:
        """Per lane, the job whose running stage will not pause (it holds the lane until it ends)."""
        out = {}
        for lane, stack in self._running.items():
            top = stack[-1].job if stack else None
            out[lane] = top.key if top is not None and not top.stages[top.at].pausable else None
        return out

    # -- on the lane threads --------------------------------------------------------------------

    def _next(self, lane: str, nested: bool = False) -> Job | None:
        """The ready job whose next stage is on `lane` and due first (under the lock); `nested`:
        among stages that may run inside another's pause."""
        best = None
        for j in self._jobs:
            if j.running or j.cancel.is_set() or j.stages[j.at].lane != lane:
                continue
            if nested and not j.stages[j.at].nestable:
                continue
            if self._reopen and not j.started:
                continue  # new jobs wait for the reopened tracer
            if best is None or (j.stage_due, j.key) < (best.stage_due, best.key):
                best = j
        return best

    def _loop(self, lane: str) -> None:
        if lane == "model" and self.model_nice:
            _nicer(self.model_nice)
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
                    self._begin(lane, job)
            if job is None:
                self._do_reopen()
                continue
            self._execute(lane, job)

    def _begin(self, lane: str, job: Job) -> None:
        """Mark `job`'s next stage under way on `lane` (under the lock)."""
        job.running = True
        self._running[lane].append(Running(job, time.monotonic(), job.seconds[job.at]))
        self._runs[lane] += 1

    def _execute(self, lane: str, job: Job) -> None:
        """Run `job`'s stage on this thread (begun by `_begin`), then hand its result on."""
        other = next(x for x in LANES if x != lane)
        with self._cond:
            alone_from = (not self._running[other], self._runs[other])
        stage = job.stages[job.at]
        t0 = time.monotonic()
        ok, value, outer = False, None, getattr(_current, "job", None)
        try:
            if job.at == 0 and t0 > job.deadline and not job.cancel.is_set():
                raise Busy(f"the tracer was busy with earlier requests for this {job.what}'s whole "
                           f"{job.budget_s:g} s budget; retry in a moment")
            job.check()  # the client left, or the budget passed between stages
            if job.tracer is None:
                if self.tracer is not None and self.tracer.stale():  # a policy, takedown, index or the date changed
                    with self._cond:
                        job.running = False
                        self._running[lane].pop()
                        self._reopen = True
                        self._cond.notify_all()
                    return
                if self.tracer is None:
                    raise Busy(f"the tracer is not open: {self.error or 'not started'}")
                job.tracer = self.tracer
            _current.job, _current.lane = job, lane
            value = stage.fn(job.tracer, job, job.value)
            ok = True
        except BaseException as e:  # noqa: BLE001  handed to the route
            value = e
        finally:
            _current.job = outer
        with self._cond:
            run = self._running[lane].pop()
            secs = time.monotonic() - t0 - run.paused
            alone = alone_from[0] and not self._running[other] and self._runs[other] == alone_from[1]
            if self._running[lane]:
                self._running[lane][-1].paused += time.monotonic() - t0  # the stage this one ran inside of
            job.running = False
            if ok:
                self.estimates.observe(stage.kind, stage.units, secs, alone and run.paused == 0)
                job.at += 1
                job.value = value
            if not ok or job.at == len(job.stages):
                self._jobs.remove(job)
            if ok and job.at == len(job.stages):
                end = time.monotonic()
                self.counts["answered"] += 1
                if end > job.due:
                    self.counts["late"] += 1
                    self.worst_late_s = max(self.worst_late_s, end - job.due)
            self._cond.notify_all()
        if not ok:
            _fail(job, value)
        elif job.at == len(job.stages):
            _finish(job, value)

    def _checkpoint(self) -> None:
        """Before every decoder layer of every model pass: stop the job if it must stop, and let
        a stage due sooner run here, nested, while this one pauses."""
        job = getattr(_current, "job", None)
        if job is None:
            return
        job.check()
        lane = _current.lane
        with self._cond:
            if not job.stages[job.at].pausable or self._reopening:
                return
            urgent = self._next(lane, nested=True)
            if urgent is None or urgent.stage_due >= job.stage_due:
                return
            if urgent.tracer is None:  # a new job: on the tracer of the one it pauses (no reopen is pending)
                urgent.tracer = job.tracer
            self._begin(lane, urgent)
        self._execute(lane, urgent)
        _current.lane = lane

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
            new.checkpoint = self._checkpoint  # before every decoder layer of every model pass
            self.tracer, self.error = new, None
        if old is not None and old is not self.tracer:
            old.fed.close()


_current = threading.local()  # the job (and lane) a lane thread is running: read by the checkpoint


def _finish(job: Job, value: Any) -> None:
    if not job.future.done():
        job.future.set_result(value)


def _fail(job: Job, e: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(e)


def _nicer(by: int) -> None:
    """Lower this thread's CPU priority by `by` (Linux: a thread's nice value is its own, and the
    threads it starts, torch's intra-op pool among them, inherit it). A no-op where unsupported."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except (AttributeError, OSError) as e:
        log.warning("model passes run at the same CPU priority as span searches (%s)", e)
