# syntax=docker/dockerfile:1.7
# The edgefleet node agent for x86_64 NVIDIA GPUs: CUDA runtime base, torch (CUDA build) and
# TensorRT 10 for CUDA 12 from PyPI (the `gpu` extra), NVML for telemetry. The compilers needed by
# pycuda (an sdist) live only in the build stage.
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
# TensorRT 10 for CUDA 12 (the base image is CUDA 12.8; TensorRT 11 on PyPI defaults to CUDA 13)
ARG TENSORRT_VERSION=10.16.1.11
ARG TENSORRT_INDEX=https://pypi.nvidia.com
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Distribution packages follow the base image's pinned release; their versions are not pinned
# one by one (Ubuntu removes superseded versions from its archive).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
# torch first, pinned by version from TORCH_INDEX (its wheels differ by index, so the lock leaves
# it out); TensorRT likewise, pinned by version from NVIDIA's index (TENSORRT_INDEX): its PyPI
# packages are stubs that fetch the real wheels from there at install time, outside pip's hash
# checking, so the lock leaves it out too (scripts/lock.sh). Then everything else from the hashed
# `gpu` lock (resolved with Python 3.12, this image's), --require-hashes --no-deps: nothing
# unhashed comes in. pycuda is an sdist: its build tools come first from gpu-build.txt (the same
# pins and hashes) and it builds --no-build-isolation, which would fetch them unhashed otherwise.
# The project last, --no-deps (a code change does not reinstall the dependencies).
COPY docker/locks/gpu-build.txt /src/gpu-build.lock
COPY docker/locks/gpu.txt /src/gpu.lock
RUN python3 -m venv /opt/edgefleet \
    && /opt/edgefleet/bin/pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && /opt/edgefleet/bin/pip install --extra-index-url "${TENSORRT_INDEX}" "tensorrt-cu12==${TENSORRT_VERSION}" \
    && /opt/edgefleet/bin/pip install --require-hashes --no-deps -r /src/gpu-build.lock \
    && /opt/edgefleet/bin/pip install --require-hashes --no-deps --no-build-isolation -r /src/gpu.lock
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgefleet_api ./edgefleet_api
COPY operator ./operator
COPY node_agent ./node_agent
RUN /opt/edgefleet/bin/pip install --no-deps --no-build-isolation . \
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
