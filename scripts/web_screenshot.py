"""The README's picture of the web page (docs/web-trace.png), taken from the demo's workspace.

    .venv/bin/python scripts/web_screenshot.py                     # after `make demo`
    .venv/bin/python scripts/web_screenshot.py -w flexolmo-work --out docs/web-trace.png
    .venv/bin/python scripts/web_screenshot.py --model flexolmo-work/models/pretrained/smollm2-135m-instruct

Serves the workspace on 127.0.0.1 (the app `flexolmo serve` runs), opens the page in headless
Chromium (Debian's chromium + chromium-driver through Selenium, as tests/test_browser.py does),
pastes the demo's step-7 response (tracing/story.py `pasted_response`, the same passages as the
demo's), traces it, clicks its longest span and saves the screenshot. `--model DIR` serves that
model instead of the merged one (as `flexolmo serve --model DIR` does): a dense model's trace has
spans and documents, no experts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", default=str(ROOT / "flexolmo-work"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "web-trace.png"))
    ap.add_argument("--model", help="a Hugging Face model folder to serve instead of the merged model")
    ap.add_argument("--generate", metavar="PROMPT", help="generate from PROMPT and trace (the page's Generate form) "
                                                         "instead of pasting the demo's step-7 response")
    ap.add_argument("--tokens", type=int, default=40, help="tokens to generate (with --generate)")
    args = ap.parse_args()

    import uvicorn
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from api.app import create_app
    from cli.demo import PASTED_FROM
    from flexolmo.base import sources
    from flexolmo.base.workspace import Workspace
    from tracing import story
    from tracing.trace import Tracer

    chromium, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        sys.exit("needs Debian's chromium and chromium-driver: bash scripts/setup.sh --browser")
    ws = Workspace.resolve(args.workspace)
    if args.model:
        os.environ["FLEXOLMO_MODEL"] = str(Path(args.model).resolve())  # read by the app (api/deps.py)
    elif not (ws.models_dir / "merged" / "config.json").is_file():
        sys.exit(f"no merged model in {ws.root}: run `make demo` first (or give --model)")
    have = {s.name for s in sources.available_sources(ws)}
    text = None if args.generate else story.pasted_response(Tracer.open(ws, model=None),
                                                            [s for s in PASTED_FROM if s in have]).text

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(ws), log_level="warning"))
    threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 300
    while not srv.started:
        if time.monotonic() > deadline:
            sys.exit("the server did not start")
        time.sleep(0.1)

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000",
              "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    d.set_page_load_timeout(120)

    def wait(cond, timeout: float = 600):
        return WebDriverWait(d, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)).until(cond)

    try:
        d.get(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        wait(lambda d: "sources searched" in d.find_element(By.ID, "health").text)
        print("page up", flush=True)
        d.find_element(By.CSS_SELECTOR, '.tab[data-view="trace-view"]').click()
        if args.generate:
            box = d.find_element(By.ID, "gen-prompt")
            box.send_keys(args.generate)
            n = d.find_element(By.ID, "gen-tokens")
            n.clear()
            n.send_keys(str(args.tokens))
            d.find_element(By.CSS_SELECTOR, "#generate-form button[type=submit]").click()
        else:
            box = d.find_element(By.ID, "trace-text")
            box.clear()
            box.send_keys(text)
            d.find_element(By.CSS_SELECTOR, "#trace-form button[type=submit]").click()
        # a pasted trace streams: its spans first ("finding the experts…"), then the experts; the
        # figures line appears once the whole trace is in
        wait(lambda d: d.find_element(By.ID, "result-meta").text or d.find_element(By.ID, "trace-status").text
             not in ("", "Tracing…", "Generating…") and "finding the experts" not in d.find_element(By.ID, "trace-status").text)
        status = d.find_element(By.ID, "trace-status").text
        if status:
            sys.exit(f"the page said: {status}")
        marks = d.find_elements(By.CSS_SELECTOR, "#response mark")
        if not marks:
            sys.exit("no span was highlighted")
        d.execute_script("arguments[0].click()", max(marks, key=lambda m: len(m.text)))
        wait(EC.visibility_of_element_located((By.ID, "detail")))
        time.sleep(0.5)  # the detail panel's documents render after it shows
        out = Path(args.out)
        tmp = out.with_suffix(".tmp.png")
        d.save_screenshot(str(tmp))
        tmp.replace(out)
        print(f"wrote {out}")
    finally:
        d.quit()
        srv.should_exit = True


if __name__ == "__main__":
    main()
