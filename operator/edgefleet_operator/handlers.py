"""kopf handlers: thin. They only ask the fleet loop for a pass; decisions live in
placement, writes in the reconciler (`fleet_loop` runs its passes).

Run with `edgefleet-operator run`. kopf runs *standalone* (no kopf peering) in every replica, and
our own Leases (`ownership`, `shard_leases`) decide who writes: kopf's peering would freeze the
handlers of every replica but one, while the fleet loop's resync (which is what writes) is not
kopf's to freeze, so it never was the gate; and with sharding by site every replica must keep its
watches and handlers live, since each owns part of the fleet. Handlers only request passes, which a
replica that holds nothing does not run, so a live handler in a standby replica costs a watch event
and writes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import kopf

from edgefleet_api import names
from edgefleet_operator import settings as settings_mod
from edgefleet_operator import watching
from edgefleet_operator.fleet_loop import FleetLoop
from edgefleet_operator.health import replica_liveness
from edgefleet_operator.metrics import OperatorMetrics
from edgefleet_operator.ownership import FLEET_SHARD
from edgefleet_operator.reconciler import FleetReconciler
from edgefleet_operator.shard_leases import ShardLeases

log = logging.getLogger(__name__)
SETTINGS = settings_mod.from_env()
IDENTITY = ""
"""This replica's name among its peers (set by `cli.cmd_run`; its member Lease carries it)."""
OWN_EVERYTHING = False
"""No Leases: this replica owns every shard (`edgefleet-operator run --standalone`)."""


def kube_client() -> Any:
    """An ApiClient from the in-cluster config, else the kubeconfig (KUBECONFIG); no call of it
    waits forever (`watching.bounded`)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        api = client.ApiClient()
    except config.ConfigException:
        api = config.new_client_from_config()
    return watching.bounded(api, watching.WatchingSettings.from_env())


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf keeps its own bookkeeping in annotations: our status schema is strict. Its handlers here only
    # watch (no change-detecting handlers), so it writes nothing to our objects; the fleet pass keeps
    # the services' finalizer (names.FINALIZER) itself.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=names.GROUP)
    # No call waits forever on a stalled connection; bounds in edgefleet_operator.watching.
    watching.configure_kopf(settings, watching.WatchingSettings.from_env())
    settings.posting.level = logging.WARNING
    _start_fleet(memo)


def _start_fleet(memo: kopf.Memo) -> None:
    """The fleet loop, and (unless this replica owns everything) its Leases on their own client."""
    metrics = OperatorMetrics()
    if SETTINGS.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(SETTINGS.metrics_port, registry=metrics.registry)
    identity = IDENTITY or f"{socket.gethostname()}/{os.getpid()}"
    reconciler = FleetReconciler(kube_client(), SETTINGS, metrics, identity=identity)
    leases = None
    if not OWN_EVERYTHING:
        from kubernetes import client

        leases = ShardLeases(
            client.CoordinationV1Api(kube_client()),
            SETTINGS.lease_namespace,
            identity,
            [FLEET_SHARD],
            SETTINGS.ownership,
        )
    loop = FleetLoop(reconciler, SETTINGS, leases)
    memo["fleet"] = loop
    memo["fleet_task"] = asyncio.create_task(loop.run(), name="edgefleet-fleet-loop")
    if leases is not None:
        memo["lease_task"] = asyncio.create_task(loop.run_leases(), name="edgefleet-leases")
    loop.request()


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    for name in ("lease_task", "fleet_task"):
        task = memo.get(name)
        if task:
            task.cancel()
    fleet: FleetLoop | None = memo.get("fleet")
    if fleet is not None and fleet.leases is not None:
        # Hand over at once (the others take over at their next round, not after a lease duration).
        try:
            await asyncio.to_thread(fleet.leases.release_all)
        except Exception as e:  # the API server gone: the Leases expire by themselves
            log.warning("leases not released (%s); they expire by themselves", e)


def _request(memo: kopf.Memo, urgent: bool = False) -> None:
    fleet = memo.get("fleet")
    if fleet is not None:
        fleet.request(urgent)


def serving_change(event_type: str | None, body: Any) -> bool:
    """Whether an InferenceService event asks for work on the serving path: the service is new,
    its spec changed since the status was written (generation ahead of observedGeneration), or it
    is being deleted. Our own status writes are none of these."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    return (
        event_type == "ADDED"
        or bool(meta.get("deletionTimestamp"))
        or meta.get("generation") != status.get("observedGeneration")
    )


@kopf.on.event("", "v1", "nodes", labels=dict(SETTINGS.fleet.node_selector))
def node_event(memo: kopf.Memo, **_: Any) -> None:
    _request(memo)


@kopf.on.event(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL)
def edge_node_event(memo: kopf.Memo, **_: Any) -> None:
    _request(memo)


@kopf.on.event("", "v1", "pods", labels={"app.kubernetes.io/name": names.AGENT_APP})
def agent_pod_event(memo: kopf.Memo, **_: Any) -> None:
    _request(memo)


@kopf.on.event(names.GROUP, names.VERSION, names.INFERENCE_SERVICE_PLURAL)
def service_event(memo: kopf.Memo, type: str | None, body: kopf.Body, **_: Any) -> None:
    _request(memo, urgent=serving_change(type, body))


@kopf.on.probe(id="fleet_pass_age_seconds")
def fleet_pass_age(memo: kopf.Memo, **_: Any) -> float:
    """Liveness and readiness: seconds since the last successful fleet pass. Fails when a replica
    that holds the fleet has had none for three resync intervals, or when its Lease rounds stopped
    (`health.replica_liveness`); a standby replica (it holds nothing) is healthy."""
    fleet: FleetLoop | None = memo.get("fleet")
    if fleet is None:
        return 0.0
    now = time.monotonic()
    age = now - fleet.last_ok_s
    rounds = None
    if fleet.leases is not None:
        last = fleet.leases.last_round_s
        rounds = now - (last if last is not None else fleet.started_s)
    failure = replica_liveness(
        fleet.owns(), age, rounds, SETTINGS.resync_interval_s, SETTINGS.ownership.renew_interval_s
    )
    if failure is not None:
        raise kopf.PermanentError(failure)
    return round(age, 1)


@kopf.on.probe(id="shards_held")
def shards_held(memo: kopf.Memo, **_: Any) -> list[str]:
    """The shards this replica writes for now; [] on a standby replica (which is Ready all the same)."""
    fleet: FleetLoop | None = memo.get("fleet")
    return fleet.held() if fleet is not None else []
