"""The per-service `-v2` Service and EndpointSlice carry the agents' gRPC port (named `grpc`,
appProtocol grpc) when the agents serve gRPC (chart `agent.grpcPort`), and only HTTP when not.
Invariant: a Service or slice left by an operator with another setting gets its ports replaced
(added and removed), never left stale, and an unchanged one is not written again.

The plan is checked pure (pass_plan), the writes with the real operator process against the local
kube-apiserver, with simulated agents (as test_operator.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fleet_helpers import Group, apply, eventually, service
from test_pass_plan import D1, LABELS, NODES, STAMP, bookkeeping, edge_nodes, isvc, read, rollout_write

from e2e.operator_proc import OperatorProcess, ensure_agent_namespace
from edgefleet_api import names
from edgefleet_operator import manifests
from edgefleet_operator.fleet_types import ServicePlacement
from edgefleet_operator.pass_plan import slice_writes

GRPC = 8001
NOW = 1_790_000_000.0


def port_names(ports: Any) -> list[tuple[str, int, str | None]]:
    return [(p["name"], p["port"], p.get("appProtocol")) for p in ports]


# --- the plan (pure) -------------------------------------------------------------------------------


def plan(grpc_port: int, services: dict[tuple[str, str], list[Any]] | None = None, slices: Any = None) -> Any:
    service_obj = isvc()
    ro = rollout_write(service_obj, NODES, edge_nodes(("1", D1)), LABELS, NOW)
    fleet = read(edge_nodes(("1", D1)), set(services or {}), slices)
    fleet.service_ports = dict(services or {})
    return bookkeeping(service_obj, ServicePlacement(NODES, 2), ro, [], fleet, 8000, STAMP, grpc_port)


def test_a_new_service_and_slice_carry_the_grpc_port_only_when_agents_serve_it() -> None:
    with_grpc = plan(GRPC)
    assert with_grpc.create_service is not None and len(with_grpc.endpoint_slices) == 1
    assert port_names(with_grpc.create_service["spec"]["ports"]) == [
        ("http", 80, None),
        ("grpc", GRPC, "grpc"),
    ]
    assert with_grpc.create_service["spec"]["ports"][1]["targetPort"] == GRPC
    assert port_names(with_grpc.endpoint_slices[0].body["ports"]) == [
        ("http", 8000, None),
        ("grpc", GRPC, "grpc"),
    ]
    http_only = plan(0)
    assert http_only.create_service is not None and len(http_only.endpoint_slices) == 1
    assert port_names(http_only.create_service["spec"]["ports"]) == [("http", 80, None)]
    assert port_names(http_only.endpoint_slices[0].body["ports"]) == [("http", 8000, None)]


def test_listed_ports_from_another_setting_are_replaced_and_equal_ones_left() -> None:
    key = ("shop", "cam-v2")
    for listed_grpc, wanted_grpc in ((0, GRPC), (GRPC, 0), (9001, GRPC)):
        first = plan(listed_grpc)
        assert len(first.endpoint_slices) == 1
        listed_service = {key: manifests.service_ports(listed_grpc)}
        again = plan(wanted_grpc, listed_service, {key: first.endpoint_slices[0].body})
        assert again.create_service is None
        assert again.service_ports == manifests.service_ports(wanted_grpc)
        assert len(again.endpoint_slices) == 1 and not again.endpoint_slices[0].create
        assert again.endpoint_slices[0].ports == manifests.slice_ports(8000, wanted_grpc)
        assert again.endpoint_slices[0].endpoints is None  # the same agents: only the ports change
    same = plan(GRPC)
    assert len(same.endpoint_slices) == 1
    unchanged = plan(GRPC, {key: manifests.service_ports(GRPC)}, {key: same.endpoint_slices[0].body})
    assert unchanged.service_ports is None and not unchanged.endpoint_slices
    # as the API server lists them (protocol and targetPort filled in): equal, nothing written
    served = [dict(p, protocol="TCP") for p in manifests.service_ports(GRPC)]
    assert plan(GRPC, {key: served}, {key: same.endpoint_slices[0].body}).service_ports is None


# --- the operator against the local kube-apiserver -------------------------------------------------


@pytest.fixture(scope="module")
def operator(
    control_plane: Any, kube: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    ensure_agent_namespace(kube)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    proc = OperatorProcess(control_plane, log, EDGEFLEET_AGENT_GRPC_PORT=str(GRPC))
    yield proc
    alive = proc.alive()
    proc.stop()
    assert alive, f"the operator died during the tests:\n{proc.tail()}"


@pytest.fixture
def group(kube: Any, operator: OperatorProcess) -> Iterator[Group]:
    g = Group(kube)
    yield g
    g.cleanup()


@pytest.mark.cluster
def test_the_operator_writes_and_repairs_the_grpc_port(
    kube: Any, namespace: str, group: Group, operator: OperatorProcess
) -> None:
    """A new service's Service and EndpointSlice get both ports; a Service and slice left by an
    operator without gRPC (HTTP only) get the grpc port added; the slice's endpoints are the
    agents' Pods either way."""
    from kubernetes import client

    core, discovery = client.CoreV1Api(kube), client.DiscoveryV1Api(kube)
    nodes = group.nodes(2)
    managed = {"app.kubernetes.io/managed-by": names.MANAGED_BY}
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "old-v2", "labels": managed},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8000, "protocol": "TCP"}]},
        },
    )
    discovery.create_namespaced_endpoint_slice(
        namespace,
        {
            "metadata": {
                "name": "old-v2",
                "labels": {
                    "kubernetes.io/service-name": "old-v2",
                    "endpointslice.kubernetes.io/managed-by": manifests.SLICE_MANAGER,
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
            "endpoints": [],
        },
    )
    apply(kube, namespace, service("cam", group.id))
    apply(kube, namespace, service("old", group.id))

    def ports_of(name: str) -> tuple[list[Any], list[Any], int] | None:
        try:
            svc = core.read_namespaced_service(name, namespace)
            slice_ = discovery.read_namespaced_endpoint_slice(name, namespace)
        except client.ApiException:
            return None
        svc_ports = [(p.name, p.port, p.app_protocol, p.target_port) for p in svc.spec.ports]
        slice_ports = [(p.name, p.port, p.app_protocol) for p in slice_.ports or []]
        return svc_ports, slice_ports, len(slice_.endpoints or [])

    want = (
        [("http", 80, None, 8000), ("grpc", GRPC, "grpc", GRPC)],
        [("http", 8000, None), ("grpc", GRPC, "grpc")],
        len(nodes),
    )
    for name in ("cam-v2", "old-v2"):
        eventually(
            lambda name=name: ports_of(name) == want,
            step=group.agents.step,
            what=f"{name}: both ports and an endpoint per agent",
            operator=operator,
            seen=lambda name=name: repr(ports_of(name)),
        )


@pytest.mark.cluster
def test_the_api_server_takes_every_slice_of_a_service_on_thousands_of_nodes(
    kube: Any, namespace: str
) -> None:
    """One slice of 2,500 agents is refused (the API's limit is 1,000 endpoints): the operator's
    slices of at most 100, named after the Service and then with a dot and a number, are each
    accepted (a server-side dry run: validation without the objects)."""
    from kubernetes import client

    discovery = client.DiscoveryV1Api(kube)
    obj = isvc()
    obj["metadata"]["namespace"] = namespace
    agents = [(f"n{i:04d}", f"10.1.{i // 250}.{i % 250}", True) for i in range(2500)]
    with pytest.raises(client.ApiException) as refused:
        discovery.create_namespaced_endpoint_slice(
            namespace, manifests.endpoint_slice(obj, agents, 8000), dry_run="All"
        )
    assert refused.value.status == 422
    writes, deletes = slice_writes(obj, agents, {}, 8000)
    assert len(writes) == 25 and deletes == () and writes[1].name == "cam-v2.1"
    for w in writes:
        discovery.create_namespaced_endpoint_slice(namespace, w.body, dry_run="All")
