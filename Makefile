# The commands a person types. Each target that needs Python first makes/updates .venv from
# pyproject.toml, and skips that when pyproject.toml has not changed since the last install.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

ARTIFACTS_DIR ?= artifacts
ARGS ?=
PORT ?= 6006
# The real MNIST, read through TFDS's manual dir, when this checkout sits beside ../shared.
SHARED_MNIST := $(abspath ../shared/datasets/mnist)
MNIST_MANUAL_DIR ?= $(if $(wildcard $(SHARED_MNIST)/train-images-idx3-ubyte.gz),$(SHARED_MNIST),)
export ARTIFACTS_DIR MNIST_MANUAL_DIR

.DEFAULT_GOAL := help
.PHONY: help venv train test test-slow test-all tensorboard report serve predict bench tune train-cluster clean distclean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: ARGS=\"--epochs 1 ...\" (flags for train), ARTIFACTS_DIR=$(ARTIFACTS_DIR), PORT=$(PORT)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP) ## create/update .venv from pyproject.toml (the other targets do this first)

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

tune: $(STAMP) ## keras-tuner search (default budget 13 min); ARGS="--study NAME --time-budget MIN ..."
	$(PY) -m pipeline tune $(ARGS)

tensorboard: $(STAMP) ## serve every run's and tuning trial's logs on http://127.0.0.1:PORT (default 6006)
	@mkdir -p $(ARTIFACTS_DIR)/tensorboard $(ARTIFACTS_DIR)/tuning
	$(VENV)/bin/tensorboard --logdir_spec runs:$(ARTIFACTS_DIR)/tensorboard,tuning:$(ARTIFACTS_DIR)/tuning --host 127.0.0.1 --port $(PORT)

report: $(STAMP) ## rebuild the report of a run (RUN=path, default the latest run)
	$(PY) -m pipeline report $(or $(RUN),$(ARTIFACTS_DIR)/runs/latest)

serve: ## start TF Serving on the published models (binary, else Docker): gRPC 8500, REST 8501
	serving/serve.sh $(ARTIFACTS_DIR)/models/mnist

predict: $(STAMP) ## predict IMAGE=file(s): in-process on the latest version, or SERVER=host:port
	@test -n "$(IMAGE)" || { echo "usage: make predict IMAGE=digit.png [SERVER=host:8501]" >&2; exit 2; }
	$(PY) -m serving predict $(IMAGE) $(if $(SERVER),--server $(SERVER),--local $(ARTIFACTS_DIR)/models/mnist) $(ARGS)

bench: $(STAMP) ## seed script vs our trainer (3 alternating pairs), input pipeline, serving latency
	$(PY) -m benchmarks.bench $(ARGS)

clean: ## delete the artifacts dir (runs, TensorBoard logs, published models) and caches
	rm -rf $(ARTIFACTS_DIR) .pytest_cache *.egg-info
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean ## clean, and delete .venv
	rm -rf $(VENV)
