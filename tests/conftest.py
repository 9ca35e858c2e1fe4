"""Session fixtures: the real local control plane, API clients, a fresh namespace per test.

Tests marked `cluster` get a running kube-apiserver (+ etcd, controller-manager,
scheduler, kwok) started by e2e.cluster once per session, or reuse one already
running (`make cluster-up`). A cluster this session started is stopped at its end.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e import cluster as localcluster

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests under tests/operator/ and tests/e2e/ that use the cluster carry the marker already;
    # GPU tests skip cleanly without CUDA.
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    for item in gpu_items:
        if not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda unavailable)"))


@pytest.fixture(scope="session")
def control_plane() -> Iterator[localcluster.ClusterState]:
    existing = localcluster.ClusterState.load(localcluster.state_dir())
    reused = existing is not None and localcluster.healthy(existing)
    state = localcluster.up(quiet=True)
    yield state
    if not reused and not os.environ.get("EDGEFLEET_KEEP_CLUSTER"):
        localcluster.down(quiet=True)


@pytest.fixture(scope="session")
def kube(control_plane: localcluster.ClusterState):  # type: ignore[no-untyped-def]
    """A kubernetes.client.ApiClient for the local control plane (admin)."""
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    yield client
    client.close()


class Kubectl:
    """Runs the built kubectl against the local control plane."""

    def __init__(self, state: localcluster.ClusterState, namespace: str | None = None) -> None:
        self.state = state
        self.namespace = namespace

    def __call__(
        self,
        *args: str,
        check: bool = True,
        input_: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        ns = ["-n", self.namespace] if self.namespace else []
        return localcluster.kubectl(self.state, *ns, *args, check=check, input_=input_)


@pytest.fixture
def namespace(kube, request: pytest.FixtureRequest) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A fresh namespace for one test, deleted afterwards."""
    from kubernetes import client

    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(kube)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture
def kubectl(control_plane: localcluster.ClusterState, namespace: str) -> Kubectl:
    return Kubectl(control_plane, namespace)
