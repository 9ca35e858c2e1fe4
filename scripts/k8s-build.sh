#!/usr/bin/env bash
# Build the local control plane's binaries from their Go modules, once per
# version, into $K8S_BIN (under the user's cache directory). Prints progress.
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
#   etcd, kwok, helm, promtool
# With --kind-node it also builds what kind's node image needs, into $KIND_BIN:
#   kubeadm, kubelet, kube-proxy, etcd (3.6), containerd (+ ctr, the runc shim),
#   crictl, CNI plugins, coredns, local-path-provisioner, pause (C), and kind itself.
# Re-running is cheap: a binary already present is skipped.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=k8s-versions.sh
source "$here/k8s-versions.sh"

export CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false"
mkdir -p "$K8S_BIN"
work="$EDGEFLEET_CACHE/build"
mkdir -p "$work"
start=$(date +%s)
log() { printf '[k8s-build %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
# go build -v names each package as it compiles; print every 100th so a long
# build shows it is alive without flooding the log.
buildlog="$work/build.log"; : > "$buildlog"
trap 'rc=$?; [ $rc -ne 0 ] && { echo "k8s-build FAILED; last lines of $buildlog:"; tail -40 "$buildlog"; }; exit $rc' EXIT
progress() { tee -a "$buildlog" | awk '/^go: downloading/ {next} {n++} n % 100 == 0 {printf "    ... %d packages (%s)\n", n, $0; fflush()} END {if (n) printf "    ... %d packages\n", n}'; }

need() { [ ! -x "$K8S_BIN/$1" ]; }

# --- Kubernetes: a wrapper module pinning the staging modules -------------
kube_cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
kind_node=false
[[ "${1:-}" == "--kind-node" ]] && { kind_node=true; kube_cmds+=(kubeadm kubelet kube-proxy); }
missing=()
for c in "${kube_cmds[@]}"; do need "$c" && missing+=("$c"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "Kubernetes $KUBE_VERSION: preparing wrapper module (first build takes a while)"
  mod="$work/kubernetes-$KUBE_VERSION"
  mkdir -p "$mod"
  gomod_path=$(cd "$mod" && GOFLAGS= go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  staging_minor="v0.${KUBE_VERSION#v1.}"
  python3 - "$gomod_path" "$KUBE_VERSION" "$staging_minor" "$mod/go.mod" <<'PY'
import re, sys
src, kube, staging, out = sys.argv[1:]
text = open(src).read()
go_line = re.search(r"^go (\S+)", text, re.M).group(1)
staging_mods = sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+) => \./staging/", text, re.M)))
godebug = re.findall(r"^godebug\s*\(.*?\)|^godebug [^\n(]+", text, re.M | re.S)
lines = ["module edgefleet.local/k8sbuild", "", f"go {go_line}", ""]
lines += godebug + [""]
lines.append(f"require k8s.io/kubernetes {kube}")
lines.append("")
lines.append("replace (")
lines += [f"\t{m} => {m} {staging}" for m in staging_mods]
lines.append(")")
open(out, "w").write("\n".join(lines) + "\n")
print(f"  {len(staging_mods)} staging modules pinned to {staging}")
PY
  minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for c in "${missing[@]}"; do
    log "building $c ..."
    (cd "$mod" && go build -v -trimpath -ldflags "$ldflags" -o "$K8S_BIN/$c.tmp" "k8s.io/kubernetes/cmd/$c" 2>&1) | progress
    mv "$K8S_BIN/$c.tmp" "$K8S_BIN/$c"
    log "built $c"
  done
fi

# --- etcd: a wrapper main calling etcdmain.Main ---------------------------
build_etcd() {  # $1: version, $2: output binary
  log "building etcd $1 ..."
  local mod="$work/etcd-$1"
  mkdir -p "$mod"
  cat > "$mod/go.mod" <<GOMOD
module edgefleet.local/etcdbuild

go 1.23

require go.etcd.io/etcd/server/v3 $1
GOMOD
  cat > "$mod/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$mod" && go build -v -trimpath -ldflags "-s -w" -o "$2.tmp" . 2>&1) | progress
  mv "$2.tmp" "$2"
  log "built etcd $1"
}
need etcd && build_etcd "$ETCD_VERSION" "$K8S_BIN/etcd"

# --- kwok and helm: plain go install --------------------------------------
if need kwok; then
  log "building kwok $KWOK_VERSION ..."
  GOBIN="$K8S_BIN" GOFLAGS=-buildvcs=false go install -v -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" 2>&1 | progress
  log "built kwok"
fi
if need helm; then
  log "building helm $HELM_VERSION ..."
  GOBIN="$K8S_BIN" GOFLAGS=-buildvcs=false go install -v -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" 2>&1 | progress
  log "built helm"
fi
if need promtool; then  # checks the chart's Prometheus rules (tests/delivery/test_monitoring.py)
  log "building promtool (prometheus $PROMTOOL_VERSION) ..."
  GOBIN="$K8S_BIN" GOFLAGS=-buildvcs=false go install -v -trimpath -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_VERSION" 2>&1 | progress
  log "built promtool"
fi
log "all binaries in $K8S_BIN"
ls -1 "$K8S_BIN"
$kind_node || exit 0

# --- kind's node image: its own binaries, in $KIND_BIN ----------------------
mkdir -p "$KIND_BIN"
have() { [ -x "$KIND_BIN/$1" ]; }
go_install() {  # $1: binary name, $2: package@version, $3...: extra go flags
  have "$1" && return 0
  log "building $1 ($2) ..."
  local tmp="$work/gobin-$1"
  mkdir -p "$tmp"
  GOBIN="$tmp" go install -v -trimpath -ldflags "-s -w" "${@:3}" "$2" 2>&1 | progress
  mv "$tmp/$(basename "${2%@*}")" "$KIND_BIN/$1"
  log "built $1"
}
for c in kubeadm kubelet kube-proxy; do ln -sf "$K8S_BIN/$c" "$KIND_BIN/$c"; done
have etcd || build_etcd "$NODE_ETCD_VERSION" "$KIND_BIN/etcd"
go_install kind "sigs.k8s.io/kind@$KIND_VERSION"
go_install containerd "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" -tags no_btrfs
go_install ctr "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION" -tags no_btrfs
go_install containerd-shim-runc-v2 "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" -tags no_btrfs
go_install crictl "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
for plugin in main/ptp main/bridge main/loopback ipam/host-local meta/portmap; do
  go_install "cni-$(basename "$plugin")" "github.com/containernetworking/plugins/plugins/$plugin@$CNI_PLUGINS_VERSION"
done
go_install coredns "github.com/coredns/coredns@$COREDNS_SRC_VERSION"
go_install local-path-provisioner "github.com/rancher/local-path-provisioner@$LOCAL_PATH_VERSION"
if ! have pause; then
  log "building pause (C, from the Kubernetes module's build/pause/linux/pause.c)"
  src="$(cd "$work/kubernetes-$KUBE_VERSION" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
  gcc -Os -Wall -Werror -static -DVERSION="edgefleet" -o "$KIND_BIN/pause" "$src"
  log "built pause"
fi
log "kind node binaries in $KIND_BIN"
ls -1 "$KIND_BIN"
