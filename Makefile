# Quick start: `make run` (the main job on embedded defaults), `make test` (the test suite) and
# `make test-fast` (the tests that need no Ray, no S3 server and are not marked slow).
# Each target creates the project-local virtual environment .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) jobs/mnist_demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check granet_ray jobs tests benchmarks examples
	$(PY) -m pytest

test-fast: $(STAMP)
	$(VENV)/bin/ruff check granet_ray jobs tests benchmarks examples
	$(PY) -m pytest -m "not ray and not s3 and not slow"

bench: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
