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

# pip byte-compiles on one core (~47 s of a 75 s install here); compileall does it on every core.
# It writes the .pyc files even where PYTHONDONTWRITEBYTECODE is set (then nothing would cache them,
# and every process would compile torch again). A few packages ship files of other Python versions
# that do not compile: not an error of the install.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-compile $(TORCH_CPU) -e '.[dev]'
	-$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1
	touch $@

install: $(VENV)/.installed

repro: install
	dvc repro

# Fast tier first (tiny models, seconds), then the slow end-to-end tier (real CLI, real dvc repro).
# One pytest worker per core (pytest-xdist), each taking whole files, so a module's fixtures are
# built once: much of a test's time is process start-up and I/O, not arithmetic.
PYTEST := $(PY) -m pytest -q -n auto --dist loadfile
test: install
	$(PYTEST) -m "not slow"
	$(PYTEST) -m slow

test-fast: install
	$(PYTEST) -m "not slow"

clean-venv:
	rm -rf $(VENV)
