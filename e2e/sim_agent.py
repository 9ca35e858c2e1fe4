"""A status-writing stand-in for node agents, for operator tests and fleet benchmarks.

It does what an agent does towards the API server and nothing else: reads its
EdgeNode's spec, reports every assigned model Ready with the spec's digest and a
measured size, reports GPU memory and temperature, renews its Lease. Tests steer
it per node (silent, hot, memory used by others, SLA windows). Real agents serve
real models; this one exists where a real agent adds nothing to what is tested.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from e2e.fleet import DEVICE_CLASSES
from edgefleet_operator import api


def micro_time(t: dt.datetime | None = None) -> str:
    return (t or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class SimNode:
    """How one simulated agent behaves."""

    name: str
    device_class: str = "jetson-orin"
    silent: bool = False
    """Stops renewing its Lease and writing status (an agent that crashed)."""
    temperature_c: float = 55.0
    soft_limit_c: float = 83.0
    throttled: bool = False
    other_used_bytes: int = 0
    """GPU memory used by something that is not one of our models."""
    model_bytes: int = 64 << 20
    """Measured size reported for every model."""
    sla_by_version: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Overrides of `sla` for one model version (a canary that errs or is slow)."""
    sla: dict[str, Any] = field(
        default_factory=lambda: {
            "p50LatencyMs": 4.0,
            "p95LatencyMs": 9.0,
            "p99LatencyMs": 14.0,
            "throughputRps": 50.0,
            "errorRate": 0.0,
            "requests": 3000,
            "windowSeconds": 60,
            "met": True,
        }
    )


class SimulatedAgents:
    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.custom: Any = client.CustomObjectsApi(api_client)
        self.coordination: Any = client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.nodes: dict[str, SimNode] = {}

    def add(self, node: SimNode) -> SimNode:
        self.nodes[node.name] = node
        return node

    def step(self) -> None:
        """One heartbeat of every non-silent simulated agent."""
        for node in self.nodes.values():
            if not node.silent:
                self.report(node)

    def report(self, node: SimNode) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            en = self.custom.get_cluster_custom_object(
                api.GROUP, api.VERSION, api.EDGE_NODE_PLURAL, node.name
            )
        except ApiException as e:
            if e.status == 404:
                return  # the operator has not created it yet
            raise
        models = en.get("spec", {}).get("models") or []
        total = DEVICE_CLASSES[node.device_class].gpu_memory_bytes
        ours = node.model_bytes * len(models)
        status = {
            "observedGeneration": en["metadata"].get("generation", 1),
            "heartbeatTime": micro_time().split(".")[0] + "Z",
            "agentVersion": "sim",
            "endpoint": f"http://{node.name}.sim:8000",
            "gpu": {
                "name": DEVICE_CLASSES[node.device_class].gpu_product,
                "memoryTotalBytes": total,
                "memoryUsedBytes": ours + node.other_used_bytes,
                "memoryFreeBytes": max(0, total - ours - node.other_used_bytes),
                "temperatureC": node.temperature_c,
                "softLimitC": node.soft_limit_c,
                "throttled": node.throttled,
            },
            "models": [
                {
                    "service": m["service"],
                    "model": m["model"],
                    "version": m["version"],
                    "digest": m["artifact"]["digest"],
                    "state": "Ready",
                    "memoryBytes": node.model_bytes,
                    "trafficWeight": m.get("trafficWeight", 100),
                    "sla": {**node.sla, **node.sla_by_version.get(str(m["version"]), {})},
                }
                for m in models
            ],
            "loadedModels": len(models),
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Serving",
                    "message": "",
                    "lastTransitionTime": micro_time().split(".")[0] + "Z",
                }
            ],
        }
        try:
            self.custom.patch_cluster_custom_object_status(
                api.GROUP, api.VERSION, api.EDGE_NODE_PLURAL, node.name, {"status": status}
            )
        except ApiException as e:
            if e.status == 404:
                return  # deleted under us (its Node went)
            raise
        self.renew_lease(node.name)

    def renew_lease(self, node: str) -> None:
        from kubernetes.client.exceptions import ApiException

        name = api.agent_name(node)
        body = {
            "metadata": {
                "name": name,
                "labels": {"app.kubernetes.io/name": api.AGENT_APP, api.LABEL_NODE: node},
            },
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 30, "renewTime": micro_time()},
        }
        try:
            self.coordination.patch_namespaced_lease(name, self.namespace, {"spec": body["spec"]})
        except ApiException as e:
            if e.status != 404:
                raise
            self.coordination.create_namespaced_lease(self.namespace, body)
