"""The local control plane is a real one: kwok nodes go Ready, the scheduler binds
pods to them, the controller-manager garbage-collects dependents."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from e2e import fleet
from e2e.waiting import eventually
from edgefleet_api import names

pytestmark = pytest.mark.cluster


@pytest.fixture
def core(kube: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(kube)


def test_simulated_edge_nodes_become_ready_with_gpu_labels(core: Any) -> None:
    prefix = f"n{uuid.uuid4().hex[:5]}"
    node_names = fleet.create_nodes(core, 3, prefix=prefix)
    try:

        def all_ready() -> bool:
            nodes = [core.read_node(n) for n in node_names]
            return all(
                any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
                for n in nodes
            )

        eventually(all_ready, what="kwok to mark the nodes Ready")
        node = core.read_node(node_names[1])
        assert node.metadata.labels[names.LABEL_FLEET] == "true"
        assert node.metadata.labels[names.LABEL_DEVICE_CLASS] == "edge-server"
        assert node.status.allocatable[names.GPU_RESOURCE] == "1"
        classes = {core.read_node(n).metadata.labels[names.LABEL_DEVICE_CLASS] for n in node_names}
        assert classes == {"jetson-orin", "edge-server", "jetson-nano"}
    finally:
        fleet.delete_nodes(core, node_names)


def test_scheduler_binds_a_gpu_pod_to_a_kwok_node_and_it_runs(core: Any, namespace: str) -> None:
    prefix = f"s{uuid.uuid4().hex[:5]}"
    node_names = fleet.create_nodes(core, 1, device_class="jetson-orin", prefix=prefix)
    try:
        core.create_namespaced_pod(
            namespace,
            {
                "metadata": {"name": "gpu-pod"},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node_names[0]},
                    "tolerations": [
                        {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "containers": [
                        {
                            "name": "c",
                            "image": "example.invalid/agent:0",
                            "resources": {"limits": {names.GPU_RESOURCE: "1"}},
                        }
                    ],
                },
            },
        )
        pod = eventually(
            lambda: (p := core.read_namespaced_pod("gpu-pod", namespace)).status.phase == "Running" and p,
            what="the pod to be scheduled and Running",
        )
        assert pod.spec.node_name == node_names[0]
    finally:
        fleet.delete_nodes(core, node_names)


def test_controller_manager_collects_garbage(core: Any, namespace: str) -> None:
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {
                "name": "dependent",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
                ],
            }
        },
    )
    core.delete_namespaced_config_map("owner", namespace)
    config_maps = lambda: {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}  # noqa: E731
    eventually(lambda: "dependent" not in config_maps(), what="garbage collection of the dependent")
