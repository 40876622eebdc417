# Every target installs what it needs: a fresh machine of this kind only needs `make run` / `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install services migrate run test test-unit lint bench bench-batch clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

services:
	bash scripts/ensure_services.sh

migrate: install services
	$(VENV)/bin/revkernel migrate

run: install services
	bash scripts/run_demo.sh

test: install services
	bash scripts/ensure_wrk.sh
	$(VENV)/bin/pytest

test-unit: install
	$(VENV)/bin/pytest -m unit

bench: install services
	bash bench/run.sh

bench-batch: install services
	bash bench/run.sh --batch 50

lint: install
	$(VENV)/bin/ruff check shared services tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
