"""The operator against the real local control plane with kwok nodes.

The real `edgefleet-operator run` process places services; simulated agents
(e2e.sim_agent) write EdgeNode statuses and Lease heartbeats as agents would.
Each test labels its own nodes and selects them, so tests do not see each other's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import Group, agent_pods, apply, condition, events, eventually, get_status, service

from e2e import fleet
from e2e.operator_proc import OperatorProcess, ensure_agent_namespace
from edgefleet_api import names

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def operator(
    control_plane: Any, kube: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    ensure_agent_namespace(kube)
    proc = OperatorProcess(control_plane, tmp_path_factory.mktemp("operator") / "operator.log")
    yield proc
    # Services of the last tests' namespaces are being deleted: let the operator release them.
    from kubernetes import client

    custom = client.CustomObjectsApi(kube)
    with contextlib.suppress(AssertionError):
        eventually(
            lambda: (
                not [
                    s
                    for s in custom.list_cluster_custom_object(
                        names.GROUP, names.VERSION, names.INFERENCE_SERVICE_PLURAL
                    )["items"]
                    if s["metadata"].get("deletionTimestamp")
                ]
            ),
            timeout_s=30,
            what="deleted services released",
        )
    alive = proc.alive()
    proc.stop()
    assert alive, f"the operator died during the tests:\n{proc.tail()}"


@pytest.fixture
def group(kube: Any, operator: OperatorProcess) -> Iterator[Group]:
    g = Group(kube)
    yield g
    g.cleanup()


def test_service_lands_on_selected_nodes_and_reports_ready(
    kube: Any, namespace: str, group: Group, operator: OperatorProcess
) -> None:
    from kubernetes import client

    orins = group.nodes(3, "jetson-orin", prefix="o")
    nanos = group.nodes(1, "jetson-nano", prefix="j")
    apply(kube, namespace, service("cam", group.id, selector={names.LABEL_DEVICE_CLASS: "jetson-orin"}))
    key = f"{namespace}/cam"
    eventually(
        lambda: sorted(group.holders(key)) == sorted(orins),
        what="EdgeNode specs on the orins",
        operator=operator,
    )
    assert group.edge_models(nanos[0]) == []
    pods = eventually(
        lambda: (p := agent_pods(kube)) and set(orins) <= set(p.values()) and p,
        what="agent pods on the orins",
    )
    assert not set(nanos) & set(pods.values())
    assert len([n for n in pods.values() if n in orins]) == 3, "exactly one agent pod per node"

    status = eventually(
        lambda: (
            (s := get_status(kube, namespace, "cam")) and condition(s, "Ready").get("status") == "True" and s
        ),
        step=group.agents.step,
        what="Ready from the agents' statuses",
        operator=operator,
    )
    assert status["nodesSummary"] == "3/3"
    assert status["sla"]["p95LatencyMs"] == 9.0 and status["sla"]["requests"] == 9000
    assert sorted(status["endpoints"]) == sorted(f"http://{n}.sim:8000" for n in orins)
    assert status["url"] == f"http://cam-v2.{namespace}.svc"
    assert condition(status, "Degraded")["status"] == "False"
    assert condition(status, "Ready")["observedGeneration"] == 1
    svc = client.CoreV1Api(kube).read_namespaced_service("cam-v2", namespace)
    assert svc.spec.ports[0].port == 80
    slice_ = eventually(
        lambda: (
            (s := client.DiscoveryV1Api(kube).read_namespaced_endpoint_slice("cam-v2", namespace))
            and len(s.endpoints or []) == 3
            and all(e.conditions.ready for e in s.endpoints)
            and s
        ),
        step=group.agents.step,
        what="a ready endpoint per agent pod",
    )
    assert {e.node_name for e in slice_.endpoints} == set(orins)
    eventually(lambda: any(r == "Placed" for r, _ in events(kube, namespace, "cam")), what="a Placed event")


def test_memory_pressure_and_a_hot_node_get_no_new_work(
    kube: Any, namespace: str, group: Group, operator: OperatorProcess
) -> None:
    # 8 GiB each. The agents measure the model at its estimate: placement goes by measured size
    # once there is one, and a smaller one would (rightly) fit the full node.
    full, hot, cool = group.nodes(3, "jetson-nano", model_bytes=2 << 30)
    group.agents.nodes[full].other_used_bytes = 7 << 30
    group.agents.nodes[hot].temperature_c = 81.0  # soft limit 83: within the 5 degree margin
    group.reported()
    apply(kube, namespace, service("big", group.id, memory="2Gi", replicas=3))
    key = f"{namespace}/big"
    eventually(
        lambda: group.holders(key) == [cool],
        step=group.agents.step,
        what="placement on the cool node",
        operator=operator,
    )
    seen: list[str] = []

    def both_reasons() -> dict[str, Any] | None:
        status = get_status(kube, namespace, "big")
        message = status.get("message", "")
        if not seen or seen[-1] != message:
            seen.append(message)
        reasons = ("1 insufficient memory", "1 near thermal limit")
        return status if all(r in message for r in reasons) else None

    # A pass may briefly see a node's heartbeat as late (Suspect) on a loaded machine; the
    # message settles on the real reasons while the agents keep reporting.
    status = eventually(
        both_reasons,
        step=group.agents.step,
        what="the unplaceable message naming both reasons",
        operator=operator,
        seen=lambda: f"messages seen: {seen}",
    )
    assert condition(status, "Degraded")["reason"] == "Unplaceable"
    assert status["nodesSummary"].endswith("/3")
    eventually(
        lambda: any(r == "FailedPlacement" for r, _ in events(kube, namespace, "big")),
        what="a FailedPlacement event",
    )


def test_a_silent_agent_loses_its_work_after_the_grace_period(
    kube: Any, namespace: str, group: Group, operator: OperatorProcess
) -> None:
    a, b = group.nodes(2)
    group.reported()
    apply(kube, namespace, service("one", group.id, replicas=1))
    key = f"{namespace}/one"
    first = eventually(lambda: group.holders(key), step=group.agents.step, what="placement")[0]
    other = b if first == a else a
    group.agents.nodes[first].silent = True
    # Within the grace period (10 s here) the node keeps its work while Ready.
    assert group.holders(key) == [first]
    eventually(
        lambda: group.holders(key) == [other],
        timeout_s=30,
        step=group.agents.step,
        what="the work to move off the silent node",
        operator=operator,
    )
    moved = eventually(
        lambda: [m for r, m in events(kube, namespace, "one") if r == "Moved"], what="a Moved event"
    )
    assert "agent silent" in moved[0], moved


def test_a_deleted_node_loses_its_work_and_its_edge_node(
    kube: Any, namespace: str, group: Group, operator: OperatorProcess
) -> None:
    from kubernetes import client

    a, b = group.nodes(2)
    group.reported()
    apply(kube, namespace, service("del", group.id, replicas=1))
    key = f"{namespace}/del"
    first = eventually(lambda: group.holders(key), step=group.agents.step, what="placement")[0]
    fleet.delete_nodes(group.core, [first])
    other = b if first == a else a
    eventually(
        lambda: group.holders(key) == [other],
        step=group.agents.step,
        what="the work to move",
        operator=operator,
    )
    custom = client.CustomObjectsApi(kube)

    def edge_node_names() -> set[str]:
        items = custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL)["items"]
        return {e["metadata"]["name"] for e in items}

    eventually(lambda: first not in edge_node_names(), what="the EdgeNode of the deleted node to go")


def test_a_not_ready_node_loses_its_work(
    kube: Any, namespace: str, group: Group, operator: OperatorProcess
) -> None:
    a, b = group.nodes(2)
    group.reported()
    apply(kube, namespace, service("nr", group.id, replicas=1))
    key = f"{namespace}/nr"
    first = eventually(lambda: group.holders(key), step=group.agents.step, what="placement")[0]
    # kwok stops heartbeating the Node; the controller-manager marks it NotReady after its grace.
    group.core.patch_node(first, {"metadata": {"annotations": {"kwok.x-k8s.io/node": None}}})
    other = b if first == a else a
    eventually(
        lambda: group.holders(key) == [other],
        timeout_s=90,
        step=group.agents.step,
        what="the work to move off the NotReady node",
        operator=operator,
    )
    moved = eventually(
        lambda: [m for r, m in events(kube, namespace, "nr") if r in ("Moved", "Removed") and first in m],
        what="an event saying the work left the node",
    )
    assert "not ready" in moved[0], moved


def test_deleting_a_service_unloads_it_everywhere_and_removes_idle_agents(
    kube: Any, namespace: str, group: Group, operator: OperatorProcess
) -> None:
    from kubernetes import client

    nodes = group.nodes(2)
    apply(kube, namespace, service("gone", group.id))
    key = f"{namespace}/gone"
    eventually(lambda: sorted(group.holders(key)) == sorted(nodes), what="placement", operator=operator)
    eventually(lambda: set(nodes) <= set(agent_pods(kube).values()), what="agent pods")
    custom = client.CustomObjectsApi(kube)
    eventually(
        lambda: (
            names.FINALIZER
            in custom.get_namespaced_custom_object(
                names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, "gone"
            )["metadata"].get("finalizers", [])
        ),
        what="our finalizer on the service",
    )
    custom.delete_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, "gone"
    )

    def gone() -> bool:
        items = custom.list_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL
        )["items"]
        return not items

    eventually(gone, what="the finalizer to release the service", operator=operator)
    assert group.holders(key) == []
    eventually(lambda: not set(nodes) & set(agent_pods(kube).values()), what="idle agent pods removed")


def test_metrics_count_passes_and_writes(operator: OperatorProcess) -> None:
    import urllib.request

    text = eventually(
        lambda: (
            urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        ),
        what="metrics",
    )
    assert 'edgefleet_operator_reconciles_total{result="ok"}' in text
    assert "edgefleet_operator_reconcile_duration_seconds_bucket" in text
    assert "edgefleet_operator_api_writes_total" in text
    assert 'edgefleet_operator_fleet_nodes{health="Healthy"}' in text
    assert "edgefleet_operator_placement_plans_total" in text


def test_log_has_no_tracebacks(operator: OperatorProcess) -> None:
    log = Path(operator.log_path).read_text(errors="replace")
    if "Traceback" in log:
        tb = log[log.index("Traceback") :].splitlines()[:80]
        pytest.fail(
            "\n".join(line for line in tb if 'File "/work' in line or "Error" in line or "rror:" in line)
        )


def rollout_to(kube: Any, namespace: str, name: str, version: str, digest: str) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(kube)
    obj = custom.get_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, name
    )
    spec = obj["spec"]
    spec["models"][0]["version"] = version
    spec["models"][0]["artifact"]["digest"] = digest
    spec["rollout"] = {
        "strategy": "Canary",
        "waves": [{"percent": 50}, {"percent": 100}],
        "analysis": {"intervalSeconds": 2, "minSamples": 10, "failureLimit": 1, "maxErrorRate": 0.05},
    }
    custom.patch_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, name, {"spec": spec}
    )


def versions_on(group: Group, nodes: list[str], key: str) -> set[str]:
    return {m.rsplit(":", 1)[1] for n in nodes for m in group.edge_models(n) if m.startswith(key + "/")}


@pytest.mark.parametrize(
    "canary_error_rate", [0.0, 0.5], ids=["good-version-promotes", "erring-version-rolls-back"]
)
def test_canary_rollout_through_the_operator(
    kube: Any, namespace: str, group: Group, operator: OperatorProcess, canary_error_rate: float
) -> None:
    nodes = group.nodes(4)
    for sim in group.agents.nodes.values():
        sim.sla_by_version = {"2": {"errorRate": canary_error_rate, "met": canary_error_rate == 0}}
    group.reported()
    apply(kube, namespace, service("roll", group.id))
    key = f"{namespace}/roll"
    eventually(
        lambda: condition(get_status(kube, namespace, "roll"), "Ready").get("status") == "True",
        step=group.agents.step,
        what="v1 ready",
        operator=operator,
    )
    rollout_to(kube, namespace, "roll", "2", "sha256:" + "2e" * 32)
    want = "Promoted" if canary_error_rate == 0 else "RolledBack"
    status = eventually(
        lambda: (s := get_status(kube, namespace, "roll")).get("rollout", {}).get("phase") == want and s,
        timeout_s=90,
        step=group.agents.step,
        what=f"the rollout to end {want}",
        operator=operator,
    )
    history = status["rollout"]["history"][0]
    assert (history["fromVersion"], history["toVersion"]) == ("1", "2"), history
    if want == "Promoted":
        eventually(
            lambda: versions_on(group, nodes, key) == {"2"}, step=group.agents.step, what="v2 everywhere"
        )
        assert [a["result"] for a in status["rollout"]["analysis"]].count("Passed") >= 2
    else:
        eventually(
            lambda: versions_on(group, nodes, key) == {"1"}, step=group.agents.step, what="v1 everywhere"
        )

        # The conditions follow status.rollout on the service's bookkeeping, which a busy pass defers.
        def rolled_back_degraded() -> dict[str, Any] | None:
            d = condition(get_status(kube, namespace, "roll"), "Degraded")
            return d if d.get("reason") == "RolloutFailed" else None

        degraded = eventually(rolled_back_degraded, step=group.agents.step, what="Degraded: RolloutFailed")
        assert degraded["status"] == "True" and "error" in degraded["message"].lower(), degraded
        eventually(
            lambda: any(r == "RolledBack" or "Rollback" in r for r, _ in events(kube, namespace, "roll")),
            what="a rollback event",
        )
