"""The page shows a trace's highlighted spans before its experts (headless Chromium, a real server,
a model made slow on purpose).

    .venv/bin/python -m pytest tests/test_progressive_browser.py -q

Skips, saying why, where Debian's chromium/chromium-driver or selenium are missing (as
tests/test_browser.py does, whose fixtures this file uses).
"""

from __future__ import annotations

import threading
from typing import Iterator

import pytest
from served import serving
from test_browser import _passage, _wait, browser, fed, pytestmark  # noqa: F401  fixtures
from test_progressive import LayerCalls

from api.app import create_app
from api.worker import Stage

try:
    from selenium.webdriver.common.by import By
except ImportError:  # pragma: no cover - skipped by pytestmark
    By = None


APPS: dict[str, object] = {}  # the server's url -> its app (its tracer's model is made slow below)


@pytest.fixture(scope="module")
def server(fed) -> Iterator[str]:  # noqa: F811  test_browser's, with the app kept
    app = create_app(fed)
    with serving(app) as url:
        APPS[url] = app
        yield url


def test_page_shows_spans_before_experts(fed, server, browser):  # noqa: F811
    d = browser
    d.get(server + "/")
    svc = APPS[server].state.service
    calls = LayerCalls(svc.tracer.model, sleep_s=0.5)  # every model pass waits: experts come late
    try:
        d.find_element(By.CSS_SELECTOR, '.tab[data-view="trace-view"]').click()
        box = d.find_element(By.ID, "trace-text")
        box.clear()
        box.send_keys(_passage(fed, "news", 3))
        d.find_element(By.CSS_SELECTOR, "#trace-form button[type=submit]").click()
        marks = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#response mark"), timeout=60)
        # the spans are on the page; the experts are not in yet
        assert "finding the experts" in d.find_element(By.ID, "trace-status").text
        assert not d.find_element(By.ID, "result-meta").text
        d.execute_script("arguments[0].click()", marks[0])
        _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail .experts-pending"), timeout=10)
        assert d.find_elements(By.CSS_SELECTOR, "#detail li.doc"), "the documents wait for the experts"
        # then the experts column fills in, in the open detail, for the same trace
        rows = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail table.experts tbody tr"), timeout=120)
        assert rows and not d.find_elements(By.CSS_SELECTOR, "#detail .experts-pending")
        assert "trace " in d.find_element(By.ID, "result-meta").text
        assert not d.find_element(By.ID, "trace-status").text
        assert calls.finished >= 1
    finally:
        calls.remove()


def test_page_keeps_the_spans_when_the_experts_are_refused(fed, server, browser):  # noqa: F811
    """The model lane is held by a long job: the page's streamed trace is admitted for its spans
    only; the spans stay highlighted with their documents, the experts column says why they are
    missing, and the status line carries the 503 with when to retry."""
    d = browser
    d.get(server + "/")
    worker = APPS[server].state.service.worker
    release, started = threading.Event(), threading.Event()
    hold = Stage("model", "counterfactual", 20_000, lambda t, j, p: started.set() or release.wait(60))
    job = worker.submit([hold], "trace", 1000.0)  # ~20,000 characters' worth of counterfactuals ahead
    try:
        assert started.wait(30)
        d.find_element(By.CSS_SELECTOR, '.tab[data-view="trace-view"]').click()
        box = d.find_element(By.ID, "trace-text")
        box.clear()
        box.send_keys(_passage(fed, "news", 4))
        d.find_element(By.CSS_SELECTOR, "#trace-form button[type=submit]").click()
        _wait(d, lambda d: "503" in d.find_element(By.ID, "trace-status").text, timeout=60)
        assert "retry in" in d.find_element(By.ID, "trace-status").text
        marks = d.find_elements(By.CSS_SELECTOR, "#response mark")
        assert marks
        d.execute_script("arguments[0].click()", marks[0])
        note = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail .experts-none"), timeout=10)[0]
        assert "Experts not linked" in note.text and "busy" in note.text
        assert d.find_elements(By.CSS_SELECTOR, "#detail li.doc") and not d.find_elements(By.CSS_SELECTOR, "#detail .experts-pending")
    finally:
        release.set()
        job.future.result(30)
