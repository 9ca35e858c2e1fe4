"""The watch-fed fleet (`fleet_cache.FleetCache`) against the real local kube-apiserver: it holds what
a list reads, through watches cut and resumed; and a pass that reads it over an unchanged fleet sends
no request at all."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fleet_helpers import Group, apply, eventually, get_status, service

from e2e.operator_proc import ensure_agent_namespace
from edgefleet_api import names
from edgefleet_operator import settings as settings_mod
from edgefleet_operator.fleet_cache import FleetCache, NotSynced
from edgefleet_operator.fleet_read import FleetRead, FleetReader
from edgefleet_operator.metrics import OperatorMetrics
from edgefleet_operator.reconciler import FleetReconciler
from edgefleet_operator.watching import WatchingSettings

pytestmark = pytest.mark.cluster


def new_client(kube: Any) -> Any:
    """A second ApiClient to the same API server (the cache's watches and the pass's calls apart)."""
    from kubernetes import client

    return client.ApiClient(kube.configuration)


class Counted:
    """Counts every request an ApiClient sends."""

    def __init__(self, api: Any) -> None:
        self.requests: list[str] = []
        self._lock = threading.Lock()
        send = api.rest_client.request

        def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.requests.append(f"{method} {url.split('?')[0]}")
            return send(method, url, *args, **kwargs)

        api.rest_client.request = request


@pytest.fixture
def group(kube: Any) -> Iterator[Group]:
    ensure_agent_namespace(kube)  # the agents' Leases live there (run alone, no other test made it)
    g = Group(kube)
    yield g
    g.cleanup()


def started(kube: Any, settings: settings_mod.OperatorSettings) -> FleetCache:
    cache = FleetCache(new_client(kube), settings, WatchingSettings())
    cache.start()
    assert cache.wait_synced(30), "the informers' first lists"
    return cache


def versions(read: FleetRead) -> dict[str, dict[str, str]]:
    """Each kind's objects by name -> resourceVersion."""
    rv = lambda o: o["metadata"]["resourceVersion"]  # noqa: E731
    return {
        "nodes": {n["metadata"]["name"]: rv(n) for n in read.nodes},
        "edge_nodes": {k: rv(v) for k, v in read.edge_nodes.items()},
        "leases": {k: rv(v) for k, v in read.leases.items()},
        "services": {f"{s['metadata']['namespace']}/{s['metadata']['name']}": rv(s) for s in read.services},
    }


def test_the_cache_holds_what_a_list_reads_through_cut_watches(
    kube: Any, group: Group, namespace: str
) -> None:
    from kubernetes import client

    settings = settings_mod.from_env(
        {"EDGEFLEET_FLEET_SELECTOR": f"{names.LABEL_FLEET}=true,test-group={group.id}"}
    )
    unsynced = FleetCache(new_client(kube), settings, WatchingSettings())
    with pytest.raises(NotSynced):  # never a pass from a fleet not listed yet
        unsynced.read()
    nodes = group.nodes(3)
    cache = started(kube, settings)
    lister = FleetReader(
        client.CoreV1Api(kube),
        client.CustomObjectsApi(kube),
        client.CoordinationV1Api(kube),
        client.DiscoveryV1Api(kube),
        settings,
    )
    passes = FleetReconciler(kube, settings, OperatorMetrics())  # lists: it makes the EdgeNodes
    try:

        def reported() -> bool:
            found = lister.read().edge_nodes
            return all((found.get(n) or {}).get("status", {}).get("gpu") for n in nodes)

        def step() -> None:
            passes.reconcile_once()
            group.agents.step()

        eventually(reported, step=step, what="EdgeNodes with their agents' status and Leases")
        apply(kube, namespace, service("cam", group.id, replicas=2))
        passes.reconcile_once()
        cache.restart()  # cut every watch: each resumes from its last version, nothing lost
        core = client.CoreV1Api(kube)
        core.patch_node(nodes[0], {"metadata": {"labels": {"zone": "b"}}})
        group.names.remove(nodes[2])
        core.delete_node(nodes[2])  # leaves the fleet: gone from the cache too
        cache.restart()
        group.agents.step()
        passes.reconcile_once()
        eventually(
            lambda: versions(cache.read()) == versions(lister.read()),
            what="the cache to hold what a list reads",
            seen=lambda: f"cache {versions(cache.read())}\nlist {versions(lister.read())}",
        )
        read = cache.read()
        assert [n["metadata"]["name"] for n in read.nodes] == sorted(nodes[:2])
        assert read.nodes[0]["metadata"]["labels"]["zone"] == "b"
        assert all("managedFields" not in n["metadata"] for n in read.nodes)
        assert cache.lists() == len(cache.informers)  # one list each: cut watches resumed, no relist
    finally:
        passes.writer.threads.shutdown()
        cache.stop()


def test_a_pass_over_an_unchanged_fleet_sends_no_request(kube: Any, group: Group, namespace: str) -> None:
    settings = settings_mod.from_env(
        {"EDGEFLEET_FLEET_SELECTOR": f"{names.LABEL_FLEET}=true,test-group={group.id}"}
    )
    group.nodes(3)
    cache = started(kube, settings)
    api = new_client(kube)
    counted = Counted(api)
    reconciler = FleetReconciler(api, settings, OperatorMetrics(), source=cache)
    try:
        apply(kube, namespace, service("cam", group.id, replicas=2))

        def settled() -> bool:
            report = reconciler.reconcile_once()
            group.agents.step()
            stable = (get_status(kube, namespace, "cam").get("rollout") or {}).get("stableVersion")
            return not report.writes and stable == "1"

        eventually(settled, what="the service placed, its agents reporting, the passes writing nothing")
        # The last pass's own writes have come back through the watches: a pass now reads the cache,
        # decides what it decided, and sends nothing.
        eventually(lambda: not reconciler.reconcile_once().writes, what="a quiet pass")
        counted.requests.clear()
        report = reconciler.reconcile_once()
        assert report.writes == {}
        assert counted.requests == []
        assert report.nodes == 3 and report.services >= 1
    finally:
        reconciler.writer.threads.shutdown()
        cache.stop()
