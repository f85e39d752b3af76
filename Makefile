# The commands a person types. Each target that needs Python first makes/updates .venv from the
# lock file (requirements.lock, or requirements-gpu.lock for the GPU build), and skips that while
# neither the lock nor pyproject.toml has changed since the last install of the same build.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# CPU or GPU build of TensorFlow. GPU=auto (default): the GPU build when `nvidia-smi -L` lists an
# NVIDIA GPU, else the CPU build; GPU=1 forces the GPU build, GPU=0 the CPU build.
# The GPU build is a second lock, not `tensorflow[and-cuda]` added on top of requirements.lock:
# installing with --require-hashes needs every package pinned with its hashes, the ~12 CUDA/cuDNN
# wheels that [and-cuda] pulls in included, and an unlocked install on top would resolve those
# at install time (not repeatable, not hash-checked). `make lock` compiles requirements-gpu.lock
# with requirements.lock as constraints, so it is exactly the CPU environment plus the CUDA wheels.
GPU ?= auto
NVIDIA_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -m1 '^GPU [0-9]' | sed 's/ .UUID: .*//')
ifeq ($(GPU),auto)
  VARIANT := $(if $(NVIDIA_GPU),gpu,cpu)
  VARIANT_WHY := $(if $(NVIDIA_GPU),nvidia-smi lists $(NVIDIA_GPU); GPU=0 for the CPU build,no NVIDIA GPU listed by nvidia-smi -L; GPU=1 for the GPU build)
else ifeq ($(GPU),1)
  VARIANT := gpu
  VARIANT_WHY := asked for with GPU=1
else ifeq ($(GPU),0)
  VARIANT := cpu
  VARIANT_WHY := asked for with GPU=0
else
  $(error GPU=$(GPU): expected GPU=1 (GPU build), GPU=0 (CPU build) or GPU=auto)
endif
OTHER_VARIANT := $(if $(filter gpu,$(VARIANT)),cpu,gpu)
LOCK_cpu := requirements.lock
LOCK_gpu := requirements-gpu.lock
LOCK := $(LOCK_$(VARIANT))
VARIANT_NAME_cpu := CPU build (tensorflow, $(LOCK_cpu))
VARIANT_NAME_gpu := GPU build (tensorflow[and-cuda] with CUDA/cuDNN wheels, $(LOCK_gpu))
# One stamp per build: switching build finds no stamp and reinstalls.
STAMP := $(VENV)/.installed-$(VARIANT)

ARTIFACTS_DIR ?= artifacts
# `make train ARTIFACTS_DIR=` would train into ./artifacts while `make predict` looked in /models.
ifeq ($(strip $(ARTIFACTS_DIR)),)
  $(error ARTIFACTS_DIR is empty: give a folder, e.g. ARTIFACTS_DIR=artifacts (the default))
endif
ARGS ?=
PORT ?= 6006
# The real MNIST, read through TFDS's manual dir, when this checkout sits beside ../shared.
SHARED_MNIST := $(abspath ../shared/datasets/mnist)
MNIST_MANUAL_DIR ?= $(if $(wildcard $(SHARED_MNIST)/train-images-idx3-ubyte.gz),$(SHARED_MNIST),)
export ARTIFACTS_DIR MNIST_MANUAL_DIR

.DEFAULT_GOAL := help
.PHONY: help venv lock train test test-slow test-all lint tensorboard report models serve predict bench tune train-cluster clean distclean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: ARGS=\"--epochs 1 ...\" (flags for train), ARTIFACTS_DIR=$(ARTIFACTS_DIR), PORT=$(PORT),"
	@echo "             GPU=1|0 (GPU or CPU build of TensorFlow; default: GPU build when nvidia-smi lists a GPU)"

# Installs exactly the lock (hash-checked), then this project without resolving anything
# (--no-deps) and with the locked setuptools (--no-build-isolation); `pip check` then catches a
# lock that no longer satisfies pyproject.toml (edited without `make lock`). Switching between
# the CPU and GPU builds recreates .venv, so no CUDA wheel is left behind in a CPU venv.
$(STAMP): pyproject.toml $(LOCK)
	@echo "venv: installing the $(VARIANT_NAME_$(VARIANT)): $(VARIANT_WHY)"
	@if [ -e $(VENV)/.installed-$(OTHER_VARIANT) ]; then \
	  echo "venv: $(VENV) holds the $(OTHER_VARIANT) build: recreating it"; rm -rf $(VENV); fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install -qq --no-deps --no-build-isolation -e .
	@$(PY) -m pip check >/dev/null || { $(PY) -m pip check; \
	  echo "venv: $(LOCK) does not satisfy pyproject.toml: run 'make lock'" >&2; exit 1; }
	@rm -f $(VENV)/.installed-stamp
	@touch $(STAMP)

venv: $(STAMP) ## create/update .venv from the lock file (the other targets do this first); GPU=1|0

# `make lock` resolves pyproject.toml (dev extra; gpu extra for the GPU lock) for CI's and the
# images' platform: Linux x86_64, Python 3.11. It keeps the versions already locked unless
# pyproject.toml needs others; UPGRADE=1 moves every unpinned package to its newest release.
# uv runs from its own venv under build/, pinned, so the lock tool never enters the project's.
UV_VERSION := 0.13.9
LOCK_TOOLS := build/lock-tools
LOCK_FLAGS := --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--custom-compile-command "make lock" $(if $(UPGRADE),--upgrade)
lock: ## regenerate requirements.lock and requirements-gpu.lock (all packages, hashed) from pyproject.toml
	@test -x $(LOCK_TOOLS)/bin/uv || { $(PYTHON) -m venv $(LOCK_TOOLS) && \
	  $(LOCK_TOOLS)/bin/python -m pip install --quiet uv==$(UV_VERSION); }
	$(LOCK_TOOLS)/bin/uv pip compile pyproject.toml --extra dev $(LOCK_FLAGS) -o $(LOCK_cpu)
	$(LOCK_TOOLS)/bin/uv pip compile pyproject.toml --extra dev --extra gpu $(LOCK_FLAGS) \
	  -c $(LOCK_cpu) -o $(LOCK_gpu)

# The CLI's hints then say that a flag such as --run-name goes in ARGS.
train train-cluster: export MNIST_FLAGS_IN_ARGS = 1
train: $(STAMP) ## train, evaluate, gate, publish and report the documented model (ARGS=... for flags)
	$(PY) -m pipeline train $(ARGS)

WORKERS ?= 2
train-cluster: $(STAMP) ## train with WORKERS=N local processes (MultiWorkerMirroredStrategy), ARGS as for train
	$(PY) -m pipeline cluster --workers $(WORKERS) -- $(ARGS)

test: $(STAMP) ## the test suite: fast tests, plus the end-to-end test when ../shared/datasets/mnist exists
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP) ## the slow tests (subprocess kills, real multi-process runs); CI runs them
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS)

test-all: $(STAMP) ## every test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff (lint + format check) and mypy, as CI runs them
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

tune: $(STAMP) ## keras-tuner search (default budget 13 min); ARGS="--study NAME --time-budget MIN ..."
	$(PY) -m pipeline tune $(ARGS)

tensorboard: $(STAMP) ## serve every run's and tuning trial's logs on http://127.0.0.1:PORT (default 6006)
	$(PY) -m pipeline.tensorboard --logdir_spec runs:$(ARTIFACTS_DIR)/tensorboard,tuning:$(ARTIFACTS_DIR)/tuning --host 127.0.0.1 --port $(PORT)

report: $(STAMP) ## rebuild the report of a run (RUN=path, default the latest run)
	$(PY) -m pipeline report $(or $(RUN),$(ARTIFACTS_DIR)/runs/latest)

models: $(STAMP) ## published versions: ARGS="list" (default), "promote N", "canary N", "rollback"
	$(PY) -m pipeline models $(or $(ARGS),list)

serve: ## start TF Serving on the published models (binary, else Docker): gRPC 8500, REST 8501
	serving/serve.sh "$(ARTIFACTS_DIR)/models/mnist"

# IMAGE's words, each single-quoted for the shell and unexpanded by make: a name with ( ) ' $ &
# reaches the client as it is (a space still separates two files); a word with * ? [ is
# expanded here as the shell would have.
IMAGE_ARGS = $(foreach f,$(foreach w,$(value IMAGE),$(or $(wildcard $(w)),$(w))),'$(subst ','\'',$(f))')
predict: $(STAMP) ## predict IMAGE=file(s): in-process (the version TF Serving would serve), or SERVER=host:port
	@test -n "$(IMAGE)" || { echo "usage: make predict IMAGE=digit.png [SERVER=host:8501]" >&2; exit 2; }
	$(PY) -m serving predict $(IMAGE_ARGS) $(if $(SERVER),--server $(SERVER),--local $(ARTIFACTS_DIR)/models/mnist) $(ARGS)

bench: $(STAMP) ## seed script vs our trainer (3 alternating pairs), input pipeline, serving latency
	$(PY) -m benchmarks.bench $(ARGS)

clean: ## delete the artifacts dir (runs, TensorBoard logs, published models) and caches
	rm -rf $(ARTIFACTS_DIR) .pytest_cache *.egg-info
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean ## clean, and delete .venv (and build/, the lock tool's venv)
	rm -rf $(VENV) build
