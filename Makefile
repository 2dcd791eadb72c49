# malt-ops developer entry points. `make run` and `make test` set the environment up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.8
# The local CPU torch wheel lives where pip's find-links points on these machines; uv does not read pip's config.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_FLAGS := $(if $(FIND_LINKS),--find-links $(FIND_LINKS),)
comma := ,
EXTRAS := training,airflow,tracking,dev
RECIPE ?= recipes/local.yaml
RUN_ID ?= local

.PHONY: setup lock run test test-slow lint style bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/lock.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || true
	@test -x $(BIN)/uv || $(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip sync --python $(BIN)/python $(UV_FLAGS) requirements/lock.txt
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	@touch $@

lock:
	$(BIN)/uv pip compile pyproject.toml $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) \
		$(UV_FLAGS) --python-version 3.11 -o requirements/lock.txt

run: setup
	$(BIN)/malt-ops run --recipe $(RECIPE) --run-id $(RUN_ID)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check malt_ops tests bench dags
	$(BIN)/ruff format --check malt_ops tests bench dags

style: setup
	$(BIN)/ruff format malt_ops tests bench dags
	$(BIN)/ruff check --fix malt_ops tests bench dags

bench: setup
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/training.py

clean:
	rm -rf $(VENV) .state
