# Quick start: `make run` (the main job on embedded defaults) and `make test` (the test suite).
# Each target creates the project-local virtual environment .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) jobs/mnist_demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check granet_ray jobs tests benchmarks
	$(PY) -m pytest

bench: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
