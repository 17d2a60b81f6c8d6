# facefed: `make demo` runs the main job, `make test` runs the tests; both set up .venv on first use.
# Data: with ../shared beside this checkout nothing needs setting; otherwise set FACEFED_LFW
# (and FACEFED_PRETRAINED) or pass them on the command line: make demo FACEFED_LFW=/path/lfw-deepfunneled.tgz
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= $(abspath $(CURDIR)/../shared)

FACEFED_LFW ?= $(wildcard $(SHARED)/datasets/lfw/lfw-deepfunneled.tgz)
FACEFED_PRETRAINED ?= $(wildcard $(SHARED)/weights/mobilefacenet-casia/arcface_mobilefacenet.pth)
export FACEFED_LFW FACEFED_PRETRAINED
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

STAMP := $(VENV)/.facefed-installed

.PHONY: install test test-fast lint demo bench check-data clean docker-test

install: $(STAMP)

# torch 2.13.0 CPU first (pip takes it from local disk), then the project with its dev extra.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

check-data:
	@if [ -z "$(FACEFED_LFW)" ] || [ ! -e "$(FACEFED_LFW)" ]; then \
	  echo "LFW not found. Put lfw-deepfunneled.tgz (from the LFW website, with its pairs files) at"; \
	  echo "  $(SHARED)/datasets/lfw/lfw-deepfunneled.tgz"; \
	  echo "or run: make $(MAKECMDGOALS) FACEFED_LFW=/path/to/lfw-deepfunneled.tgz"; exit 2; fi
	@if [ -z "$(FACEFED_PRETRAINED)" ] || [ ! -e "$(FACEFED_PRETRAINED)" ]; then \
	  echo "Pretrained MobileFaceNet not found. Put arcface_mobilefacenet.pth at"; \
	  echo "  $(SHARED)/weights/mobilefacenet-casia/arcface_mobilefacenet.pth"; \
	  echo "or run: make $(MAKECMDGOALS) FACEFED_PRETRAINED=/path/to/arcface_mobilefacenet.pth"; exit 2; fi

test: check-data install
	$(BIN)/python -m pytest -q

test-fast: check-data install
	$(BIN)/python -m pytest -q -m 'not slow'

# ruff (lint + format check) and mypy (strict on common/, normal elsewhere); settings in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: check-data install
	$(BIN)/python demo/run.py

bench: check-data install
	@for b in bench/vault.py bench/train.py bench/federation.py bench/forget.py; do \
	  if [ -f $$b ]; then echo "== $$b"; $(BIN)/python $$b || exit $$?; fi; done

# Docker: build the images, run docker/compose.yml (server, 3 sites, 9 share holders), one round, a
# forget + unlearn + receipt check, a scan of every container; then tear down and prune (docker/smoke.py,
# about 13 min on 2 cores). Uses a running engine (docker info), else starts ../shared/tools/docker-engine
# through docker/engine.sh (overlay2 storage where overlayfs mounts, else vfs), with its local torch CPU
# wheel, and stops it again afterwards unless DOCKER_KEEP_ENGINE=1.
# DOCKER_TEST_ARGS: e.g. --keep-images for faster reruns.
DOCKER_ENGINE ?= $(SHARED)/tools/docker-engine
DOCKER_TEST_ARGS ?=
docker-test: check-data
	@set -e; started=; \
	if ! docker info >/dev/null 2>&1; then \
	  if [ ! -x "$(DOCKER_ENGINE)" ]; then \
	    echo "docker-test: no Docker engine (docker info fails) and no $(DOCKER_ENGINE) to start one"; exit 2; fi; \
	  root=$${FACEFED_DOCKER_ROOT:-$${TMPDIR:-/tmp}/facefed-docker}; \
	  docker -H "unix://$$root/docker.sock" info >/dev/null 2>&1 || started=1; \
	  eval "$$(DOCKER_ENGINE=$(DOCKER_ENGINE) docker/engine.sh start)"; \
	  FACEFED_TORCH_FIND_LINKS=$${FACEFED_TORCH_FIND_LINKS:-$$($(DOCKER_ENGINE) wheels)}; \
	  export FACEFED_TORCH_FIND_LINKS; \
	fi; \
	rc=0; $(PYTHON) docker/smoke.py $(DOCKER_TEST_ARGS) || rc=$$?; \
	if [ -n "$$started" ] && [ -z "$(DOCKER_KEEP_ENGINE)" ]; then $(DOCKER_ENGINE) stop; fi; \
	exit $$rc

clean:
	rm -rf demo-state bench-out .pytest_cache
