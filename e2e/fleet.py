"""Simulated edge nodes: Node objects that kwok manages (heartbeats, pod status),
labelled and sized like the devices of an edge fleet.

    create_nodes(core_v1, 5)                      # a mixed fleet: jetson-orin and edge-server
    create_nodes(core_v1, 3, device_class="jetson-orin", prefix="orin")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgefleet_api import names

KWOK_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}
GIB = 1 << 30


@dataclass(frozen=True)
class DeviceClass:
    """A kind of edge device: its GPU and how much of it there is."""

    name: str
    gpu_product: str
    gpu_memory_bytes: int
    cpu: str
    memory: str


DEVICE_CLASSES = {
    "jetson-orin": DeviceClass("jetson-orin", "NVIDIA-Jetson-AGX-Orin", 32 * GIB, "12", "32Gi"),
    "jetson-nano": DeviceClass("jetson-nano", "NVIDIA-Jetson-Orin-Nano", 8 * GIB, "6", "8Gi"),
    "edge-server": DeviceClass("edge-server", "NVIDIA-L4", 24 * GIB, "32", "128Gi"),
}
MIXED = ("jetson-orin", "edge-server", "jetson-nano")


def fleet_labels(device_class: str) -> dict[str, str]:
    """What makes a node a fleet member of `device_class`: our labels and the ones NVIDIA's GPU
    feature discovery would set (the GPU's product and its memory in MiB, which placement reads until
    an agent measures it)."""
    dc = DEVICE_CLASSES[device_class]
    return {
        names.LABEL_FLEET: "true",
        names.LABEL_DEVICE_CLASS: dc.name,
        names.LABEL_GPU_PRODUCT: dc.gpu_product,
        "nvidia.com/gpu.memory": str(dc.gpu_memory_bytes // (1 << 20)),
    }


def node_manifest(
    name: str,
    device_class: str = "jetson-orin",
    zone: str = "zone-a",
    gpus: int = 1,
    extra_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Node kwok will manage, labelled as a fleet member of `device_class`."""
    dc = DEVICE_CLASSES[device_class]
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "arm64" if device_class.startswith("jetson") else "amd64",
        "type": "kwok",
        "topology.kubernetes.io/zone": zone,
        **fleet_labels(device_class),
        **(extra_labels or {}),
    }
    capacity = {"cpu": dc.cpu, "memory": dc.memory, "pods": "110", names.GPU_RESOURCE: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": dict(KWOK_ANNOTATION)},
        "spec": {},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def create_nodes(
    core_v1: Any,
    count: int,
    device_class: str | None = None,
    prefix: str = "edge",
    zones: tuple[str, ...] = ("zone-a", "zone-b"),
    labels: dict[str, str] | None = None,
) -> list[str]:
    """Create `count` simulated edge nodes (idempotent by name); returns their names.

    Without `device_class` the fleet mixes the classes in MIXED round-robin.
    """
    from kubernetes.client.exceptions import ApiException

    names = []
    for i in range(count):
        dc = device_class or MIXED[i % len(MIXED)]
        name = f"{prefix}-{i:03d}"
        body = node_manifest(name, dc, zone=zones[i % len(zones)], extra_labels=labels)
        try:
            core_v1.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
        names.append(name)
    return names


def delete_nodes(core_v1: Any, names: list[str]) -> None:
    from kubernetes.client.exceptions import ApiException

    for name in names:
        try:
            core_v1.delete_node(name)
        except ApiException as e:
            if e.status != 404:
                raise


if __name__ == "__main__":  # `python -m e2e.fleet labels CLASS`: fleet_labels as kubectl label args
    import sys

    if sys.argv[1:2] != ["labels"] or len(sys.argv) != 3 or sys.argv[2] not in DEVICE_CLASSES:
        sys.exit(f"usage: python -m e2e.fleet labels {{{','.join(DEVICE_CLASSES)}}}")
    print(" ".join(f"{k}={v}" for k, v in fleet_labels(sys.argv[2]).items()))
