"""List, then watch from the list's resourceVersion: the one loop by which the agent follows its
EdgeNode and the operator keeps the fleet in memory (`edgefleet_operator.informer`).

`ListWatch.run` blocks its thread until `stop`. It calls `listed(items, resourceVersion)` after each
list, `event(type, obj)` per ADDED/MODIFIED/DELETED (BOOKMARKs only move the resourceVersion),
`answered()` when a watch request is accepted, and `failed(exc)` before it backs off. The callbacks
run on the watch's thread.

Recovery:
- a watch ends after `watch_timeout_s` (server side, `timeoutSeconds`) and is resumed from the last
  resourceVersion delivered (an event's or a bookmark's), served from the API server's watch cache:
  no relist;
- a watch that stalls (the socket stays open, nothing arrives) ends at the client's read timeout,
  `watch_read_timeout_s` (between two reads: longer than the API server's bookmark period, so a
  quiet watch is kept); `restart` cuts it at once from any thread (the caller found the link dead
  on another call) and the watch resumes on a new connection without backing off;
- a failed list or watch is retried after `Backoff` (jittered, doubling to `backoff_max_s`): clients
  that lost the API server together come back spread out;
- 410 Gone (the version was compacted away, or the API server restarted and its cache starts
  later) relists at once; so does every `resync_s`, whatever the watch says.
A resume never replays an event already delivered (it starts after the last one delivered).

Why not the client's `kubernetes.watch.Watch`: it can be stopped only between two events (a stalled
connection cannot be cut from another thread), it resumes from the last event it parsed, and it
retries a 410 itself where this relists. This module imports no client: `call` is one, and a failure
the API server states (an ERROR event, a status other than 200) is a `WatchError` with the `status`
and `reason` attributes the client's ApiException has too.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from edgefleet_api.backoff import Backoff

log = logging.getLogger(__name__)
Obj = dict[str, Any]

__all__ = ["ListWatch", "ListWatchTimings", "WatchError", "caused_by"]


class WatchError(Exception):
    """The API server refused a watch or ended it with an ERROR event."""

    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason = status, reason


@dataclass(frozen=True, slots=True)
class ListWatchTimings:
    """Seconds. See the module docstring for what each bounds."""

    request_timeout_s: float = 10.0
    """Connect and read timeout of a list; connect timeout of a watch."""
    watch_timeout_s: float = 60.0
    watch_read_timeout_s: float = 70.0
    resync_s: float = 300.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


def _nothing(*_: Any) -> None:
    pass


class ListWatch:
    """One list-and-watch loop. `call(**kwargs)` is a kubernetes client list method with its
    positional arguments and selectors bound (e.g. `functools.partial(core.list_node,
    label_selector=...)`); this adds the resourceVersion, watch and timeout arguments and always
    reads the raw response (`_preload_content=False`: the API's JSON, no client models)."""

    def __init__(
        self,
        what: str,
        call: Callable[..., Any],
        timings: ListWatchTimings,
        *,
        listed: Callable[[list[Obj], str], None],
        event: Callable[[str, Obj], None],
        answered: Callable[[], None] = _nothing,
        failed: Callable[[BaseException], object] = _nothing,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self._call = call
        self.timings = timings
        self._listed, self._event, self._answered, self._failed = listed, event, answered, failed
        self._clock = clock
        self._stopping = threading.Event()
        self._restarting = threading.Event()
        self._seen_rv: str | None = None
        """The resourceVersion of the last list or event delivered (watch thread only)."""
        self._response: Any = None
        self.lists = 0
        """Lists made (the first, 410s and resyncs): a relist storm shows here."""

    def stop(self) -> None:
        """Ask `run` to return; a watch request in progress is cut off. Any thread."""
        self._stopping.set()
        self._cut()

    def restart(self) -> None:
        """Cut the watch request in progress (its connection may be half-open and silent); the loop
        resumes from its resourceVersion on a new connection, without backing off. Any thread."""
        self._restarting.set()
        self._cut()

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    def _cut(self) -> None:
        response = self._response
        if response is not None:
            with suppress(Exception):
                response.shutdown()

    def run(self) -> None:
        """List and watch until stopped (blocking)."""
        from urllib3.exceptions import ReadTimeoutError

        t = self.timings
        backoff = Backoff(t.backoff_initial_s, t.backoff_max_s)
        rv: str | None = None
        self._seen_rv = None
        listed_at = -float("inf")
        while not self._stopping.is_set():
            self._restarting.clear()  # a restart asked for before this request is served by it
            try:
                if rv is None or self._clock() - listed_at >= t.resync_s:
                    rv = self._list()
                    listed_at = self._clock()
                    backoff.reset()
                rv = self._watch_once(rv)
                backoff.reset()
            except Exception as exc:
                if self._stopping.is_set():
                    return
                rv = self._seen_rv or rv  # never replay events already delivered
                cut = self._restarting.is_set()
                if cut or caused_by(exc, ReadTimeoutError):
                    log.info("watch of %s silent; resuming on a new connection", self.what)
                    if cut:  # by the caller, who already knows the API server failed it: no backoff
                        continue  # (the flag is cleared above: a retry that fails backs off)
                if getattr(exc, "status", None) == 410:
                    log.info("watch of %s: 410 Gone; relisting", self.what)
                    rv = self._seen_rv = None
                    continue
                self._failed(exc)
                self._stopping.wait(backoff.next())
            else:
                if rv is None:
                    log.info("watch of %s: 410 Gone; relisting", self.what)
                    self._seen_rv = None

    def _list(self) -> str:
        t = self.timings.request_timeout_s
        response = self._call(_preload_content=False, _request_timeout=(t, t))
        found = json.loads(response.data)
        rv = str(found["metadata"]["resourceVersion"])
        self.lists += 1
        self._listed(found.get("items") or [], rv)
        self._seen_rv = rv
        return rv

    def _watch_once(self, rv: str) -> str | None:
        """One watch request; returns the resourceVersion to resume from, None to relist."""
        t = self.timings
        response = self._call(
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=max(1, int(t.watch_timeout_s)),
            watch=True,
            _preload_content=False,
            _request_timeout=(t.request_timeout_s, t.watch_read_timeout_s),
        )
        self._response = response
        try:
            if self._stopping.is_set() or self._restarting.is_set():
                return rv  # asked for while this request went out: `_cut` could not see it yet
            if response.status != 200:
                raise WatchError(response.status, str(response.reason))
            self._answered()
            for line in _lines(response):
                if self._stopping.is_set():
                    return rv
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise WatchError(obj.get("code"), str(obj.get("message")))
                rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                if kind != "BOOKMARK":
                    self._event(kind, obj)
                self._seen_rv = rv  # a resume after this request fails starts past this event
            return rv
        finally:
            self._response = None
            response.close()
            response.release_conn()


def _lines(response: Any) -> Iterator[bytes]:
    """The non-empty lines of a streamed response body (urllib3), as they arrive."""
    pending = b""
    for chunk in response.stream(amt=None, decode_content=False):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending


def caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
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
