# The README's two set-up commands: `make repro` (run the default pipeline end to end) and
# `make test` (run the test suite). Both create .venv on first use; `make repro` installs what the
# pipeline needs, `make test` adds the test tools (the `dev` extra).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

# torch: the tested version. Which build pip installs is pip's choice and its configuration's: on a
# machine without a GPU, point pip at the CPU wheels (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu,
# see the README) or it takes PyPI's default (CUDA) build; GPU machines get a CUDA build as usual.
TORCH := torch==2.13.0

.PHONY: install install-dev python-version repro test test-fast test-lowest bench clean-venv

python-version:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "error: logit-cache needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) --version 2>&1 | head -1 || echo missing)." \
	       "Run with PYTHON=python3.11 (or newer): make $(MAKECMDGOALS) PYTHON=python3.12" >&2; exit 1; }

$(PY): | python-version
	$(PYTHON) -m venv $(VENV)
	-$(PY) -m pip install -q --upgrade pip 2>/dev/null || true  # not required: an offline mirror may lack it

# pip byte-compiles on one core (~47 s of a 75 s install here); compileall does it on every core.
# It writes the .pyc files even where PYTHONDONTWRITEBYTECODE is set (then nothing would cache them,
# and every process would compile torch again). A few packages ship files of other Python versions
# that do not compile: not an error of the install.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-compile $(TORCH) -e .
	-$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

repro: install
	dvc repro

# Fast tier first (tiny models, seconds), then the slow end-to-end tier (real CLI, real dvc repro).
# One pytest worker per core (pytest-xdist), each taking whole files, so a module's fixtures are
# built once: much of a test's time is process start-up and I/O, not arithmetic.
PYTEST := $(PY) -m pytest -q -n auto --dist loadfile
test: install-dev
	$(PYTEST) -m "not slow"
	$(PYTEST) -m slow

test-fast: install-dev
	$(PYTEST) -m "not slow"

# The test suite on the lowest versions pyproject.toml allows (.ci/lowest_versions.py pins each floor), in
# a second environment: what makes those floors versions a test run has shown to work. It takes PyPI's
# torch build of that version (a few GB) and ~15 min here; not part of `make test`.
LOWEST := .venv-lowest
test-lowest: | python-version
	$(PYTHON) -m venv $(LOWEST)
	-$(LOWEST)/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
	$(PYTHON) .ci/lowest_versions.py > $(LOWEST)/constraints.txt
	$(LOWEST)/bin/python -m pip install -q -c $(LOWEST)/constraints.txt -e '.[dev]'
	$(LOWEST)/bin/python -m pytest -q -n auto --dist loadfile -m "not slow"
	$(LOWEST)/bin/python -m pytest -q -n auto --dist loadfile -m slow

clean-venv:
	rm -rf $(VENV)
