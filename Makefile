# Quick start: `make demo` and `make test`. Both create/update .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# digits comparison: base pretraining if needed, then five strategies, one table
demo: install
	$(PY) -m bnn_adapt --multirun --config-dir sweeps --config-name demo
	$(PY) -m bnn_adapt.report outputs/demo

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

clean:
	rm -rf outputs/runs outputs/multiruns outputs/demo
