"""The page's Batches tab in headless Chromium (as tests/test_browser.py drives the page): enter a
key, paste a JSONL batch, watch the progress bar fill, read the per-source table and the plot."""

from __future__ import annotations

import json
from typing import Iterator

import pytest
from served import serving
from conftest_model import build_federation

from api.app import create_app
from flexolmo.base import sources
from index.build import build_source
from index.keys import KeyStore

from test_browser import CHROMIUM, DRIVER, pytestmark, webdriver  # noqa: F401  the same skip as the page's test

if webdriver is not None:
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

NAMES = ("public", "news", "code")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    ws = build_federation(tmp_path_factory.mktemp("batchpage"), sources=NAMES, n_docs=30)
    for s in NAMES:
        build_source(ws, s)
    return ws


@pytest.fixture(scope="module")
def server(fed) -> Iterator[str]:
    with serving(create_app(fed)) as url:
        yield url


def test_the_batches_tab_submits_follows_and_reports(fed, server):
    _, key = KeyStore.for_workspace(fed).create("news-owner", "owner", "batch page test")
    docs = sources.load_documents(fed, "news", split="train").column("text").to_pylist()
    jsonl = "".join(json.dumps({"id": f"w{i}", "text": " " + " ".join(docs[i].split()[2:20])}) + "\n" for i in range(8))
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    try:
        d.get(server)
        d.find_element(By.CSS_SELECTOR, '.tab[data-view="owner-view"]').click()
        k = d.find_element(By.ID, "owner-key")
        k.send_keys(key)
        d.execute_script("arguments[0].dispatchEvent(new Event('change'))", k)
        d.find_element(By.CSS_SELECTOR, '.tab[data-view="batch-view"]').click()
        d.execute_script("arguments[0].value = arguments[1]", d.find_element(By.ID, "batch-text"), jsonl)
        d.find_element(By.CSS_SELECTOR, "#batch-form button[type=submit]").click()
        wait = WebDriverWait(d, 180, poll_frequency=0.3)
        wait.until(lambda d: "8/8 rows" in (t := d.find_element(By.ID, "batch-status").text) and "(done)" in t)
        prog = d.find_element(By.ID, "batch-progress")
        assert prog.get_attribute("value") == prog.get_attribute("max") == "8"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#batch-report img.batch-plot"))
        cells = [c.text for c in d.find_elements(By.CSS_SELECTOR, "#batch-report table td")]
        assert cells[:3] == ["news", "news-owner", "100%"]
        assert d.execute_script("return document.querySelector('#batch-report img').naturalWidth") > 100
    finally:
        d.quit()
