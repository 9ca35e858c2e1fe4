# Versions of the local control plane's components; sourced by the scripts.
# Bumping a version builds a new, separately cached set of binaries.
KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.5.21}"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"
HELM_VERSION="${HELM_VERSION:-v3.16.4}"
EDGEFLEET_CACHE="${EDGEFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgefleet}"
K8S_BIN="${K8S_BIN:-$EDGEFLEET_CACHE/k8s-${KUBE_VERSION}-etcd-${ETCD_VERSION}-kwok-${KWOK_VERSION}/bin}"
