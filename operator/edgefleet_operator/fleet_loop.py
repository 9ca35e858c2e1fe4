"""Runs fleet passes in a worker thread: on request (debounced) and every resync interval, and only
while this replica holds a shard (`ownership`): the fleet's, a site shard's, or both.

The kubernetes client is synchronous, so a pass runs in a thread, one at a time; the kopf handlers
only ask for one (`FleetLoop.request`), which is cheap: a burst of requests within the debounce
window costs one pass. A second task renews this replica's Leases every renew interval (its own
thread and ApiClient, so a long pass never delays a renewal); a replica that holds nothing runs no
pass at all (it reads nothing and writes nothing) and takes over when the holder is gone. A pass is
gated twice more: before it starts and before every write (`FleetReconciler.gate`), so a pass that
loses its hold midway stops writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from edgefleet_api import backoff
from edgefleet_operator.fleet_cache import FleetCache, NotSynced
from edgefleet_operator.fleet_types import Health
from edgefleet_operator.ownership import FLEET_SHARD, HoldLost, site_shards
from edgefleet_operator.pass_report import PassReport
from edgefleet_operator.reconciler import FleetReconciler
from edgefleet_operator.settings import OperatorSettings
from edgefleet_operator.shard_leases import ShardLeases

log = logging.getLogger(__name__)
NOT_SYNCED_RETRY_S = 0.2
"""How soon a pass that found the fleet not yet listed is tried again."""
URGENT_DEBOUNCE_S = 0.1
"""The debounce before a pass for urgent work: a burst of new services is then placed pass after pass
as it arrives (each pass leaves the earlier ones' bookkeeping to later), not after a full debounce."""


def backoff_delay(failures: int, base_s: float, cap_s: float, rand: float) -> float:
    """Seconds to wait after `failures` failures in a row (>= 1): exponential with full jitter, a
    `rand` share (in [0, 1)) of min(cap, base * 2^(failures-1)) (`edgefleet_api.backoff.delay`).
    Full jitter spreads the retries of many operators (and of one operator's passes) over the
    whole window, so an API server coming back is not met by a synchronised burst."""
    return backoff.delay(failures, base_s, cap_s, 1.0 - rand, jitter=1.0)


def unreachable(e: BaseException) -> bool:
    """Whether a failed call means the API server was out of reach (no answer, a timeout, or an
    answer saying it cannot serve now: 408, 429, 5xx), not that it refused this call (other 4xx)."""
    if isinstance(e, ApiException):
        return e.status is None or e.status in (408, 429) or e.status >= 500
    return isinstance(e, (HTTPError, OSError))


class FleetLoop:
    """Asks the reconciler for passes while this replica holds the fleet shard; a failed pass is
    logged and retried after an exponential backoff with jitter (reset by a pass that succeeds).

    `leases` None: this replica owns everything, unconditionally (an in-process test's loop, or
    `edgefleet-operator run --standalone`, for a single instance for sure)."""

    def __init__(
        self,
        reconciler: FleetReconciler,
        settings: OperatorSettings,
        leases: ShardLeases | None = None,
        rand: Callable[[], float] = random.random,
        cache: FleetCache | None = None,
    ) -> None:
        self.reconciler = reconciler
        self.cache = cache
        """The watch-fed fleet the reconciler reads (None: it lists per pass). Its watches are cut and
        resumed when a call finds the API server out of reach: they may be as dead as that call's."""
        self.settings = settings
        self.leases = leases
        self.rand = rand
        self._wake = asyncio.Event()
        self._passes = 0
        self._done = asyncio.Condition()
        self.last_ok_s: float = time.monotonic()
        self.started_s: float = self.last_ok_s
        self.last_report: PassReport | None = None
        self.failures = 0
        """Failed passes in a row (the backoff's exponent)."""
        self._fresh = True
        self._every = [FLEET_SHARD, *site_shards(settings.ownership.site_shards)]
        reconciler.gate = self._gate
        reconciler.held = lambda: frozenset(self.held())

    def owns(self) -> bool:
        """Whether this replica may run a pass now: it holds a shard, by its own clock."""
        return bool(self.held())

    def held(self) -> list[str]:
        """The shards this replica may write for now (all of them without Leases)."""
        return list(self._every) if self.leases is None else self.leases.held()

    def _gate(self, shard: str) -> None:
        if self.leases is not None and not self.leases.holds(shard):
            raise HoldLost(f"shard {shard} no longer held")

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
            if not self.owns():  # standby: no pass, no read, no write
                self._fresh = True
                self.reconciler.lost_sight()
                continue
            await self._pass()
            async with self._done:
                self._passes += 1
                self._done.notify_all()

    async def _pass(self) -> None:
        if self._fresh:  # a new hold: what this replica kept from an earlier one may be stale
            self.reconciler.forget()
            self._fresh = False
        if self.cache is not None and self.cache.blind():  # a watch failed since the last pass
            self.reconciler.lost_sight()
        try:
            self.last_report = await asyncio.to_thread(self.reconciler.reconcile_once)
        except NotSynced as e:  # the first lists are under way: no pass decides from a partial fleet
            log.info("pass waits for the fleet's first lists (%s)", e)
            self._wake.set()
            await asyncio.sleep(NOT_SYNCED_RETRY_S)
            return
        except HoldLost as e:
            log.warning("pass stopped before its next write: %s", e)
            self._fresh = True
            self.reconciler.lost_sight()
            return
        except Exception as e:
            if unreachable(e):
                self.reconciler.lost_sight()
                self._restart_watches()
            self.failures += 1
            delay = backoff_delay(
                self.failures, self.settings.api_backoff_base_s, self.settings.api_backoff_cap_s, self.rand()
            )
            if isinstance(e, ApiException):  # the API server said no (or went away): one line
                log.warning("fleet reconcile failed (%s %s); retrying in %.1f s", e.status, e.reason, delay)
            elif isinstance(e, (HTTPError, OSError)):  # out of reach (timeout, refused, TLS cut): one line
                log.warning("fleet reconcile failed (unreachable: %s); retrying in %.1f s", e, delay)
            else:
                log.exception("fleet reconcile failed; retrying in %.1f s", delay)
            self._wake.set()
            await asyncio.sleep(delay)
            return
        self.failures = 0
        self.last_ok_s = time.monotonic()
        report = self.last_report
        silent = [n for n, h in report.health.items() if h != Health.HEALTHY.value]
        log.log(
            logging.INFO if report.writes else logging.DEBUG,
            "pass: %.2f s, %d nodes, %d services, writes %s, deferred %d, not healthy %s",
            report.seconds,
            report.nodes,
            report.services,
            report.writes,
            report.deferred,
            silent,
        )

    def _restart_watches(self) -> None:
        if self.cache is not None:
            self.cache.restart()

    async def run_leases(self) -> None:
        """Every renew interval: one round of `ShardLeases` (list, renew, acquire or release); a pass
        at once after an acquire. A failed round is retried sooner (backoff, at most a renew interval),
        since the holds lapse if renewals keep failing."""
        assert self.leases is not None, "no leases: this replica owns everything"
        leases, renew_s, failures = self.leases, self.settings.ownership.renew_interval_s, 0
        while True:
            try:
                result = await asyncio.to_thread(leases.round)
            except Exception as e:
                failures += 1
                delay = min(renew_s, backoff_delay(failures, 0.5, renew_s, self.rand()))
                log.warning("lease round failed (%s); retrying in %.1f s", e, delay)
                if unreachable(e):
                    self._restart_watches()
            else:
                failures, delay = 0, renew_s
                for shard in result.lost:
                    log.warning("shard %s lost (members %s)", shard, ", ".join(result.members))
                    self._fresh = True
                if result.acquired:
                    log.warning("shards %s acquired (members %s)", result.acquired, ", ".join(result.members))
                    self._fresh = True
                    self.last_ok_s = time.monotonic()  # the pass-age clock of a new hold starts now
                    self.request()
                self.reconciler.metrics.observe_transitions(result.acquired, result.lost)
            self.reconciler.metrics.observe_holds(leases.shards, leases.held())
            await asyncio.sleep(delay)
