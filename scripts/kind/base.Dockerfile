# kind's base image, made offline (scripts/kind/node-image.sh): kind v0.33.0's images/base with its
# files, on a Debian bookworm root filesystem made by debootstrap (systemd, iptables, conntrack,
# runc, ...), with containerd, crictl and the CNI plugins built from their Go modules. Built with
# the legacy builder (no BuildKit here): permissions are set by RUN, not COPY --chmod.
ARG ROOTFS_IMAGE=edgefleet-local/kind-base-rootfs:bookworm
FROM ${ROOTFS_IMAGE}
COPY files/ /
COPY bin/containerd bin/ctr bin/containerd-shim-runc-v2 bin/crictl bin/runc-capfilter /usr/local/bin/
COPY cni/ /opt/cni/bin/
RUN chmod 0755 /kind /kind/bin /kind/bin/* /usr/local/bin/* /opt/cni/bin/* \
    && find /lib/systemd/system/sysinit.target.wants/ -name "systemd-tmpfiles-setup.service" -delete \
    && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \
    && rm -f /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/basic.target.wants/* \
    && rm -f /lib/systemd/system/sockets.target.wants/*udev* /lib/systemd/system/sockets.target.wants/*initctl* \
    && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \
    && ln -sf /usr/lib/systemd/systemd /sbin/init \
    && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \
    && systemctl mask systemd-binfmt.service \
    && mkdir -p /etc/kubernetes/manifests \
    && ctr oci spec \
       | jq '.hooks.createContainer[.hooks.createContainer | length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \
       | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
