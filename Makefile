# The two commands of the README: `make run` (build a spec, train a small model) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0

.PHONY: run test lint format setup clean bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/optgen build specs/adamw.yaml -o out
	$(PY) examples/train_small.py --optimizer out/adamw

test: setup lint
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# CPU benchmark suite (~15 min on 2 cores; uses the GPU when there is one): benchmarks/results/, README tables
bench: setup
	$(PY) benchmarks/suite.py --jobs 2

clean:
	rm -rf $(VENV) out .pytest_cache
