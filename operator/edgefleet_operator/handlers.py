"""kopf handlers: thin. The operator's startup and cleanup, and its probes. kopf watches nothing here:
the fleet is kept in memory by our own informers (`fleet_cache`), whose events ask the fleet loop for
passes; decisions live in placement, writes in the reconciler (`fleet_loop` runs its passes).

Run with `edgefleet-operator run`. kopf runs *standalone* (no kopf peering) in every replica, and
our own Leases (`ownership`, `shard_leases`) decide who writes. Every replica keeps its informers
live (a standby takes over with a warm cache); events only request passes, which a replica that holds
nothing does not run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import kopf

from edgefleet_api import names
from edgefleet_operator import settings as settings_mod
from edgefleet_operator import watching
from edgefleet_operator.fleet_cache import FleetCache
from edgefleet_operator.fleet_loop import FleetLoop
from edgefleet_operator.fleet_writer import WRITE_THREADS
from edgefleet_operator.health import replica_liveness
from edgefleet_operator.metrics import OperatorMetrics
from edgefleet_operator.ownership import FLEET_SHARD, site_shards
from edgefleet_operator.reconciler import FleetReconciler
from edgefleet_operator.shard_leases import ShardLeases

log = logging.getLogger(__name__)
SETTINGS = settings_mod.from_env()
IDENTITY = ""
"""This replica's name among its peers (set by `cli.cmd_run`; its member Lease carries it)."""
OWN_EVERYTHING = False
"""No Leases: this replica owns every shard (`edgefleet-operator run --standalone`)."""


def kube_client(on_error: Callable[[], None] | None = None, connections: int = 0) -> Any:
    """An ApiClient from the in-cluster config, else the kubeconfig (KUBECONFIG); no call of it
    waits forever, and `on_error` hears of every failed attempt (`watching.bounded`); at least
    `connections` kept open at once."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        api = client.ApiClient()
    except config.ConfigException:
        api = config.new_client_from_config()
    api.configuration.connection_pool_maxsize = max(api.configuration.connection_pool_maxsize, connections)
    return watching.bounded(api, watching.WatchingSettings.from_env(), on_error)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf keeps its own bookkeeping in annotations (our status schema is strict); with no resource
    # handlers it writes nothing to our objects; the fleet pass keeps the services' finalizer itself.
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
    # The informers' watches on a client of their own; a failed attempt of any other call (a pass's
    # write, a Lease round) cuts them, since their connections may have died with it.
    cache = FleetCache(kube_client(connections=16), SETTINGS, watching.WatchingSettings.from_env())
    reconciler = FleetReconciler(
        kube_client(cache.restart, WRITE_THREADS), SETTINGS, metrics, identity=identity, source=cache
    )
    leases = None
    if not OWN_EVERYTHING:
        from kubernetes import client

        leases = ShardLeases(
            client.CoordinationV1Api(kube_client(cache.restart)),
            SETTINGS.lease_namespace,
            identity,
            [FLEET_SHARD, *site_shards(SETTINGS.ownership.site_shards)],
            SETTINGS.ownership,
        )
    loop = FleetLoop(reconciler, SETTINGS, leases, cache=cache)
    memo["fleet"] = loop
    running = asyncio.get_running_loop()

    def request(urgent: bool) -> None:  # from the informers' threads
        running.call_soon_threadsafe(loop.request, urgent)

    cache.request = request
    cache.start()
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
    if fleet is not None and fleet.cache is not None:
        fleet.cache.stop()
    if fleet is not None and fleet.leases is not None:
        # Hand over at once (the others take over at their next round, not after a lease duration).
        try:
            await asyncio.to_thread(fleet.leases.release_all)
        except Exception as e:  # the API server gone: the Leases expire by themselves
            log.warning("leases not released (%s); they expire by themselves", e)


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
