#!/usr/bin/env bash
# `make e2e-kind`: the end-to-end suite (tests/e2e/test_fleet_e2e.py) on a kind cluster, with the real
# images and real Pods, for hosts with Docker.
#
#   1. creates a kind cluster: a control plane and three workers (Kubernetes >= 1.30: the chart's
#      agent admission policy reads the node name from bound ServiceAccount tokens);
#   2. builds the operator and CPU agent images (docker/), and an e2e agent image on top with the
#      example models baked in (/opt/edgefleet/examples), and loads them into kind;
#   3. makes the workers a fleet: edgefleet.io/fleet=true, device classes jetson-orin x2 and
#      edge-server, zones, and one nvidia.com/gpu each (an advertised extended resource: kind has no
#      GPUs; the CPU agent image needs none);
#   4. runs the suite against the cluster: it installs the chart with helm (these images), applies
#      the examples, infers through port-forwards to the agent Pods, rolls canaries forward and back,
#      stops a worker's container (NotReady) and uninstalls;
#   5. deletes the cluster (KEEP_CLUSTER=1 keeps it; its kubeconfig is printed).
#
# Needs docker (a running daemon), kind, kubectl and helm on PATH, and the project's venv (make venv).
# Settings: EDGEFLEET_KIND_CLUSTER (cluster name, default edgefleet-e2e), EDGEFLEET_KIND_IMAGE (node
# image, default: kind's own), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail

cd "$(dirname "$0")/.."
fail() { echo "e2e-kind: $*" >&2; exit 2; }
need() { command -v "$1" >/dev/null 2>&1 || fail "'$1' is not on PATH: $2"; }

need docker "install Docker Engine (https://docs.docker.com/engine/install/)"
docker info >/dev/null 2>&1 || fail "docker is installed but its daemon does not answer ('docker info' failed)"
need kind "install kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
need kubectl "install kubectl (https://kubernetes.io/docs/tasks/tools/)"
need helm "install Helm 3 (https://helm.sh/docs/intro/install/)"
[[ -x .venv/bin/python ]] || fail "no .venv: run 'make venv' first"

CLUSTER=${EDGEFLEET_KIND_CLUSTER:-edgefleet-e2e}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/edgefleet-e2e-kind.XXXXXX")
KUBECONFIG_FILE="$WORK/kubeconfig"
k() { kubectl --kubeconfig "$KUBECONFIG_FILE" "$@"; }

cleanup() {
  local status=$?
  if [[ -n "${KEEP_CLUSTER:-}" ]]; then
    echo "e2e-kind: kept cluster $CLUSTER; kubeconfig $KUBECONFIG_FILE (kind delete cluster --name $CLUSTER)"
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    rm -rf "$WORK"
  fi
  exit "$status"
}
trap cleanup EXIT

kind get clusters 2>/dev/null | grep -qx "$CLUSTER" && fail "a kind cluster named $CLUSTER exists already; delete it or set EDGEFLEET_KIND_CLUSTER"

echo "== kind cluster $CLUSTER"
cat >"$WORK/kind.yaml" <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
  - role: worker
EOF
kind create cluster --name "$CLUSTER" --config "$WORK/kind.yaml" --kubeconfig "$KUBECONFIG_FILE" \
  --wait 300s ${EDGEFLEET_KIND_IMAGE:+--image "$EDGEFLEET_KIND_IMAGE"}

echo "== images"
# A build context with only what the Dockerfiles copy (the repository holds .venv and caches).
mkdir -p "$WORK/context"
cp -r pyproject.toml README.md edgefleet_api operator node_agent "$WORK/context/"
docker build -f docker/operator.Dockerfile -t edgefleet/operator:e2e "$WORK/context"
docker build -f docker/agent-cpu.Dockerfile -t edgefleet/agent-cpu:e2e "$WORK/context"
docker build -t edgefleet/agent:e2e - <<'EOF'
FROM edgefleet/agent-cpu:e2e
USER 0
RUN edgefleet-agent make-examples /opt/edgefleet/examples && chmod -R a+rX /opt/edgefleet/examples
USER 65532:65532
EOF
# The same models on this host: the suite reads their digests and computes reference outputs.
container=$(docker create edgefleet/agent:e2e)
docker cp "$container:/opt/edgefleet/examples" "$WORK/examples"
docker rm "$container" >/dev/null
kind load docker-image --name "$CLUSTER" edgefleet/operator:e2e edgefleet/agent:e2e

echo "== fleet nodes"
workers=()
while IFS= read -r node; do workers+=("$node"); done \
  < <(k get nodes -l '!node-role.kubernetes.io/control-plane' -o name | sed 's|^node/||' | sort)
[[ ${#workers[@]} -ge 3 ]] || fail "expected three kind workers, found: ${workers[*]:-none}"
classes=(jetson-orin jetson-orin edge-server)
zones=(zone-a zone-b zone-a)
for i in 0 1 2; do
  k label node "${workers[$i]}" edgefleet.io/fleet=true "edgefleet.io/device-class=${classes[$i]}" \
    "topology.kubernetes.io/zone=${zones[$i]}" --overwrite
  k patch node "${workers[$i]}" --subresource=status --type=json \
    -p '[{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "1"}]'
done

cat >"$WORK/values.yaml" <<'EOF'
operator:
  image: {repository: edgefleet/operator, tag: e2e, pullPolicy: Never}
agent:
  image: {repository: edgefleet/agent, tag: e2e}
EOF

echo "== the end-to-end suite"
EDGEFLEET_E2E_KUBECONFIG="$KUBECONFIG_FILE" \
EDGEFLEET_E2E_VALUES="$WORK/values.yaml" \
EDGEFLEET_E2E_EXAMPLES="$WORK/examples" \
EDGEFLEET_E2E_EXAMPLES_AT=/opt/edgefleet/examples \
EDGEFLEET_E2E_NODE_DOWN="docker stop {node}" \
  .venv/bin/python -m pytest tests/e2e/test_fleet_e2e.py -v -p no:cacheprovider ${PYTEST_ARGS:-}
