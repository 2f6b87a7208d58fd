# The user's entry point. Every target works from a fresh clone with nothing installed by hand.
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints-cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export DAGSTER_HOME := $(abspath dagster_home)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test lint bench-method bench-models

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_C) -e '.[test]'
	touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

# Method-core speed: greedy envelopes (G=2,000 and 20,000 x 57) and the hierarchy (100k and 1M x 384).
bench-method: setup
	mkdir -p reports
	$(PY) benchmarks/greedy_speed.py --json reports/greedy_speed.json
	$(PY) benchmarks/hierarchy_speed.py --sizes 100000,1000000 --json reports/hierarchy_speed.json

# Model layer: embedder throughput against the bare forward.
bench-models: setup
	mkdir -p reports
	$(PY) benchmarks/embedder_throughput.py --json reports/embedder_throughput.json
