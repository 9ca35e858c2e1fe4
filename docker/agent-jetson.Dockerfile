# syntax=docker/dockerfile:1.7
# The edgefleet node agent for NVIDIA Jetson (arm64, L4T r36 / JetPack 6, Orin family).
#
#   docker buildx build --platform linux/arm64 -f docker/agent-jetson.Dockerfile \
#       -t ghcr.io/edgefleet/agent:0.1.0-jetson .
#
# Run it with the NVIDIA container runtime (`--runtime nvidia`; k3s: the `nvidia` RuntimeClass),
# which mounts the board's GPU device nodes and driver libraries into the container.
# Base images are pinned by exact version tag; digests could not be verified from the build
# host (no registry access) - pin them with `docker buildx imagetools inspect` before release.
#
# Python: L4T r36 is Ubuntu 22.04 (Python 3.10); the project needs >= 3.11, so both stages use
# Ubuntu's python3.11 (same path in both, so the virtual environment moves as is). torch comes
# from a Jetson wheel index for that Python and JetPack (TORCH_INDEX); the TensorRT backend needs
# TensorRT Python bindings built for Python 3.11 (TENSORRT_WHEEL, optional), otherwise the agent
# serves TorchScript models on the GPU through torch.
ARG L4T_BUILD_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
ARG L4T_RUNTIME_IMAGE=nvcr.io/nvidia/l4t-cuda:12.6.11-runtime

FROM ${L4T_BUILD_IMAGE} AS build
ARG TORCH_VERSION=2.8.0
ARG TORCH_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
ARG TENSORRT_WHEEL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
# torch first, pinned by version from TORCH_INDEX; then the agent lock (scripts/lock.sh), the one
# the CPU image uses: it was resolved with Python 3.11, this image's Python, and its markers come
# out the same on aarch64 as on x86_64; its hashes cover every file of each pinned version, the
# aarch64 wheels included. --require-hashes --no-deps: nothing unhashed comes in.
# The one exception: TENSORRT_WHEEL, TensorRT's Python bindings, a local wheel built from JetPack
# for this Python (no index holds one), installed --no-deps by path: the builder vouches for it.
# nvidia-ml-py is a dependency but NVML is absent on Jetson: the agent reads thermals from sysfs.
COPY docker/locks/agent.txt /src/agent.lock
RUN python3.11 -m venv /opt/edgefleet \
    && /opt/edgefleet/bin/pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && /opt/edgefleet/bin/pip install --require-hashes --no-deps -r /src/agent.lock \
    && if [ -n "${TENSORRT_WHEEL}" ]; then /opt/edgefleet/bin/pip install --no-deps "${TENSORRT_WHEEL}"; fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgefleet_api ./edgefleet_api
COPY operator ./operator
COPY node_agent ./node_agent
# The project last, --no-deps (a code change does not reinstall the dependencies).
RUN /opt/edgefleet/bin/pip install --no-deps . \
    && /opt/edgefleet/bin/python -m compileall -q -x "/torch/testing/_internal/" /opt/edgefleet
# (torch's test internals hold Python 3.12-only syntax and are never imported: left uncompiled)

FROM ${L4T_RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="edgefleet-agent" \
      org.opencontainers.image.description="edgefleet node agent (Jetson, L4T r36, arm64)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# The interpreter only: no compilers, no headers.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 \
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
