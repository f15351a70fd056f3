# The README's two commands: `make demo` and `make test`.
# Each creates (or reuses) the virtualenv in .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# the venv's tools (ninja for the C++/CUDA extension build) come first on PATH
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test venv lint bench clean wheel-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned here, not in pyproject.toml, to the CPU build these machines
# carry (a multi-GB CUDA build is never downloaded); the package itself takes a
# range, and `all` pulls every extra the demo, the examples and the tests use.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/gristmill demo

test: $(STAMP)
	$(BIN)/python -c "from gristmill.ext import backend, minhash_native; print('ext backend:', backend('cpu')); minhash_native.module()"
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# CI's second step (.ci/run): build the sdist and wheel, install the wheel with only the
# core into a fresh venv outside the repository, check that a missing extra is named, run
# the demo and a shipped recipe there (~4 min on a loaded 2-core box). `--with-torch` also
# installs the torch extra and JIT-builds the C++ code from site-packages (~8 min more).
wheel-check: $(STAMP)
	$(BIN)/python scripts/check_wheel.py

lint: $(STAMP)
	$(BIN)/ruff check gristmill tests benchmarks

clean:
	rm -rf out data .pytest_cache
