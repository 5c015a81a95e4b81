"""The page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`, driven
by Selenium) against a real server on 127.0.0.1, over a tiny federation with a merged model.

    .venv/bin/python -m pytest tests/test_browser.py -q
    FLEXOLMO_SCREENSHOTS=docs .venv/bin/python -m pytest tests/test_browser.py -q   # refresh docs/*.png

scripts/setup.sh installs the browser (apt-get install chromium chromium-driver) and the test
extra installs Selenium; never a downloaded browser build (Selenium Manager is not used: the
driver's path is given). The test skips, saying why, only when those cannot be installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import uvicorn
from conftest_model import build_served_federation

from api.app import create_app
from flexolmo.base import sources
from index.keys import KeyStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # pragma: no cover - the test extra installs it
    webdriver = None

pytestmark = pytest.mark.skipif(
    webdriver is None or not CHROMIUM or not DRIVER,
    reason="needs Debian's chromium and chromium-driver and the selenium package: run scripts/setup.sh "
           "(apt-get install chromium chromium-driver; pip install -e '.[test]')")

NAMES = ("public", "news", "code")
SHOTS = os.environ.get("FLEXOLMO_SCREENSHOTS")  # a folder: save the page's screenshots there too


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return build_served_federation(tmp_path_factory.mktemp("browser"), sources=NAMES)


@pytest.fixture(scope="module")
def owner_key(fed) -> str:
    _, key = KeyStore.for_workspace(fed).create("news-owner", "owner", "browser test")
    return key


@pytest.fixture(scope="module")
def server(fed, owner_key) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(fed), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser(server) -> Iterator["webdriver.Chrome"]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000",
              "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _passage(ws, source: str, i: int, a: int = 2, b: int = 24) -> str:
    text = sources.load_documents(ws, source, split="train").to_pylist()[i]["text"]
    return " " + " ".join(text.split(" ")[a:b])


def _wait(driver, cond, timeout: float = 120):
    """Wait for cond(driver); an element re-rendered meanwhile (stale) is looked up again."""
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,)).until(cond)


def _press(driver, text: str) -> None:
    """Click the owner view's button labelled `text` (the view re-renders as answers come in)."""
    def click(d):
        for b in d.find_elements(By.CSS_SELECTOR, "#owner-policy button"):
            if b.text == text:
                b.click()
                return True
        return False

    _wait(driver, click)


def _select_source(driver, name: str) -> None:
    """Pick `name` in the owner view's source list (the list is rebuilt when the sources reload)."""
    def pick(d):
        try:
            Select(d.find_element(By.ID, "owner-source")).select_by_value(name)
        except NoSuchElementException:  # the options are not there yet
            return False
        return d.find_element(By.ID, "owner-source").get_attribute("value") == name

    _wait(driver, pick)


def _shot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / name))
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SHOTS) / name))


def _trace(driver, text: str) -> str:
    """Paste `text`, trace it, wait for the result; the new trace's id."""
    driver.find_element(By.CSS_SELECTOR, '.tab[data-view="trace-view"]').click()
    before = driver.find_element(By.ID, "result-meta").text
    box = driver.find_element(By.ID, "trace-text")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.CSS_SELECTOR, "#trace-form button[type=submit]").click()
    _wait(driver, lambda d: d.find_element(By.ID, "result-meta").text not in ("", before))
    assert not driver.find_element(By.ID, "trace-status").text, driver.find_element(By.ID, "trace-status").text
    return driver.find_element(By.ID, "result-meta").text.rsplit("trace ", 1)[-1]


def _details(driver) -> list[tuple[list[str], dict[str, tuple[str, bool]]]]:
    """Click every highlighted group; per group: the documents' sources, and each expert's
    (routing share text, switched on)."""
    out = []
    for mark in driver.find_elements(By.CSS_SELECTOR, "#response mark"):
        driver.execute_script("arguments[0].click()", mark)
        _wait(driver, lambda d: d.find_element(By.ID, "detail").is_displayed())
        detail = driver.find_element(By.ID, "detail")
        docs = [e.text for e in detail.find_elements(By.CSS_SELECTOR, "li.doc .source")]
        experts = {}
        for row in detail.find_elements(By.CSS_SELECTOR, "table.experts tbody tr"):
            cells = row.find_elements(By.TAG_NAME, "td")
            experts[cells[0].text.replace(" (off)", "")] = (cells[1].text.strip(), "off" not in row.get_attribute("class"))
        out.append((docs, experts))
    return out


def test_trace_click_switch_off_and_search(fed, server, browser, owner_key, tmp_path):
    d = browser
    d.get(server + "/")
    _wait(d, lambda d: "sources searched" in d.find_element(By.ID, "health").text)

    # paste a response: its spans are highlighted; a click shows documents and experts
    passage = _passage(fed, "news", 3)
    _trace(d, passage)
    marks = d.find_elements(By.CSS_SELECTOR, "#response mark")
    assert marks, "no span highlighted"
    d.execute_script("arguments[0].click()", max(marks, key=lambda m: len(m.text)))
    detail = _wait(d, EC.visibility_of_element_located((By.ID, "detail")))
    doc_sources = [e.text for e in detail.find_elements(By.CSS_SELECTOR, "li.doc .source")]
    assert "news" in doc_sources
    assert detail.find_elements(By.CSS_SELECTOR, "li.doc .snippet mark")  # the match inside its document
    experts = {r.find_elements(By.TAG_NAME, "td")[0].text for r in detail.find_elements(By.CSS_SELECTOR, "table.experts tbody tr")}
    assert experts == set(NAMES)
    assert "top: " in detail.find_element(By.CSS_SELECTOR, ".top-expert").text
    assert "(by counterfactual)" in detail.find_element(By.CSS_SELECTOR, ".top-expert").text
    _shot(d, tmp_path, "web-trace.png")

    # as news's owner, switch news off: without a key the page asks for one (sending nothing); with it, done
    d.find_element(By.CSS_SELECTOR, '.tab[data-view="owner-view"]').click()
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#owner-source option"))
    _select_source(d, "news")
    _press(d, "Switch off")
    _wait(d, lambda d: "Enter the owner key" in d.find_element(By.ID, "owner-status").text)
    assert d.switch_to.active_element.get_attribute("id") == "owner-key" and sources.get_source(fed, "news").active
    key = d.find_element(By.ID, "owner-key")
    key.send_keys(owner_key)
    d.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    # kept for this tab's session only
    assert d.execute_script("return sessionStorage.getItem('owner-key')") == owner_key
    assert d.execute_script("return window.localStorage.length") == 0
    charts = _wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#owner-contribution .charts"))  # the owner's plots
    assert len(charts.find_elements(By.CSS_SELECTOR, "svg.chart rect.col")) >= 2
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", charts)
    _shot(d, tmp_path, "web-owner.png")
    d.execute_script("window.scrollTo(0, 0)")
    try:
        _press(d, "Switch off")
        _wait(d, lambda d: d.find_element(By.ID, "owner-status").text.startswith("Saved"))
        assert "switched off" in d.find_element(By.ID, "owner-policy").text
        assert sources.policy_log(fed, "news")[-1]["changed_by"] == "news-owner"  # the key's owner

        # the next trace: no news documents, news's expert off with no routing
        _trace(d, passage)
        assert "not searched: news (inactive)" in d.find_element(By.ID, "result-meta").text
        groups = _details(d)
        for docs, exp in groups:
            assert "news" not in docs
            assert exp["news"] == ("0%", False), exp
    finally:
        d.find_element(By.CSS_SELECTOR, '.tab[data-view="owner-view"]').click()
        _select_source(d, "news")
        _press(d, "Switch on")
        _wait(d, lambda d: d.find_element(By.ID, "owner-status").text.startswith("Saved"))

    # search the training data: counts per source, documents with the phrase marked, next tokens
    phrase = " ".join(passage.split()[3:6])
    d.find_element(By.CSS_SELECTOR, '.tab[data-view="search-view"]').click()
    q = d.find_element(By.ID, "search-query")
    q.send_keys(phrase)
    d.find_element(By.CSS_SELECTOR, "#search-form button[type=submit]").click()
    row = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, 'table.search tr[data-source="news"]'))[0]
    assert int(row.find_elements(By.TAG_NAME, "td")[1].text.replace(",", "")) >= 1
    marks = row.find_elements(By.CSS_SELECTOR, ".snippet mark")
    assert marks and marks[0].text.strip() == phrase
    _shot(d, tmp_path, "web-search.png")
    d.find_element(By.ID, "next-button").click()
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "table.next-tokens tbody tr"))
    assert "occurrences" in d.find_element(By.ID, "search-result").text
