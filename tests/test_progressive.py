"""Progressive traces: the spans before any model pass, the experts after, for the same trace id.

    .venv/bin/python -m pytest tests/test_progressive.py -q

Over a tiny served federation (tests/conftest_model.py): the library's two stages
(`Tracer.trace_parts`), the streaming route (`POST /api/trace/stream`, server-sent events)
in-process and against a real server (a disconnect stops the model work), with the model made
slow on purpose by a forward hook that sleeps before its first decoder layer.
"""

from __future__ import annotations

import json
import time
from typing import Iterator

import httpx
import pytest
from served import serving
from conftest_model import build_served_federation
from fastapi.testclient import TestClient

from api.app import create_app
from flexolmo.base import sources
from tracing.provenance import store
from tracing.trace import Tracer

NAMES = ("public", "news", "code")
VOLATILE = ("trace_id", "created_at", "timings_ms")  # differ between any two traces of the same text


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return build_served_federation(tmp_path_factory.mktemp("progressive"), sources=NAMES)


@pytest.fixture(scope="module")
def tracer(fed) -> Iterator[Tracer]:
    t = Tracer.open(fed)
    yield t
    t.fed.close()


def _passage(ws, source: str, i: int, a: int = 4, b: int = 40) -> str:
    text = sources.load_documents(ws, source, split="train").to_pylist()[i]["text"]
    return " " + " ".join(text.split(" ")[a:b])


class LayerCalls:
    """Counts the decoder layers run by model passes (each layer's post-attention norm, which full
    forward passes and the layer-by-layer counterfactual passes both call); optionally sleeps
    before each (a slow model)."""

    def __init__(self, model, sleep_s: float = 0.0):
        layers = [m for m in model.module.modules() if type(m).__name__.endswith("DecoderLayer")]
        assert layers, "no decoder layers to hook"
        self.sleep_s, self.started, self.finished = sleep_s, 0, 0
        self._hooks = [h for m in layers for h in (m.post_attention_layernorm.register_forward_pre_hook(self._pre),
                                                   m.post_attention_layernorm.register_forward_hook(self._post))]

    def _pre(self, *_):
        self.started += 1
        time.sleep(self.sleep_s)

    def _post(self, *_):
        self.finished += 1

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _stored(ws, trace_id: str) -> int:
    """How many rows of the traces table hold this trace (0 when nothing is stored yet)."""
    from flexolmo.base.errors import NotFoundError

    try:
        with store.reader(ws) as con:
            return con.execute("SELECT count(*) FROM traces WHERE trace_id = ?", [trace_id]).fetchone()[0]
    except NotFoundError:
        return 0


def _without(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in VOLATILE}


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream."""
    kind = None
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, json.loads(line[6:])


def _assemble(spans: dict, experts: dict) -> dict:
    """The trace a client puts together from the `spans` and `experts` events."""
    t = {k: v for k, v in spans.items() if k != "experts_pending"}
    by_index = {s["index"]: s for s in experts["spans"]}
    t["spans"] = [{**s, **{k: v for k, v in by_index[s["index"]].items()}} for s in t["spans"]]
    t["timings_ms"] = experts["timings_ms"]
    return t


# -- the library --------------------------------------------------------------------------------


def test_first_part_has_spans_and_no_model_pass_ran(fed, tracer):
    calls = LayerCalls(tracer.model)
    try:
        parts = tracer.trace_parts(_passage(fed, "news", 3), prompt="what did they say", store=False)
        first = next(parts)
        assert first.spans and all(s.documents for s in first.spans)
        assert all(s.experts == [] and s.top_expert is None for s in first.spans)  # experts pending
        assert calls.started == 0, "a model pass ran before the first part was handed over"
        tid = first.trace_id
        done = next(parts)
        assert calls.finished >= 1 and done.trace_id == tid and done is first
        assert all(s.experts and s.top_expert is not None for s in done.spans)
        with pytest.raises(StopIteration):
            next(parts)
    finally:
        calls.remove()


def test_parts_assemble_to_the_one_shot_trace(fed, tracer):
    text = _passage(fed, "code", 5)
    one = tracer.trace(text, prompt="show me", store=False).to_dict()
    *_, last = tracer.trace_parts(text, prompt="show me", store=False)
    two = last.to_dict()
    assert _without(one) == _without(two)
    assert set(one["timings_ms"]) == set(two["timings_ms"]) >= {"first_part", "experts", "total"}
    assert two["timings_ms"]["first_part"] <= two["timings_ms"]["total"]


def test_closing_after_the_first_part_runs_no_model_pass_and_stores_nothing(fed, tracer):
    calls = LayerCalls(tracer.model)
    try:
        parts = tracer.trace_parts(_passage(fed, "news", 7), store=True)
        first = next(parts)
        parts.close()
        assert calls.started == 0 and not tracer.model.off  # the experts switched off for the call are back on
        assert _stored(fed, first.trace_id) == 0
    finally:
        calls.remove()


# -- the API, in-process ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(fed) -> Iterator[TestClient]:
    with TestClient(create_app(fed)) as c:
        yield c


def test_stream_sends_spans_then_experts_and_stores_once(fed, client):
    text, prompt = _passage(fed, "news", 3), "what did they say"
    with client.stream("POST", "/api/trace/stream", json={"text": text, "prompt": prompt}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(_events(r.iter_lines()))
    assert [k for k, _ in events] == ["spans", "experts", "done"]
    (_, spans), (_, experts), (_, done) = events
    assert spans["experts_pending"] and spans["spans"] and all(s["experts"] == [] for s in spans["spans"])
    assert spans["trace_id"] == experts["trace_id"] == done["trace_id"] and done["stored"]
    assembled = _assemble(spans, experts)
    one = client.post("/api/trace", json={"text": text, "prompt": prompt}).json()
    assert _without(assembled) == _without(one)
    assert _stored(fed, spans["trace_id"]) == 1


def test_stream_refuses_bad_input_before_streaming(client):
    r = client.post("/api/trace/stream", json={"text": "   "})
    assert r.status_code == 400 and "empty" in r.text


# -- the API against a real server: a slow model, a client that leaves -------------------------


@pytest.fixture(scope="module")
def server(fed) -> Iterator[tuple[str, object]]:
    app = create_app(fed)
    with serving(app) as url:
        yield url, app.state.service


def test_slow_model_spans_arrive_before_any_model_pass(fed, server):
    url, svc = server
    calls = LayerCalls(svc.tracer.model, sleep_s=0.2)
    try:
        with httpx.stream("POST", f"{url}/api/trace/stream", json={"text": _passage(fed, "news", 4)},
                          timeout=60) as r:
            assert r.status_code == 200
            it = _events(r.iter_lines())
            kind, first = next(it)
            assert kind == "spans" and first["spans"]
            assert calls.finished == 0, "the spans waited for a model pass"
            rest = [k for k, _ in it]
        assert rest == ["experts", "done"] and calls.finished >= 1
    finally:
        calls.remove()


def test_disconnect_stops_the_model_work_and_stores_nothing(fed, server):
    url, svc = server
    calls = LayerCalls(svc.tracer.model, sleep_s=0.5)
    try:
        # how many layer calls a whole trace of this text makes
        text = _passage(fed, "code", 6)
        with httpx.stream("POST", f"{url}/api/trace/stream", json={"text": text}, timeout=60) as r:
            full_events = [k for k, _ in _events(r.iter_lines())]
        assert full_events == ["spans", "experts", "done"]
        full, calls.started, calls.finished = calls.started, 0, 0
        assert full >= 2  # layers of the routing pass, then of the counterfactual rows: time enough to leave

        with httpx.stream("POST", f"{url}/api/trace/stream", json={"text": text}, timeout=60) as r:
            kind, first = next(_events(r.iter_lines()))
            assert kind == "spans"
        # the connection is closed; the job is stopped at its next decoder layer
        deadline = time.monotonic() + 30
        while svc.worker.queued and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.worker.queued == 0
        assert calls.started < full, f"the model work ran to the end ({calls.started} of {full} passes)"
        assert _stored(fed, first["trace_id"]) == 0  # nothing stored
    finally:
        calls.remove()


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_prints_the_spans_table_then_the_experts(fed):
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(app, ["--workspace", str(fed.root), "trace", "--text", _passage(fed, "news", 5)])
    assert r.exit_code == 0, r.output
    spans_at, experts_at = r.output.find("spans of"), r.output.find(": experts")
    assert 0 <= spans_at < r.output.find("finding the experts") < experts_at, r.output
    assert "experts (share, drop)" not in r.output[:experts_at] and "top: " in r.output[experts_at:]
    # spans and documents only: no model pass, and the closing line says why there are no experts
    r = CliRunner().invoke(app, ["--workspace", str(fed.root), "trace", "--text", _passage(fed, "news", 5),
                                 "--no-link-experts", "--json"])
    assert r.exit_code == 0, r.output
    t = json.loads(r.output)
    assert t["spans"] and not any(s["experts"] for s in t["spans"]) and "experts" not in t["timings_ms"]
    r = CliRunner().invoke(app, ["--workspace", str(fed.root), "trace", "--text", _passage(fed, "news", 5),
                                 "--no-link-experts"])
    assert "finding the experts" not in r.output and "not asked (--no-link-experts" in r.output, r.output
