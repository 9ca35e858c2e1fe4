"""The fleet pass's decisions as typed writes (pass_plan): pure, from dicts as the API returns them
(read through the contract's typed views, as a pass reads them)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgefleet_api import names
from edgefleet_api.patch import merge_patch
from edgefleet_operator import manifests, pass_plan, rollout
from edgefleet_operator.fleet_read import FleetRead, read_service
from edgefleet_operator.fleet_types import PlacedModel, PlacementEvent, ServicePlacement
from edgefleet_operator.settings import AgentPodSettings

NOW = 1_790_000_000.0
STAMP = "2026-09-21T14:13:20Z"
D1, D2 = "sha256:" + "1a" * 32, "sha256:" + "2b" * 32
NODES = ("n1", "n2")
LABELS = {n: {names.LABEL_DEVICE_CLASS: "jetson-orin"} for n in NODES}


def model(version: str, digest: str) -> dict[str, Any]:
    return {"name": "classifier", "version": version, "artifact": {"uri": "repo://c", "digest": digest}}


def isvc(
    version: str = "1", digest: str = D1, status: dict[str, Any] | None = None, **meta: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {"models": [model(version, digest)]}
    if version != "1":
        spec["rollout"] = {"strategy": "Canary", "waves": [{"count": 1}]}
    obj: dict[str, Any] = {
        "apiVersion": names.API_VERSION,
        "kind": names.INFERENCE_SERVICE_KIND,
        "metadata": {"name": "cam", "namespace": "shop", "uid": "u1", "resourceVersion": "7", **meta},
        "spec": spec,
    }
    if status is not None:
        obj["status"] = status
    return obj


def edge_nodes(loaded: tuple[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """EdgeNodes n1, n2; `loaded`: the (version, digest) their agents report Ready."""
    out = {}
    for n in NODES:
        st: dict[str, Any] = {"endpoint": f"http://{n}:8000"}
        if loaded:
            st["models"] = [
                {
                    "service": "shop/cam",
                    "model": "classifier",
                    "version": loaded[0],
                    "digest": loaded[1],
                    "state": "Ready",
                }
            ]
        out[n] = {
            "apiVersion": names.API_VERSION,
            "kind": names.EDGE_NODE_KIND,
            "metadata": {"name": n, "uid": f"u-{n}"},
            "spec": {"nodeName": n, "models": []},
            "status": st,
        }
    return out


def fleet(edge_nodes: dict[str, dict[str, Any]]) -> FleetRead:
    return FleetRead([], edge_nodes, {}, [])


def rollout_write(
    service: dict[str, Any], nodes: Iterable[str], edge_nodes: dict[str, Any], labels: Any, now: float
) -> pass_plan.RolloutWrite:
    return pass_plan.rollout_write(read_service(service), tuple(nodes), fleet(edge_nodes), labels, now)


def status_of(ro: pass_plan.RolloutWrite) -> dict[str, Any]:
    """The rollout step's status.rollout, as written."""
    assert ro.decision is not None
    return ro.decision.status.to_obj()


def bookkeeping(service: dict[str, Any], *args: Any) -> pass_plan.Bookkeeping:
    return pass_plan.bookkeeping(read_service(service), *args)


def stable_status() -> dict[str, Any]:
    """status.rollout of version 1 deployed and confirmed on both nodes."""
    ro = rollout_write(isvc(), NODES, edge_nodes(("1", D1)), LABELS, NOW)
    assert ro.decision is not None and status_of(ro)["stableVersion"] == "1"
    return status_of(ro)


def test_the_decisions_need_no_api_client() -> None:
    """The pure seams import no kubernetes (nor kopf, aiohttp, torch): they run without a cluster."""
    repo = Path(__file__).resolve().parents[2]
    code = (
        "import sys\n"
        "from edgefleet_operator import fleet_read, pass_plan, service_status\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'kubernetes', 'kopf', 'aiohttp', 'torch'}))"
    )
    env = os.environ | {"PYTHONPATH": f"{repo}{os.pathsep}{repo / 'operator'}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


# --- rollout steps -------------------------------------------------------------------------------


def test_a_first_deployment_writes_no_rollout_status_before_the_specs() -> None:
    ro = rollout_write(isvc(), NODES, edge_nodes(), LABELS, NOW)
    assert ro.decision is not None and "stableVersion" not in status_of(ro)
    assert ro.status_patch is None and not ro.clear_action and ro.action_warning is None
    assert set(ro.decision.targets) == set(NODES)


def test_a_confirmed_first_deployment_records_its_stable_version() -> None:
    ro = rollout_write(isvc(), NODES, edge_nodes(("1", D1)), LABELS, NOW)
    assert ro.status_patch is not None and ro.status_patch["status"]["rollout"]["stableVersion"] == "1"
    assert [e.reason for e in ro.events] == ["Deployed"]


def test_an_advancing_rollout_patches_its_status_rollout() -> None:
    previous = stable_status()
    service = isvc("2", D2, status={"rollout": previous})
    ro = rollout_write(service, NODES, edge_nodes(("1", D1)), LABELS, NOW + 60)
    assert ro.decision is not None and status_of(ro)["phase"] == "Progressing"
    assert ro.status_patch == {"status": {"rollout": merge_patch(previous, status_of(ro))}}
    assert ro.status_patch["status"]["rollout"]["canaryVersion"] == "2"
    assert [(e.reason, e.warning, e.time) for e in ro.events] == [
        ("RolloutStarted", False, "2026-09-21T14:14:20Z")
    ]
    # Unchanged since (nothing reported yet): nothing to write.
    again = rollout_write(
        isvc("2", D2, status={"rollout": status_of(ro)}), NODES, edge_nodes(("1", D1)), LABELS, NOW + 60
    )
    assert again.status_patch is None and again.events == ()


def test_an_action_is_cleared_once_read_and_an_unknown_one_warned_about() -> None:
    previous = stable_status()
    annotated = isvc(
        "2", D2, status={"rollout": previous}, annotations={names.ANNOTATION_ROLLOUT_ACTION: "pause"}
    )
    ro = rollout_write(annotated, NODES, edge_nodes(("1", D1)), LABELS, NOW)
    assert ro.clear_action and ro.action_warning is None
    assert ro.decision is not None and status_of(ro)["phase"] == "Paused"

    bad = isvc(status={"rollout": previous}, annotations={names.ANNOTATION_ROLLOUT_ACTION: "launch"})
    ro = rollout_write(bad, NODES, edge_nodes(("1", D1)), LABELS, NOW)
    assert ro.clear_action and ro.decision is not None
    warning = ro.action_warning
    assert warning is not None and (warning.reason, warning.warning) == ("InvalidRolloutAction", True)
    body = warning.body()
    assert body["type"] == "Warning" and "launch" in body["message"] and body["firstTimestamp"] == STAMP
    assert body["involvedObject"] == {
        "apiVersion": names.API_VERSION,
        "kind": names.INFERENCE_SERVICE_KIND,
        "name": "cam",
        "namespace": "shop",
        "uid": "u1",
    }


def test_an_unusable_rollout_status_holds_the_service() -> None:
    ro = rollout_write(isvc(status={"rollout": {"phase": "Sideways"}}), NODES, edge_nodes(), LABELS, NOW)
    assert ro.decision is None and ro.held.startswith("ValueError")
    assert ro.status_patch is None and ro.events == ()


# --- EdgeNode specs, finalizers, Pods --------------------------------------------------------------


def decision_for(service: dict[str, Any], loaded: tuple[str, str] | None = None) -> rollout.Decision:
    ro = rollout_write(service, NODES, edge_nodes(loaded), LABELS, NOW)
    assert ro.decision is not None
    return ro.decision


def test_edge_node_specs_are_patched_where_they_differ_and_mark_when_work_starts() -> None:
    service = isvc()
    placed = {n: (PlacedModel("shop/cam", "classifier", "1", 64 << 20),) for n in NODES} | {"n3": ()}
    nodes = edge_nodes() | {
        "n3": {
            "metadata": {"name": "n3", "annotations": {names.ANNOTATION_WORK_SINCE: "x"}},
            "spec": {"models": []},
        }
    }
    capacity = dict.fromkeys((*NODES, "n3"), 8 << 30)
    rollouts = {"shop/cam": decision_for(service)}
    specs = {"shop/cam": read_service(service).spec}
    writes = pass_plan.edge_node_spec_writes(placed, rollouts, specs, fleet(nodes), capacity, STAMP)
    assert [w.node for w in writes] == ["n1", "n2", "n3"]
    # n1 and n2 get models to serve; n3, which serves none already, only its bookkeeping
    assert [w.serving for w in writes] == [True, True, False]
    n1 = writes[0].patch
    assert n1["metadata"] == {"annotations": {names.ANNOTATION_WORK_SINCE: STAMP}}
    assert [(m["service"], m["version"], m["memoryBudgetBytes"]) for m in n1["spec"]["models"]] == [
        ("shop/cam", "1", 64 << 20)
    ]
    assert writes[2].patch == {
        "spec": {"models": [], "memoryBudgetBytes": 8 << 30},
        "metadata": {"annotations": {names.ANNOTATION_WORK_SINCE: None}},
    }
    # Written as planned: the next plan is empty.
    for w in writes:
        nodes[w.node]["spec"] = dict(w.patch["spec"])
        nodes[w.node]["metadata"]["annotations"] = {names.ANNOTATION_WORK_SINCE: STAMP}
    assert pass_plan.edge_node_spec_writes(placed, rollouts, specs, fleet(nodes), capacity, STAMP) == ()


def test_artifact_peers_are_written_where_they_change_and_only_then() -> None:
    service = isvc()
    placed = {n: (PlacedModel("shop/cam", "classifier", "1", 64 << 20),) for n in NODES}
    nodes = edge_nodes()
    capacity = dict.fromkeys(NODES, 8 << 30)
    rollouts, specs = {"shop/cam": decision_for(service)}, {"shop/cam": read_service(service).spec}
    peers = {"n1": ("http://10.0.0.2:8000",), "n2": ()}
    writes = pass_plan.edge_node_spec_writes(placed, rollouts, specs, fleet(nodes), capacity, STAMP, peers)
    assert {w.node: w.patch["spec"]["artifactPeers"] for w in writes} == {
        "n1": ["http://10.0.0.2:8000"],
        "n2": [],
    }
    for w in writes:
        nodes[w.node]["spec"] = dict(w.patch["spec"])
        nodes[w.node]["metadata"]["annotations"] = {names.ANNOTATION_WORK_SINCE: STAMP}
    assert (
        pass_plan.edge_node_spec_writes(placed, rollouts, specs, fleet(nodes), capacity, STAMP, peers) == ()
    )
    moved = {"n1": ("http://10.0.0.3:8000",), "n2": ()}
    again = pass_plan.edge_node_spec_writes(placed, rollouts, specs, fleet(nodes), capacity, STAMP, moved)
    assert [(w.node, w.patch["spec"]["artifactPeers"]) for w in again] == [("n1", ["http://10.0.0.3:8000"])]
    assert not again[0].serving  # the node serves what it did: written after the serving changes


def test_a_deleted_service_is_released_once_no_spec_holds_it() -> None:
    gone = isvc(finalizers=["other.io/keep", names.FINALIZER], deletionTimestamp=STAMP)
    holding = edge_nodes()
    holding["n1"]["spec"]["models"] = [{"service": "shop/cam", "model": "classifier"}]
    assert pass_plan.finalizer_releases([gone], fleet(holding)) == ()
    (w,) = pass_plan.finalizer_releases([gone], fleet(edge_nodes()))
    assert (w.finalizers, w.resource_version) == (("other.io/keep",), "7")


def test_agent_pods_follow_the_work() -> None:
    agent = AgentPodSettings()
    placed = {
        "n1": (PlacedModel("shop/cam", "classifier", "1", 1),),
        "n2": (),
        "n3": (PlacedModel("s", "m", "1", 1),),
    }
    pods = {
        names.agent_name("n2"): {"status": {"phase": "Running"}},  # idle: deleted
        names.agent_name("n3"): {"status": {"phase": "Failed"}},  # ended: replaced (deleted first)
    }
    nodes = edge_nodes()
    writes = pass_plan.pod_writes(placed, pods, nodes, agent)
    assert [(w.node, w.create is not None) for w in writes] == [("n1", True), ("n2", False), ("n3", False)]
    assert writes[0].create is not None and writes[0].create["metadata"]["name"] == names.agent_name("n1")
    assert pass_plan.nodes_with_work(placed) == 2


def test_no_agent_pod_on_a_node_whose_agent_runs_outside_the_operator() -> None:
    """A node labelled edgefleet.io/agent-managed-by=systemd (or static-pod) gets no agent Pod, and one
    the operator made before the label is deleted (two agents would serve one EdgeNode); with the
    chart's agents.external every node is such a node."""
    placed = {"n1": (PlacedModel("s", "m", "1", 1),), "n2": (PlacedModel("s", "m", "1", 1),)}
    nodes = [
        {"metadata": {"name": "n1", "labels": {names.LABEL_AGENT_MANAGED_BY: "systemd"}}},
        {"metadata": {"name": "n2", "labels": {names.LABEL_AGENT_MANAGED_BY: "operator"}}},
        {"metadata": {"name": "n3"}},
    ]
    agent = AgentPodSettings()
    external = pass_plan.external_agents(nodes, agent)
    assert external == {"n1"}
    pods = {names.agent_name("n1"): {"status": {"phase": "Running"}}}
    writes = pass_plan.pod_writes(placed, pods, edge_nodes(), agent, external)
    assert [(w.node, w.create is not None) for w in writes] == [("n1", False), ("n2", True)]
    everywhere = pass_plan.external_agents(nodes, dataclasses.replace(agent, external=True))
    assert everywhere == {"n1", "n2", "n3"}
    assert pass_plan.pod_writes(placed, {}, edge_nodes(), agent, everywhere) == ()


# --- bookkeeping -----------------------------------------------------------------------------------


def read(
    nodes: dict[str, Any],
    services: Iterable[tuple[str, str]] = (),
    slices: dict[tuple[str, str], Any] | None = None,
) -> FleetRead:
    pods = {names.agent_name(n): {"status": {"podIP": f"10.0.0.{i}"}} for i, n in enumerate(NODES)}
    return FleetRead([], nodes, {}, [], pods, set(services), slices or {})


def test_a_new_service_gets_events_status_finalizer_service_and_slice() -> None:
    service = isvc()
    ro = rollout_write(service, NODES, edge_nodes(("1", D1)), LABELS, NOW)
    placement = ServicePlacement(NODES, 2)
    events = [PlacementEvent("shop/cam", "Placed", "on n1, n2")]
    plan = bookkeeping(service, placement, ro, events, read(edge_nodes(("1", D1))), 8000, STAMP)
    assert [(e.reason, e.warning) for e in plan.events] == [("Placed", False)]
    assert plan.status_patch is not None
    status = plan.status_patch["status"]
    assert status["readyNodes"] == 2 and status["observedGeneration"] == 1
    assert "rollout" not in status, "the rollout step wrote it already"
    assert status["endpoints"] == ["http://n1:8000", "http://n2:8000"]
    assert plan.finalizer is not None and plan.finalizer.finalizers == (names.FINALIZER,)
    assert plan.create_service is not None and plan.create_service["metadata"]["name"] == "cam-v2"
    assert len(plan.endpoint_slices) == 1 and plan.endpoint_slices[0].create
    assert [e["addresses"] for e in plan.endpoint_slices[0].body["endpoints"]] == [["10.0.0.0"], ["10.0.0.1"]]


def test_written_bookkeeping_plans_nothing_but_what_changed() -> None:
    service = isvc()
    ro = rollout_write(service, NODES, edge_nodes(("1", D1)), LABELS, NOW)
    placement = ServicePlacement(NODES, 2)
    plan = bookkeeping(service, placement, ro, [], read(edge_nodes(("1", D1))), 8000, STAMP)
    assert plan.status_patch is not None and len(plan.endpoint_slices) == 1
    # As the writer leaves it: the status (its rollout written by the rollout step already), the
    # finalizer, the Service and the slice.
    assert ro.decision is not None and ro.status_patch is not None
    written = isvc(
        status=plan.status_patch["status"] | {"rollout": status_of(ro)}, finalizers=[names.FINALIZER]
    )
    slices = {("shop", "cam-v2"): plan.endpoint_slices[0].body}
    again = bookkeeping(
        written, placement, ro, [], read(edge_nodes(("1", D1)), {("shop", "cam-v2")}, slices), 8000, STAMP
    )
    assert (
        again.events,
        again.status_patch,
        again.finalizer,
        again.create_service,
        again.endpoint_slices,
        again.slice_deletes,
    ) == (
        (),
        None,
        None,
        None,
        (),
        (),
    )
    # An agent's Pod lost its IP: the slice's endpoints are patched, nothing else.
    fewer = read(edge_nodes(("1", D1)), {("shop", "cam-v2")}, slices)
    del fewer.pods[names.agent_name("n2")]
    patched = bookkeeping(written, placement, ro, [], fewer, 8000, STAMP)
    assert patched.status_patch is None and len(patched.endpoint_slices) == 1
    assert not patched.endpoint_slices[0].create
    assert [e["nodeName"] for e in patched.endpoint_slices[0].endpoints or []] == ["n1"]


def test_a_failed_placement_is_said_once() -> None:
    service = isvc(status={"message": "needs 2 nodes, 1 fit"})
    ro = rollout_write(service, NODES[:1], edge_nodes(), LABELS, NOW)
    again = [PlacementEvent("shop/cam", "FailedPlacement", "needs 2 nodes, 1 fit")]
    new = [PlacementEvent("shop/cam", "FailedPlacement", "needs 2 nodes, 0 fit")]
    placement = ServicePlacement(NODES[:1], 2, "needs 2 nodes, 1 fit")
    plan = bookkeeping(service, placement, ro, again, read(edge_nodes()), 8000, STAMP)
    assert plan.events == () and plan.placement_events == tuple(again)
    plan = bookkeeping(service, placement, ro, new, read(edge_nodes()), 8000, STAMP)
    assert [(e.reason, e.warning) for e in plan.events] == [("FailedPlacement", True)]


def test_slice_endpoints_are_compared_by_address_node_and_readiness() -> None:
    want = {"endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "n1", "conditions": {"ready": True}}]}
    same = {
        "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "n1", "conditions": {"ready": True}, "x": 1}]
    }
    unready = {"endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "n1", "conditions": {"ready": False}}]}
    assert pass_plan.endpoints_patch(same, want) is None
    assert pass_plan.endpoints_patch(unready, want) == want["endpoints"]
    assert pass_plan.endpoints_patch({}, want) == want["endpoints"]


def test_a_service_on_more_nodes_than_a_slice_holds_gets_several_slices_changed_one_at_a_time() -> None:
    """The API refuses an EndpointSlice of more than 1,000 endpoints: a service's agents go into
    slices of at most `limit`, each agent in exactly one; an unchanged fleet writes nothing, one
    agent's readiness rewrites its own slice only, a new agent fills the slice with room, and a
    shrinking service deletes its last slices (the last first) and moves their agents."""
    obj = isvc()
    limit = 4

    def agents(n: int, not_ready: frozenset[int] = frozenset()) -> list[tuple[str, str, bool]]:
        return [(f"n{i:02d}", f"10.0.0.{i}", i not in not_ready) for i in range(n)]

    def listed_after(writes: tuple[pass_plan.SliceWrite, ...], before: dict[Any, Any]) -> dict[Any, Any]:
        out = dict(before)
        for w in writes:
            out[(w.namespace, w.name)] = w.body
        return out

    def check(listed: dict[Any, Any], want: list[tuple[str, str, bool]]) -> None:
        got = [
            (e["nodeName"], e["addresses"][0], e["conditions"]["ready"])
            for s in listed.values()
            for e in s["endpoints"]
        ]
        assert sorted(got) == sorted(want) and all(len(s["endpoints"]) <= limit for s in listed.values())

    writes, deletes = pass_plan.slice_writes(obj, agents(10), {}, 8000, limit=limit)
    assert [w.name for w in writes] == ["cam-v2", "cam-v2.1", "cam-v2.2"] and deletes == ()
    assert all(w.create for w in writes)
    listed = listed_after(writes, {})
    check(listed, agents(10))
    assert pass_plan.slice_writes(obj, agents(10), listed, 8000, limit=limit) == ((), ())
    flipped, _ = pass_plan.slice_writes(obj, agents(10, frozenset({5})), listed, 8000, limit=limit)
    assert [(w.name, w.create) for w in flipped] == [("cam-v2.1", False)]  # n05's slice only
    grown, _ = pass_plan.slice_writes(obj, agents(11), listed, 8000, limit=limit)
    assert [w.name for w in grown] == ["cam-v2.2"]  # the one with room
    listed = listed_after(grown, listed)
    check(listed, agents(11))
    fewer = [a for a in agents(11) if a[0] not in {"n00", "n01", "n02", "n03", "n04", "n05"}]
    shrunk, deletes = pass_plan.slice_writes(obj, fewer, listed, 8000, limit=limit)
    assert deletes == ("cam-v2.2",)  # 5 agents need 2 slices: the third goes, its agents move
    listed = {k: v for k, v in listed_after(shrunk, listed).items() if k[1] not in deletes}
    check(listed, fewer)
    assert sorted(k[1] for k in listed) == ["cam-v2", "cam-v2.1"]
    # one slice from before slices were split, over the limit: the new slice is written before the
    # old one gives up its agents (no agent missing from every slice in between)
    old = manifests.endpoint_slice(obj, agents(6), 8000)
    split, _ = pass_plan.slice_writes(obj, agents(6), {("shop", "cam-v2"): old}, 8000, limit=limit)
    assert [(w.name, w.create) for w in split] == [("cam-v2.1", True), ("cam-v2", False)]
