"""Admission at arrival and the tracer's two lanes (api/admission.py, api/worker.py).

The planner on its own (pure: times in, verdicts out), the worker with stages that wait on
events (what each lane runs, in which order, what it refuses), and the served API under a burst
(refusals within 100 ms with Retry-After; spans-only traces answered while the model lane is
busy; a streamed trace's spans even when its experts are refused).

    .venv/bin/python -m pytest tests/test_admission.py -q
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from conftest_model import build_served_federation
from served import LiveServer

from api.admission import Estimates, Fit, Planned, Step, admit, plan
from api.app import create_app
from api.deps import Settings
from api.worker import Busy, Stage, Stopped, TraceWorker
from flexolmo.base import sources
from tracing.provenance import queries
from tracing.trace import Tracer

NAMES = ("public", "news", "code")


# -- the planner -------------------------------------------------------------------------------


def _job(key, due, *steps, ready=0.0):
    return Planned(key=key, due=due, ready=ready, order=key, steps=[Step(*x) if isinstance(x, tuple) else x for x in steps])


def test_plan_runs_each_lane_earliest_due_first_and_chains_stages():
    long = _job(1, 100.0, ("index", 1.0), ("model", 10.0))
    short = _job(2, 5.0, ("index", 1.0), ("model", 2.0))
    # short is due first: its index step runs first (0-1), its model step 1-3; long's index 1-2, model 3-13
    assert plan(0.0, [long, short]) == {2: 3.0, 1: 13.0}
    # a step under way that may not pause holds its lane: the model steps wait for it
    busy = _job(3, 100.0, Step("model", 4.0, started=True))
    assert plan(0.0, [long, short, busy], holding={"model": 3}) == {3: 4.0, 2: 6.0, 1: 16.0}


def test_plan_pauses_a_long_model_step_for_a_nestable_one_due_sooner():
    long = _job(1, 100.0, Step("model", 10.0, pausable=True, nestable=True, started=True))
    short = _job(2, 3.0, Step("model", 1.0, pausable=True, nestable=True))
    gen = _job(3, 4.0, Step("model", 1.0, nestable=True))  # a generation: runs nested, never pauses
    assert plan(0.0, [long, short, gen]) == {2: 1.0, 3: 2.0, 1: 12.0}
    # a step that may not run nested waits for the lane to be clear
    alone = _job(4, 3.0, Step("model", 1.0))
    assert plan(0.0, [long, alone]) == {1: 10.0, 4: 11.0}
    # an index step is never paused: an urgent one waits for the one under way
    idx = _job(5, 100.0, Step("index", 2.0, started=True))
    urgent = _job(6, 0.5, Step("index", 0.1))
    assert plan(0.0, [idx, urgent], holding={"index": 5}) == {5: 2.0, 6: 2.1}


def test_admit_refuses_what_would_be_late_and_what_would_make_others_late():
    a = _job(1, 5.5, ("model", 5.0))
    ok = admit(0.0, [a], _job(2, 20.0, ("model", 5.0)))
    assert ok.admitted and ok.finish == 10.0
    late = admit(0.0, [a], _job(2, 8.0, ("model", 5.0)))
    assert not late.admitted and late.retry_after_s == 2  # 10 - 8
    # an earlier-due newcomer would go first and push `a` past its due: refused too
    pushy = admit(0.0, [a], _job(2, 2.0, ("model", 1.0)))
    assert not pushy.admitted and pushy.retry_after_s == 1
    # index-only work is not held by a full model lane
    full = _job(9, 100.0, Step("model", 50.0, started=True))
    assert admit(0.0, [full], _job(3, 0.5, ("index", 0.1)), holding={"model": 9}).admitted


def test_fit_learns_a_fixed_cost_and_a_rate_and_estimates_fall_back_to_priors():
    f = Fit()
    assert f.predict(10) is None
    for x in (100, 200, 400, 800):
        f.add(x, 0.05 + 0.001 * x)
    assert f.predict(1000) == pytest.approx(1.05, rel=1e-6)
    est = Estimates({"first": 0.001, "counterfactual": 0.01})
    assert est.seconds("first", 500) == pytest.approx(0.5)  # the prior
    est.observe("counterfactual", 100, 3.0, alone=False)  # timed under load only
    assert est.seconds("counterfactual", 100, idle=True) == pytest.approx(3.0)  # the loaded fit stands in
    est.observe("counterfactual", 100, 1.0, alone=True)
    assert est.seconds("counterfactual", 100, idle=True) == pytest.approx(1.0)
    assert 1.0 < est.seconds("counterfactual", 100) < 3.0


def test_the_plan_times_stages_as_9_in_10_recent_ones_ran_against_their_estimate():
    est = Estimates({"counterfactual": 0.01})
    for i in range(20):  # stages of one size: every fifth takes 1.5x the others
        est.observe("counterfactual", 100, 1.5 if i % 5 == 4 else 1.0, alone=True)
    mean = est.seconds("counterfactual", 100)
    assert 1.0 < mean < 1.5 and est.seconds("counterfactual", 100, idle=True) < 1.5  # the fits: near the mean
    assert est.seconds("counterfactual", 100, safe=True) == pytest.approx(mean * est._overrun("counterfactual"))
    assert 1.2 < est._overrun("counterfactual") <= 1.5  # the 90th percentile of time / estimate
    steady = Estimates({"first": 0.001})
    for _ in range(10):
        steady.observe("first", 100, 0.2, alone=True)
    assert steady.seconds("first", 100, safe=True) == pytest.approx(0.2)  # never below the estimate


# -- the worker's lanes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return build_served_federation(tmp_path_factory.mktemp("admission"), sources=NAMES)


@pytest.fixture
def worker(fed):
    est = Estimates({"first": 0.001, "routing": 0.001, "counterfactual": 0.001, "generate": 0.01, "search": 0.01})
    w = TraceWorker(fed, lambda ws: Tracer.open(ws, model=None), est, factor=4.0)
    w.start()
    yield w
    w.close()


def _stage(lane: str, fn, kind: str = "first", units: float = 100) -> Stage:
    return Stage(lane, kind, units, lambda tracer, job, prev: fn())


def test_the_index_lane_answers_while_the_model_lane_is_busy(worker):
    release, order = threading.Event(), []
    model = worker.submit([_stage("model", lambda: release.wait(10), "counterfactual")], "trace", 30.0)
    time.sleep(0.1)
    t0 = time.monotonic()
    spans = worker.submit([_stage("index", lambda: order.append("index") or "spans")], "trace", 30.0)
    assert spans.future.result(5) == "spans" and time.monotonic() - t0 < 1.0
    assert not model.future.done()  # still running on the other lane
    release.set()
    assert model.future.result(5) is True and worker.queued == 0


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def _threads() -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{os.getpid()}/task")}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice values are Linux's")
def test_model_passes_run_nicer_than_span_searches_torch_threads_included(fed, monkeypatch):
    import torch

    from flexolmo.base.errors import InputError

    for bad in ("20", "-1"):  # a nice value the service cannot take is refused at start, however given
        monkeypatch.setenv("FLEXOLMO_MODEL_NICE", bad)
        with pytest.raises(InputError, match="FLEXOLMO_MODEL_NICE"):
            Settings.from_env(fed.root)
    monkeypatch.delenv("FLEXOLMO_MODEL_NICE")

    est = Estimates({"first": 0.001, "routing": 0.001, "counterfactual": 0.001, "generate": 0.01, "search": 0.01})
    w = TraceWorker(fed, lambda ws: Tracer.open(ws, model=None), est, factor=4.0, model_nice=7)
    base = _nice(threading.get_native_id())
    w.start()
    try:
        def matmul():  # a product big enough for torch's intra-op threads
            a = torch.randn(512, 512)
            return float((a @ a).sum()), threading.get_native_id()

        w.submit([_stage("model", lambda: None, "counterfactual")], "trace", 30.0).future.result(10)
        before = _threads()  # the tracer open, its lanes running
        _, model_tid = w.submit([_stage("model", matmul, "counterfactual")], "trace", 30.0).future.result(10)
        _, index_tid = w.submit([_stage("index", lambda: (0, threading.get_native_id()))], "trace", 30.0).future.result(10)
        assert _nice(model_tid) == min(19, base + 7) and _nice(index_tid) == base
        started = _threads() - before  # the torch threads the model lane's product started
        if torch.get_num_threads() > 1:
            assert started and all(_nice(t) == min(19, base + 7) for t in started), {t: _nice(t) for t in started}
    finally:
        w.close()


def test_a_burst_is_refused_at_once_with_retry_after_and_admitted_jobs_run_earliest_due_first(worker):
    for _ in range(3):  # the model lane's stages take ~1 s per 100 characters (timed, alone)
        worker.estimates.observe("counterfactual", 100, 1.0, alone=True)
    release, ran = threading.Event(), []
    first = worker.submit([_stage("model", lambda: release.wait(10), "counterfactual")], "trace", 30.0)
    time.sleep(0.05)
    admitted, refused = [], []
    for i in range(8):  # 1 s each, target 4 s: about three fit behind the running one
        t0 = time.monotonic()
        try:
            admitted.append(worker.submit([_stage("model", lambda i=i: ran.append(i), "counterfactual")], "trace", 30.0))
        except Busy as e:
            refused.append((time.monotonic() - t0, e))
    assert 2 <= len(admitted) <= 4 and len(refused) == 8 - len(admitted), (len(admitted), len(refused))
    assert all(secs < 0.1 for secs, _ in refused)
    assert all(e.retry_after >= 1 and "retry in" in str(e) and "target" in str(e) for _, e in refused)
    release.set()
    for j in [first, *admitted]:
        j.future.result(10)
    assert sorted(ran) == list(range(len(admitted)))
    # a job due sooner overtakes those admitted before it that still wait (targets = budgets here)
    worker.factor, ran[:] = 0, []
    release.clear()
    block = worker.submit([_stage("model", lambda: release.wait(10), "counterfactual")], "trace", 30.0)
    time.sleep(0.05)
    late = [worker.submit([_stage("model", lambda i=i: ran.append(i), "counterfactual")], "trace", 30.0) for i in range(2)]
    soon = worker.submit([_stage("model", lambda: ran.append("soon"), "counterfactual")], "trace", 5.0)
    release.set()
    for j in [block, *late, soon]:
        j.future.result(10)
    assert ran == ["soon", 0, 1]


def test_a_long_model_stage_pauses_at_a_layer_for_one_due_sooner(worker):
    """The long stage calls the tracer's checkpoint, as every decoder layer does: an urgent
    nestable stage runs there, nested, and the long one resumes; one that may not nest waits."""
    events, started = [], threading.Event()

    def long(tracer, job, prev):
        started.set()
        for i in range(60):
            tracer.checkpoint()
            time.sleep(0.02)
        events.append("long done")
        return "long"

    for _ in range(3):
        worker.estimates.observe("counterfactual", 1000, 1.2, alone=True)
        worker.estimates.observe("routing", 100, 0.05, alone=True)
    first = worker.submit([Stage("model", "counterfactual", 1000, long, pausable=True, nestable=True)], "trace", 30.0)
    assert started.wait(5)
    t0 = time.monotonic()
    quick = worker.submit([Stage("model", "routing", 100, lambda t, j, p: events.append("quick") or "quick",
                                 pausable=True, nestable=True)], "trace", 30.0)
    assert quick.future.result(5) == "quick" and time.monotonic() - t0 < 0.5
    assert not first.future.done() and events == ["quick"]  # ran while the long one paused
    # a stage that may not run nested (its request switches experts off) waits for the lane
    worker.factor = 0  # (admitted on its budget: it has to wait)
    own = worker.submit([Stage("model", "routing", 100, lambda t, j, p: events.append("own") or "own")], "trace", 30.0)
    assert own.future.result(10) == "own" and first.future.result(10) == "long"
    assert events == ["quick", "long done", "own"]
    # the long stage's time, less its pause, taught the estimates
    assert worker.estimates.seconds("counterfactual", 1000) > 0.9


def test_a_job_that_cannot_start_within_its_budget_never_runs(worker):
    release, ran, started = threading.Event(), [], threading.Event()
    worker.factor = 0  # admitted on its budget alone
    first = worker.submit([_stage("model", lambda: started.set() or release.wait(5), "counterfactual")], "trace", 5.0)
    assert started.wait(5)  # running: the second, though due sooner, waits for it
    second = worker.submit([_stage("model", lambda: ran.append(1), "counterfactual", units=1)], "trace", 0.2)
    time.sleep(0.4)
    release.set()
    assert first.future.result(10) is True
    with pytest.raises(Busy, match="busy"):
        second.future.result(10)
    assert not ran and worker.queued == 0


def test_a_forgotten_job_stops_between_stages_and_a_reopen_waits_for_jobs_under_way(worker):
    release, ran = threading.Event(), []
    job = worker.submit([_stage("index", lambda: release.wait(5)), _stage("model", lambda: ran.append("model"))],
                        "trace", 30.0)
    time.sleep(0.1)
    worker.reopen_soon()
    tracer = worker.tracer
    later = worker.submit([_stage("index", lambda: ran.append("later"))], "trace", 30.0)
    time.sleep(0.2)
    assert ran == [] and worker.tracer is tracer  # the reopen waits for the job under way; `later` waits for it
    worker.forget(job)
    release.set()
    with pytest.raises(Stopped):
        job.future.result(5)
    later.future.result(10)
    assert ran == ["later"] and worker.tracer is not tracer  # reopened before `later` started


# -- the served API ----------------------------------------------------------------------------


def _text(ws, source: str, n_chars: int, start: int = 0) -> str:
    docs = sources.load_documents(ws, source, split="train").to_pylist()
    return " " + " ".join(d["text"] for d in docs[start:])[:n_chars]


@pytest.fixture
def live(fed):
    servers = []

    def start(settings: Settings) -> LiveServer:
        servers.append(LiveServer(create_app(fed, settings=settings)))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def _stored_once(ws, ids: list[str]) -> bool:
    counts = dict(queries.query(ws, "SELECT trace_id, count(*) FROM traces GROUP BY 1", limit=None).rows)
    return all(counts.get(i) == 1 for i in ids)


def test_served_burst_refusals_come_fast_and_spans_only_traces_pass_the_busy_model(fed, live):
    srv = live(replace(Settings.from_env(fed.root), client_passes=0, trace_budget_s=60))
    long = _text(fed, "news", 2500) + _text(fed, "code", 2500)
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        for i in range(2):  # the service times its stages (alone)
            assert c.post("/api/trace", json={"text": _text(fed, "news", 3000, start=i)}).status_code == 200
        est = c.get("/api/health").json()["estimates"]
        assert est["counterfactual"]["runs"] >= 2 and est["first"]["runs"] >= 2

        def post(body):
            t0 = time.perf_counter()
            r = httpx.post(srv.url + "/api/trace", json=body, timeout=120)
            return r, time.perf_counter() - t0

        with cf.ThreadPoolExecutor(12) as pool:
            burst = [pool.submit(post, {"text": long}) for _ in range(10)]
            time.sleep(0.3)
            spans = [post({"text": _text(fed, "code", 600, start=i), "options": {"link_experts": False}})
                     for i in range(3)]
            res = [f.result() for f in burst]
        ok = [r for r, _ in res if r.status_code == 200]
        refused = [(r, s) for r, s in res if r.status_code == 503]
        assert ok and refused and len(ok) + len(refused) == 10, [r.status_code for r, _ in res]
        assert all(s < 0.5 and int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["detail"] for r, s in refused)
        assert max(s for r, s in refused) < 0.5
        # spans-only traces: answered while the model lane works through the admitted ones
        assert all(r.status_code == 200 and not any(s["experts"] for s in r.json()["spans"]) for r, _ in spans), \
            [(r.status_code, r.text[:300], s) for r, s in spans]
        assert all(r.json()["spans"] for r, _ in spans) and max(s for _, s in spans) < 5
        assert _stored_once(fed, [r.json()["trace_id"] for r in ok] + [r.json()["trace_id"] for r, _ in spans])
        seen = c.get("/api/health").json()["admission"]  # the service counted what the clients saw
        assert seen["refused"] == len(refused) and seen["admitted"] == 2 + len(ok) + len(spans), seen
        assert seen["answered"] == seen["admitted"] and seen["late"] <= seen["answered"], seen


def test_a_streamed_trace_shows_its_spans_when_its_experts_are_refused(fed, live):
    srv = live(replace(Settings.from_env(fed.root), client_passes=0, trace_budget_s=60, queue_factor=2,
                       chars_per_s=10_000))
    long = 3 * (_text(fed, "news", 10_000) + _text(fed, "code", 10_000))  # seconds of model passes
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        assert c.post("/api/trace", json={"text": long}).status_code == 200  # timed
        with cf.ThreadPoolExecutor(4) as pool:
            # traces that switch an expert off for themselves: their passes hold the model lane
            # (no pause for a stage due sooner), so the stream's experts wait for them whole
            held = {"text": long, "options": {"exclude": ["code"]}}
            busy = [pool.submit(httpx.post, srv.url + "/api/trace", json=held, timeout=120) for _ in range(3)]
            deadline = time.monotonic() + 30
            while not c.get("/api/health").json()["lanes"]["model"]["running"]:  # a held pass under way
                assert time.monotonic() < deadline and not all(f.done() for f in busy)  # (some are refused)
                time.sleep(0.02)
            events = []
            # a short text: its target (0.25 s, the least) is shorter than what is left of the
            # held passes ahead of it; a long one sat on the edge of its 2x target (admitted, or not)
            with c.stream("POST", "/api/trace/stream", json={"text": _text(fed, "news", 1500)}) as r:
                assert r.status_code == 200
                kind = None
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        events.append((kind, json.loads(line[6:])))
            [f.result() for f in busy]
    kinds = [k for k, _ in events]
    assert kinds == ["spans", "error"], kinds
    err = events[1][1]
    assert err["status"] == 503 and err["retry_after"] >= 1 and "experts were not linked" in err["detail"]
    assert events[0][1]["spans"] and _stored_once(fed, []) and not queries.query(
        fed, f"SELECT count(*) FROM traces WHERE trace_id = '{events[0][1]['trace_id']}'").rows[0][0]
