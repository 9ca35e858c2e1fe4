"""This agent's EdgeNode, in: the watch thread, and the persisted copy of what it delivered.

`EdgeNodeWatch.run` (a worker thread) lists the EdgeNode (field selector on its name), then
watches it from the list's resourceVersion. What it sees is handed to the loop's thread
(`call_soon_threadsafe`): `listed(obj or None)` after each list, `event(kind, obj)` per
ADDED/MODIFIED/DELETED, `answered()` when a watch request is accepted, `failed("watch", exc)`.

Recovery (`edgefleet_api.list_watch`), with the bounds of the default settings: a watch ends
after `watch_timeout_s` and resumes from the last resourceVersion delivered; a stalled one (not
even the API server's bookmark of every minute arrives) ends at the read timeout,
min(`watch_timeout_s`, `BOOKMARK_S`) + `request_timeout_s` (70 s), or at once when the rest of
the link fails first (the Lease's or the status's call times out: `restart`); failures back off
(0.5 s doubling to `backoff_max_s`, 30 s, jittered); 410 Gone relists at once, and so does
every `resync_s` (300 s).

`AssignmentStore` keeps the last live spec at `<state_dir>/assignment-<edge node>.json`
(atomic replace, writes in arrival order) for a start with the API server out of reach.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from edgefleet_api import names
from edgefleet_api.list_watch import ListWatch, ListWatchTimings
from node_agent.link.assignment import InvalidAssignment
from node_agent.link.connection import ApiConnection, LinkStats
from node_agent.link.durable import write_atomic
from node_agent.link.persistence import decode_persisted, encode_persisted
from node_agent.link.settings import BOOKMARK_S, LinkSettings, rfc3339

if TYPE_CHECKING:
    from kubernetes.client import CustomObjectsApi

log = logging.getLogger(__name__)


class EdgeNodeWatch:
    """List and watch of one EdgeNode (`edgefleet_api.list_watch.ListWatch`, field selector on its
    name), on its own thread (see the module docstring). The callbacks run on the loop's thread."""

    def __init__(
        self,
        settings: LinkSettings,
        custom: CustomObjectsApi,
        clock: Callable[[], float],
        *,
        listed: Callable[[dict[str, Any] | None], None],
        event: Callable[[str, dict[str, Any]], None],
        answered: Callable[[], None],
        failed: Callable[[str, BaseException], object],
    ) -> None:
        self.settings = settings
        self._on_listed, self._on_event = listed, event
        self._online, self._failed = answered, failed
        self._loop: asyncio.AbstractEventLoop | None = None
        call = functools.partial(
            custom.list_cluster_custom_object,
            names.GROUP,
            names.VERSION,
            names.EDGE_NODE_PLURAL,
            field_selector=f"metadata.name={settings.edge_node}",
        )
        timings = ListWatchTimings(
            request_timeout_s=settings.request_timeout_s,
            watch_timeout_s=settings.watch_timeout_s,
            # A quiet watch still gets the API server's bookmark every minute: a stall is told
            # from it within a minute and the request timeout, however long the watch may run.
            watch_read_timeout_s=min(settings.watch_timeout_s, BOOKMARK_S) + settings.request_timeout_s,
            resync_s=settings.resync_s,
            backoff_initial_s=settings.backoff_initial_s,
            backoff_max_s=settings.backoff_max_s,
        )
        self._list_watch = ListWatch(
            f"EdgeNode {settings.edge_node}",
            call,
            timings,
            listed=lambda items, _rv: self._post(self._on_listed, items[0] if items else None),
            event=lambda kind, obj: self._post(self._on_event, kind, obj),
            answered=lambda: self._post(self._online),
            failed=lambda exc: self._post(self._failed, "watch", exc),
            clock=clock,
        )

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        """List, then watch from the list's resourceVersion, until stopped (blocking: its
        own thread); callbacks go to `loop`."""
        self._loop = loop
        self._list_watch.run()

    def stop(self) -> None:
        """Ask `run` to return; a watch request in progress is cut off."""
        self._list_watch.stop()

    def restart(self) -> None:
        """Cut the watch request in progress (the link found the API server unreachable: this
        request's connection may be half-open and silent); the watch thread resumes from its
        resourceVersion on a new connection, after no backoff. Any thread."""
        self._list_watch.restart()

    def _post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn(*args)` on the loop's thread (from the watch thread)."""
        assert self._loop is not None
        with suppress(RuntimeError):  # the loop closed under a stopping link
            self._loop.call_soon_threadsafe(fn, *args)


class AssignmentStore:
    """The persisted copy of this node's last live EdgeNode spec (`settings.state_file`)."""

    def __init__(self, settings: LinkSettings, stats: LinkStats, connection: ApiConnection) -> None:
        self.settings = settings
        self._stats = stats
        self._connection = connection
        self._lock = asyncio.Lock()

    def read(self) -> dict[str, Any] | None:
        """The persisted EdgeNode (metadata + spec), or None when there is none usable. Blocking."""
        path = self.settings.state_file
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("cannot read %s: %s", path, e)
            return None
        try:
            return decode_persisted(text, self.settings.edge_node)
        except InvalidAssignment as e:
            log.error("ignoring %s: %s", path, e)
            return None

    async def save(self, obj: Mapping[str, Any]) -> None:
        """Persist `obj` (on the link's thread pool); a failure is logged, not raised."""
        text = encode_persisted(obj, rfc3339())
        async with self._lock:  # writes land in the order specs arrived
            try:
                await self._connection.run(write_atomic, self.settings.state_file, text)
            except OSError as e:
                log.error("cannot persist the assignment to %s: %s", self.settings.state_file, e)
                return
        self._stats.persisted_writes += 1
