"""The page shows a trace's highlighted spans before its experts (headless Chromium, a real server,
a model made slow on purpose).

    .venv/bin/python -m pytest tests/test_progressive_browser.py -q

Skips, saying why, where Debian's chromium/chromium-driver or selenium are missing (as
tests/test_browser.py does, whose fixtures this file uses).
"""

from __future__ import annotations

from typing import Iterator

import pytest
from served import serving
from test_browser import _passage, _wait, browser, fed, pytestmark  # noqa: F401  fixtures
from test_progressive import LayerCalls

from api.app import create_app

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
