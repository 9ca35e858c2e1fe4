"""Connections, guarded below aiohttp: a client that opens sockets and sends nothing, or dribbles
its headers a byte a second, cannot hold the agent's sockets.

- At most `max_connections` open connections, and `max_connections_per_peer` from one address;
  the excess gets a canned `503` with `Retry-After` and is closed, before aiohttp sees it (no
  parsing, no task, no log line).
- A connection must deliver a request's headers within `header_timeout_s` of opening, and the next
  request's within `idle_timeout_s` of the previous answer (keep-alive); else it is closed. While a
  request is being served, no timer runs here: its body has its own limit (`serving.bodies`) and
  its work its deadline.

`GuardedSite` listens with `ConnectionGuard.wrap(factory)` as the protocol factory; `request_started` and
`request_finished` are called by the outermost middleware (aiohttp creates a request once its
headers are parsed). Loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

log = logging.getLogger(__name__)

_REFUSAL_BODY = b'{"error":"too many connections; retry shortly"}'
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY
)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How many connections, and how long one may wait between requests; validated."""

    max_connections: int = 1024
    """Open connections in all; keep it well under the process's file limit."""
    max_connections_per_peer: int = 128
    """Open connections from one address: one client cannot take them all (probes included)."""
    header_timeout_s: float = 10.0
    """A new connection must deliver its first request's headers within this."""
    idle_timeout_s: float = 30.0
    """A kept-alive connection must deliver the next request's headers within this of the answer."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_connections_per_peer <= self.max_connections:
            raise ValueError("need 1 <= max_connections_per_peer <= max_connections")
        if self.header_timeout_s <= 0 or self.idle_timeout_s <= 0:
            raise ValueError("header_timeout_s and idle_timeout_s must be > 0")


class ConnectionGuard:
    """Counts connections per peer, refuses the excess, closes the ones that wait too long."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.per_peer: Counter[str] = Counter()
        self.open = 0

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """The protocol factory that guards each of `factory`'s connections."""
        return lambda: _Guarded(factory(), self)

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        guarded = _guarded(transport)
        if guarded is not None:
            guarded.disarm()

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        guarded = _guarded(transport)
        if guarded is not None:
            guarded.arm(self.limits.idle_timeout_s)

    def admit(self, peer: str) -> bool:
        limits = self.limits
        if self.open >= limits.max_connections or self.per_peer[peer] >= limits.max_connections_per_peer:
            return False
        self.open += 1
        self.per_peer[peer] += 1
        return True

    def release(self, peer: str) -> None:
        self.open -= 1
        self.per_peer[peer] -= 1
        if not self.per_peer[peer]:
            del self.per_peer[peer]


def _guarded(transport: asyncio.BaseTransport | None) -> _Guarded | None:
    """The guard's wrapper of a request's connection (its transport's protocol)."""
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, _Guarded) else None


def _peer(transport: asyncio.BaseTransport) -> str:
    peername = transport.get_extra_info("peername")
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return str(peername or "")


class _Guarded(asyncio.Protocol):
    """One connection: aiohttp's protocol behind the guard's admission and timers."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.admitted = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports implement asyncio.Transport without subclassing it)
        transport = cast(asyncio.Transport, transport)
        self.transport, self.peer = transport, _peer(transport)
        if not self.guard.admit(self.peer):
            transport.write(REFUSAL)
            transport.close()
            return
        self.admitted = True
        self.inner.connection_made(transport)
        self.arm(self.guard.limits.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self.admitted:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.admitted = False
        self.disarm()
        self.guard.release(self.peer)
        self.inner.connection_lost(exc)

    def arm(self, delay_s: float) -> None:
        self.disarm()
        self.timer = asyncio.get_running_loop().call_later(delay_s, self._expire, delay_s)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self, delay_s: float) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():  # an answer still going out to a slow reader
            self.arm(delay_s)
            return
        log.debug("closing a connection from %s: no request within %g s", self.peer, delay_s)
        transport.close()


class GuardedSite(web.BaseSite):
    """aiohttp's TCP site, listening through a `ConnectionGuard`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard) -> None:
        super().__init__(runner)
        self.host, self.port, self.guard = host, port, guard

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "the runner is not set up"
        self._server = await asyncio.get_running_loop().create_server(
            self.guard.wrap(server), self.host, self.port, backlog=self._backlog, reuse_address=True
        )
