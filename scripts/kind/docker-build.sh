# Sourced by the scripts that build images. `docker_build ARGS...` is `docker build -q ARGS...` that
# prints nothing unless the build fails (then all of its output). Debian's docker.io has no buildx:
# there the legacy builder is asked for by name (the Dockerfiles need no BuildKit feature).
# shellcheck shell=bash
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
docker_build() {
  local out
  out=$(docker build -q "$@" 2>&1) || { echo "$out" >&2; return 1; }
}
