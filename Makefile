# One entry point for people and CI. `make test` and `make demo` work on a fresh clone:
# they create .venv, install the package with its extras, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-slow lint format demo bench-loader gpu-check clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks main.py
	$(VENV)/bin/ruff format --check src tests benchmarks main.py

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks main.py
	$(VENV)/bin/ruff format src tests benchmarks main.py

demo: $(STAMP)
	$(PY) scripts/demo.py

bench-loader: $(STAMP)
	$(PY) benchmarks/loader.py

# One NVIDIA GPU, ~8 minutes: CUDA tests + side-by-side benchmarks -> gpu_check_out/ (docs/performance.md).
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
