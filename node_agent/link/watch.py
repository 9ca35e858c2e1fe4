"""This agent's EdgeNode, in: the watch thread, and the persisted copy of what it delivered.

`EdgeNodeWatch.run` (a worker thread) lists the EdgeNode (field selector on its name), then
watches it from the list's resourceVersion. What it sees is handed to the loop's thread
(`call_soon_threadsafe`): `listed(obj or None)` after each list, `event(kind, obj)` per
ADDED/MODIFIED/DELETED, `answered()` when a watch request is accepted, `failed("watch", exc)`.

Recovery, with the bounds of the default settings:
- A watch ends after `watch_timeout_s` (server side, `timeoutSeconds`) and is resumed from
  the last resourceVersion it saw (events and bookmarks).
- A watch that stalls (the socket stays open, nothing arrives, not even the API server's
  bookmark of every minute) ends at the client's read timeout, min(`watch_timeout_s`,
  `BOOKMARK_S`) + `request_timeout_s` (70 s); when the rest of the link fails
  first (the Lease's or the status's call times out), `restart` cuts it at once.
- A failed watch or list is retried after `Backoff` (jittered, 0.5 s doubling to
  `backoff_max_s`, 30 s): a fleet that lost its API server together comes back spread out.
  The retry resumes from the resourceVersion of the last event delivered (never replaying
  one: an older spec would be applied again), served from the API server's watch cache, not
  a relist per agent; 410 Gone (that version was compacted away, or the API
  server restarted and its cache starts later) relists at once.
- A full relist every `resync_s` (300 s), whatever the watch says.

Why not the client's `kubernetes.watch.Watch`: it can be stopped only between two events (a
stalled connection cannot be cut from another thread; `restart` must), it resumes from the last
event it parsed, which the loop may not have applied yet, and it retries a 410 itself where this
relists. Its line splitter (`iter_resp_lines`) is used as is.

`AssignmentStore` keeps the last live spec at `<state_dir>/assignment-<edge node>.json`
(atomic replace, writes in arrival order) for a start with the API server out of reach.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from edgefleet_api import names
from edgefleet_api.backoff import Backoff
from node_agent.link.assignment import InvalidAssignment
from node_agent.link.connection import ApiConnection, LinkStats
from node_agent.link.durable import write_atomic
from node_agent.link.persistence import decode_persisted, encode_persisted
from node_agent.link.settings import BOOKMARK_S, LinkSettings, rfc3339

if TYPE_CHECKING:
    from kubernetes.client import CustomObjectsApi

log = logging.getLogger(__name__)


class EdgeNodeWatch:
    """List and watch of one EdgeNode, on its own thread (see the module docstring). The
    callbacks run on the loop's thread."""

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
        self._custom = custom
        self._clock = clock
        self._on_listed, self._on_event = listed, event
        self._online, self._failed = answered, failed
        self._stopping = threading.Event()
        self._restarting = threading.Event()
        self._seen_rv: str | None = None
        """The resourceVersion of the last list or event delivered (watch thread only)."""
        self._watch_response: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        """List, then watch from the list's resourceVersion, until stopped (blocking: its
        own thread); callbacks go to `loop`."""
        self._loop = loop
        self._watch_forever()

    def stop(self) -> None:
        """Ask `run` to return; a watch request in progress is cut off."""
        self._stopping.set()
        self._cut()

    def restart(self) -> None:
        """Cut the watch request in progress (the link found the API server unreachable: this
        request's connection may be half-open and silent); the watch thread resumes from its
        resourceVersion on a new connection, after no backoff. Any thread."""
        self._restarting.set()
        self._cut()

    def _cut(self) -> None:
        response = self._watch_response
        if response is not None:
            with suppress(Exception):
                response.shutdown()

    def _watch_forever(self) -> None:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import ReadTimeoutError

        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        rv: str | None = None
        self._seen_rv = None
        listed_at = -float("inf")
        while not self._stopping.is_set():
            self._restarting.clear()  # a restart asked for before this request is served by it
            try:
                if rv is None or self._clock() - listed_at >= self.settings.resync_s:
                    obj, rv = self._list()
                    self._seen_rv = rv
                    listed_at = self._clock()
                    self._post(self._on_listed, obj)
                    backoff.reset()
                rv = self._watch_once(rv)
                backoff.reset()
            except Exception as exc:
                if self._stopping.is_set():
                    return
                rv = self._seen_rv or rv  # never replay events already delivered
                cut = self._restarting.is_set()
                if cut or _caused_by(exc, ReadTimeoutError):
                    log.info(
                        "watch of EdgeNode %s silent; resuming on a new connection", self.settings.edge_node
                    )
                    if cut:  # by the link, which already knows the API server failed it: no backoff
                        continue  # (the flag is cleared above: a retry that fails backs off)
                if isinstance(exc, ApiException) and exc.status == 410:
                    self._gone()
                    rv = self._seen_rv = None
                    continue
                self._post(self._failed, "watch", exc)
                self._stopping.wait(backoff.next())
            else:
                if rv is None:
                    self._gone()
                    self._seen_rv = None

    def _gone(self) -> None:
        log.info("watch of EdgeNode %s: 410 Gone; relisting", self.settings.edge_node)

    def _list(self) -> tuple[dict[str, Any] | None, str]:
        t = self.settings.request_timeout_s
        result: Any = self._custom.list_cluster_custom_object(
            names.GROUP,
            names.VERSION,
            names.EDGE_NODE_PLURAL,
            field_selector=f"metadata.name={self.settings.edge_node}",
            _request_timeout=(t, t),
        )
        items = result.get("items") or []
        return (items[0] if items else None), str(result["metadata"]["resourceVersion"])

    def _watch_once(self, rv: str) -> str | None:
        """One watch request; returns the resourceVersion to resume from, None to relist."""
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        s = self.settings
        response: Any = self._custom.list_cluster_custom_object(
            names.GROUP,
            names.VERSION,
            names.EDGE_NODE_PLURAL,
            field_selector=f"metadata.name={s.edge_node}",
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=int(s.watch_timeout_s),
            watch=True,
            _preload_content=False,
            _request_timeout=(s.request_timeout_s, min(s.watch_timeout_s, BOOKMARK_S) + s.request_timeout_s),
        )
        self._watch_response = response
        try:
            if self._stopping.is_set() or self._restarting.is_set():
                return rv  # asked for while this request went out: `_cut` could not see it yet
            if response.status != 200:
                raise ApiException(status=response.status, reason=response.reason)
            self._post(self._online)
            for line in iter_resp_lines(response):
                if self._stopping.is_set():
                    return rv
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                self._seen_rv = rv  # a resume after this request fails starts past this event
                if kind != "BOOKMARK":
                    self._post(self._on_event, kind, obj)
            return rv
        finally:
            self._watch_response = None
            response.close()
            response.release_conn()

    def _post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn(*args)` on the loop's thread (from the watch thread)."""
        assert self._loop is not None
        with suppress(RuntimeError):  # the loop closed under a stopping link
            self._loop.call_soon_threadsafe(fn, *args)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `exc` or an exception it was raised from (or during) is a `kind`."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
        if e is None and exc.args and isinstance(exc.args[-1], BaseException):
            e = exc.args[-1]  # urllib3's ProtocolError carries its cause as an argument
    return False


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
