"""A status-writing stand-in for node agents, for operator tests and fleet benchmarks.

It does what an agent does towards the API server and nothing else: reads its
EdgeNode's spec, reports every assigned model Ready with the spec's digest and a
measured size, reports GPU memory and temperature, renews its Lease. Tests steer
it per node (silent, hot, memory used by others, SLA windows). Real agents serve
real models; this one exists where a real agent adds nothing to what is tested.
"""

from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from e2e.fleet import DEVICE_CLASSES
from edgefleet_api import names


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
    loading_versions: set[str] = field(default_factory=set)
    """Model versions reported Loading, not Ready (an agent still fetching the artifact)."""
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
    since: str = field(default_factory=lambda: micro_time().split(".")[0] + "Z")
    """When the agent started (its Ready condition's lastTransitionTime)."""
    counters_by_version: dict[str, dict[str, float]] | None = None
    """None: no status.models[].counters (an agent from before them). Else version -> {"requests":
    requests served per report at traffic weight 100, "errorRate", "slowShare"} ("*": any
    version); each report adds that many to the version's cumulative counters (epoch `epoch`)."""
    epoch: str = "sim-1"
    slo_latency_ms: float | None = 40.0
    counted: dict[str, tuple[float, int, int, int]] = field(default_factory=dict)
    """service/model:version -> (requests so far, exact; requests, errors, slow reported)."""

    def count(self, key: str, version: str, traffic_weight: int) -> dict[str, Any] | None:
        """The version's counters for the next report (None: this agent reports none)."""
        if self.counters_by_version is None:
            return None
        rates = self.counters_by_version.get(version, self.counters_by_version.get("*", {}))
        served = self.counted.get(key, (0.0, 0, 0, 0))[0]
        served += rates.get("requests", 0.0) * traffic_weight / 100
        n = int(served)
        errors, slow = int(n * rates.get("errorRate", 0.0)), int(n * rates.get("slowShare", 0.0))
        self.counted[key] = (served, n, errors, slow)
        out: dict[str, Any] = {"epoch": self.epoch, "requests": n, "errors": errors, "slow": slow}
        if self.slo_latency_ms is not None:
            out["sloLatencyMs"] = self.slo_latency_ms
        return out


class SimulatedAgents:
    """Simulated agents of many nodes, driven from the caller's thread (no process per node).

    `step()` reports every node (a GET and two PATCHes each: simple, for tests of a few nodes);
    `step_bulk()` costs the API server what a fleet of real agents does: one LIST per round, a status
    write only where something changed or a heartbeat is due, Lease renewals only when due.
    """

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.custom: Any = client.CustomObjectsApi(api_client)
        self.coordination: Any = client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.nodes: dict[str, SimNode] = {}
        self._reported: dict[str, tuple[Any, float]] = {}
        """node -> (status written last, minus its timestamps; monotonic time of the write)."""
        self._renewed: dict[str, float] = {}
        """node -> monotonic time of the last Lease renewal."""

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
                names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, node.name
            )
        except ApiException as e:
            if e.status == 404:
                return  # the operator has not created it yet
            raise
        if self._write_status(node, status_for(node, en)):
            self.renew_lease(node.name)

    def step_bulk(
        self,
        pool: ThreadPoolExecutor,
        heartbeat_s: float = 30.0,
        lease_renew_s: float = 10.0,
    ) -> int:
        """One round of every non-silent agent; returns the API writes it made.

        Reads all EdgeNodes with one LIST; writes a node's status when it differs from the last one
        written (timestamps aside) or `heartbeat_s` has passed, and renews its Lease every
        `lease_renew_s` (a real agent's 10 s). Writes run on `pool`.
        """
        items = self.custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL)[
            "items"
        ]
        found = {e["metadata"]["name"]: e for e in items if e["metadata"]["name"] in self.nodes}
        now = time.monotonic()
        status_writes, lease_writes = [], []
        for name, en in found.items():
            node = self.nodes[name]
            if node.silent:
                continue
            status = status_for(node, en)
            last = self._reported.get(name)
            if last is None or last[0] != _essence(status) or now - last[1] >= heartbeat_s:
                status_writes.append((node, status))
            if now - self._renewed.get(name, -1e9) >= lease_renew_s:
                lease_writes.append(name)
        futures: list[Future[Any]] = [pool.submit(self._write_status, n, st) for n, st in status_writes]
        futures += [pool.submit(self.renew_lease, n) for n in lease_writes]
        return sum(1 for f in futures if f.result() is not False)

    def _write_status(self, node: SimNode, status: dict[str, Any]) -> bool:
        """PATCH the EdgeNode's status; False when the EdgeNode is gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.patch_cluster_custom_object_status(
                names.GROUP,
                names.VERSION,
                names.EDGE_NODE_PLURAL,
                node.name,
                {"status": status},
                _preload_content=False,  # the answer is not read: decoding it is half the cost
            )
        except ApiException as e:
            if e.status == 404:
                return False  # deleted under us (its Node went)
            raise
        self._reported[node.name] = (_essence(status), time.monotonic())
        return True

    def renew_lease(self, node: str) -> None:
        from kubernetes.client.exceptions import ApiException

        name = names.agent_name(node)
        body = {
            "metadata": {
                "name": name,
                "labels": {"app.kubernetes.io/name": names.AGENT_APP, names.LABEL_NODE: node},
            },
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 30, "renewTime": micro_time()},
        }
        try:
            self.coordination.patch_namespaced_lease(
                name, self.namespace, {"spec": body["spec"]}, _preload_content=False
            )
        except ApiException as e:
            if e.status != 404:
                raise
            self.coordination.create_namespaced_lease(self.namespace, body)
        self._renewed[node] = time.monotonic()


def _essence(status: dict[str, Any]) -> Any:
    """A status without its heartbeat time: what a real agent compares before writing."""
    return {k: v for k, v in status.items() if k != "heartbeatTime"}


def status_for(node: SimNode, edge_node: dict[str, Any]) -> dict[str, Any]:
    """The EdgeNode status `node`'s agent reports for the spec in `edge_node`: every assigned model
    Ready (Loading for `loading_versions`) with the spec's digest, its measured size and SLA window,
    and its counters when the node keeps them (each call counts one more report's requests)."""
    models: list[dict[str, Any]] = list(edge_node.get("spec", {}).get("models") or [])
    total = DEVICE_CLASSES[node.device_class].gpu_memory_bytes
    ours = node.model_bytes * len(models)

    def entry(m: dict[str, Any]) -> dict[str, Any]:
        version = str(m["version"])
        out = {
            "service": m["service"],
            "model": m["model"],
            "version": m["version"],
            "digest": m["artifact"]["digest"],
            "state": "Loading" if version in node.loading_versions else "Ready",
            "memoryBytes": node.model_bytes,
            "trafficWeight": m.get("trafficWeight", 100),
        }
        if version not in node.loading_versions:
            out["sla"] = {**node.sla, **node.sla_by_version.get(version, {})}
            key = f"{m['service']}/{m['model']}:{version}"
            counters = node.count(key, version, int(m.get("trafficWeight", 100)))
            if counters is not None:
                out["counters"] = counters
        return out

    return {
        "observedGeneration": edge_node["metadata"].get("generation", 1),
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
        "models": [entry(m) for m in models],
        "loadedModels": sum(1 for m in models if str(m["version"]) not in node.loading_versions),
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Serving",
                "message": "",
                "lastTransitionTime": node.since,
            }
        ],
    }
