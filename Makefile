# Every target is a one-liner; tool configuration lives in pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser promtool demo test lint typecheck bench bench-broker docs worker serve clean

# make worker APP=myproject.tasks CONCURRENCY=4 QUEUES=celery,training LOGLEVEL=info EVENTS=1
APP ?= $(or $(TASKKIT_APP),workers.app)
ARGS ?=
# EVENTS=1 sends task events (-E) for Flower and `celery events` (or TASKKIT_WORKER_EVENTS=1).
EVENTS ?=
CONCURRENCY ?= 2
QUEUES ?= celery
LOGLEVEL ?= info
# make serve HOST=0.0.0.0 PORT=8080 (beyond loopback it needs TASKKIT_API_TOKEN)
HOST ?= 127.0.0.1
PORT ?= 8000

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q -e '.[dev]' && touch $(STAMP)

# Debian's Chromium, which the dashboard's browser test drives (tests/browser); needs root.
browser:
	test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)

# Prometheus' promtool alone (Debian's package unpacked, no server), for tests/telemetry's alert
# rules (docs/alerts/); needs root.
promtool:
	command -v promtool >/dev/null || (d=$$(mktemp -d) && cd $$d && apt-get update -q && apt-get download prometheus && dpkg -x prometheus_*.deb root && install -m 755 root/usr/bin/promtool /usr/local/bin/promtool; s=$$?; rm -rf $$d; exit $$s)

# A training run on the embedded defaults survives the SIGKILL of its worker (workers/demo.py).
demo: $(STAMP)
	$(BIN)/python -m workers.demo

# Two pytest-xdist workers, a file each at a time: most tests wait on workers, servers and
# timeouts, not on the CPU (the suite takes about half as long as one process).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# Only the embedded broker section of docs/benchmarks.md (benchmarks/bench_broker.py).
bench-broker: $(STAMP)
	$(BIN)/python -m benchmarks.bench_broker

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

worker: $(STAMP)
	$(BIN)/celery -A $(APP) worker --concurrency=$(CONCURRENCY) --queues=$(QUEUES) --loglevel=$(LOGLEVEL) $(if $(filter 1 true yes,$(EVENTS)),-E) $(ARGS)

# The HTTP service and dashboard (taskkit.api) on http://$(HOST):$(PORT)/.
serve: $(STAMP)
	$(BIN)/taskkit serve --host $(HOST) --port $(PORT) --app $(APP)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis site
