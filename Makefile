# celery_ext: one command to run a worker, one to run every test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast check bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e ".[all,test,dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv with celery_ext and every extra

run: $(STAMP)  ## start a worker on the embedded default (no broker or database needed)
	$(BIN)/celery -A celery_ext worker --loglevel INFO

test: $(STAMP)  ## the whole suite on real servers (Redis, PostgreSQL, MariaDB, RabbitMQ), slow tests included
	$(BIN)/python -m pytest tests -p no:cacheprovider

test-fast: $(STAMP)  ## everything but the slow chaos tests
	$(BIN)/python -m pytest tests -p no:cacheprovider -m "not slow"

check: $(STAMP)  ## lint, format check and type-check
	$(BIN)/ruff check celery_ext tests bench examples
	$(BIN)/ruff format --check celery_ext tests bench examples
	$(BIN)/mypy

bench: $(STAMP)  ## core benchmark: bare Celery vs celery_ext, interleaved
	$(BIN)/python bench/bench_core.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
