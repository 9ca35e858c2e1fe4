"""The objects the operator creates, as pure functions: EdgeNodes, node-agent Pods,
and the Service + EndpointSlice that lead in-cluster clients to a service's agents."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from edgefleet_api import names
from edgefleet_operator.settings import AgentPodSettings

Obj = Mapping[str, Any]
SERVICE_SUFFIX = "-v2"
"""In-cluster Service of an InferenceService: `<name>-v2` (the v2 inference protocol)."""
SLICE_MANAGER = f"{names.GROUP}-operator"
"""The endpointslice.kubernetes.io/managed-by value of the EndpointSlices this operator keeps."""


def owner_ref(obj: Obj, controller: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def edge_node(node: Obj) -> dict[str, Any]:
    """A new EdgeNode for a fleet Node, owned by it (deleting the Node deletes the EdgeNode)."""
    name = node["metadata"]["name"]
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.EDGE_NODE_KIND,
        "metadata": {
            "name": name,
            "labels": {names.LABEL_NODE: name, "app.kubernetes.io/managed-by": names.MANAGED_BY},
            "ownerReferences": [owner_ref({**node, "apiVersion": "v1", "kind": "Node"}, controller=False)],
        },
        "spec": {"nodeName": name, "gpuIndex": 0, "models": []},
    }


def agent_pod(edge_node_obj: Obj, settings: AgentPodSettings) -> dict[str, Any]:
    """The node-agent Pod for one EdgeNode, pinned to its node, owned by the EdgeNode.

    Pinned with required node affinity on metadata.name (as the DaemonSet controller does) so the
    scheduler still checks the GPU resource; restricted Pod Security settings but for the hostPath
    of its node disk (`_node_disk`), which needs the namespace at `privileged`; tolerates an
    unreachable node (`agent_tolerations`); liveness does not depend on model readiness.
    """
    node = edge_node_obj["spec"]["nodeName"]
    name = names.agent_name(node)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": {
                "app.kubernetes.io/name": names.AGENT_APP,
                "app.kubernetes.io/managed-by": names.MANAGED_BY,
                names.LABEL_NODE: node,
            },
            # The conventional scrape annotations (Prometheus' kubernetes_sd examples, most charts'
            # default scrape config); the chart's PodMonitor selects the same Pods by label.
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(settings.port),
                "prometheus.io/path": "/metrics",
            },
            "ownerReferences": [owner_ref(edge_node_obj)],
        },
        "spec": {
            "serviceAccountName": settings.service_account,
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
                        ]
                    }
                }
            },
            "tolerations": agent_tolerations(settings),
            **({"runtimeClassName": settings.runtime_class} if settings.runtime_class else {}),
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "fsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "agent",
                    "image": settings.image,
                    "args": [
                        "serve",
                        "--edge-node",
                        node,
                        "--port",
                        str(settings.port),
                        "--model-repository",
                        f"{AGENT_DISK}/models",
                        "--cache-budget",
                        settings.cache_budget,
                        *_optional_args(settings),
                    ],
                    "env": [
                        {"name": "EDGEFLEET_NODE_NAME", "value": node},
                        {
                            "name": "EDGEFLEET_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                        {
                            "name": "EDGEFLEET_POD_IP",
                            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                        },
                        *tuning_env(settings),
                    ],
                    "ports": _ports(settings),
                    "resources": {
                        "requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
                        "limits": {"memory": settings.memory_limit, settings.gpu_resource: "1"},
                    },
                    # torch imports and the first model load can take minutes on a Jetson: liveness
                    # starts counting only once the agent has answered once (5 min at most).
                    "startupProbe": _http_probe("/v2/health/live", 5, failures=60),
                    "livenessProbe": _http_probe("/v2/health/live", 10),
                    "readinessProbe": _http_probe("/v2/health/ready", 5),
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [
                        {"name": "models", "mountPath": AGENT_DISK},
                        {"name": "tmp", "mountPath": "/tmp"},
                    ],
                }
            ],
            **_node_disk(name, settings),
        },
    }


AGENT_DISK = "/var/lib/edgefleet"
"""Where the agent container sees its disk: the model repository (`models/`), and in it the node
cache (`models/.edgefleet/cache`) and the persisted assignment (`models/.edgefleet`): one
filesystem, so the repository's versions are hard links to the cache's blobs."""
NODE_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")


def agent_tolerations(settings: AgentPodSettings) -> list[dict[str, Any]]:
    """The chart's tolerations, then NoExecute ones for an unreachable or not-ready node (unless the
    chart names those keys itself): bounded by `unreachable_toleration_s`, else for as long as it
    takes, so a node cut off from the cloud keeps its agent Pod (and what it serves) instead of
    losing it to the default 300 s eviction when it reconnects."""
    out = [dict(t) for t in settings.tolerations]
    given = {t.get("key") for t in out}
    for key in NODE_TAINTS:
        if key in given:
            continue
        toleration: dict[str, Any] = {"key": key, "operator": "Exists", "effect": "NoExecute"}
        if settings.unreachable_toleration_s is not None:
            toleration["tolerationSeconds"] = settings.unreachable_toleration_s
        out.append(toleration)
    return out


def _node_disk(agent: str, settings: AgentPodSettings) -> dict[str, Any]:
    """The agent's disk: `<host_path>/<agent>` on the node (made the agent user's by an init
    container that runs as root and may only chown), or an emptyDir when `host_path` is empty."""
    tmp = {"name": "tmp", "emptyDir": {}}
    if not settings.host_path:
        return {"volumes": [{"name": "models", "emptyDir": {}}, tmp]}
    path = f"{settings.host_path.rstrip('/')}/{agent}"
    return {
        "initContainers": [
            {
                "name": "node-disk",
                "image": settings.image,
                "command": ["chown", "65532:65532", AGENT_DISK],
                "securityContext": {
                    "runAsUser": 0,
                    "runAsNonRoot": False,
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
                },
                "volumeMounts": [{"name": "models", "mountPath": AGENT_DISK}],
            }
        ],
        "volumes": [{"name": "models", "hostPath": {"path": path, "type": "DirectoryOrCreate"}}, tmp],
    }


def _ports(settings: AgentPodSettings) -> list[dict[str, Any]]:
    grpc = [{"name": "grpc", "containerPort": settings.grpc_port}] if settings.grpc_port else []
    return [{"name": "http", "containerPort": settings.port}, *grpc]


def _optional_args(settings: AgentPodSettings) -> list[str]:
    bandwidth = settings.download_bandwidth
    grpc = ["--grpc-port", str(settings.grpc_port)] if settings.grpc_port else []
    return (["--download-bandwidth", bandwidth] if bandwidth else []) + grpc


def tuning_env(settings: AgentPodSettings) -> list[dict[str, str]]:
    """The agent's thermal limits, pool workers and Lease renewal interval from the chart
    (`agent.thermal`, `agent.workers`, `agent.urgentWorkers`, `fleet.agentLeaseRenewSeconds`), when
    set."""
    values = (
        ("EDGEFLEET_THERMAL_SOFT_LIMIT_C", settings.thermal_soft_limit_c),
        ("EDGEFLEET_THERMAL_SOFT_MARGIN_C", settings.thermal_soft_margin_c),
        ("EDGEFLEET_WORKERS", settings.workers),
        ("EDGEFLEET_URGENT_WORKERS", settings.urgent_workers),
        ("EDGEFLEET_LINK_LEASE_RENEW_S", settings.lease_renew_s),
    )
    return [{"name": name, "value": f"{value:g}"} for name, value in values if value is not None]


def service_name(isvc_name: str) -> str:
    """A DNS label: `<name>-v2`, shortened with a hash when too long."""
    name = isvc_name + SERVICE_SUFFIX
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(isvc_name.encode()).hexdigest()[:8]
    return f"{isvc_name[: 63 - len(SERVICE_SUFFIX) - 9]}-{digest}{SERVICE_SUFFIX}"


def service_url(isvc: Obj) -> str:
    meta = isvc["metadata"]
    return f"http://{service_name(meta['name'])}.{meta['namespace']}.svc"


def service_ports(grpc_port: int = 0) -> list[dict[str, Any]]:
    """The Service's ports: `http` (80) and, when the agents serve gRPC, `grpc` (the agents' gRPC
    port, appProtocol grpc, so meshes and gateways speak HTTP/2 to it)."""
    http = {"name": "http", "port": 80, "targetPort": 8000, "protocol": "TCP"}
    if not grpc_port:
        return [http]
    grpc = {
        "name": "grpc",
        "port": grpc_port,
        "targetPort": grpc_port,
        "protocol": "TCP",
        "appProtocol": "grpc",
    }
    return [http, grpc]


def slice_ports(port: int, grpc_port: int = 0) -> list[dict[str, Any]]:
    """The EndpointSlice's ports, named as the Service's (a selector-less Service's port reaches
    the slice's port of the same name)."""
    http = {"name": "http", "port": port, "protocol": "TCP"}
    if not grpc_port:
        return [http]
    return [http, {"name": "grpc", "port": grpc_port, "protocol": "TCP", "appProtocol": "grpc"}]


def service(isvc: Obj, grpc_port: int = 0) -> dict[str, Any]:
    """A selector-less Service (agents live in the operator's namespace, so the operator keeps its
    EndpointSlice); PreferClose keeps traffic on the caller's node or zone where it can."""
    meta = isvc["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {
                "app.kubernetes.io/managed-by": names.MANAGED_BY,
                f"{names.GROUP}/inferenceservice": meta["name"],
            },
            "ownerReferences": [owner_ref(isvc)],
        },
        "spec": {
            "ports": service_ports(grpc_port),
            "trafficDistribution": "PreferClose",
        },
    }


def endpoint_slice(
    isvc: Obj,
    agents: Iterable[tuple[str, str, bool]],
    port: int,
    grpc_port: int = 0,
    name: str | None = None,
) -> dict[str, Any]:
    """An EndpointSlice of the service's Service (named `name`, the Service's by default): (node,
    pod IP, ready) per agent serving it."""
    meta = isvc["metadata"]
    svc = service_name(meta["name"])
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or svc,
            "namespace": meta["namespace"],
            "labels": {
                "kubernetes.io/service-name": svc,
                "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER,
            },
            "ownerReferences": [owner_ref(isvc)],
        },
        "addressType": "IPv4",
        "ports": slice_ports(port, grpc_port),
        "endpoints": [
            {"addresses": [ip], "nodeName": node, "conditions": {"ready": ready}}
            for node, ip, ready in sorted(agents)
        ],
    }


def _http_probe(path: str, period_s: int, failures: int = 3) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period_s,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }
