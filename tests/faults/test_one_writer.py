"""One writer (issue 16 part 5): two real operator processes against the real local API server.

Each test asserts its invariant:
- two operators at once: every EdgeNode spec write comes from the replica that held the fleet's
  shard Lease at that moment (its writer annotation, against the Lease's history in etcd's write
  order); a replica that never held it wrote nothing; no spec write conflicted;
- the holder SIGKILLed mid-wave: the other takes over within the bound (lease duration + two
  renew periods, plus a pass) and the rollout resumes where it was: no wave skipped or repeated,
  status.rollout never goes backwards;
- the holder SIGKILLed mid-delete of a service: the delete completes (finalizer released, no
  EdgeNode spec entry, no agent Pod, no Service left);
- a user editing the rollout-action annotation and the spec while the operator writes: every
  action is acted on (none cleared unseen) and no field of the user's is lost.

The simulated agents (e2e.sim_agent) stand in for node agents: what is tested is who writes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.operator_proc import AGENT_NAMESPACE, ensure_agent_namespace
from e2e.waiting import eventually
from edgefleet_api import names
from faults.one_writer_support import BOUND_S, LEASE_S, Fleet, Recorder, Replica, writer

pytestmark = pytest.mark.cluster

FAST = {"intervalSeconds": 2, "minSamples": 10, "failureLimit": 1}
LONG = {"intervalSeconds": 3600, "minSamples": 10, "failureLimit": 1}
PASS_SLACK_S = 5.0
"""A pass after the takeover, on a 2-core machine shared with other tests."""


class Pair:
    """The module's two operator replicas, started together."""

    def __init__(self, control_plane: Any, log_dir: Path) -> None:
        self.control_plane, self.log_dir = control_plane, log_dir
        self.replicas: list[Replica] = []

    def start(self) -> list[Replica]:
        if not self.replicas:
            self.replicas = [Replica(self.control_plane, self.log_dir, label) for label in ("a", "b")]
        return self.replicas

    def by_identity(self, identity: str) -> Replica:
        (found,) = [r for r in self.replicas if r.identity == identity]
        return found

    def holder(self, recorder: Recorder, fleet: Fleet) -> tuple[Replica, Replica]:
        """(the replica holding the fleet shard, the other), once one holds it."""
        ids = {r.identity for r in self.replicas}
        held = wait(lambda: (h := recorder.holder()) in ids and h, fleet, "a replica to hold the fleet")
        holder = self.by_identity(held)
        return holder, next(r for r in self.replicas if r is not holder)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture(scope="module")
def pair(control_plane: Any, kube: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    ensure_agent_namespace(kube)
    p = Pair(control_plane, tmp_path_factory.mktemp("one-writer"))
    yield p
    from kubernetes import client

    custom: Any = client.CustomObjectsApi(kube)

    def released() -> bool:
        items = custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.INFERENCE_SERVICE_PLURAL)
        return not [s for s in items["items"] if s["metadata"].get("deletionTimestamp")]

    with contextlib.suppress(AssertionError):
        eventually(released, timeout_s=30, what="deleted services released")
    for r in p.replicas:
        r.proc.stop()
    logs = p.logs()
    assert "Traceback" not in logs, logs[logs.index("Traceback") :][:3000]


@pytest.fixture
def fleet(kube: Any, namespace: str) -> Iterator[Fleet]:
    f = Fleet(kube, namespace, 4)
    yield f
    f.cleanup()


def wait(check: Callable[[], Any], fleet: Fleet, what: str, timeout_s: float = 45) -> Any:
    """Poll `check` while the simulated agents report."""
    return eventually(check, timeout_s, what, step=fleet.agents.step)


def assert_one_writer(recorder: Recorder, fleet: Fleet, replicas: list[Replica]) -> int:
    """Every spec write of the fleet's EdgeNodes came from the shard's holder at that moment; returns
    how many there were."""
    writes = recorder.spec_writes(set(fleet.nodes))
    ids = {r.identity for r in replicas}
    for w in writes:
        assert writer(w) in ids, (w.name, writer(w), ids)
        assert writer(w) == recorder.holder_at(w.revision), (
            f"{w.name} spec written at revision {w.revision} by {writer(w)} while "
            f"{recorder.holder_at(w.revision)!r} held the fleet"
        )
    assert sum(r.writes("edgenode.conflict") for r in replicas if r.proc.alive()) == 0
    return len(writes)


def deploy(fleet: Fleet, name: str, replicas: int) -> None:
    fleet.apply(fleet.service(name, placement={"replicas": replicas}))
    wait(
        lambda: fleet.ready(name) and fleet.rollout(name).get("stableVersion") == "1",
        fleet,
        f"{name} v1 ready and stable",
    )


def start_rollout(fleet: Fleet, name: str, waves: list[dict[str, Any]], analysis: dict[str, Any]) -> None:
    spec = fleet.service(name, "2", rollout={"strategy": "Canary", "waves": waves, "analysis": analysis})
    spec["spec"]["placement"] = fleet.get(name)["spec"]["placement"]
    fleet.patch(name, {"spec": spec["spec"]})


# --- (a) ------------------------------------------------------------------------------------------


def test_two_operators_at_once_write_as_one(kube: Any, namespace: str, pair: Pair, fleet: Fleet) -> None:
    recorder = Recorder(kube, namespace)
    try:
        replicas = pair.start()  # both at once, racing for the shard
        for i in range(4):
            fleet.apply(fleet.service(f"s{i}", placement={"replicas": 2}))
        wait(
            lambda: all(len(fleet.holders(f"s{i}")) == 2 and fleet.ready(f"s{i}") for i in range(4)),
            fleet,
            "every service on 2 nodes and Ready",
        )
        assert assert_one_writer(recorder, fleet, replicas) >= 4
        holders = {recorder.holder_at(s.revision) for s in recorder.events("leases")} - {""}
        for r in replicas:
            if r.identity not in holders:  # it never held the fleet: it wrote nothing at all
                assert r.metric("edgefleet_operator_reconciles_total", result="ok") == 0
                assert sum(r.writes(w) for w in ("edgenode.patch", "pod.create", "event.create")) == 0
        holder, standby = pair.holder(recorder, fleet)
        assert holder.metric("edgefleet_operator_shards_held", shard="fleet") == 1
        assert standby.metric("edgefleet_operator_shards_held", shard="fleet") == 0
        assert standby.proc.alive(), standby.proc.tail()

        # A holder stopped gracefully (SIGTERM: a rolling update, a drain) hands over at once: it
        # releases its Lease, and the other takes it at its next round, not after a lease duration.
        stopped_at = time.monotonic()
        holder.proc.stop()
        took = wait(
            lambda: recorder.holder() == standby.identity and time.monotonic(),
            fleet,
            "the standby to take over from a stopped holder",
            timeout_s=30,
        )
        assert took - stopped_at < LEASE_S, f"handover took {took - stopped_at:.2f} s"
        holder.restart()
    finally:
        recorder.stop()


# --- (b) ------------------------------------------------------------------------------------------


def test_holder_killed_mid_wave_the_other_resumes_the_rollout(
    kube: Any, namespace: str, pair: Pair, fleet: Fleet
) -> None:
    replicas = pair.start()
    deploy(fleet, "roll", 4)
    recorder = Recorder(kube, namespace)
    try:
        start_rollout(fleet, "roll", [{"count": 1}, {"count": 2}, {"count": 4}], FAST)
        wait(
            lambda: (r := fleet.rollout("roll")).get("currentWave") == 1 and r.get("phase") == "Progressing",
            fleet,
            "the rollout in its second wave",
        )
        holder, survivor = pair.holder(recorder, fleet)
        killed_at = holder.kill()
        fleet.apply(fleet.service("probe", placement={"replicas": 1}))  # work for the survivor at once

        def survivor_wrote() -> float | None:
            mine = [
                w.at_s
                for w in recorder.spec_writes(set(fleet.nodes))
                if writer(w) == survivor.identity and w.at_s > killed_at
            ]
            return min(mine) if mine else None

        first = wait(survivor_wrote, fleet, "the survivor's first EdgeNode spec write", timeout_s=30)
        failover_s = first - killed_at
        print(
            f"\nfailover: SIGKILL -> the survivor's first spec write {failover_s:.2f} s (bound {BOUND_S} s)"
        )
        assert failover_s <= BOUND_S + PASS_SLACK_S, failover_s

        final = wait(
            lambda: (r := fleet.rollout("roll")).get("phase") == "Promoted" and r,
            fleet,
            "the rollout promoted by the survivor",
            timeout_s=60,
        )
        assert final["stableVersion"] == "2"
        assert all(vs == {"2"} for vs in fleet.versions("roll").values())
        # Each wave analysed (passed) exactly once: none skipped, none repeated after the takeover.
        assert [a["wave"] for a in final["analysis"] if a["result"] == "Passed"] == [0, 1, 2], final[
            "analysis"
        ]
        assert [(h["fromVersion"], h["toVersion"]) for h in final["history"]][:1] == [("1", "2")]
        # status.rollout never went backwards: (phase, wave, canary nodes) only advanced.
        rank = {"Progressing": 0, "Promoted": 1, "Idle": 1}
        progress = []
        for s in recorder.events("inferenceservices"):
            r = (s.obj.get("status") or {}).get("rollout") or {}
            if (
                s.name == "roll"
                and r.get("phase") in rank
                and (r.get("canaryVersion") or r.get("stableVersion")) == "2"
            ):
                progress.append((rank[r["phase"]], r.get("currentWave", 0), len(r.get("canaryNodes") or [])))
        assert progress and progress == sorted(progress), progress
        assert {p[1] for p in progress if p[0] == 0} == {0, 1, 2}, progress
        assert_one_writer(recorder, fleet, replicas)
    finally:
        recorder.stop()
        for r in replicas:
            if not r.proc.alive():
                r.restart()


# --- (c) ------------------------------------------------------------------------------------------


def test_holder_killed_mid_delete_the_delete_completes(
    kube: Any, namespace: str, pair: Pair, fleet: Fleet
) -> None:
    from kubernetes import client

    core: Any = client.CoreV1Api(kube)
    replicas = pair.start()
    deploy(fleet, "gone", 4)

    def agent_pods() -> set[str]:
        pods = core.list_namespaced_pod(
            AGENT_NAMESPACE, label_selector=f"app.kubernetes.io/name={names.AGENT_APP}"
        )
        return {
            p.metadata.labels.get(names.LABEL_NODE)
            for p in pods.items
            if p.metadata.labels.get(names.LABEL_NODE) in fleet.nodes and not p.metadata.deletion_timestamp
        }

    wait(lambda: agent_pods() == set(fleet.nodes), fleet, "an agent Pod per node")
    recorder = Recorder(kube, namespace)
    try:
        holder, _ = pair.holder(recorder, fleet)
        fleet.custom.delete_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, "gone"
        )
        # Killed with the delete under way (a pass starts >= 0.1 s after the event; the kill is sent
        # at once): `kubectl delete` is waiting on our finalizer, the models still on their nodes.
        holder.kill()
        left = fleet.get("gone")
        assert left["metadata"].get("deletionTimestamp") and names.FINALIZER in left["metadata"]["finalizers"]
        holder.restart()

        def gone() -> bool:
            try:
                fleet.get("gone")
                return False
            except client.exceptions.ApiException as e:
                return e.status == 404

        wait(gone, fleet, "the service deleted (finalizer released)", timeout_s=30)
        assert fleet.holders("gone") == [], "no EdgeNode spec entry left"
        wait(lambda: not agent_pods(), fleet, "no agent Pod left on nodes without work", timeout_s=30)
        wait(
            lambda: (
                not [s for s in core.list_namespaced_service(namespace).items if s.metadata.name == "gone-v2"]
            ),
            fleet,
            "its Service gone",
            timeout_s=30,
        )
        assert_one_writer(recorder, fleet, replicas)
    finally:
        recorder.stop()


# --- (d) ------------------------------------------------------------------------------------------


def test_a_user_edit_racing_the_operator_loses_no_field(
    kube: Any, namespace: str, pair: Pair, fleet: Fleet
) -> None:
    replicas = pair.start()
    deploy(fleet, "race", 2)
    start_rollout(fleet, "race", [{"count": 1}, {"count": 2}], LONG)
    wait(lambda: fleet.rollout("race").get("phase") == "Progressing", fleet, "the rollout in its first wave")

    def kept() -> float:  # the operator's clears skipped because the user had set another action
        return sum(r.writes("inferenceservice.annotation.changed") for r in replicas if r.proc.alive())

    before = kept()
    rounds = 10
    for i in range(rounds):
        # A user pauses, and resumes the moment the pause shows in status: while the operator is about
        # to remove the annotation it acted on. With the user's own fields in the same edit. The
        # resume must not be lost: the rollout must end up Progressing with no action left.
        resume_when_paused(fleet, i)
        wait(
            lambda: (
                fleet.rollout("race").get("phase") == "Progressing"
                and names.ANNOTATION_ROLLOUT_ACTION
                not in (fleet.get("race")["metadata"].get("annotations") or {})
            ),
            fleet,
            f"edit {i}: the resume acted on and cleared",
            15,
        )
    print(f"\nthe resume beat the operator's clear of the pause in {kept() - before:g} of {rounds} rounds")
    obj = wait(
        lambda: (
            names.ANNOTATION_ROLLOUT_ACTION
            not in ((o := fleet.get("race"))["metadata"].get("annotations") or {})
            and o
        ),
        fleet,
        "the last action cleared",
    )
    assert obj["metadata"]["annotations"]["example.com/note"] == str(rounds - 1)
    assert obj["spec"]["sla"]["p95LatencyMs"] == 20 + rounds - 1
    assert fleet.rollout("race")["phase"] == "Progressing"


def resume_when_paused(fleet: Fleet, i: int) -> None:
    """Set the pause action; the moment a watch shows the operator's Paused status, set resume (and
    the user's own fields): about when the operator removes the pause it acted on."""
    from kubernetes import watch

    since = fleet.get("race")["metadata"]["resourceVersion"]
    fleet.patch("race", {"metadata": {"annotations": {names.ANNOTATION_ROLLOUT_ACTION: "pause"}}})
    w = watch.Watch()
    stream = w.stream(
        fleet.custom.list_namespaced_custom_object,
        names.GROUP,
        names.VERSION,
        fleet.namespace,
        names.INFERENCE_SERVICE_PLURAL,
        field_selector="metadata.name=race",
        resource_version=since,
        timeout_seconds=15,
    )
    try:
        for event in stream:
            obj = event["object"]
            if ((obj.get("status") or {}).get("rollout") or {}).get("phase") != "Paused":
                continue
            fleet.patch(
                "race",
                {
                    "metadata": {
                        "annotations": {names.ANNOTATION_ROLLOUT_ACTION: "resume", "example.com/note": str(i)}
                    },
                    "spec": {"sla": {"p95LatencyMs": 20 + i, "p99LatencyMs": 40}},
                },
            )
            return
    finally:
        w.stop()
    raise AssertionError(f"round {i}: the pause never showed in status")
