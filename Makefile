# avatune: `make dev` runs the local stack, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Reinstall whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install dev test lint format bench soak token schemas clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so the trainer extra never pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[api,trainer,rag,cli,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

dev: install
	$(PY) -m infra.devstack

test: install lint
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

# ruff's lint rules and format check (pyproject.toml [tool.ruff]); `make format` fixes what it can.
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install
	$(PY) -m bench

# The fault soak (bench/soak.py): not part of `make test` nor `make bench`; writes section 8
# of BENCHMARKS.md and fails on any violated invariant.
SOAK_MINUTES ?= 6
SOAK_WORKERS ?= 2
soak: install
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES) --workers $(SOAK_WORKERS)

token: install
	@$(PY) -m handlers.devtoken $(or $(USER_ID),alice)

schemas: install
	$(PY) -m contracts.export_schemas

clean:
	rm -rf $(VENV) .dev .pytest_cache
