# Two commands matter: `make demo` and `make test`. Both do every set-up step themselves.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPM_STAMP := node_modules/.installed
export PATH := $(CURDIR)/$(BIN):$(CURDIR)/node_modules/.bin:$(PATH)

.PHONY: setup venv npm model chromium test pytest contracts-test contracts-build contracts-invariant-long reliability-table pytest-postgres demo clean

setup: $(STAMP) $(NPM_STAMP)

# torch==2.13.0 first: it is a local CPU wheel here; installing it before the project keeps
# pip from resolving `torch` to a CUDA build of several GB.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(NPM_STAMP): package.json package-lock.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

model: setup
	$(BIN)/openlora model pull smollm2-135m-instruct

contracts-build: $(NPM_STAMP)
	@if [ -d contracts/src ] && ls contracts/src/*.sol >/dev/null 2>&1; then $(MAKE) -C contracts build; fi

contracts-test: $(NPM_STAMP)
	@if ls contracts/src/*.sol >/dev/null 2>&1; then $(MAKE) -C contracts test; else echo "no contracts yet"; fi

# headless Chromium drives the dashboard test (Debian package; installed only when missing)
chromium:
	bash scripts/ensure-chromium.sh

pytest: setup model chromium
	$(BIN)/python -m pytest -q

# the ledger and migration tests again on a throwaway PostgreSQL (Debian package, installed when missing);
# test_poa.py touches no database, so it runs only in the SQLite pass
pytest-postgres: setup
	bash scripts/with-postgres.sh $(BIN)/python -m pytest -q tests/attribution tests/migrations --ignore=tests/attribution/test_poa.py

test: setup model contracts-test pytest pytest-postgres

# the invariant suites with many more runs (minutes; not part of `make test`)
contracts-invariant-long: $(NPM_STAMP)
	$(MAKE) -C contracts invariant-long

# re-render docs/reliability.md from the rows the reliability tests wrote (docs/reliability.json)
reliability-table: setup
	$(BIN)/python scripts/reliability_table.py

demo: setup model
	$(BIN)/python -m node.demo

clean:
	rm -rf $(VENV) node_modules contracts/out contracts/cache
