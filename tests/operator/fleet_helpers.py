"""Helpers of the operator tests: a test's own labelled nodes with simulated agents, services,
and polling. Shared by test_operator.py and test_operator_restart.py."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from e2e import fleet, waiting
from e2e.operator_proc import AGENT_NAMESPACE, OperatorProcess
from e2e.sim_agent import SimNode, SimulatedAgents
from edgefleet_api import names

DIGEST = "sha256:" + "cd" * 32


class Group:
    """A test's own nodes (labelled test-group=<id>) and its simulated agents."""

    def __init__(self, kube: Any) -> None:
        from kubernetes import client

        self.id = uuid.uuid4().hex[:6]
        self.core = client.CoreV1Api(kube)
        self.custom = client.CustomObjectsApi(kube)
        self.agents = SimulatedAgents(kube, AGENT_NAMESPACE)
        self.names: list[str] = []

    def nodes(
        self,
        count: int,
        device_class: str = "jetson-orin",
        prefix: str = "n",
        labels: dict[str, str] | None = None,
        **sim: Any,
    ) -> list[str]:
        names = fleet.create_nodes(
            self.core,
            count,
            device_class=device_class,
            prefix=f"{prefix}{self.id}",
            labels={"test-group": self.id, **(labels or {})},
        )
        for n in names:
            self.agents.add(SimNode(n, device_class, **sim))
        self.names += names
        return names

    def edge_models(self, node: str) -> list[str]:
        try:
            en = self.custom.get_cluster_custom_object(
                names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, node
            )
        except Exception:
            return []
        return [f"{m['service']}/{m['model']}:{m['version']}" for m in en.get("spec", {}).get("models") or []]

    def reported(self) -> None:
        """Step the simulated agents until every node's EdgeNode exists and carries their status."""

        def all_reported() -> bool:
            found = {
                e["metadata"]["name"]: e
                for e in self.custom.list_cluster_custom_object(
                    names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL
                )["items"]
            }
            return all((found.get(n) or {}).get("status", {}).get("gpu") for n in self.names)

        eventually(all_reported, step=self.agents.step, what="the EdgeNodes to carry agent status")

    def holders(self, service: str) -> list[str]:
        return [n for n in self.names if any(m.startswith(service + "/") for m in self.edge_models(n))]

    def cleanup(self) -> None:
        fleet.delete_nodes(self.core, self.names)


def eventually(
    check: Callable[[], Any],
    timeout_s: float = 45,
    what: str = "condition",
    step: Callable[[], None] | None = None,
    operator: OperatorProcess | None = None,
    seen: Callable[[], str] | None = None,
) -> Any:
    """e2e.waiting.eventually; when it times out, the message adds `seen()` (what the check
    saw) and the operator's log tail."""

    def context() -> str:
        parts = [seen()] if seen else []
        return "\n".join(parts + ([f"operator log:\n{operator.tail()}"] if operator else []))

    return waiting.eventually(check, timeout_s, what, step, context if seen or operator else None)


def service(name: str, group_id: str, memory: str = "64Mi", **placement: Any) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.INFERENCE_SERVICE_KIND,
        "metadata": {"name": name},
        "spec": {
            "models": [
                {
                    "name": "classifier",
                    "version": "1",
                    "memoryEstimate": memory,
                    "artifact": {"uri": "repo://classifier/1/model.pt", "digest": DIGEST},
                    "inputs": [{"name": "image", "datatype": "FP32", "shape": [3, 64, 64]}],
                    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}],
                }
            ],
            "sla": {"p95LatencyMs": 20, "p99LatencyMs": 40},
            "placement": {
                "nodeSelector": {"test-group": group_id, **placement.pop("selector", {})},
                **placement,
            },
        },
    }


def apply(kube: Any, namespace: str, body: dict[str, Any]) -> None:
    from kubernetes import client

    client.CustomObjectsApi(kube).create_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, body
    )


def get_status(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client

    obj = client.CustomObjectsApi(kube).get_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, name
    )
    return obj.get("status") or {}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def events(kube: Any, namespace: str, name: str) -> list[tuple[str, str]]:
    from kubernetes import client

    items = (
        client.CoreV1Api(kube)
        .list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        .items
    )
    return [(e.reason, e.message) for e in items]


def agent_pods(kube: Any) -> dict[str, str]:
    from kubernetes import client

    pods = (
        client.CoreV1Api(kube)
        .list_namespaced_pod(AGENT_NAMESPACE, label_selector=f"app.kubernetes.io/name={names.AGENT_APP}")
        .items
    )
    return {
        p.metadata.name: (
            p.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms[
                0
            ]
            .match_fields[0]
            .values[0]
        )
        for p in pods
        if not p.metadata.deletion_timestamp
    }
