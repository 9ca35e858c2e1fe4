"""kopf handlers: thin. They only ask the fleet loop for a pass; decisions live in
placement, writes in the reconciler (`fleet_loop` runs its passes).

Run with `edgefleet-operator run` (peering: one active instance per cluster).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf

from edgefleet_api import names
from edgefleet_operator import settings as settings_mod
from edgefleet_operator import watching
from edgefleet_operator.fleet_loop import FleetLoop
from edgefleet_operator.metrics import OperatorMetrics
from edgefleet_operator.reconciler import FleetReconciler

log = logging.getLogger(__name__)
SETTINGS = settings_mod.from_env()
PEERING_NAME = "edgefleet"


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
    settings.peering.name = PEERING_NAME
    settings.peering.clusterwide = True

    metrics = OperatorMetrics()
    if SETTINGS.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(SETTINGS.metrics_port, registry=metrics.registry)
    reconciler = FleetReconciler(kube_client(), SETTINGS, metrics)
    loop = FleetLoop(reconciler, SETTINGS)
    memo["fleet"] = loop
    memo["fleet_task"] = asyncio.create_task(loop.run(), name="edgefleet-fleet-loop")
    loop.request()


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("fleet_task")
    if task:
        task.cancel()


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
    """Liveness: seconds since the last successful fleet pass; fails past three resync intervals."""
    fleet: FleetLoop | None = memo.get("fleet")
    if fleet is None:
        return 0.0
    age = time.monotonic() - fleet.last_ok_s
    if age > 3 * SETTINGS.resync_interval_s + 30:
        raise kopf.PermanentError(f"no successful fleet reconcile for {age:.0f}s")
    return round(age, 1)
