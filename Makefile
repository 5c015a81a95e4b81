# flexolmo-trace: `make demo` sets everything up and runs the demo; `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup data-deps demo test bench clean-work

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $@

data-deps: setup
	VENV=$(VENV) bash scripts/data-deps.sh

demo: setup data-deps
	$(BIN)/flexolmo demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/index_build.py
	$(BIN)/python bench/generate_overhead.py -w flexolmo-work
	$(BIN)/python bench/trace.py

clean-work:
	rm -rf flexolmo-work
