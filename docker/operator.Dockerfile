# syntax=docker/dockerfile:1.7
# The edgefleet operator: kopf + the kubernetes client, no torch, no build tools.
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/edgefleet/operator:0.1.0 .
#
# Base images are pinned by exact version tag; digests could not be verified from the build
# host (no registry access) - pin them with `docker buildx imagetools inspect` before release.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/edgefleet
WORKDIR /src
# Runtime dependencies of the operator only (the node agent's torch/numpy stay out), from the
# hashed lock (scripts/lock.sh): the project itself is installed --no-deps on top.
COPY docker/locks/operator.txt /src/operator.lock
RUN /opt/edgefleet/bin/pip install --require-hashes --no-deps -r /src/operator.lock
COPY pyproject.toml README.md ./
COPY edgefleet_api ./edgefleet_api
COPY operator ./operator
COPY node_agent ./node_agent
RUN /opt/edgefleet/bin/pip install --no-deps . \
    && /opt/edgefleet/bin/python -m compileall -q /opt/edgefleet

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="edgefleet-operator" \
      org.opencontainers.image.source="https://github.com/edgefleet/edgefleet" \
      org.opencontainers.image.licenses="Apache-2.0"
# Read-only root filesystem: no bytecode writes, HOME on the /tmp emptyDir the chart mounts.
ENV PATH=/opt/edgefleet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=build /opt/edgefleet /opt/edgefleet
# A passwd entry for the uid (getpass and friends look the user up).
RUN groupadd --gid 65532 nonroot && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin nonroot
# 65532: the conventional "nonroot" uid; the chart runs it with runAsNonRoot.
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["edgefleet-operator"]
CMD ["run"]
