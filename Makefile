# Two commands from a clean clone: `make demo` and `make test`. Both create .venv, install torch
# first (CPU wheel by default; override TORCH_SPEC / TORCH_INDEX for a CUDA build), then prunekit.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.prunekit-installed

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/prunekit demo --out prunekit-demo

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/global_magnitude.py
	$(BIN)/python benchmarks/sparse_inference.py
	$(BIN)/python benchmarks/llm_pruning.py

clean:
	rm -rf $(VENV) prunekit-demo .pytest_cache
