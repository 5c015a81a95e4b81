"""Admission at arrival: take a request only if the service expects to answer it in time.

The tracer's work runs on two lanes (api/worker.py): the **index** lane (spans, documents,
relevance; searches) and the **model** lane (generation, routing, counterfactuals). A request
is a chain of stages on these lanes, e.g. a pasted trace is [first@index, last@model]. Each
admitted request has a due time, arrival + its target, where the target is `factor` times
what the request takes on an idle service (at least MIN_TARGET_S, at most its budget): a
short request may wait a little, a long one longer, none beyond `factor` times its own idle
time. Each lane runs its ready stages earliest-due first, and on the model lane a stage due
sooner does not wait for a long one under way: the long one pauses at its next decoder layer
(`Step.pausable`, `Step.nestable`; api/worker.py).

At arrival `admit` plans every admitted, unfinished request plus the new one on the two lanes
as they will run (`plan`: earliest-due first, pauses included, each stage ready when its
previous one ends, times from `Estimates`) and takes the new one only if it finishes by its due time and no
admitted request is pushed past its own. Otherwise the request is refused at once (503)
with the seconds after which it would be taken (Retry-After): an overloaded service says
no in milliseconds instead of letting requests age in a queue.

`Estimates` learns each stage's time from the stages run (seconds = a + b * units, a least
squares fit that forgets old runs), separately for stages that ran alone (nothing on the other
lane: the idle times that set the targets) and for all (what waiting requests will take now).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field

LANES = ("index", "model")
MIN_TARGET_S = 0.25  # no request's target is shorter: a wait no one notices (a short one may wait for a stage under way)
DECAY = 0.9  # weight of a fit's past at each new observation (about the last 10 runs count)
OVERRUN_RUNS = 40  # the plan times stages by the 90th percentile of this many recent runs' time / estimate
OVERRUN_MAX = 3.0


@dataclass
class Fit:
    """seconds = a + b * units by least squares over past runs, older runs weighing less."""

    runs: int = 0  # observations added
    n: float = 0.0  # their weight (each older one counting DECAY times less)
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        self.runs += 1
        self.n, self.sx, self.sy = DECAY * self.n + 1, DECAY * self.sx + x, DECAY * self.sy + y
        self.sxx, self.sxy = DECAY * self.sxx + x * x, DECAY * self.sxy + x * y

    def predict(self, x: float) -> float | None:
        """None before the first run."""
        if self.n == 0:
            return None
        var = self.n * self.sxx - self.sx ** 2
        if self.n >= 3 and var > 1e-9 * max(1.0, self.sxx * self.n):
            b = (self.n * self.sxy - self.sx * self.sy) / var
            a = (self.sy - b * self.sx) / self.n
            if b >= 0 and a >= 0:
                return a + b * x
        return self.sy / self.sx * x if self.sx > 0 else self.sy / self.n  # through the origin


class Estimates:
    """Seconds each stage kind takes for given units (characters traced, tokens generated)."""

    def __init__(self, priors: dict[str, float]):
        """:param priors: seconds per unit of each kind, used until the kind has run once"""
        self.priors = dict(priors)
        self._all: dict[str, Fit] = {k: Fit() for k in priors}
        self._alone: dict[str, Fit] = {k: Fit() for k in priors}
        self._over: dict[str, deque[float]] = {k: deque(maxlen=OVERRUN_RUNS) for k in priors}
        self._lock = threading.Lock()

    def seconds(self, kind: str, units: float, idle: bool = False, safe: bool = False) -> float:
        """What a stage of `kind` over `units` takes now (idle: on an otherwise idle service;
        safe: as long as 9 in 10 recent stages of its kind took, against their estimate)."""
        with self._lock:
            fits = (self._alone[kind], self._all[kind]) if idle else (self._all[kind], self._alone[kind])
            for f in fits:
                got = f.predict(units)
                if got is not None:
                    return max(got, 1e-4) * (self._overrun(kind) if safe else 1.0)
        return self.priors[kind] * max(units, 1.0)

    def _overrun(self, kind: str) -> float:
        """The 90th percentile of recent stages' time over their estimate, at least 1 (lock held)."""
        r = sorted(self._over[kind])
        return min(OVERRUN_MAX, max(1.0, r[int(0.9 * (len(r) - 1))])) if len(r) >= 5 else 1.0

    def observe(self, kind: str, units: float, seconds: float, alone: bool) -> None:
        with self._lock:
            before = self._all[kind].predict(units)
            if before:
                self._over[kind].append(seconds / before)
            self._all[kind].add(units, seconds)
            if alone:
                self._alone[kind].add(units, seconds)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per kind: the runs counted and the predicted seconds for 1,000 units (for /api/health)."""
        return {k: {"runs": self._all[k].runs, "s_per_1000_units": round(self.seconds(k, 1000), 4),
                    "idle_s_per_1000_units": round(self.seconds(k, 1000, idle=True), 4)} for k in self.priors}


@dataclass(frozen=True)
class Step:
    """One stage of a request as the planner sees it."""

    lane: str
    seconds: float  # what is left of it
    pausable: bool = False  # may pause at a decoder layer for a step due sooner (model passes)
    nestable: bool = False  # may run inside another step's pause
    started: bool = False  # under way (running, or paused under a nested step)


@dataclass
class Planned:
    """A request as the planner sees it: its unfinished stages and when it is due."""

    key: int
    due: float  # time.monotonic() by which it should be answered
    steps: list[Step]  # its stages not finished, in order
    ready: float  # when its first step may start (now, or when its previous stage ends)
    order: int = 0  # arrival order: ties in due go first come, first served
    dues: list[float] = field(default_factory=list)  # each step's due: the request's less the later steps'

    def __post_init__(self) -> None:
        later = 0.0
        self.dues = [0.0] * len(self.steps)
        for i in range(len(self.steps) - 1, -1, -1):
            self.dues[i] = self.due - later
            later += self.steps[i].seconds


def plan(now: float, jobs: list[Planned], holding: dict[str, int | None] | None = None) -> dict[int, float]:
    """When each request would finish if the lanes run as they do: a lane runs, of the steps
    ready on it, the one due first; a pausable step under way gives way at its next decoder
    layer to a nestable step due sooner (it resumes when that ends); any other step under way
    holds its lane until it ends, and a step that is not nestable starts only on a lane with
    no step under way. A step is ready when the request's previous step has ended.

    :param holding: per lane, the request whose step is running and may not pause (None: none)
    :returns: request key -> finish time (requests with no steps left finish at their `ready`)"""
    eps = 1e-9
    t = now
    at = {j.key: 0 for j in jobs}
    left = {j.key: j.steps[0].seconds for j in jobs if j.steps}
    started = {j.key: j.steps[0].started for j in jobs if j.steps}
    ready = {j.key: j.ready for j in jobs}
    done = {j.key: j.ready for j in jobs if not j.steps}
    live = {j.key: j for j in jobs if j.steps}
    hold = {lane: k for lane, k in (holding or {}).items() if k in live}
    while live:
        chosen: dict[str, int] = {}
        for lane in LANES:
            k = hold.get(lane)
            if k is not None:
                chosen[lane] = k
                continue
            mine = [j for j in live.values() if j.steps[at[j.key]].lane == lane and ready[j.key] <= t + eps]
            busy = any(started[j.key] for j in mine)
            mine = [j for j in mine if started[j.key] or j.steps[at[j.key]].nestable or not busy]
            if mine:
                j = min(mine, key=lambda j: (j.dues[at[j.key]], j.order))
                chosen[lane] = j.key
                started[j.key] = True
                if not j.steps[at[j.key]].pausable:
                    hold[lane] = j.key
        waiting = [ready[k] for k in live if ready[k] > t + eps]
        if not chosen:
            t = min(waiting)
            continue
        dt = min([left[k] for k in chosen.values()] + [r - t for r in waiting])
        t += dt
        for lane, k in chosen.items():
            left[k] -= dt
            if left[k] > eps:
                continue
            if hold.get(lane) == k:
                del hold[lane]
            j = live[k]
            at[k] += 1
            if at[k] == len(j.steps):
                done[k] = t
                del live[k]
            else:
                ready[k], left[k], started[k] = t, j.steps[at[k]].seconds, False
    return done


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    finish: float  # planned finish of the new request (time.monotonic())
    retry_after_s: int = 0  # when refused: seconds after which it would be taken


def admit(now: float, admitted: list[Planned], new: Planned, holding: dict[str, int | None] | None = None) -> Verdict:
    """Take `new` if it finishes by its due time and no admitted request is pushed past its own
    (one already late may stay late, but no later than before)."""
    before = plan(now, admitted, holding)
    after = plan(now, admitted + [new], holding)
    late = after[new.key] - new.due
    for j in admitted:
        if after[j.key] > max(j.due, before[j.key]) + 1e-9:
            late = max(late, after[j.key] - max(j.due, before[j.key]))
    if late <= 1e-9:
        return Verdict(True, after[new.key])
    return Verdict(False, after[new.key], retry_after_s=max(1, math.ceil(late)))
