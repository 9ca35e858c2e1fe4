#!/usr/bin/env bash
# `make images`: the operator and CPU agent images, built on this machine from docker/, with nothing
# from an image registry. The Python base is a Debian bookworm root filesystem made by debootstrap
# from Debian's mirror (python3.11, venv, CA certificates), `docker import`ed and passed to the
# Dockerfiles as PYTHON_IMAGE; torch comes from PyPI (TORCH_INDEX; the Dockerfiles' default, the
# PyTorch CPU index, is what users with internet access get).
#
#   scripts/images.sh                 edgefleet/operator:dev and edgefleet/agent-cpu:dev
#   EDGEFLEET_IMAGE_TAG=e2e scripts/images.sh
#
# A rebuild with nothing changed takes seconds (Docker's layer cache; the base is cached by its
# package list). Starts a Docker daemon where none answers (scripts/kind/docker-up.sh).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
TAG=${EDGEFLEET_IMAGE_TAG:-dev}
TORCH_INDEX=${EDGEFLEET_TORCH_INDEX:-https://pypi.org/simple}
MIRROR=${EDGEFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
start=$(date +%s)
log() { printf '[images %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

bash "$repo/scripts/kind/docker-up.sh"
# shellcheck source=kind/docker-build.sh
source "$repo/scripts/kind/docker-build.sh"

base="edgefleet-local/python:3.11-bookworm-$(echo "$PACKAGES $MIRROR" | sha256sum | cut -c1-12)"
if ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
  log "Python base: debootstrap bookworm ($PACKAGES)"
  rootfs=$(mktemp -d)
  debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 ||
    { tail -20 "$rootfs.log"; rm -rf "$rootfs"; exit 1; }
  # This machine's trust store (a local mirror's or proxy's certificate authority included).
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
  tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$base" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
  log "Python base $base: $(docker image inspect "$base" --format '{{.Size}}' | numfmt --to=iec)"
fi

# A build context with only what the Dockerfiles copy (the repository holds .venv and caches).
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/edgefleet_api" "$repo/operator" "$repo/node_agent" "$context/"
mkdir -p "$context/docker" && cp -r "$repo/docker/locks" "$context/docker/"
find "$context" -name __pycache__ -prune -exec rm -rf {} +

build() {  # $1: Dockerfile, $2: image, $3...: build args
  local t0=$(date +%s)
  docker_build -f "$repo/docker/$1" --build-arg "PYTHON_IMAGE=$base" "${@:3}" -t "$2" "$context"
  log "$2: $(docker image inspect "$2" --format '{{.Size}}' | numfmt --to=iec), built in $(( $(date +%s) - t0 ))s"
}
build operator.Dockerfile "edgefleet/operator:$TAG"
# The dependency stage (torch: 4 GB, minutes to build) under its own name, keyed by what makes it, so
# `docker image prune` (which removes untagged stages) keeps it and a rebuild of our code is quick.
# The key reads the agent's lock, as the stage does (not pyproject.toml's lint settings).
deps_key=$(cat "$repo/docker/agent-cpu.Dockerfile" "$repo/docker/locks/agent.txt" | { cat; echo "$base $TORCH_INDEX"; } | sha256sum | cut -c1-12)
deps="edgefleet-local/agent-cpu-deps:$deps_key"
build agent-cpu.Dockerfile "$deps" --target deps --build-arg "TORCH_INDEX=$TORCH_INDEX"
build agent-cpu.Dockerfile "edgefleet/agent-cpu:$TAG" --build-arg "TORCH_INDEX=$TORCH_INDEX"
# Each older dependency stage and each image a rebuild left untagged holds up to 5 GB: a few
# rebuilds would fill the disk (a kind node then fails to unpack the agent image).
for old in $(docker images edgefleet-local/agent-cpu-deps --format '{{.Repository}}:{{.Tag}}'); do
  [ "$old" = "$deps" ] || docker rmi "$old" >/dev/null
done
docker image prune -f >/dev/null
