#!/usr/bin/env bash
# `make e2e-kind`: the end-to-end suite (tests/e2e/test_fleet_e2e.py) on a kind cluster, with the real
# images and real Pods.
#
#   1. creates a kind cluster: a control plane and three workers (Kubernetes >= 1.30: the chart's
#      agent admission policy reads the node name from bound ServiceAccount tokens);
#   2. builds the operator and CPU agent images (scripts/images.sh: docker/), and an e2e agent image
#      on top with the example models baked in (/opt/edgefleet/examples), and loads them into kind;
#   3. makes the workers a fleet: edgefleet.io/fleet=true, device classes jetson-orin x2 and
#      edge-server, zones, and one nvidia.com/gpu each with the labels GPU feature discovery would
#      set (an advertised extended resource: kind has no GPUs; the CPU agent image needs none);
#   4. runs the suite against the cluster: it installs the chart with helm (these images), applies
#      the examples, infers through port-forwards to the agent Pods, rolls canaries forward and back,
#      stops a worker's container (NotReady) and uninstalls; then tests/e2e/kind_node_reboot.py: a
#      worker whose agent is a static Pod (`edgefleet-agent install --static-pod`) and one with the
#      operator's agent Pod reboot (`docker restart`) while the API server is stopped; the static
#      agent serves from its node cache, and the fleet converges with no model moved once it is back;
#   5. deletes the cluster (KEEP_CLUSTER=1 keeps it; its kubeconfig is printed).
#
# With Docker and registry access (a user's machine) it uses kind's own node image and default CNI.
# Without registry access (this project's sandboxes) everything is made here: the node image by
# scripts/kind/node-image.sh, the cluster without kind's CNI (its image cannot be built here), each
# node's Pod network a static ptp/host-local configuration with routes to the other nodes' Pod
# ranges, and, where no Docker daemon answers, Debian's docker.io started by
# scripts/kind/docker-up.sh (and stopped at the end).
#
# Needs the project's venv (make venv). kind, kubectl and helm from PATH, else the ones
# scripts/k8s-build.sh builds (`make binaries`; kind with --kind-node). Settings:
# EDGEFLEET_KIND_CLUSTER (cluster name, default edgefleet-e2e), EDGEFLEET_KIND_IMAGE (node image;
# default: kind's own, or the offline build without registry access), EDGEFLEET_KIND_OFFLINE (1 or
# 0: force either way), EDGEFLEET_E2E_TESTS (the test files or ids to run; default both suites),
# PYTEST_ARGS (extra pytest arguments).
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD
# shellcheck source=k8s-versions.sh
source scripts/k8s-versions.sh
# shellcheck source=kind/docker-build.sh
source scripts/kind/docker-build.sh
start=$(date +%s)
log() { printf '== [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
fail() { echo "e2e-kind: $*" >&2; exit 2; }
[[ -x .venv/bin/python ]] || fail "no .venv: run 'make venv' first"

if [[ -z "${EDGEFLEET_KIND_OFFLINE:-}" ]]; then
  # Docker Hub answers 401 to an anonymous /v2/ when it is reachable.
  if curl -s -o /dev/null --max-time 5 https://registry-1.docker.io/v2/; then EDGEFLEET_KIND_OFFLINE=0; else EDGEFLEET_KIND_OFFLINE=1; fi
fi
offline=$EDGEFLEET_KIND_OFFLINE

started_docker=false
if ! docker info >/dev/null 2>&1; then
  [[ $offline == 1 ]] || fail "docker is not running: start Docker (https://docs.docker.com/engine/install/)"
  bash scripts/kind/docker-up.sh
  started_docker=true
fi
tool() {  # $1: name, $2: where our build puts it
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"
  elif [[ -x "$2/$1" ]]; then echo "$2/$1"
  else return 1; fi
}
if ! KUBECTL=$(tool kubectl "$K8S_BIN") || ! HELM=$(tool helm "$K8S_BIN"); then
  bash scripts/k8s-build.sh
  KUBECTL=$(tool kubectl "$K8S_BIN"); HELM=$(tool helm "$K8S_BIN")
fi
if [[ $offline == 1 && -z "${EDGEFLEET_KIND_IMAGE:-}" ]]; then
  log "node image (offline build: scripts/kind/node-image.sh)"
  EDGEFLEET_KIND_IMAGE=$(bash scripts/kind/node-image.sh)
fi
KIND=$(tool kind "$KIND_BIN") || { bash scripts/k8s-build.sh --kind-node; KIND="$KIND_BIN/kind"; }
export PATH="$(dirname "$KUBECTL"):$(dirname "$HELM"):$PATH"

CLUSTER=${EDGEFLEET_KIND_CLUSTER:-edgefleet-e2e}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/edgefleet-e2e-kind.XXXXXX")
KUBECONFIG_FILE="$WORK/kubeconfig"
k() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

cleanup() {
  local status=$?
  if [[ -s "$WORK/timings.json" ]]; then
    log "measured by the suite (seconds):"
    "$repo/.venv/bin/python" -c 'import json, sys; [print(f"   {v:7.1f}  {k}") for k, v in json.load(open(sys.argv[1])).items()]' "$WORK/timings.json"
  fi
  if [[ -n "${KEEP_CLUSTER:-}" ]]; then
    echo "e2e-kind: kept cluster $CLUSTER; kubeconfig $KUBECONFIG_FILE ($KIND delete cluster --name $CLUSTER)"
  else
    "$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    rm -rf "$WORK"
    $started_docker && bash scripts/kind/docker-down.sh
  fi
  log "done (exit $status)"
  exit "$status"
}
trap cleanup EXIT

"$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER" &&
  fail "a kind cluster named $CLUSTER exists already; delete it or set EDGEFLEET_KIND_CLUSTER"

log "kind cluster $CLUSTER (node image: ${EDGEFLEET_KIND_IMAGE:-the kind default})"
cat >"$WORK/kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: $([[ $offline == 1 ]] && echo true || echo false)
nodes:
  - role: control-plane
  - role: worker
  - role: worker
  - role: worker
EOF
# Offline, nodes stay NotReady until their Pod network is configured below: no --wait here.
"$KIND" create cluster --name "$CLUSTER" --config "$WORK/kind.yaml" --kubeconfig "$KUBECONFIG_FILE" \
  $([[ $offline == 1 ]] || echo --wait 300s) ${EDGEFLEET_KIND_IMAGE:+--image "$EDGEFLEET_KIND_IMAGE"}

if [[ $offline == 1 ]]; then
  log "Pod network: each node's Pod range on ptp/host-local, routes to the others'"
  nodes=()
  while IFS= read -r node; do nodes+=("$node"); done < <(k get nodes -o name | sed 's|^node/||' | sort)
  declare -A cidr ip
  for n in "${nodes[@]}"; do
    cidr[$n]=$(k get node "$n" -o jsonpath='{.spec.podCIDR}')
    ip[$n]=$(k get node "$n" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
  done
  for n in "${nodes[@]}"; do
    docker exec -i "$n" sh -c 'mkdir -p /etc/cni/net.d && cat > /etc/cni/net.d/10-edgefleet.conflist' <<EOF
{"cniVersion": "1.0.0", "name": "edgefleet", "plugins": [
  {"type": "ptp", "ipMasq": true, "mtu": 1500,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "${cidr[$n]}"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
    for other in "${nodes[@]}"; do
      [[ $other == "$n" ]] || docker exec "$n" ip route replace "${cidr[$other]}" via "${ip[$other]}"
    done
  done
  k wait --for=condition=Ready node --all --timeout=300s
fi

log "images (scripts/images.sh)"
EDGEFLEET_IMAGE_TAG=e2e bash scripts/images.sh
docker_build -t edgefleet/agent:e2e - <<'EOF'
FROM edgefleet/agent-cpu:e2e
USER 0
RUN edgefleet-agent make-examples /opt/edgefleet/examples && chmod -R a+rX /opt/edgefleet/examples
USER 65532:65532
EOF
# The same models on this host: the suite reads their digests and computes reference outputs.
container=$(docker create edgefleet/agent:e2e)
docker cp "$container:/opt/edgefleet/examples" "$WORK/examples"
docker rm "$container" >/dev/null
workers=()
while IFS= read -r node; do workers+=("$node"); done \
  < <(k get nodes -l '!node-role.kubernetes.io/control-plane' -o name | sed 's|^node/||' | sort)
[[ ${#workers[@]} -ge 3 ]] || fail "expected three kind workers, found: ${workers[*]:-none}"
# The operator runs on the control plane (a server node, as the chart's values suggest), so the
# worker the suite stops is never the operator's; the agent image (torch) goes to the workers only.
log "loading the images into the nodes"
# As `kind load docker-image` does, but streamed (no archive on disk), one `docker save` read by all
# the nodes at once, and keeping only the unpacked layers in each node: kind's keeps the archive's
# layers too, twice the disk for a 5 GB image.
load() {  # $1: image, $2...: nodes
  local image=$1 node fifos=() pids=() failed=0 t0=$SECONDS
  local dir
  dir=$(mktemp -d)
  for node in "${@:2}"; do
    mkfifo "$dir/$node"
    docker exec -i "$node" ctr --namespace=k8s.io images import --all-platforms --local \
      --snapshotter=overlayfs --discard-unpacked-layers - <"$dir/$node" >/dev/null \
      2> >(grep -v "support for cgroup v1 is deprecated" >&2) &
    pids+=($!) fifos+=("$dir/$node")
  done
  docker save "$image" | tee "${fifos[@]}" >/dev/null || failed=1
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  rm -rf "$dir"
  [[ $failed == 0 ]] || fail "loading $image into ${*:2} failed"
  log "  $image on ${*:2} ($(( SECONDS - t0 ))s)"
}
load edgefleet/operator:e2e "$CLUSTER-control-plane"
load edgefleet/agent:e2e "${workers[@]}"

log "fleet nodes"
classes=(jetson-orin jetson-orin edge-server)
zones=(zone-a zone-b zone-a)
for i in 0 1 2; do
  # Our labels and the ones GPU feature discovery would set (product, memory), as e2e/fleet.py's
  # simulated nodes have them: the operator places by that memory until an agent measures it.
  # shellcheck disable=SC2046
  k label node "${workers[$i]}" $("$repo/.venv/bin/python" -m e2e.fleet labels "${classes[$i]}") \
    "topology.kubernetes.io/zone=${zones[$i]}" --overwrite
  k patch node "${workers[$i]}" --subresource=status --type=json \
    -p '[{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "1"}]'
done

cat >"$WORK/values.yaml" <<'EOF'
operator:
  image: {repository: edgefleet/operator, tag: e2e, pullPolicy: Never}
  nodeSelector: {node-role.kubernetes.io/control-plane: ""}
  tolerations: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]
agent:
  image: {repository: edgefleet/agent, tag: e2e}
EOF

log "the end-to-end suite"
EDGEFLEET_E2E_KUBECONFIG="$KUBECONFIG_FILE" \
EDGEFLEET_E2E_VALUES="$WORK/values.yaml" \
EDGEFLEET_E2E_EXAMPLES="$WORK/examples" \
EDGEFLEET_E2E_EXAMPLES_AT=/opt/edgefleet/examples \
EDGEFLEET_E2E_NODE_DOWN="docker stop {node}" \
EDGEFLEET_E2E_TIMINGS="$WORK/timings.json" \
  "$repo/.venv/bin/python" -m pytest ${EDGEFLEET_E2E_TESTS:-tests/e2e/test_fleet_e2e.py tests/e2e/kind_node_reboot.py} \
  -v -p no:cacheprovider ${PYTEST_ARGS:-}
