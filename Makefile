# Set-up is part of every target: a fresh machine needs only `make quickstart` / `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test test-fast docs bench

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,docs]'
	touch $@

# Train a small J = 1 model on dead-leaves images (rendered, no download), then sample,
# super-resolve and denoise with it; everything lands in workdirs/quickstart.
quickstart: setup
	$(PY) launch/train.py --flagfile=launch/configs/quickstart.flags
	$(PY) launch/sample.py --flagfile=launch/configs/quickstart_sample.flags

# One pytest worker per core (at most 4), each test file on one worker.
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile tests

# The edit-test loop: the tests that run in the test process; those marked slow (they start
# Python processes: CLI runs, kill-and-resume, benchmarks' smoke runs, multi-process runs, or
# run a reproduction or a docs build) are skipped.
test-fast: setup
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 $(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile -m "not slow" tests

# The documentation site (Sphinx + MyST, API reference from the docstrings) into docs/_build/html;
# warnings (a broken cross-reference, a malformed docstring) fail the build.
docs: setup
	@$(PY) -c "import sphinx, myst_nb, furo" 2>/dev/null || { echo "make docs needs the docs extra: $(PY) -m pip install -e '.[docs]'"; exit 1; }
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
