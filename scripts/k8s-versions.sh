# Versions of the local control plane's components; sourced by the scripts.
# Bumping a version builds a new, separately cached set of binaries.
KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.5.21}"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"
HELM_VERSION="${HELM_VERSION:-v3.16.4}"
PROMTOOL_VERSION="${PROMTOOL_VERSION:-v0.316.0}"           # the github.com/prometheus/prometheus module
EDGEFLEET_CACHE="${EDGEFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgefleet}"
K8S_BIN="${K8S_BIN:-$EDGEFLEET_CACHE/k8s-${KUBE_VERSION}-etcd-${ETCD_VERSION}-kwok-${KWOK_VERSION}/bin}"

# kind's node image, built offline by scripts/kind/node-image.sh (`make e2e-kind` on machines that
# reach no image registry). The image references are the ones kind $KIND_VERSION and kubeadm
# $KUBE_VERSION look for; the sources are the Go modules and C source named here.
KIND_VERSION="${KIND_VERSION:-v0.33.0}"
NODE_ETCD_VERSION="${NODE_ETCD_VERSION:-v3.6.5}"          # registry.k8s.io/etcd:3.6.5-0
CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.4.2}"
CRICTL_VERSION="${CRICTL_VERSION:-v1.34.0}"
CNI_PLUGINS_VERSION="${CNI_PLUGINS_VERSION:-v1.7.1}"
COREDNS_SRC_VERSION="${COREDNS_SRC_VERSION:-v1.14.7}"     # tagged as kubeadm's coredns reference
LOCAL_PATH_VERSION="${LOCAL_PATH_VERSION:-v0.0.30}"
KIND_BIN="${KIND_BIN:-$EDGEFLEET_CACHE/kind-node-${KUBE_VERSION}-kind-${KIND_VERSION}-containerd-${CONTAINERD_VERSION}/bin}"
