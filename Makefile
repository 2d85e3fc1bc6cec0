# avatune: `make dev` runs the local stack, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Reinstall whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install dev test lint format bench token schemas docs clean

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

token: install
	@$(PY) -m handlers.devtoken $(or $(USER_ID),alice)

schemas: install
	$(PY) -m contracts.export_schemas

# The documentation site (MkDocs + Material) into site/; strict: a broken link or anchor fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) .dev .pytest_cache site
