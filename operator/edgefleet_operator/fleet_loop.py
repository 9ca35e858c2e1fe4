"""Runs fleet passes in a worker thread: on request (debounced) and every resync interval.

The kubernetes client is synchronous, so a pass runs in a thread, one at a time; the kopf handlers
only ask for one (`FleetLoop.request`), which is cheap: a burst of requests within the debounce
window costs one pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from kubernetes.client.exceptions import ApiException

from edgefleet_operator.fleet_types import Health
from edgefleet_operator.pass_report import PassReport
from edgefleet_operator.reconciler import FleetReconciler
from edgefleet_operator.settings import OperatorSettings

log = logging.getLogger(__name__)
URGENT_DEBOUNCE_S = 0.1
"""The debounce before a pass for urgent work: a burst of new services is then placed pass after pass
as it arrives (each pass leaves the earlier ones' bookkeeping to later), not after a full debounce."""


class FleetLoop:
    """Asks the reconciler for passes; a failed pass is logged and retried after a second."""

    def __init__(self, reconciler: FleetReconciler, settings: OperatorSettings) -> None:
        self.reconciler = reconciler
        self.settings = settings
        self._wake = asyncio.Event()
        self._passes = 0
        self._done = asyncio.Condition()
        self.last_ok_s: float = time.monotonic()
        self.last_report: PassReport | None = None

    def request(self, urgent: bool = False) -> None:
        """Ask for a pass; `urgent`: work on the serving path (a service created, its spec changed, or
        deleted) is waiting, so the running pass, if any, leaves Pods and bookkeeping not yet started
        to this one."""
        if urgent:
            self.reconciler.urgent.set()
        self._wake.set()

    async def run(self) -> None:
        debounce = self.settings.reconcile_debounce_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.resync_interval_s)
            urgent = self.reconciler.urgent.is_set()
            await asyncio.sleep(min(URGENT_DEBOUNCE_S, debounce) if urgent else debounce)
            self._wake.clear()
            try:
                self.last_report = await asyncio.to_thread(self.reconciler.reconcile_once)
                self.last_ok_s = time.monotonic()
                silent = [n for n, h in self.last_report.health.items() if h != Health.HEALTHY.value]
                log.log(
                    logging.INFO if self.last_report.writes else logging.DEBUG,
                    "pass: %.2f s, %d nodes, %d services, writes %s, deferred %d, not healthy %s",
                    self.last_report.seconds,
                    self.last_report.nodes,
                    self.last_report.services,
                    self.last_report.writes,
                    self.last_report.deferred,
                    silent,
                )
            except Exception as e:
                if isinstance(e, ApiException):  # the API server said no (or went away): one line
                    log.warning("fleet reconcile failed (%s %s); retrying", e.status, e.reason)
                else:
                    log.exception("fleet reconcile failed; retrying")
                self._wake.set()
                await asyncio.sleep(1.0)
            async with self._done:
                self._passes += 1
                self._done.notify_all()
