# syntax=docker/dockerfile:1.7
# The edgefleet node agent, CPU only (torch CPU build): development, CI, and nodes without a GPU.
#
#   docker build -f docker/agent-cpu.Dockerfile -t ghcr.io/edgefleet/agent:0.1.0-cpu .
#
# Base images are pinned by exact version tag; digests could not be verified from the build
# host (no registry access) - pin them with `docker buildx imagetools inspect` before release.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_VERSION=2.15.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The dependencies only: this 4 GB layer is rebuilt when they change, not when our code does
# (the code is a wheel of a few hundred kB, installed last). torch first, pinned by version from
# TORCH_INDEX (its wheels differ by index, so the lock leaves it out); then everything else from
# the hashed lock (scripts/lock.sh), --no-deps: nothing unhashed comes in. A CUDA build of torch
# (TORCH_INDEX=https://pypi.org/simple, where no CPU index is reachable) brings triton (1 GB), the
# GPU kernel compiler of torch.compile: of no use without a GPU, so it goes; its NVIDIA libraries
# stay (torch's import loads them even on a CPU).
# Bytecode compiled at build time (the root filesystem is read-only); torch's test internals hold
# Python 3.12-only syntax and are never imported by the agent, so they are left out.
COPY docker/locks/agent.txt /src/agent.lock
RUN python -m venv /opt/edgefleet \
    && /opt/edgefleet/bin/pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && /opt/edgefleet/bin/pip install --require-hashes --no-deps -r /src/agent.lock \
    && /opt/edgefleet/bin/pip uninstall -y -q triton \
    && /opt/edgefleet/bin/python -m compileall -q -x "/torch/testing/_internal/" /opt/edgefleet

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgefleet_api ./edgefleet_api
COPY operator ./operator
COPY node_agent ./node_agent
RUN python -m venv /tmp/venv && /tmp/venv/bin/pip wheel -q --no-deps --disable-pip-version-check . -w /wheels

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="edgefleet-agent" \
      org.opencontainers.image.description="edgefleet node agent (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
# Read-only root filesystem: models and state live on /var/lib/edgefleet (a volume), scratch on
# /tmp (an emptyDir); no bytecode writes.
ENV PATH=/opt/edgefleet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor
# A passwd entry for the uid: getpass, torch and ssl look the user up.
RUN groupadd --gid 65532 nonroot && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin nonroot \
    && install -d -o 65532 -g 65532 /var/lib/edgefleet
COPY --from=deps /opt/edgefleet /opt/edgefleet
COPY --from=wheel /wheels /wheels
RUN /opt/edgefleet/bin/pip install -q --no-deps --no-index --disable-pip-version-check /wheels/*.whl \
    && rm -rf /wheels
VOLUME ["/var/lib/edgefleet"]
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["edgefleet-agent"]
CMD ["serve", "--model-repository", "/var/lib/edgefleet/models"]
