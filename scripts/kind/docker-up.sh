#!/usr/bin/env bash
# A Docker daemon for `make images` / `make e2e-kind`. A daemon that answers (`docker info`) is used
# as it is. On a machine without one (this project's sandboxes: Debian, root, no daemon running),
# it installs Debian's docker.io (with iptables and jq) and starts dockerd itself, recording its PID
# in $EDGEFLEET_DOCKER_STATE/started-by-edgefleet so that scripts/kind/docker-down.sh stops exactly it.
# Where the capability bounding set lacks capabilities (privileged containers then fail with
# "unable to apply caps"), dockerd runs every container through scripts/kind/runc-capfilter.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state=${EDGEFLEET_DOCKER_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgefleet/dockerd}
log() { echo "[docker-up] $*"; }

if docker info >/dev/null 2>&1; then
  log "using the Docker daemon that answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
  exit 0
fi
if ! command -v dockerd >/dev/null 2>&1 || ! command -v jq >/dev/null 2>&1 || ! command -v iptables >/dev/null 2>&1; then
  [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1 ||
    { echo "docker-up: no Docker daemon answers and this is no Debian root to install one; start Docker first" >&2; exit 2; }
  log "installing Debian's docker.io, iptables and jq (this machine has no Docker daemon)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io iptables jq >/dev/null
fi
mkdir -p "$state"
args=(--pidfile "$state/dockerd.pid" --host unix:///var/run/docker.sock)
full=$(( (1 << 41) - 1 ))
bounding=$((16#$(awk '/^CapBnd:/ {print $2}' /proc/self/status)))
if (( (bounding & full) != full )); then
  log "the capability bounding set lacks some capabilities: containers run through runc-capfilter"
  args+=(--add-runtime "capfilter=$here/runc-capfilter" --default-runtime capfilter)
fi
log "starting dockerd (log: $state/dockerd.log)"
nohup dockerd "${args[@]}" >"$state/dockerd.log" 2>&1 &
echo $! >"$state/started-by-edgefleet"
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && { log "dockerd is up (pid $(cat "$state/started-by-edgefleet"))"; exit 0; }
  sleep 1
done
echo "docker-up: dockerd did not answer within 60 s; see $state/dockerd.log" >&2
exit 1
