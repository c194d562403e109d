# The few commands people need. Each creates or reuses .venv and installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint generate bench clean

## run: start the service (embedded PostgreSQL unless DATABASE_URL is set) on 127.0.0.1:50051
run: $(STAMP)
	$(BIN)/python -m server

## test: lint, type-check and run the whole test suite (DATABASE_URL if set, else embedded PostgreSQL)
test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## generate: regenerate generated/ from protos/ (tests fail while they differ)
generate: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

## bench: the performance benchmark (about 10 minutes; QUICK=1 for about 2); needs h2load (nghttp2-client)
bench: $(STAMP)
	$(BIN)/python bench/run.py $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "deadletter needs Python 3.11 or newer ($(PYTHON) is older); set PYTHON=python3.12 or similar"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)
