#!/usr/bin/env bash
# Stops the dockerd that scripts/kind/docker-up.sh started (by its PID), and nothing else.
set -euo pipefail
state=${EDGEFLEET_DOCKER_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgefleet/dockerd}
marker="$state/started-by-edgefleet"
[[ -f "$marker" ]] || { echo "[docker-down] no dockerd of ours to stop"; exit 0; }
pid=$(cat "$marker")
if kill -0 "$pid" 2>/dev/null; then
  kill "$pid"
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  echo "[docker-down] stopped dockerd (pid $pid)"
fi
rm -f "$marker"
