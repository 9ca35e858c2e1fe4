#!/usr/bin/env bash
# kind's node image, made offline: for machines that reach no image registry (this project's
# sandboxes), every piece comes from Debian packages (debootstrap), Go modules and C source:
#
#   scripts/k8s-build.sh --kind-node   kubeadm, kubelet, kube-proxy (+ the control plane's
#                                      binaries), etcd 3.6, containerd 2, crictl, CNI plugins,
#                                      coredns, local-path-provisioner, pause (C) and kind
#   debootstrap bookworm               the root filesystems of kind's base image and of the
#                                      Kubernetes component images
#   scripts/kind/base.Dockerfile       kind's base image (kind v0.33.0's files, systemd, containerd)
#   kind build node-image --type file  the node image, from a kubernetes-server-like tarball whose
#                                      image archives hold every image kind and kubeadm look for,
#                                      tagged with the exact references they expect
#
# Prints the image's name. A second run with nothing changed takes seconds: the image carries the
# content key of its inputs (the versions, these scripts) and is rebuilt only when it changes.
# Hosts with registry access need none of this: `make e2e-kind` uses kind's own image there.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=../k8s-versions.sh
source "$repo/scripts/k8s-versions.sh"
IMAGE=${EDGEFLEET_KIND_NODE_IMAGE:-edgefleet-local/kind-node:$KUBE_VERSION}
MIRROR=${EDGEFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
start=$(date +%s)
log() { printf '[node-image %4ss] %s\n' "$(( $(date +%s) - start ))" "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=docker-build.sh
source "$here/docker-build.sh"

key=$(cat "$repo/scripts/k8s-versions.sh" "$repo/scripts/k8s-build.sh" "$here/node-image.sh" \
  "$here/base.Dockerfile" "$here/runc-capfilter" | sha256sum | cut -c1-16)
if [[ "$(docker image inspect "$IMAGE" --format '{{index .Config.Labels "io.edgefleet.build-key"}}' 2>/dev/null)" == "$key" ]]; then
  log "$IMAGE is up to date (key $key)"
  echo "$IMAGE"
  exit 0
fi

log "binaries (scripts/k8s-build.sh --kind-node)"
bash "$repo/scripts/k8s-build.sh" --kind-node >&2
work="$EDGEFLEET_CACHE/kind-node-work"
rm -rf "$work" && mkdir -p "$work"

# A root filesystem from debootstrap, imported as an image; cached by its package list.
rootfs_image() {  # $1: image name, $2: comma-separated packages
  local tag
  tag="$1:$(echo "$2 $MIRROR" | sha256sum | cut -c1-12)"
  if ! docker image inspect "$tag" >/dev/null 2>&1; then
    log "debootstrap bookworm for $1 ($2)"
    local dir="$work/rootfs-$(basename "$1")"
    mkdir -p "$dir"
    debootstrap --variant=minbase --include="$2" bookworm "$dir" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
      { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    # This machine's trust store (a local mirror's certificate authority included).
    cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* "$dir"/usr/share/man/*
    tar -C "$dir" -c . | docker import - "$tag" >/dev/null
    rm -rf "$dir"
  fi
  echo "$tag"
}

command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
base_rootfs=$(rootfs_image edgefleet-local/kind-base-rootfs \
  systemd,systemd-sysv,dbus,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,bash,ca-certificates,curl,jq,procps,runc)
component_rootfs=$(rootfs_image edgefleet-local/kube-component-rootfs iptables,conntrack,ca-certificates,kmod)

log "kind's base image"
kind_src="$(cd "$EDGEFLEET_CACHE/build" && GOFLAGS= go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')/images/base"
ctx="$work/base-context"
mkdir -p "$ctx/bin" "$ctx/cni"
cp -r "$kind_src/files" "$ctx/files"
chmod -R u+w "$ctx/files"
# Privileged Pods (kube-proxy) meet the same missing capabilities as kind's nodes: containerd runs
# runc through the same filter (a no-op where nothing is missing).
# Without CAP_SYS_RESOURCE no process may lower its oom_score_adj, and runc fails every sandbox
# ("failed to update /proc/self/oom_score_adj: Permission denied", seen as "can't get final child's
# PID from pipe: EOF"): containerd then clamps each container's score to its own, as for rootless.
sed -i -e 's|^\(\s*\)SystemdCgroup = true|&\n\1BinaryName = "/usr/local/bin/runc-capfilter"|' \
  -e 's|restrict_oom_score_adj = false|restrict_oom_score_adj = true|' "$ctx/files/etc/containerd/config.toml"
grep -q 'restrict_oom_score_adj = true' "$ctx/files/etc/containerd/config.toml" ||
  die "kind's containerd config changed: restrict_oom_score_adj not found"
for b in containerd ctr containerd-shim-runc-v2 crictl; do cp "$KIND_BIN/$b" "$ctx/bin/"; done
cp "$here/runc-capfilter" "$ctx/bin/"
for p in ptp bridge loopback host-local portmap; do cp "$KIND_BIN/cni-$p" "$ctx/cni/$p"; done
base_image="edgefleet-local/kind-base:$key"
docker_build -f "$here/base.Dockerfile" --build-arg "ROOTFS_IMAGE=$base_rootfs" -t "$base_image" "$ctx"

log "component images, tagged as kubeadm and kind look for them"
kube_ver=$KUBE_VERSION
images_of() { "$K8S_BIN/kubeadm" config images list --kubernetes-version "$kube_ver" 2>/dev/null; }
etcd_ref=$(images_of | grep '/etcd:')
coredns_ref=$(images_of | grep '/coredns')
pause_ref=$(grep -h 'sandbox_image' "$kind_src/files/etc/containerd/config.toml" | sed 's/.*"\(.*\)".*/\1/')
const() { grep -h "const $1 " "$kind_src/../../pkg/build/nodeimage/"*.go | sed 's/.*"\(.*\)".*/\1/'; }
kindnetd_ref=$(const kindnetdImage)
provisioner_ref=$(const storageProvisionerImage)
helper_ref=$(const storageHelperImage)

component() {  # $1: image reference, $2: binary (from K8S_BIN or KIND_BIN), $3: path in the image, [$4: entrypoint]
  local c="$work/img-$(basename "${1%%:*}")"
  mkdir -p "$c"
  cp -L "$2" "$c/bin"
  {
    echo "FROM $component_rootfs"
    echo "COPY bin $3"
    [[ -n "${4:-}" ]] && echo "ENTRYPOINT [\"$4\"]"
  } >"$c/Dockerfile"
  docker_build -t "$1" "$c"
}
for c in kube-apiserver kube-controller-manager kube-scheduler kube-proxy; do
  component "registry.k8s.io/$c:$kube_ver" "$K8S_BIN/$c" "/usr/local/bin/$c"
done
component "$etcd_ref" "$KIND_BIN/etcd" /usr/local/bin/etcd
component "$coredns_ref" "$KIND_BIN/coredns" /coredns /coredns
component "$provisioner_ref" "$KIND_BIN/local-path-provisioner" /usr/bin/local-path-provisioner
component "$helper_ref" /bin/true /usr/local/bin/true
# kindnetd never runs (the cluster config disables kind's CNI); kind's build wants its image.
component "$kindnetd_ref" /bin/true /usr/local/bin/true
pause_ctx="$work/img-pause"
mkdir -p "$pause_ctx" && cp "$KIND_BIN/pause" "$pause_ctx/pause"
printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' >"$pause_ctx/Dockerfile"
docker_build -t "$pause_ref" "$pause_ctx"

log "the Kubernetes tarball kind builds from"
tree="$work/tarball/kubernetes"
mkdir -p "$tree/server/bin"
echo "$kube_ver" >"$tree/version"
for b in kubeadm kubelet kubectl; do cp -L "$K8S_BIN/$b" "$tree/server/bin/"; done
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  docker save "registry.k8s.io/$c:$kube_ver" -o "$tree/server/bin/$c.tar"
done
# kind takes an archive's image names from whichever of `repositories` and `manifest.json` comes
# first, and from manifest.json only its first image: the archive that carries the extra images
# has its `repositories` file first.
extra="$work/extra"
mkdir -p "$extra"
docker save "registry.k8s.io/kube-proxy:$kube_ver" "$etcd_ref" "$coredns_ref" "$pause_ref" \
  "$kindnetd_ref" "$provisioner_ref" "$helper_ref" | tar -C "$extra" -x
# Docker writes Docker Hub names short (kindest/kindnetd); kind compares the names it requires
# (docker.io/kindest/kindnetd) as strings: the archive names them in full.
full='def full: if (split("/")[0] | test("[.:]|^localhost$")) then . else "docker.io/" + . end;'
jq -c "$full with_entries(.key |= full)" "$extra/repositories" >"$extra/repositories.new"
jq -c "$full map(.RepoTags |= map(full))" "$extra/manifest.json" >"$extra/manifest.json.new"
mv "$extra/repositories.new" "$extra/repositories" && mv "$extra/manifest.json.new" "$extra/manifest.json"
(cd "$extra" && tar -cf "$tree/server/bin/kube-proxy.tar" repositories manifest.json \
  $(ls -A | grep -vx -e repositories -e manifest.json))
tar -C "$work/tarball" -czf "$work/kubernetes-server-linux-amd64.tar.gz" kubernetes

log "kind build node-image"
# kind leaves the tarball's extracted copy in its temporary folder (1.2 GB each build): ours, removed.
mkdir -p "$work/tmp"
TMPDIR="$work/tmp" "$KIND_BIN/kind" build node-image --type file "$work/kubernetes-server-linux-amd64.tar.gz" \
  --base-image "$base_image" --image "$IMAGE.unlabelled" >&2
printf 'FROM %s\nLABEL io.edgefleet.build-key=%s\n' "$IMAGE.unlabelled" "$key" | docker_build -t "$IMAGE" -
docker rmi "$IMAGE.unlabelled" >/dev/null
rm -rf "$work"
log "built $IMAGE ($(docker image inspect "$IMAGE" --format '{{.Size}}' | numfmt --to=iec))"
echo "$IMAGE"
