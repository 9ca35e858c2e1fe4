"""A whole fleet pass without a cluster: the real reconciler (reads, decisions, writer) against an
in-memory API server (fake_api) that records every request. What only a cluster shows (watches,
the operator process, kill and restart) stays in test_operator*.py."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from unittest.mock import ANY

import pytest
from fake_api import Call, FakeApiServer

from edgefleet_api import names
from edgefleet_operator import rollout
from edgefleet_operator import settings as settings_mod
from edgefleet_operator.metrics import OperatorMetrics
from edgefleet_operator.reconciler import FleetReconciler

NS = "shop"
NOW = 1_790_000_000.0
EDGE_NODES = f"/apis/{names.GROUP}/{names.VERSION}/edgenodes"
SERVICES = f"/apis/{names.GROUP}/{names.VERSION}/namespaces/{NS}/inferenceservices"
D1, D2 = "sha256:" + "1a" * 32, "sha256:" + "2b" * 32


def node(name: str) -> dict[str, Any]:
    labels = {
        names.LABEL_FLEET: "true",
        names.LABEL_DEVICE_CLASS: "jetson-orin",
        "nvidia.com/gpu.memory": "8192",
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
        },
    }


def isvc(name: str, version: str = "1", digest: str = D1, **spec: Any) -> dict[str, Any]:
    model = {
        "name": "classifier",
        "version": version,
        "memoryEstimate": "64Mi",
        "artifact": {"uri": f"repo://classifier/{version}/model.pt", "digest": digest},
    }
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.INFERENCE_SERVICE_KIND,
        "metadata": {"name": name, "namespace": NS, "generation": 1},
        "spec": {"models": [model], "placement": {"replicas": 2}, **spec},
    }


class World:
    """Fleet nodes and services on a fake API server, and a reconciler with a fixed clock."""

    def __init__(self, nodes: tuple[str, ...] = ("n1", "n2"), services: tuple[str, ...] = ("cam",)) -> None:
        self.api = FakeApiServer()
        for n in nodes:
            self.api.add("/api/v1/nodes", node(n))
        for s in services:
            self.api.add(SERVICES, isvc(s))
        self.rec = FleetReconciler(self.api.client, settings_mod.from_env({}), OperatorMetrics(), lambda: NOW)

    def agents_report(self) -> None:
        """Every agent reports what its EdgeNode spec asks for as loaded and Ready, with its endpoint."""
        for en in self.api.objects.copy().values():
            if en.get("kind") != names.EDGE_NODE_KIND:
                continue
            node = en["metadata"]["name"]
            models = [
                {k: m[k] for k in ("service", "model", "version")}
                | {"digest": m["artifact"]["digest"], "state": "Ready"}
                for m in en["spec"]["models"]
            ]
            en["status"] = {"models": models, "endpoint": f"http://{node}.sim:8000"}
            self.api.changed(en)

    def service(self, name: str = "cam") -> dict[str, Any]:
        return self.api.get(f"{SERVICES}/{name}")


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.rec.writer.threads.shutdown()


def first(calls: list[Call], method: str, kind: str) -> int:
    return next(i for i, c in enumerate(calls) if (c.method, c.kind) == (method, kind))


def last(calls: list[Call], method: str, kind: str) -> int:
    return max(i for i, c in enumerate(calls) if (c.method, c.kind) == (method, kind))


def let_the_new_revision_settle(world: World) -> None:
    """A pass that sees the new revision, then time for it to settle: a new revision rolls out
    once the spec has held it `SPEC_SETTLE_S` (the passes after this one roll it out)."""
    settled = [0.0]
    world.rec.reader.views.clock = lambda: settled[0]
    world.rec.reconcile_once()
    settled[0] += rollout.decision.SPEC_SETTLE_S


def test_a_new_service_is_written_phase_by_phase(world: World) -> None:
    report = world.rec.reconcile_once()
    w = world.api.writes()
    kinds = [(c.method, c.kind) for c in w]
    assert kinds == [
        ("POST", "edgenodes"),
        ("POST", "edgenodes"),
        ("PATCH", "edgenodes"),
        ("PATCH", "edgenodes"),
        ("POST", "pods"),
        ("POST", "pods"),
        ("POST", "events"),  # Placed
        ("PATCH", "inferenceservices/status"),
        ("PATCH", "inferenceservices"),  # the finalizer, after the status
        ("POST", "services"),
        ("POST", "endpointslices"),
    ]
    assert [e.body["reason"] for e in w if e.kind == "events"] == ["Placed"]
    # A first deployment's status.rollout goes out with the status, after the specs: one write.
    status = world.service()["status"]
    assert status["rollout"]["phase"] and "stableVersion" not in status["rollout"]
    assert status["conditions"][0]["lastTransitionTime"] == "2026-09-21T14:13:20Z"  # the pass's clock
    assert world.service()["metadata"]["finalizers"] == [names.FINALIZER]
    # The work-since annotation is the pass's clock too.
    en = world.api.get(f"{EDGE_NODES}/n1")
    assert en["metadata"]["annotations"][names.ANNOTATION_WORK_SINCE] == "2026-09-21T14:13:20Z"
    assert report.writes == {
        "edgenode.create": 2,
        "edgenode.patch": 2,
        "pod.create": 2,
        "event.create": 1,
        "inferenceservice.status": 1,
        "inferenceservice.finalizer": 1,
        "service.create": 1,
        "endpointslice.create": 1,
    }
    assert (report.nodes, report.services, report.unplaced, report.deferred) == (2, 1, 0, 0)


def test_a_pass_over_an_unchanged_fleet_writes_nothing(world: World) -> None:
    world.rec.reconcile_once()
    world.agents_report()
    world.rec.reconcile_once()  # the first deployment is confirmed: stable
    world.api.calls.clear()
    report = world.rec.reconcile_once()
    assert report.writes == {} and world.api.writes() == []


def a_canary_of_version_2(world: World) -> None:
    """Version 1 placed and confirmed stable, then the service's spec changed to version 2, rolled
    out in one wave of one node, and settled: the next pass starts its canary."""
    world.rec.reconcile_once()
    world.agents_report()
    world.rec.reconcile_once()
    svc = world.service()
    svc["spec"] = isvc("cam", "2", D2, rollout={"strategy": "Canary", "waves": [{"count": 1}]})["spec"]
    svc["metadata"]["generation"] = 2
    world.api.changed(svc)
    let_the_new_revision_settle(world)


def test_an_advancing_rollout_writes_its_status_before_any_edge_node_spec(world: World) -> None:
    a_canary_of_version_2(world)
    assert world.service()["status"]["rollout"]["stableVersion"] == "1"
    world.api.calls.clear()
    world.rec.reconcile_once()
    w = world.api.writes()
    rollout_patch = first(w, "PATCH", "inferenceservices/status")
    assert set(w[rollout_patch].body["status"]) == {"rollout"}
    assert rollout_patch < first(w, "PATCH", "edgenodes"), [(c.method, c.kind) for c in w]
    specs = {c.path.rsplit("/", 1)[1]: c.body["spec"] for c in w if c.kind == "edgenodes"}
    canaries = world.service()["status"]["rollout"]["canaryNodes"]
    assert len(canaries) == 1 and {m["version"] for m in specs[canaries[0]]["models"]} == {"2"}
    # The other node is told to fetch version 2 ahead (the last wave: promotion takes it next);
    # it keeps serving version 1.
    (other,) = set(specs) - set(canaries)
    assert {m["version"] for m in specs[other]["models"]} == {"1"}
    assert [(p["model"], p["version"], p["trafficWeight"]) for p in specs[other]["prefetch"]] == [
        ("classifier", "2", 0)
    ]
    # The step's events go with its status; the service's status after every spec.
    assert [c.body["reason"] for c in w if c.kind == "events"] == ["RolloutStarted"]
    assert last(w, "PATCH", "edgenodes") < last(w, "PATCH", "inferenceservices/status")


def test_a_wave_s_serving_changes_are_all_written_before_any_prefetch(world: World) -> None:
    """On an API server slow with its agents' writes, a wave's (or a rollback's) canaries are not
    kept waiting behind the next wave's prefetch: every write that changes what a node serves is
    answered before a write that changes only what a node fetches ahead is sent."""
    a_canary_of_version_2(world)

    def slow_serving_write(call: Call) -> None:
        models = ((call.body or {}).get("spec") or {}).get("models") or []
        if call.kind == "edgenodes" and any(m["version"] == "2" for m in models):
            time.sleep(0.2)  # the canary's write, answered late

    world.api.before = slow_serving_write
    world.api.calls.clear()
    world.rec.reconcile_once()
    order = [
        "serving" if any(m["version"] == "2" for m in c.body["spec"]["models"]) else "prefetch"
        for c in world.api.writes()
        if c.kind == "edgenodes"
    ]
    assert order == ["serving", "prefetch"], order


def test_a_rollout_action_is_cleared_and_an_unknown_one_warned_about(world: World) -> None:
    world.rec.reconcile_once()
    world.service()["metadata"]["annotations"] = {names.ANNOTATION_ROLLOUT_ACTION: "launch"}
    world.api.calls.clear()
    report = world.rec.reconcile_once()
    w = world.api.writes()
    assert (w[0].kind, w[0].body["reason"], w[0].body["type"]) == (
        "events",
        "InvalidRolloutAction",
        "Warning",
    )
    # Removed only if unchanged: conditional on the resourceVersion of the service as read.
    assert w[1].kind == "inferenceservices" and w[1].body == {
        "metadata": {"annotations": {names.ANNOTATION_ROLLOUT_ACTION: None}, "resourceVersion": ANY}
    }
    assert names.ANNOTATION_ROLLOUT_ACTION not in world.service()["metadata"].get("annotations", {})
    assert report.writes["inferenceservice.annotation"] == 1


def test_urgent_work_during_the_specs_defers_pods_and_bookkeeping_to_the_next_pass(world: World) -> None:
    def urgent_at_a_spec(call: Call) -> None:
        if call.method == "PATCH" and call.kind == "edgenodes":
            world.rec.urgent.set()  # as a new service's ADDED event would, mid-pass

    world.api.before = urgent_at_a_spec
    first_pass = world.rec.reconcile_once()
    kinds = {(c.method, c.kind) for c in world.api.calls}
    assert ("PATCH", "edgenodes") in kinds
    assert first_pass.deferred == 3, first_pass  # two nodes' Pods, one service's bookkeeping
    # Not even their reads: the next pass starts at once.
    assert not {k for _, k in kinds} & {
        "pods",
        "events",
        "inferenceservices/status",
        "services",
        "endpointslices",
    }

    world.api.before = None
    world.api.calls.clear()
    second = world.rec.reconcile_once()
    assert second.deferred == 0 and second.writes["pod.create"] == 2, second
    # Placement said Placed in the first pass (not this one): the event was carried over.
    assert [c.body["reason"] for c in world.api.writes() if c.kind == "events"] == ["Placed"]
    assert world.service()["status"]["observedGeneration"] == 1


def one_write_at_a_time(world: World) -> None:
    """Writes in a known order: a write not yet started when `urgent` is set is one that follows."""
    world.rec.writer.threads.shutdown()
    world.rec.writer.threads = ThreadPoolExecutor(1)


def test_urgent_work_during_the_pods_defers_the_pods_and_bookkeeping_not_yet_started() -> None:
    world = World(services=("a", "b"))
    one_write_at_a_time(world)

    def urgent_at_first_pod(call: Call) -> None:
        if call.method == "POST" and call.kind == "pods":
            world.rec.urgent.set()

    world.api.before = urgent_at_first_pod
    report = world.rec.reconcile_once()
    assert report.writes["pod.create"] == 1 and report.deferred == 1 + 2, report  # a Pod, two services
    assert not [c for c in world.api.calls if c.kind in ("events", "inferenceservices/status", "services")]
    world.api.before = None
    world.api.calls.clear()
    report = world.rec.reconcile_once()
    assert report.writes["pod.create"] == 1 and report.deferred == 0, report
    placed = [c.body["involvedObject"]["name"] for c in world.api.writes() if c.kind == "events"]
    assert sorted(placed) == ["a", "b"], "the first pass's Placed events, carried"
    world.rec.writer.threads.shutdown()


def test_urgent_work_during_the_bookkeeping_defers_the_services_not_yet_started() -> None:
    world = World(services=("a", "b"))
    one_write_at_a_time(world)

    def urgent_at_first_event(call: Call) -> None:
        if call.method == "POST" and call.kind == "events":
            world.rec.urgent.set()

    world.api.before = urgent_at_first_event
    report = world.rec.reconcile_once()
    # The service whose bookkeeping had started finishes it; the other waits for the next pass.
    assert report.deferred == 1 and report.writes["inferenceservice.status"] == 1, report
    done = next(c.body["involvedObject"]["name"] for c in world.api.calls if c.kind == "events")
    world.api.before = None
    world.api.calls.clear()
    report = world.rec.reconcile_once()
    assert report.deferred == 0 and report.writes["inferenceservice.status"] == 1, report
    placed = [c.body["involvedObject"]["name"] for c in world.api.writes() if c.kind == "events"]
    assert placed == [{"a": "b", "b": "a"}[done]], "its Placed event, carried"
    world.rec.writer.threads.shutdown()


def test_an_edge_node_gone_since_the_read_is_skipped_not_fatal(world: World) -> None:
    world.api.fail[("PATCH", f"{EDGE_NODES}/n1")] = 404
    report = world.rec.reconcile_once()
    assert report.writes["edgenode.patch"] == 1 and report.writes["pod.create"] == 2
    assert world.service()["status"]["observedGeneration"] == 1


def test_api_errors_are_tolerated_where_the_next_pass_mends_them(world: World) -> None:
    events = ("POST", f"/api/v1/namespaces/{NS}/events")
    world.api.fail[events] = 403  # events are best effort (a terminating namespace refuses them)
    report = world.rec.reconcile_once()
    assert "event.create" not in report.writes and report.writes["inferenceservice.status"] == 1
    del world.api.fail[events]
    world.agents_report()
    world.rec.reconcile_once()  # stable: the rollout writes nothing more

    world.service()["status"]["observedGeneration"] = 0  # the next status differs: it is written
    world.service()["metadata"]["finalizers"] = []
    world.api.fail[("PATCH", f"{SERVICES}/cam/status")] = 404  # the service went meanwhile
    report = world.rec.reconcile_once()
    assert report.writes["service.error"] == 1, report
    assert "inferenceservice.finalizer" not in report.writes, "nothing after a failed status write"

    del world.api.fail[("PATCH", f"{SERVICES}/cam/status")]
    world.api.fail[("PATCH", f"{SERVICES}/cam")] = 409  # another controller wrote it: next pass
    report = world.rec.reconcile_once()
    assert "service.error" not in report.writes and report.writes["inferenceservice.status"] == 1
    assert "inferenceservice.finalizer" not in report.writes
    del world.api.fail[("PATCH", f"{SERVICES}/cam")]
    assert world.rec.reconcile_once().writes == {"inferenceservice.finalizer": 1}


def test_bookkeeping_the_api_server_keeps_refusing_backs_off(world: World) -> None:
    """A Service the API server refuses on every try (a 500: no cluster IP left) is tried on the
    next pass, then after a doubling backoff, not on every pass; the first success ends it."""
    create = ("POST", f"/api/v1/namespaces/{NS}/services")
    world.api.fail[create] = 500
    tries = 0
    for _ in range(6):  # passes back to back: well within the backoff after the second failure
        world.api.calls.clear()
        world.rec.reconcile_once()
        tries += sum(1 for c in world.api.calls if (c.method, c.kind) == ("POST", "services"))
    assert tries == 2, "the first failure is retried at once, the second waits"
    failures, until = world.rec.writer.held_back[f"{NS}/cam"]
    assert failures == 2 and until > 0
    del world.api.fail[create]
    world.rec.writer.held_back[f"{NS}/cam"] = (failures, 0.0)  # its backoff over
    world.api.calls.clear()
    world.rec.reconcile_once()
    assert [c.kind for c in world.api.writes() if c.method == "POST"].count("services") == 1
    assert f"{NS}/cam" not in world.rec.writer.held_back


def test_bookkeeping_refused_in_a_namespace_being_deleted_is_not_a_warning(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleting a namespace of a thousand services refuses their Services' re-creation while they
    go: expected, so it backs off as any refusal does but logs no warning per service."""
    terminating = (
        f'services "cam" is forbidden: unable to create new content in namespace {NS} because it is '
        "being terminated"
    )
    world.api.fail[("POST", f"/api/v1/namespaces/{NS}/services")] = (403, terminating)
    with caplog.at_level(logging.DEBUG, logger="edgefleet_operator.fleet_writer"):
        report = world.rec.reconcile_once()
    assert report.writes["service.error"] == 1 and world.rec.writer.held_back[f"{NS}/cam"][0] == 1
    said = [r for r in caplog.records if "could not update" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.DEBUG], said
    world.api.fail[("POST", f"/api/v1/namespaces/{NS}/services")] = 500  # any other refusal warns
    caplog.clear()
    world.rec.reconcile_once()
    assert [r.levelno for r in caplog.records if "could not update" in r.getMessage()] == [logging.WARNING]


def test_a_failed_pod_is_replaced_and_idle_agents_removed(world: World) -> None:
    world.rec.reconcile_once()
    pods = {c.body["metadata"]["name"] for c in world.api.writes() if c.kind == "pods"}
    for pod in pods:
        world.api.get(f"/api/v1/namespaces/edgefleet-system/pods/{pod}")["status"] = {"phase": "Failed"}
    world.api.calls.clear()
    world.rec.reconcile_once()
    assert [c.method for c in world.api.writes() if c.kind == "pods"] == ["DELETE", "DELETE"]
    world.rec.reconcile_once()
    world.api.get(f"{SERVICES}/cam")["metadata"]["deletionTimestamp"] = "2026-09-21T14:13:20Z"
    world.api.calls.clear()
    report = world.rec.reconcile_once()
    assert report.writes["pod.delete"] == 2 and report.writes["inferenceservice.finalizer"] == 1
    w = world.api.writes()
    # The finalizer goes once no EdgeNode spec holds the service: after the specs are written.
    assert last(w, "PATCH", "edgenodes") < first(w, "PATCH", "inferenceservices") < first(w, "DELETE", "pods")
    assert world.service()["metadata"]["finalizers"] == []


def test_a_service_whose_rollout_holds_holds_alone() -> None:
    """An unusable status.rollout (edited by hand), or one the API refused: that service's specs and
    bookkeeping wait; the fleet's pass goes on."""
    world = World(services=("cam", "odd"))
    world.service("odd")["status"] = {"rollout": {"phase": "Sideways"}}
    report = world.rec.reconcile_once()
    assert report.writes["rollout.invalid"] == 1 and report.writes["inferenceservice.status"] == 1, report
    assert world.service("cam")["status"]["observedGeneration"] == 1
    assert world.service("odd")["status"] == {"rollout": {"phase": "Sideways"}}
    assert not [
        m
        for n in ("n1", "n2")
        for m in world.api.get(f"{EDGE_NODES}/{n}")["spec"]["models"]
        if m["service"] == f"{NS}/odd"
    ]

    world.agents_report()
    world.rec.reconcile_once()  # cam's first deployment is confirmed: stable
    cam = world.service("cam")
    cam["spec"] = isvc("cam", "2", D2, rollout={"strategy": "Canary", "waves": [{"count": 1}]})["spec"]
    cam["metadata"]["generation"] = 2
    let_the_new_revision_settle(world)
    del world.service("odd")["status"]  # mended
    world.api.fail[("PATCH", f"{SERVICES}/cam/status")] = 500  # and now cam's rollout cannot be written
    world.api.calls.clear()
    report = world.rec.reconcile_once()  # (cam's canary would start: its status.rollout goes first)
    assert report.writes["rollout.error"] == 1 and "service.error" not in report.writes, report
    assert report.writes["inferenceservice.status"] == 1 and world.service("odd")["status"]["readyNodes"] == 0
    assert {m["version"] for n in ("n1", "n2") for m in world.api.get(f"{EDGE_NODES}/{n}")["spec"]["models"]
            if m["service"] == f"{NS}/cam"} == {"1"}  # fmt: skip
    posted = [
        (c.body["involvedObject"]["name"], c.body["reason"]) for c in world.api.writes() if c.kind == "events"
    ]
    assert posted == [("odd", "Placed")], "placed (on specs) once its rollout goes on, and said once"


def test_a_step_that_changes_no_node_goes_out_with_the_status_in_one_write(world: World) -> None:
    """A first deployment confirmed by its nodes changes no EdgeNode: its status.rollout and the
    service's status are one write, its Deployed event goes with it, and a pass that defers the
    bookkeeping posts nothing: the next pass takes the same step and says it once."""
    world.rec.reconcile_once()
    world.agents_report()
    world.rec.urgent.set()

    def keep_urgent(call: Call) -> None:
        if call.method == "GET":
            world.rec.urgent.set()  # urgent work arrives mid-pass: the bookkeeping waits

    world.api.before = keep_urgent
    world.api.calls.clear()
    deferred = world.rec.reconcile_once()
    assert deferred.deferred and world.api.writes() == [], deferred.writes
    assert "stableVersion" not in world.service()["status"]["rollout"]
    world.api.before = None
    world.api.calls.clear()
    report = world.rec.reconcile_once()
    w = world.api.writes()
    assert [(c.method, c.kind) for c in w] == [("POST", "events"), ("PATCH", "inferenceservices/status")]
    assert [c.body["reason"] for c in w if c.kind == "events"] == ["Deployed"]
    assert report.writes == {"event.create": 1, "inferenceservice.status": 1}, report.writes
    status = world.service()["status"]
    assert status["rollout"]["stableVersion"] == "1" and status["readyNodes"] == 2, status


# --- one writer: conditional writes and the ownership gate --------------------------------------


def test_a_rollout_action_set_again_during_the_pass_is_kept_for_the_next(world: World) -> None:
    a_canary_of_version_2(world)
    world.rec.reconcile_once()
    assert world.service()["status"]["rollout"]["phase"] == "Progressing"
    world.service()["metadata"]["annotations"] = {names.ANNOTATION_ROLLOUT_ACTION: "pause"}
    world.api.changed(world.service())

    def user_sets_resume(call: Call) -> None:  # as the pass writes the rollout step, a user edits
        if call.method == "PATCH" and call.kind == "inferenceservices/status" and world.api.before:
            world.api.before = None
            world.service()["metadata"]["annotations"][names.ANNOTATION_ROLLOUT_ACTION] = "resume"
            world.api.changed(world.service())

    world.api.before = user_sets_resume
    report = world.rec.reconcile_once()
    assert world.service()["status"]["rollout"]["phase"] == "Paused", "the pause was acted on"
    assert world.service()["metadata"]["annotations"][names.ANNOTATION_ROLLOUT_ACTION] == "resume"
    assert report.writes.get("inferenceservice.annotation.changed") == 1
    assert "inferenceservice.annotation" not in report.writes
    again = world.rec.reconcile_once()  # the user's resume is not lost: this pass acts on it
    assert world.service()["status"]["rollout"]["phase"] == "Progressing"
    assert names.ANNOTATION_ROLLOUT_ACTION not in world.service()["metadata"]["annotations"]
    assert again.writes.get("inferenceservice.annotation") == 1


def test_a_spec_write_conflicting_with_a_status_report_is_written_on_the_new_version(world: World) -> None:
    def agent_reports(call: Call) -> None:
        if call.method == "PATCH" and call.kind == "edgenodes" and call.path.endswith("/n1"):
            en = world.api.get(f"{EDGE_NODES}/n1")
            if not en.get("status"):
                en["status"] = {"endpoint": "http://n1.sim:8000"}
                world.api.changed(en)

    world.api.before = agent_reports
    report = world.rec.reconcile_once()
    patches = [c for c in world.api.calls if c.method == "PATCH" and c.path.endswith("/edgenodes/n1")]
    assert len(patches) == 2, "409 on the first, written on the second"
    assert patches[0].body["metadata"]["resourceVersion"] != patches[1].body["metadata"]["resourceVersion"]
    assert world.api.get(f"{EDGE_NODES}/n1")["spec"]["models"], "the spec was written"
    assert report.writes["edgenode.patch"] == 2 and "edgenode.conflict" not in report.writes


def test_a_spec_changed_since_the_read_is_not_overwritten_but_re_planned(world: World) -> None:
    world.rec.reconcile_once()
    world.agents_report()
    world.rec.reconcile_once()

    def someone_edits_the_spec(call: Call) -> None:
        if call.method == "PATCH" and call.kind == "edgenodes" and call.path.endswith("/n1"):
            en = world.api.get(f"{EDGE_NODES}/n1")
            if en["spec"].get("memoryBudgetBytes") != 1:
                en["spec"]["memoryBudgetBytes"] = 1  # as a replica that lost its hold would
                world.api.changed(en)

    svc = world.service()
    svc["spec"] = isvc("cam", "2", D2, rollout={"strategy": "Canary", "waves": [{"count": 2}]})["spec"]
    svc["metadata"]["generation"] = 2
    world.api.changed(svc)
    let_the_new_revision_settle(world)
    world.api.before = someone_edits_the_spec
    report = world.rec.reconcile_once()
    assert report.writes.get("edgenode.conflict") == 1, report.writes
    assert world.api.get(f"{EDGE_NODES}/n1")["spec"]["memoryBudgetBytes"] == 1, "not overwritten blindly"
    world.api.before = None
    world.rec.reconcile_once()  # re-read, re-planned, written
    assert world.api.get(f"{EDGE_NODES}/n1")["spec"]["memoryBudgetBytes"] > 1


def test_a_pass_that_loses_its_hold_stops_writing(world: World) -> None:
    from edgefleet_operator.ownership import HoldLost

    held = {"yes": True}

    def gate(shard: str) -> None:
        if not held["yes"]:
            raise HoldLost(f"shard {shard} no longer held")

    def lose_at_the_first_spec(call: Call) -> None:
        if call.method == "PATCH" and call.kind == "edgenodes":
            held["yes"] = False

    world.rec.gate = gate
    world.api.before = lose_at_the_first_spec
    with pytest.raises(HoldLost):
        world.rec.reconcile_once()
    kinds = [(c.method, c.kind) for c in world.api.writes()]
    assert kinds == [("POST", "edgenodes"), ("POST", "edgenodes"), ("PATCH", "edgenodes")], kinds
    world.api.calls.clear()
    with pytest.raises(HoldLost):  # a replica that holds nothing reads nothing either
        world.rec.reconcile_once()
    assert world.api.calls == []
