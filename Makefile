# Ringside: `make run` and `make test` do everything on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/local.toml
RINGSIDE := $(BIN)/ringside --config $(CONFIG)
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install run up down status kill pause test test-unit lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP) ## foreground local cluster; Ctrl-C stops it
	$(RINGSIDE) run

up: $(STAMP)
	$(RINGSIDE) up

down: $(STAMP)
	$(RINGSIDE) down

status: $(STAMP)
	$(RINGSIDE) status

kill: $(STAMP)
	@test -n "$(NODE)" || (echo "usage: make kill NODE=n2" && exit 2)
	$(RINGSIDE) kill $(NODE)

pause: $(STAMP)
	@test -n "$(NODE)" -a -n "$(SECONDS)" || (echo "usage: make pause NODE=n2 SECONDS=6" && exit 2)
	$(RINGSIDE) pause $(NODE) $(SECONDS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/server tests/gateway $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check server gateway tests loadtest
	$(BIN)/mypy server gateway

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
