# Ringside: `make run` and `make test` do everything on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/local.toml
RINGSIDE := $(BIN)/ringside --config $(CONFIG)
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# A misspelt variable (`USER=20` for `USERS=20`) would be ignored without a word: refuse it.
# Settings the programs read from the environment (RINGSIDE_*, REDIS_URL, LOG_*) pass on.
MAKE_VARS := PYTHON CONFIG PYTEST_ARGS NODE SECONDS FORCE GATEWAY USERS RATE DURATION SPAWN CHAOS \
	PROCESSES BENCH_ARGS BASE
GIVEN_VARS := $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v)))
UNKNOWN_VARS := $(filter-out $(MAKE_VARS) REDIS_URL LOG_LEVEL LOG_FORMAT RINGSIDE_%,$(GIVEN_VARS))
ifneq ($(strip $(UNKNOWN_VARS)),)
$(error unknown variable $(UNKNOWN_VARS) (a typo?): this Makefile reads $(MAKE_VARS), and passes RINGSIDE_*, REDIS_URL, LOG_LEVEL and LOG_FORMAT to the programs)
endif

.PHONY: install run up down stop status kill pause drain add-node restart deploy test test-unit lint \
	loadtest loadtest-ui bench cpu-ab clean

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

stop: down

status: $(STAMP)
	$(RINGSIDE) status

kill: $(STAMP)
	@test -n "$(NODE)" || (echo "usage: make kill NODE=n2" && exit 2)
	$(RINGSIDE) kill $(NODE)

pause: $(STAMP)
	@test -n "$(NODE)" -a -n "$(SECONDS)" || (echo "usage: make pause NODE=n2 SECONDS=6" && exit 2)
	$(RINGSIDE) pause $(NODE) $(SECONDS)

drain: $(STAMP)
	@test -n "$(NODE)" || (echo "usage: make drain NODE=n2 [FORCE=1]" && exit 2)
	$(RINGSIDE) drain $(if $(FORCE),--force) $(NODE)

add-node: $(STAMP)
	@test -n "$(NODE)" || (echo "usage: make add-node NODE=n4" && exit 2)
	$(RINGSIDE) add-node $(NODE)

restart: $(STAMP)
	@test -n "$(NODE)" || (echo "usage: make restart NODE=n2 (or NODE=gateway, NODE=redis)" && exit 2)
	$(RINGSIDE) restart $(NODE)

deploy: $(STAMP)
	$(RINGSIDE) deploy $(if $(filter 1 yes true,$(GATEWAY)),--gateway,)

# Load tests against the running cluster (`make up` first). USERS, RATE (Hz per user),
# DURATION (e.g. 60s) and CHAOS (e.g. kill:n2@20) are passed to the locustfile.
USERS ?= 200
RATE ?= 10
DURATION ?= 60s
SPAWN ?= 50
CHAOS ?=
PROCESSES ?=
BENCH_ARGS ?=
LOCUST_PROCESSES = $(if $(PROCESSES),--processes $(PROCESSES),)
LOCUST_ENV = RINGSIDE_CONFIG=$(CONFIG) RINGSIDE_RATE=$(RATE) RINGSIDE_CHAOS=$(CHAOS)

loadtest: $(STAMP)
	mkdir -p .run/loadtest
	$(LOCUST_ENV) $(BIN)/locust -f loadtest/locustfile.py $(LOCUST_PROCESSES) --headless -u $(USERS) -r $(SPAWN) \
		-t $(DURATION) --csv .run/loadtest/ringside --html .run/loadtest/report.html --only-summary

loadtest-ui: $(STAMP)
	$(LOCUST_ENV) $(BIN)/locust -f loadtest/locustfile.py $(LOCUST_PROCESSES)

bench: $(STAMP)
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

BASE ?= HEAD~1
cpu-ab: $(STAMP) ## CPU per request of this checkout against BASE, both clusters side by side
	$(BIN)/python -m loadtest.cpu_ab --side-by-side --base $(BASE)

.PHONY: dashboard
dashboard: $(STAMP) ## print the operator dashboard's URL with the admin token
	@$(BIN)/python -c "from server.config import load_config; c = load_config('$(CONFIG)'); \
		g = c.gateway; print(f'http://{g.host}:{g.port}/?token={c.admin_token}')"

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/server tests/gateway $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check server gateway tests loadtest
	$(BIN)/mypy server gateway

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
