# Source this to use the local control plane from your shell:
#   source scripts/cluster-env.sh && kubectl get nodes
_edgefleet_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=k8s-versions.sh
source "$_edgefleet_repo/scripts/k8s-versions.sh"
export KUBECONFIG="${EDGEFLEET_CLUSTER_DIR:-$_edgefleet_repo/.cluster}/kubeconfig"
export PATH="$K8S_BIN:$PATH"
unset _edgefleet_repo
