"""An operator killed (SIGKILL) in the middle of reconciling, then restarted, converges to the
same state as one that was never interrupted, with no duplicate agent Pods."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import Group, apply, eventually, service

from e2e.operator_proc import AGENT_NAMESPACE, OperatorProcess, ensure_agent_namespace
from edgefleet_api import names

pytestmark = pytest.mark.cluster


def test_killed_mid_reconcile_resumes_without_duplicates(
    control_plane: Any, kube: Any, namespace: str, tmp_path: Path
) -> None:
    from kubernetes import client

    ensure_agent_namespace(kube)
    group = Group(kube)
    core = client.CoreV1Api(kube)
    try:
        nodes = group.nodes(6, "jetson-orin")
        first = OperatorProcess(control_plane, tmp_path / "first.log")
        try:
            for i in range(6):
                apply(kube, namespace, service(f"s{i}", group.id, replicas=2))
            # Kill it as soon as it has started writing placements, mid-way through the burst.
            eventually(
                lambda: any(group.edge_models(n) for n in nodes), what="the first placement", operator=first
            )
        finally:
            first.kill()
        partial = {n: group.edge_models(n) for n in nodes}

        second = OperatorProcess(control_plane, tmp_path / "second.log")
        try:

            def converged() -> bool:
                placed = [m for n in nodes for m in group.edge_models(n)]
                return len(placed) == 12 and all(
                    len(group.holders(f"{namespace}/s{i}")) == 2 for i in range(6)
                )

            eventually(converged, timeout_s=60, what="every service on 2 nodes", operator=second)
            # Assignments written before the kill were kept (stability), not reshuffled.
            for node, models in partial.items():
                assert set(models) <= set(group.edge_models(node)), (node, models)
            with_work = {n for n in nodes if group.edge_models(n)}

            def our_pods() -> list[Any]:
                pods = core.list_namespaced_pod(
                    AGENT_NAMESPACE, label_selector=f"app.kubernetes.io/name={names.AGENT_APP}"
                ).items
                return [p for p in pods if p.metadata.labels.get(names.LABEL_NODE) in nodes]

            ours = eventually(lambda: (p := our_pods()) and len(p) >= len(with_work) and p, what="agent pods")
            # One pod per node with work: none twice, none missing, none extra.
            assert sorted(p.metadata.labels[names.LABEL_NODE] for p in ours) == sorted(with_work)
            assert all(p.metadata.name == names.agent_name(p.metadata.labels[names.LABEL_NODE]) for p in ours)
            assert second.alive(), second.tail()
        finally:
            second.stop()
    finally:
        group.cleanup()


def test_a_pass_over_an_unchanged_fleet_writes_nothing(control_plane: Any, kube: Any, namespace: str) -> None:
    """Idempotence, in-process: after convergence a pass reads, decides the same, and writes nothing
    (status churn is the API server's load at fleet scale)."""
    from kubernetes import client

    from edgefleet_operator import settings as settings_mod
    from edgefleet_operator.metrics import OperatorMetrics
    from edgefleet_operator.reconciler import FleetReconciler

    ensure_agent_namespace(kube)
    group = Group(kube)
    try:
        group.nodes(3, "jetson-orin")
        apply(kube, namespace, service("idem", group.id, replicas=2))
        # The reconciler's own client, counting every request it makes (method, path).
        own = client.ApiClient(kube.configuration)
        calls: list[tuple[str, str]] = []
        send = own.rest_client.request

        def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            calls.append((method, url.split("?")[0]))
            return send(method, url, *args, **kwargs)

        own.rest_client.request = counted  # type: ignore[method-assign]
        reconciler = FleetReconciler(own, settings_mod.from_env({}), OperatorMetrics())
        first = reconciler.reconcile_once()
        assert first.writes, "the first pass places the service"
        for _ in range(5):
            group.agents.step()
            reconciler.reconcile_once()
        assert len(group.holders(f"{namespace}/idem")) == 2

        # Other tests' services may share the cluster: judge by this test's own objects.
        custom = client.CustomObjectsApi(kube)

        def versions() -> dict[str, str]:
            isvc = custom.get_namespaced_custom_object(
                names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, "idem"
            )
            out = {"isvc": isvc["metadata"]["resourceVersion"]}
            for n in group.names:
                en = custom.get_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, n)
                out[n] = en["metadata"]["resourceVersion"]
            return out

        before = versions()
        calls.clear()
        steady = reconciler.reconcile_once()
        assert steady.incremental_plan, "a pass over an unchanged fleet re-plans incrementally"
        reconciler.reconcile_once()
        assert versions() == before, "a pass over an unchanged fleet rewrote this service or its nodes"
        # Not even attempts: a steady pass only lists, none of its requests is about this service or
        # its nodes (a create answered 409 or a get per object is load that grows with the fleet).
        # Other tests' leftovers on the shared cluster may still be worked on: judge by our objects.
        ours = [(m, u) for m, u in calls if namespace in u or any(u.endswith(f"/{n}") for n in group.names)]
        assert not ours, ours
    finally:
        group.cleanup()


def test_urgent_work_defers_pods_and_bookkeeping_to_the_next_pass(
    control_plane: Any, kube: Any, namespace: str
) -> None:
    """A pass that learns of urgent work (here: set as its specs are written) leaves its agent Pods and
    services' bookkeeping to the next pass; nothing is lost: the next pass creates them and posts the
    placement events the first one decided."""
    from fleet_helpers import agent_pods, events, get_status

    from edgefleet_operator import settings as settings_mod
    from edgefleet_operator.metrics import OperatorMetrics
    from edgefleet_operator.reconciler import FleetReconciler

    ensure_agent_namespace(kube)
    group = Group(kube)
    try:
        nodes = group.nodes(2, "jetson-orin")
        reconciler = FleetReconciler(kube, settings_mod.from_env({}), OperatorMetrics())
        eventually(  # both new nodes judged Healthy (kwok marks them Ready a moment after creation)
            lambda: all(reconciler.reconcile_once().health.get(n) == "Healthy" for n in nodes),
            what="the new nodes healthy",
        )
        apply(kube, namespace, service("urgent", group.id, replicas=2))
        write_specs = reconciler._write_edge_node_specs

        def then_urgent(*args: Any) -> None:
            write_specs(*args)
            reconciler.urgent.set()  # as a new service's ADDED event would, mid-pass

        reconciler._write_edge_node_specs = then_urgent  # type: ignore[method-assign]
        first = reconciler.reconcile_once()
        assert sorted(group.holders(f"{namespace}/urgent")) == sorted(nodes), "specs are written first"
        assert first.deferred >= 3, first  # two nodes' Pods, one service's bookkeeping
        assert not any(k.startswith(("pod.", "inferenceservice.", "event.")) for k in first.writes), first
        assert get_status(kube, namespace, "urgent") == {}
        assert not set(nodes) & set(agent_pods(kube).values())

        reconciler._write_edge_node_specs = write_specs  # type: ignore[method-assign]
        second = reconciler.reconcile_once()
        assert second.deferred == 0 and second.writes.get("pod.create") == 2, second
        assert get_status(kube, namespace, "urgent").get("observedGeneration") == 1
        assert set(nodes) <= set(agent_pods(kube).values())
        # Placement said "Placed" in the first pass; the event went out with the deferred bookkeeping.
        assert [r for r, _ in events(kube, namespace, "urgent")].count("Placed") == 1
    finally:
        group.cleanup()
