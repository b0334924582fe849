# Every target is a one-liner; tool configuration lives in pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck bench worker clean

# make worker CONCURRENCY=4 QUEUES=celery,training LOGLEVEL=info
CONCURRENCY ?= 2
QUEUES ?= celery
LOGLEVEL ?= info

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q -e '.[dev]' && touch $(STAMP)

# A training run on the embedded defaults survives the SIGKILL of its worker (workers/demo.py).
demo: $(STAMP)
	$(BIN)/python -m workers.demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks

worker: $(STAMP)
	$(BIN)/celery -A workers.app worker --concurrency=$(CONCURRENCY) --queues=$(QUEUES) --loglevel=$(LOGLEVEL)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
