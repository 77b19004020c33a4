# octaskly — developer entry points. `make dev` runs a local cluster; `make test` is the
# whole suite (CI runs exactly it).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYZ    ?= dist/octaskly.pyz

.PHONY: dev venv system-deps test lint typecheck unit pyz release bench soak clean

$(STAMP): pyproject.toml | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## system-deps: bubblewrap (bwrap), which the strict sandbox levels and their tests need;
## shellcheck and systemd (systemd-analyze), which the installer and unit tests need;
## chromium, the headless browser the dashboard's tests drive (with Playwright);
## postgresql, whose initdb/pg_ctl the tests use for throwaway servers (tests/pg.py);
## whatever is missing is installed with one apt-get call when we are root (CI), else a warning
system-deps:
	@missing=""; \
	command -v bwrap >/dev/null 2>&1 || missing="$$missing bubblewrap"; \
	command -v shellcheck >/dev/null 2>&1 || missing="$$missing shellcheck"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	test -x /usr/lib/chromium/chromium || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else \
			echo "warning: missing system packages: sudo apt-get install$$missing" >&2; \
		fi; \
	fi

## dev: create the venv, install, and run a dispatcher + 2 workers (API on 127.0.0.1:3000)
dev: $(STAMP)
	$(BIN)/octaskly dev --workers 2

## lint: ruff (lint + format check), mypy --strict, import-linter layer contracts
lint: $(STAMP)
	$(BIN)/ruff check octaskly operator tests bench scripts
	$(BIN)/ruff format --check octaskly operator tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

## test: lint, then the whole test suite in parallel (SQLite, the default store), then
## the core, reliability and security suites again with every dispatcher on PostgreSQL
PG_SUITES = tests/integration/test_api.py tests/integration/test_api_auth.py \
	tests/integration/test_task_output.py \
	tests/integration/test_cluster.py tests/integration/test_peering.py \
	tests/integration/test_events.py tests/integration/test_key_rotation.py \
	tests/e2e/test_secure_transport.py tests/reliability/test_crash.py \
	tests/reliability/test_worker_faults.py tests/reliability/test_api_schema.py
test: lint
	$(BIN)/pytest -n 4 --durations=15
	OCTASKLY_TEST_STORE=postgresql $(BIN)/pytest -n 4 --durations=5 $(PG_SUITES)

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

## pyz: the single-file zipapp dist/octaskly.pyz (shiv, reproducible)
pyz: $(STAMP)
	mkdir -p $(dir $(PYZ))
	$(BIN)/shiv --reproducible --compressed -c octaskly -o $(PYZ) \
		-p '/usr/bin/env python3' .
	@echo "built $(PYZ) ($$(du -h $(PYZ) | cut -f1))"

## release: a reproducible pyz per target (Linux x86_64/aarch64, macOS, Windows; CPython
## 3.11-3.13) + tarballs + SHA256SUMS in dist/, wheel tags checked, start-up measured;
## wheels cached in ~/.cache/octaskly-release (RELEASE_ARGS="--targets local" for one)
RELEASE_ARGS ?=
release: $(STAMP)
	$(BIN)/python -m scripts.release --verify-reproducible $(RELEASE_ARGS)

## bench: measure throughput, latency, memory and startup against issue 3's targets
## (about 4 minutes; BENCH_ARGS="--quick" or e.g. "--tasks 2000 --scale-depths 1000,10000")
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## soak: 30 minutes of mixed load on a dispatcher + 2 workers, sampling the dispatcher's RSS,
## open fds and database size every 30 s; fails if one does not level off (not in CI;
## SOAK_ARGS="--minutes 5", "--task-retention-minutes 5", "--out soak.json")
SOAK_ARGS ?=
soak: $(STAMP)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf dist build *.egg-info .mypy_cache .ruff_cache .pytest_cache
