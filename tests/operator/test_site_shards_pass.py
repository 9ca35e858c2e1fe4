"""Fleet passes of two replicas sharing a fleet by shards (no cluster: the real reconciler against the
in-memory API server): the fleet shard's holder decides and writes EdgeNodes, specs and services;
the holder of a node's site shard judges its health, publishes it on the EdgeNode, and keeps its
agent Pod. Neither writes what the other's shards own."""

from __future__ import annotations

from typing import Any

from fake_api import Call, FakeApiServer
from test_fleet_pass import EDGE_NODES, NOW, SERVICES, isvc, node

from edgefleet_api import names
from edgefleet_operator import settings as settings_mod
from edgefleet_operator.fleet_types import Health
from edgefleet_operator.metrics import OperatorMetrics
from edgefleet_operator.ownership import FLEET_SHARD, site_shard
from edgefleet_operator.reconciler import FleetReconciler

SHARDS = 2


def sited_node(name: str, site: str) -> dict[str, Any]:
    obj = node(name)
    obj["metadata"]["labels"][names.LABEL_SITE] = site
    return obj


def replica(api: FakeApiServer, held: set[str]) -> FleetReconciler:
    settings = settings_mod.from_env({"EDGEFLEET_SITE_SHARDS": str(SHARDS)})
    rec = FleetReconciler(api.client, settings, OperatorMetrics(), lambda: NOW)
    rec.held = lambda: frozenset(held)
    return rec


def kinds(calls: list[Call]) -> list[tuple[str, str]]:
    return [(c.method, c.kind) for c in calls]


def two_sites() -> tuple[str, str]:
    """Two site names that hash to different site shards."""
    first = "store-0"
    other = next(
        f"store-{i}" for i in range(1, 100) if site_shard(f"store-{i}", SHARDS) != site_shard(first, SHARDS)
    )
    return first, other


def test_the_fleet_holder_decides_and_site_holders_judge_health_and_keep_pods() -> None:
    api = FakeApiServer()
    a, b = two_sites()
    api.add("/api/v1/nodes", sited_node("n1", a))
    api.add("/api/v1/nodes", sited_node("n2", b))
    api.add(SERVICES, isvc("cam"))
    coordinator = replica(api, {FLEET_SHARD})
    sites = replica(api, {site_shard(a, SHARDS), site_shard(b, SHARDS)})
    try:
        report = coordinator.reconcile_once()
        assert kinds(api.writes())[:2] == [("POST", "edgenodes"), ("POST", "edgenodes")]
        assert not any(api.get(f"{EDGE_NODES}/{n}")["spec"].get("models") for n in ("n1", "n2")), (
            "placed on nodes of unknown health"
        )
        assert report.health == {"n1": Health.SUSPECT.value, "n2": Health.SUSPECT.value}

        api.calls.clear()
        report = sites.reconcile_once()
        assert kinds(api.writes()) == [("PATCH", "edgenodes"), ("PATCH", "edgenodes")]
        for call in api.writes():  # the health annotation, nothing else
            assert call.body == {"metadata": {"annotations": {names.ANNOTATION_HEALTH: "Healthy"}}}
        assert report.writes == {"edgenode.health": 2}

        api.calls.clear()
        coordinator.reconcile_once()
        written = kinds(api.writes())
        assert written.count(("PATCH", "edgenodes")) == 2  # the specs: placed on both
        assert ("POST", "pods") not in written, "the fleet holder made a Pod of a site it does not hold"
        assert all(api.get(f"{EDGE_NODES}/{n}")["spec"]["models"] for n in ("n1", "n2"))

        api.calls.clear()
        report = sites.reconcile_once()
        assert kinds(api.writes()) == [("POST", "pods"), ("POST", "pods")]
        assert report.writes == {"pod.create": 2}
    finally:
        coordinator.writer.threads.shutdown()
        sites.writer.threads.shutdown()


def test_a_site_holder_writes_only_for_its_own_sites() -> None:
    api = FakeApiServer()
    a, b = two_sites()
    api.add("/api/v1/nodes", sited_node("n1", a))
    api.add("/api/v1/nodes", sited_node("n2", b))
    everything = replica(api, {FLEET_SHARD, site_shard(a, SHARDS), site_shard(b, SHARDS)})
    only_a = replica(api, {site_shard(a, SHARDS)})
    try:
        everything.reconcile_once()  # EdgeNodes, health published by the replica that holds all
        api.get(f"{EDGE_NODES}/n1")["metadata"]["annotations"][names.ANNOTATION_HEALTH] = "NotReady"
        api.get(f"{EDGE_NODES}/n2")["metadata"]["annotations"][names.ANNOTATION_HEALTH] = "NotReady"
        api.changed(api.get(f"{EDGE_NODES}/n1"))
        api.changed(api.get(f"{EDGE_NODES}/n2"))
        api.calls.clear()
        report = only_a.reconcile_once()
        assert [(c.method, c.path) for c in api.writes()] == [("PATCH", f"{EDGE_NODES}/n1")]
        assert report.health == {"n1": "Healthy", "n2": "NotReady"}  # n2's as published
    finally:
        everything.writer.threads.shutdown()
        only_a.writer.threads.shutdown()
