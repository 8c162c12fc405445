# `make demo` and `make test` set up .venv when it is missing, then run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.robustdet-installed
# The CUDA build on this machine's disk; a plain `torch` requirement would pull a newer release.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,export]' $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/robustdet train configs/default.yaml --out runs/demo --overwrite
	$(VENV)/bin/robustdet report runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(PY) -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks experiments

clean:
	rm -rf $(VENV) runs .pytest_cache
