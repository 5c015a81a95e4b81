#!/usr/bin/env bash
# Creates the virtual environment and installs the project (CPU torch from its exact pin).
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

if ! "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "flexolmo-trace needs Python 3.11 (found: $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  echo "== apt-get install python3.11-venv"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3.11-venv >/dev/null
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, with its exact pin: the CPU build. A looser pin pulls a multi-GB CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e '.[test]'
echo "environment ready: $VENV"
