"""The link's connection to the API server: whether it answers, how long to wait before the
next call after a failure, the counters of what was sent, and the small thread pool every
blocking call of the link runs on (the kubernetes client is synchronous; the loop's default
executor is the scheduler's, for loads).

A failed call marks the link offline (`connected` False) and spaces further calls by the
backoff (`may_call`); a call the API server refused (4xx other than 408/429: RBAC,
validation) is not an outage. The first answer, or the first failure, sets `first_contact`.
Loop thread only, except `run`'s work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edgefleet_api.backoff import Backoff
from node_agent.link.settings import LinkSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class LinkStats:
    """Counters since start (tests and /metrics read them); each part of the link adds to its own."""

    status_writes: int = 0
    status_skipped: int = 0
    """Ticks where the pacer or the diff found nothing worth a write."""
    lease_renewals: int = 0
    relists: int = 0
    watch_events: int = 0
    api_errors: int = 0
    reconcile_passes: int = 0
    persisted_writes: int = 0
    prefetched: int = 0
    """Versions fetched ahead into the node cache (spec.prefetch)."""
    last_error: str = ""
    offline_since_s: float | None = None
    errors_by_call: dict[str, int] = field(default_factory=dict)


class ApiConnection:
    """Reachability of the API server and the link's thread pool (see the module docstring).

    `on_reconnect` runs when a call succeeds after the link was offline (or on the first
    answer): the Lease and status catch up at once. `on_unreachable` runs once, with the
    error, when the very first call fails: the link then serves its persisted assignment.
    `on_offline` runs when a call fails after the link was up (the watch restarts: its
    connection may be as dead as the one that failed).
    """

    def __init__(
        self,
        settings: LinkSettings,
        stats: LinkStats,
        clock: Callable[[], float],
        *,
        on_reconnect: Callable[[], None],
        on_unreachable: Callable[[str], None],
        on_offline: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.connected = False
        self.first_contact = asyncio.Event()
        """Set by the first answer of the API server, or its first failure."""
        self._clock = clock
        self._on_reconnect = on_reconnect
        self._on_unreachable = on_unreachable
        self._on_offline = on_offline
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._retry_at_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: ThreadPoolExecutor | None = None

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the thread pool `run` uses, for work awaited on `loop`."""
        self._loop = loop
        self._pool = ThreadPoolExecutor(max_workers=5, thread_name_prefix="edgefleet-link")

    def close(self) -> None:
        """Stop the thread pool; queued work is dropped, running work finishes in the background."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the link's thread pool."""
        assert self._loop is not None and self._pool is not None, "the connection is not open"
        call = (lambda: fn(*args, **kwargs)) if kwargs else (lambda: fn(*args))
        return await self._loop.run_in_executor(self._pool, call)

    def online(self) -> None:
        """The API server answered."""
        was = self.connected
        self.connected = True
        self._backoff.reset()
        self._retry_at_s = 0.0
        if not self.first_contact.is_set():
            self.first_contact.set()
        if not was:
            if self.stats.offline_since_s is not None:
                log.info(
                    "API server reachable again after %.1f s", self._clock() - self.stats.offline_since_s
                )
            self.stats.offline_since_s = None
            self._on_reconnect()

    def failed(self, call: str, exc: BaseException) -> bool:
        """Account a failed call. True when the API server answered and refused it (4xx other
        than 408/429: RBAC, validation): the link is up, the call is wrong, and it is logged;
        anything else (no answer, timeouts, 5xx) means offline."""
        status = getattr(exc, "status", None)  # the client's ApiException, or a list_watch.WatchError
        status = status if isinstance(status, int) else None
        if status is None or not 400 <= status < 500 or status in (408, 429):
            self.offline(call, exc)
            return False
        reason = getattr(exc, "reason", "")
        self.stats.api_errors += 1
        self.stats.errors_by_call[call] = self.stats.errors_by_call.get(call, 0) + 1
        self.stats.last_error = f"{call}: {status} {reason}"
        log.error(
            "EdgeNode %s: the API server refused %s: %s %s", self.settings.edge_node, call, status, reason
        )
        self.online()
        return True

    def offline(self, call: str, exc: BaseException) -> None:
        """The API server did not answer `call`: back off before the next call."""
        self.stats.api_errors += 1
        self.stats.errors_by_call[call] = self.stats.errors_by_call.get(call, 0) + 1
        self.stats.last_error = f"{call}: {type(exc).__name__}: {exc}"
        was = self.connected
        if self.connected or self.stats.offline_since_s is None:
            log.warning("API server unreachable (%s: %s); serving the last assignment", call, exc)
            self.stats.offline_since_s = self._clock()
        self.connected = False
        self._retry_at_s = self._clock() + self._backoff.next()
        if not self.first_contact.is_set():
            self.first_contact.set()
            self._on_unreachable(str(exc))
        if was and self._on_offline is not None:
            self._on_offline()

    def may_call(self) -> bool:
        """Whether a call may go out now (online, or the backoff after a failure has passed)."""
        return self.connected or self._clock() >= self._retry_at_s


async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """Until `event` is set or `timeout_s` passes."""
    with suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)
