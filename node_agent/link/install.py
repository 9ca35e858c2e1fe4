"""The agent run by the node itself, not by the operator: the files `edgefleet-agent install` writes
(pure text; the command writes them). A node that reboots while cut off from the cloud starts no
Pod the API server has not seen (the kubelet needs it to start a normal Pod), but it starts its
systemd units and its static Pods: the agent comes back and serves its persisted assignment from
its node cache, then reconciles when the API server is back.

- systemd (`systemd_unit`): `edgefleet-agent.service`, Restart=always, the node disk in
  /var/lib/edgefleet/<agent name> (the same layout as the agent Pod's hostPath);
- static Pod (`static_pod`): a manifest for the kubelet's staticPodPath, hostNetwork (the node's
  address and a fixed port), the node disk and the kubeconfig as hostPaths. The kubelet
  refuses static Pods that name a ServiceAccount, so the agent authenticates with a kubeconfig
  from the node's disk.

Either way, label the Node `edgefleet.io/agent-managed-by=systemd` (or `static-pod`), or install
the chart with `agents.external=true`: the operator then creates no agent Pod there.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath

from edgefleet_api import names

AGENT_DISK_ROOT = "/var/lib/edgefleet"
"""The node disk's root, as the chart's `agent.nodeCache.hostPath` default."""
SYSTEMD_UNIT = "edgefleet-agent.service"
STATIC_POD = "edgefleet-agent.yaml"


@dataclass(frozen=True, slots=True)
class InstallSettings:
    """What an installed agent runs with. The node disk is `<disk_root>/<agent name>`."""

    edge_node: str
    kubeconfig: str = "/etc/edgefleet/kubeconfig"
    """A kubeconfig for the agent's ServiceAccount (a token bound to the Node, see docs)."""
    namespace: str = "edgefleet-agents"
    """Namespace of the agent's Lease (the chart's agent namespace)."""
    port: int = 8000
    device: str = "cuda"
    cache_budget: str = "10Gi"
    endpoint: str | None = None
    """This agent's URL in EdgeNode.status (the Service routes to its address); None: the static
    Pod's own address (hostNetwork), or none for a systemd unit."""
    disk_root: str = AGENT_DISK_ROOT
    executable: str = "/usr/local/bin/edgefleet-agent"
    image: str = "ghcr.io/edgefleet/agent:0.1.0"
    user: str = "edgefleet"
    """The systemd unit's user (systemd creates its state folder for it)."""

    def __post_init__(self) -> None:
        if not self.edge_node:
            raise ValueError("an edge node name is required")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        for path in (self.kubeconfig, self.disk_root, self.executable):
            if not PurePosixPath(path).is_absolute():
                raise ValueError(f"{path!r} must be an absolute path")

    @property
    def agent(self) -> str:
        return names.agent_name(self.edge_node)

    @property
    def disk(self) -> str:
        return f"{self.disk_root.rstrip('/')}/{self.agent}"

    def serve_args(self, disk: str) -> list[str]:
        """`serve` arguments, with the node disk seen at `disk`."""
        args = [
            "serve", "--edge-node", self.edge_node, "--kubeconfig", self.kubeconfig,
            "--namespace", self.namespace, "--model-repository", f"{disk}/models",
            "--cache-budget", self.cache_budget, "--port", str(self.port), "--device", self.device,
        ]  # fmt: skip
        if self.endpoint:
            args += ["--endpoint", self.endpoint]
        return args


def systemd_unit(s: InstallSettings) -> str:
    """`edgefleet-agent.service`: restarted whatever its exit (Restart=always), started at boot
    whether the network or the API server is there or not (the agent serves its persisted
    assignment from the node cache until the API server answers)."""
    command = shlex.join([s.executable, *s.serve_args(s.disk)])
    return f"""\
# edgefleet node agent for EdgeNode {s.edge_node}, written by `edgefleet-agent install --systemd`.
# Serves its last persisted assignment from the node cache in {s.disk} while the API server is
# out of reach (after a reboot with no cloud too), and reconciles when it is back.
[Unit]
Description=edgefleet node agent (EdgeNode {s.edge_node})
Documentation=https://github.com/edgefleet/edgefleet/blob/main/docs/edge_autonomy.md
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
User={s.user}
Group={s.user}
SupplementaryGroups=video
StateDirectory=edgefleet/{s.agent}
StateDirectoryMode=0750
Environment=EDGEFLEET_NODE_NAME={s.edge_node}
ExecStart={command}
Restart=always
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec=30
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths={s.disk}

[Install]
WantedBy=multi-user.target
"""


def static_pod(s: InstallSettings) -> str:
    """A static Pod manifest (JSON, which is YAML) for the kubelet's staticPodPath."""
    disk = "/var/lib/edgefleet"
    kubeconfig_dir = str(PurePosixPath(s.kubeconfig).parent)
    container = {
        "name": "agent",
        "image": s.image,
        "args": s.serve_args(disk),
        "env": [
            {"name": "EDGEFLEET_NODE_NAME", "value": s.edge_node},
            {"name": "EDGEFLEET_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "ports": [{"name": "http", "containerPort": s.port, "hostPort": s.port}],
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": s.port},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", "port": s.port},
            "periodSeconds": 5,
            "failureThreshold": 60,
        },
        "securityContext": {
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "node-disk", "mountPath": disk},
            {"name": "kubeconfig", "mountPath": kubeconfig_dir, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": s.agent,
            "namespace": s.namespace,
            "labels": {
                "app.kubernetes.io/name": f"{names.AGENT_APP}-static",
                names.LABEL_NODE: s.edge_node,
                names.LABEL_AGENT_MANAGED_BY: "static-pod",
            },
        },
        "spec": {
            "hostNetwork": True,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "restartPolicy": "Always",
            "securityContext": {"fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [
                {
                    "name": "node-disk",
                    "image": s.image,
                    "command": ["chown", "65532:65532", disk],
                    "securityContext": {
                        "runAsUser": 0,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
                    },
                    "volumeMounts": [{"name": "node-disk", "mountPath": disk}],
                }
            ],
            "containers": [container],
            "volumes": [
                {"name": "node-disk", "hostPath": {"path": s.disk, "type": "DirectoryOrCreate"}},
                {"name": "kubeconfig", "hostPath": {"path": kubeconfig_dir, "type": "Directory"}},
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    }
    return json.dumps(pod, indent=2) + "\n"
