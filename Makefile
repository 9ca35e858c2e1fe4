# edgefleet: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help lock setup venv binaries test test-unit lint demo cluster-up cluster-down cluster-status \
        bench crds clean

help:
	@echo "make demo          set up and run a local edge fleet (control plane, nodes, examples)"
	@echo "make test          set up and run the whole test suite"
	@echo "make cluster-up    build (once, cached) and start the local control plane"
	@echo "make cluster-down  stop it and remove its state"
	@echo "make lint          ruff, mypy (strict for the contract and pure modules), import contracts"
	@echo "make bench         run the benchmarks, results in docs/benchmarks.md"
	@echo "make lock          regenerate the images' hashed dependency locks (docker/locks/) from pyproject.toml (gpu.txt with a Python 3.12: PY312=...)"
	@echo "make crds          regenerate crds/ and the chart's CRDs from edgefleet_api/crdgen.py"
	@echo "make images        build the operator and CPU agent images here (docker; no registry needed)"
	@echo "make e2e-kind      the end-to-end suite on a kind cluster of real Pods, with those images"

# The virtual environment, rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	@echo "== setting up $(VENV) (torch is large: the first install takes a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off --upgrade pip
	$(PY) -m pip install --progress-bar off -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Kubernetes binaries from their Go modules, cached by version under ~/.cache/edgefleet.
binaries:
	bash scripts/k8s-build.sh

setup: venv binaries

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -m "not cluster" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p edgefleet_api -p edgefleet_operator -p node_agent
	$(VENV)/bin/lint-imports --no-cache

cluster-up: setup
	$(PY) -m e2e.cluster up

cluster-down:
	@if [ -x $(PY) ]; then $(PY) -m e2e.cluster down; else echo "no environment; nothing to stop"; fi

cluster-status: venv
	$(PY) -m e2e.cluster status

demo: setup
	$(PY) -m e2e.demo

# edgefleet/operator:$(EDGEFLEET_IMAGE_TAG) and edgefleet/agent-cpu:... (default tag: dev), built from
# docker/ on a Debian base made here by debootstrap; starts dockerd where none runs. See scripts/images.sh.
.PHONY: images
images:
	bash scripts/images.sh

# The end-to-end suite on a kind cluster of real Pods (docker, kind and its node image are set up by
# the script, all built here): creates the cluster, builds and loads the images, runs
# tests/e2e/test_fleet_e2e.py (which installs the chart) and tests/e2e/kind_node_reboot.py (a node
# reboot with the API server down), deletes the cluster. See scripts/e2e-kind.sh.
.PHONY: e2e-kind
e2e-kind: venv
	PYTEST_ARGS="$(PYTEST_ARGS)" bash scripts/e2e-kind.sh

bench: venv
	$(PY) -m bench

lock: venv
	bash scripts/lock.sh

crds: venv
	$(PY) -m edgefleet_api.crdgen
	bash scripts/render-install.sh

clean: cluster-down
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
