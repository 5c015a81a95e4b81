"""The page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`, driven
by Selenium) against a real server on 127.0.0.1, over a tiny federation with a merged model.
Every control of the page is used, each with an effect checked: the three tabs, the trace form
(prompt, response, counterfactual box), the generate form (prompt, tokens), a span by click
and by keyboard, the search form (query, source, documents, Search, Next tokens), and the
owner view (source, key, switch off/on, visibility, takedown form).

    .venv/bin/python -m pytest tests/test_browser.py -q
    FLEXOLMO_SCREENSHOTS=docs .venv/bin/python -m pytest tests/test_browser.py -q   # refresh docs/*.png

scripts/setup.sh installs the browser (apt-get install chromium chromium-driver) and the test
extra installs Selenium; never a downloaded browser build (Selenium Manager is not used: the
driver's path is given). The test skips, saying why, only when those cannot be installed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from served import serving
from conftest_model import build_served_federation

from api.app import create_app
from flexolmo.base import sources
from flexolmo.model.generate import GenerationOptions
from index.keys import KeyStore
from index.takedown import list_takedowns
from tracing.options import TraceOptions

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
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
    with serving(create_app(fed)) as url:
        yield url


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


def _wait(driver, cond, timeout: float = 300):
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


def _type(driver, element_id: str, text: str) -> None:
    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(text)


def _submit(driver, form: str) -> str:
    """Submit the trace view's `form`, wait for its result; the new trace's id."""
    before = driver.find_element(By.ID, "result-meta").text
    driver.find_element(By.CSS_SELECTOR, f"#{form} button[type=submit]").click()
    _wait(driver, lambda d: d.find_element(By.ID, "result-meta").text not in ("", before)
          or d.find_element(By.ID, "trace-status").get_attribute("class") == "status error")
    assert not driver.find_element(By.ID, "trace-status").text, driver.find_element(By.ID, "trace-status").text
    return driver.find_element(By.ID, "result-meta").text.rsplit("trace ", 1)[-1]


def _trace(driver, text: str, prompt: str = "") -> str:
    """Paste `text` (and `prompt`), trace it, wait for the result; the new trace's id."""
    driver.find_element(By.CSS_SELECTOR, '.tab[data-view="trace-view"]').click()
    _type(driver, "trace-prompt", prompt)
    _type(driver, "trace-text", text)
    return _submit(driver, "trace-form")


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


def _owner_view(driver, owner_key: str, source: str) -> None:
    """The owner view on `source`, with the owner's key entered."""
    driver.find_element(By.CSS_SELECTOR, '.tab[data-view="owner-view"]').click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#owner-source option"))
    _select_source(driver, source)
    key = driver.find_element(By.ID, "owner-key")
    if key.get_attribute("value") != owner_key:
        key.clear()
        key.send_keys(owner_key)
        driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    _wait(driver, lambda d: f"{source}-owner" in d.find_element(By.ID, "owner-policy").text)


def test_tabs_show_their_view_and_the_forms_take_the_option_models_defaults(server, browser):
    d = browser
    d.get(server + "/")
    _wait(d, lambda d: "sources searched" in d.find_element(By.ID, "health").text)
    views = ("trace-view", "search-view", "owner-view")
    for view in views[::-1]:
        d.find_element(By.CSS_SELECTOR, f'.tab[data-view="{view}"]').click()
        assert [d.find_element(By.ID, v).is_displayed() for v in views] == [v == view for v in views]
        assert "active" in d.find_element(By.CSS_SELECTOR, f'.tab[data-view="{view}"]').get_attribute("class")
    # the generate form's tokens and the counterfactual box: the models' defaults and limits
    limit = httpx.get(server + "/api/health", trust_env=False).json()["limits"]["max_new_tokens"]
    tokens = d.find_element(By.ID, "gen-tokens")
    _wait(d, lambda d: tokens.get_attribute("value"))
    assert int(tokens.get_attribute("value")) == GenerationOptions().max_new_tokens
    assert int(tokens.get_attribute("min")) == GenerationOptions.model_fields["max_new_tokens"].metadata[0].ge
    assert int(tokens.get_attribute("max")) == min(limit, GenerationOptions.model_fields["max_new_tokens"].metadata[1].le)
    assert d.find_element(By.ID, "trace-cf").is_selected() == TraceOptions().counterfactual
    assert d.find_element(By.ID, "trace-experts").is_selected() == TraceOptions().link_experts


def test_generate_and_trace_and_the_trace_forms_controls(fed, server, browser):
    d = browser
    d.get(server + "/")
    _wait(d, lambda d: d.find_element(By.ID, "gen-tokens").get_attribute("value"))
    # generate, then trace: a generated response of at most the tokens asked for
    _type(d, "gen-prompt", "The president")
    _type(d, "gen-tokens", "5")
    _submit(d, "generate-form")
    meta = d.find_element(By.ID, "result-meta").text
    assert meta.startswith("Generated") and 1 <= int(meta.split(" tokens")[0].rsplit(" ", 1)[-1]) <= 5, meta
    assert "Prompt: The president" in d.find_element(By.ID, "result-prompt").text

    # a pasted response with its prompt, counterfactuals off; a span opened from the keyboard
    d.find_element(By.ID, "trace-cf").click()
    assert not d.find_element(By.ID, "trace-cf").is_selected()
    try:
        _trace(d, _passage(fed, "code", 4), prompt="a question about code")
        assert "Prompt: a question about code" in d.find_element(By.ID, "result-prompt").text
        mark = max(d.find_elements(By.CSS_SELECTOR, "#response mark"), key=lambda m: len(m.text))
        mark.send_keys(Keys.ENTER)
        detail = _wait(d, EC.visibility_of_element_located((By.ID, "detail")))
        assert "selected" in mark.get_attribute("class")
        drops = [r.find_elements(By.TAG_NAME, "td")[2].text for r in detail.find_elements(By.CSS_SELECTOR, "table.experts tbody tr")]
        assert drops and set(drops) == {"—"}  # no counterfactual computed
        assert "(by routing)" in detail.find_element(By.CSS_SELECTOR, ".top-expert").text
        # spans and documents only: no model pass, and the counterfactual box has nothing to say
        d.find_element(By.ID, "trace-experts").click()
        assert not d.find_element(By.ID, "trace-experts").is_selected() and not d.find_element(By.ID, "trace-cf").is_enabled()
        _trace(d, _passage(fed, "news", 5))
        mark = max(d.find_elements(By.CSS_SELECTOR, "#response mark"), key=lambda m: len(m.text))
        mark.click()
        detail = _wait(d, EC.visibility_of_element_located((By.ID, "detail")))
        assert not detail.find_elements(By.CSS_SELECTOR, "table.experts")
        assert "spans and documents only" in detail.find_element(By.CSS_SELECTOR, ".experts-none").text
    finally:
        if not d.find_element(By.ID, "trace-experts").is_selected():
            d.find_element(By.ID, "trace-experts").click()
        if not d.find_element(By.ID, "trace-cf").is_selected():
            d.find_element(By.ID, "trace-cf").click()


def test_search_by_source_with_and_without_documents(fed, server, browser):
    d = browser
    d.get(server + "/")
    d.find_element(By.CSS_SELECTOR, '.tab[data-view="search-view"]').click()
    phrase = " ".join(_passage(fed, "news", 6).split()[2:5])
    _type(d, "search-query", phrase)
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '#search-source option[value="news"]'))
    Select(d.find_element(By.ID, "search-source")).select_by_value("news")
    for n_docs in (0, 2):
        _type(d, "search-docs", str(n_docs))
        d.execute_script("document.getElementById('search-result').replaceChildren()")
        d.find_element(By.CSS_SELECTOR, "#search-form button[type=submit]").click()
        rows = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "table.search tbody tr"))
        assert [r.get_attribute("data-source") for r in rows] == ["news"]  # the source chosen only
        assert int(rows[0].find_elements(By.TAG_NAME, "td")[1].text.replace(",", "")) >= 1
        docs = rows[0].find_elements(By.CSS_SELECTOR, "li.doc")
        assert (len(docs) == 0) if n_docs == 0 else (1 <= len(docs) <= n_docs), (n_docs, len(docs))
    d.find_element(By.ID, "next-button").click()
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "table.next-tokens tbody tr"))
    assert [th.text for th in d.find_elements(By.CSS_SELECTOR, "table.next-tokens thead th")][2:] == ["news"]


def test_owner_changes_visibility_and_takes_a_document_down(fed, server, browser, owner_key):
    d = browser
    d.get(server + "/")
    _owner_view(d, owner_key, "news")
    for vis in ("snippets", "full"):
        Select(d.find_element(By.CSS_SELECTOR, "#owner-policy select")).select_by_value(vis)
        _wait(d, lambda d: d.find_element(By.ID, "owner-status").text.startswith("Saved"))
        assert sources.get_source(fed, "news").visibility == vis
        assert Select(d.find_element(By.CSS_SELECTOR, "#owner-policy select")).first_selected_option.text == vis

    doc_id = sources.load_documents(fed, "news", split="train").to_pylist()[7]["doc_id"]
    form = d.find_element(By.CSS_SELECTOR, "#owner-takedowns form")
    form.find_element(By.CSS_SELECTOR, "input[placeholder=doc_id]").send_keys(doc_id)
    form.find_element(By.CSS_SELECTOR, "input[placeholder=reason]").send_keys("asked by its author")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(d, lambda d: d.find_element(By.ID, "owner-status").text.startswith(f"Taken down: {doc_id}"))
    assert doc_id in [c.text for c in d.find_elements(By.CSS_SELECTOR, "#owner-takedowns li code")]
    (t,) = [t for t in list_takedowns(fed, "news") if t.doc_id == doc_id]
    assert t.reason == "asked by its author" and t.requested_by == "news-owner"
