# syntax=docker/dockerfile:1.7
# The edgefleet node agent for x86_64 NVIDIA GPUs: CUDA runtime base, torch (CUDA build) and
# TensorRT 10 from PyPI (the `gpu` extra), NVML for telemetry. The compilers needed by pycuda live
# only in the build stage.
#
#   docker build -f docker/agent-gpu.Dockerfile -t ghcr.io/edgefleet/agent:0.1.0 .
#
# Needs the NVIDIA container runtime on the node (k3s: see README "Install on k3s").
# Base images are pinned by exact version tag; digests could not be verified from the build
# host (no registry access) - pin them with `docker buildx imagetools inspect` before release.
# Ubuntu 24.04 ships Python 3.12 (the project needs >= 3.11); build and runtime stages use the
# same distribution so the virtual environment's interpreter path is the same in both.
ARG CUDA_BUILD_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_BUILD_IMAGE} AS build
ARG TORCH_VERSION=2.15.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Distribution packages follow the base image's pinned release; their versions are not pinned
# one by one (Ubuntu removes superseded versions from its archive).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/edgefleet \
    && /opt/edgefleet/bin/pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgefleet_api ./edgefleet_api
COPY operator ./operator
COPY node_agent ./node_agent
RUN /opt/edgefleet/bin/pip install ".[gpu]" \
    && /opt/edgefleet/bin/python -m compileall -q -x "/torch/testing/_internal/" /opt/edgefleet
# (torch's test internals hold Python 3.12-only syntax and are never imported: left uncompiled)

FROM ${CUDA_RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="edgefleet-agent" \
      org.opencontainers.image.description="edgefleet node agent (CUDA, TensorRT, x86_64)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# The interpreter only: no compilers, no headers.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 nonroot && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin nonroot \
    && install -d -o 65532 -g 65532 /var/lib/edgefleet
ENV PATH=/opt/edgefleet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    CUDA_CACHE_PATH=/tmp/cuda-cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=build /opt/edgefleet /opt/edgefleet
VOLUME ["/var/lib/edgefleet"]
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["edgefleet-agent"]
CMD ["serve", "--device", "cuda:0", "--model-repository", "/var/lib/edgefleet/models"]
