# The README's two set-up commands: `make repro` (run the default pipeline end to end) and
# `make test` (run the test suite). Both create .venv and install the project on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

# On a machine without CUDA pin the CPU build of torch (pip picks the local CPU wheel where one
# lies on disk); with CUDA, leave pip's normal choice so GPU users get a CUDA build.
TORCH_CPU := $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)

.PHONY: install repro test test-fast bench clean-venv

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# --no-compile: Python compiles what is imported on first use; byte-compiling all of torch and its
# neighbours up front took most of a minute of the install
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-compile $(TORCH_CPU) -e '.[dev]'
	touch $@

install: $(VENV)/.installed

repro: install
	dvc repro

# Fast tier first (tiny models, seconds), then the slow end-to-end tier (real CLI, real dvc repro).
test: install
	$(PY) -m pytest -q -m "not slow"
	$(PY) -m pytest -q -m slow

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
