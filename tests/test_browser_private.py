"""The page keeps its stored traces private: it traces, reloads, still reads its own trace back
from the store (with the capability token it keeps in the tab's sessionStorage), and cannot
read another client's. Real Chromium against a real server (tests/test_browser.py's fixtures).

    .venv/bin/python -m pytest tests/test_browser_private.py -q
"""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("selenium", reason="needs the selenium package: pip install -e '.[test]' (scripts/setup.sh)")

from selenium.webdriver.common.by import By  # noqa: E402
from test_browser import _passage, _wait, browser, fed, owner_key, pytestmark, server  # noqa: E402,F401  fixtures

from tracing.provenance.access import TOKEN_HEADER  # noqa: E402

SECRET = " and the unpublished draft says qwertyuiop"


def _trace_id(driver) -> str:
    meta = _wait(driver, lambda d: "trace " in d.find_element(By.ID, "result-meta").text
                 and d.find_element(By.ID, "result-meta").text)
    return meta.rsplit("trace ", 1)[1].split()[0]


def test_the_page_reads_its_own_trace_after_a_reload_and_not_anothers(fed, server, browser):
    browser.get(server)
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    text = _passage(fed, "news", 4) + SECRET
    box = _wait(browser, lambda d: d.find_element(By.ID, "trace-text"))
    box.send_keys(text)
    cf = browser.find_element(By.ID, "trace-cf")
    if cf.is_selected():
        cf.click()  # no counterfactual passes: faster
    browser.find_element(By.CSS_SELECTOR, "#trace-form button[type=submit]").click()
    mine = _trace_id(browser)
    token = browser.execute_script("return sessionStorage.getItem('trace-token')")
    assert token and token.startswith("flxt_")

    # another client (no key, its own token) stores a trace of its own
    r = httpx.post(server + "/api/trace", json={"text": _passage(fed, "code", 4) + " my other secret asdfghjkl"},
                   timeout=120)
    assert r.status_code == 200 and r.headers[TOKEN_HEADER] != token
    other = r.json()["trace_id"]

    browser.refresh()  # the page forgets what it showed; the tab keeps its token
    button = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'#my-traces button[data-trace="{mine}"]'))[0]
    listed = {b.get_attribute("data-trace") for b in browser.find_elements(By.CSS_SELECTOR, "#my-traces button")}
    assert listed == {mine} and "asdfghjkl" not in browser.find_element(By.ID, "my-traces").text
    button.click()
    _wait(browser, lambda d: "qwertyuiop" in d.find_element(By.ID, "response").text)
    assert _trace_id(browser) == mine and browser.find_elements(By.CSS_SELECTOR, "#response mark")

    # the other client's trace: not found for this tab, through the page and through its own fetch
    browser.execute_script("showStored(arguments[0])", other)
    _wait(browser, lambda d: "404" in d.find_element(By.ID, "trace-status").text)
    assert "asdfghjkl" not in browser.find_element(By.TAG_NAME, "body").text
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('/api/traces/{other}', {{headers: {{'{TOKEN_HEADER}': sessionStorage.getItem('trace-token')}}}})"
        ".then((r) => done(r.status));")
    assert status == 404
    rows = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/api/query', {method: 'POST', headers: {'Content-Type': 'application/json', "
        f"'{TOKEN_HEADER}': sessionStorage.getItem('trace-token')}}, "
        "body: JSON.stringify({sql: 'SELECT trace_id FROM traces'})}).then((r) => r.json()).then((j) => done(j.rows));")
    assert rows == [[mine]]
