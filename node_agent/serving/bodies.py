"""Request bodies, read so that no client can hold the agent's memory, time or event loop.

- The declared Content-Length is checked against the limit before a byte is read (413).
- Bytes are charged to the shared `BodyBudget` as they ARRIVE (decompressed bytes, when the body is
  compressed), not as declared: a client that declares 64 MiB and sends nothing holds nothing.
  Past the budget: `Overloaded` (503 + Retry-After).
- The whole body must arrive within `timeout_s` (408, and the connection is closed).
- `Content-Encoding: gzip` / `deflate` are inflated here, in steps of `INFLATE_STEP_BYTES` with the
  event loop served between steps, and refused (413) as soon as the inflated size passes the limit:
  a 10 MB body that would inflate to 10 GiB costs a few steps, and nothing goes on after the
  answer. aiohttp's own decompression is off (`auto_decompress=False`), since it inflates whole
  chunks inside the protocol's data callback. Other encodings: 415.
- A client that goes away mid-body is one log line (and a 499 nobody reads), not a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from types import TracebackType

from aiohttp import hdrs, web

from node_agent.errors import Overloaded
from node_agent.serving.responses import HttpError

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499
"""nginx's status for a client that closed the connection before its request was read: logged,
and answered to nobody."""
INFLATE_STEP_BYTES = 256 * 1024
"""Most bytes one inflate step produces before the event loop gets a turn."""
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class BodyBudget:
    """Bytes of request bodies held by requests in progress, bounded (loop thread only)."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def hold(self) -> BodyHold:
        """What one request holds: charged as its body arrives, released as a whole on exit."""
        return BodyHold(self)


class BodyHold:
    """One request's share of a `BodyBudget` (a context manager)."""

    __slots__ = ("budget", "bytes")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.bytes = 0

    def charge(self, n: int) -> None:
        """Hold `n` more bytes; `Overloaded` (nothing charged) when the budget has no room."""
        budget = self.budget
        if budget.held + n > budget.limit:
            raise Overloaded(
                f"too many request bytes in flight ({budget.held} of {budget.limit}); retry shortly",
                retry_after_s=1.0,
            )
        budget.held += n
        self.bytes += n

    def __enter__(self) -> BodyHold:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.budget.held -= self.bytes
        self.bytes = 0
        assert self.budget.held >= 0, "released more request bytes than held"


def check_length(request: web.Request, limit: int) -> None:
    """413 (`HttpError`) when the declared Content-Length is over `limit`."""
    length = request.content_length
    if length is not None and length > limit:
        raise HttpError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")


def _inflater(request: web.Request) -> zlib._Decompress | None:
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise HttpError(415, f"unsupported Content-Encoding {encoding[:40]!r} (gzip, deflate or none)")
    return zlib.decompressobj(wbits)


async def read_body(
    request: web.Request, limit: int, hold: BodyHold | None = None, timeout_s: float | None = None
) -> bytearray:
    """The body (inflated), read in chunks: 413 as soon as it passes `limit`, each chunk charged to
    `hold` as it arrives, 408 when it has not all arrived within `timeout_s`."""
    check_length(request, limit)
    inflater = _inflater(request)
    buf = bytearray()

    def take(data: bytes) -> None:
        if len(buf) + len(data) > limit:
            raise HttpError(413, f"request body exceeds the limit of {limit} bytes")
        if hold is not None:
            hold.charge(len(data))
        buf.extend(data)

    async def read() -> None:
        async for chunk in request.content.iter_any():
            if inflater is None:
                take(chunk)
                continue
            data = _inflate(inflater, chunk)
            take(data)
            while inflater.unconsumed_tail:
                await asyncio.sleep(0)  # the loop's turn between steps
                take(_inflate(inflater, inflater.unconsumed_tail))
        if inflater is not None:
            take(inflater.flush())
            if not inflater.eof:
                raise HttpError(400, "the compressed request body is truncated")

    try:
        async with asyncio.timeout(timeout_s):
            await read()
    except TimeoutError:
        raise HttpError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    except ConnectionResetError:  # one line, not a traceback: clients do go away
        log.info(
            "%s %s: the client closed the connection before its body arrived", request.method, request.path
        )
        raise HttpError(CLIENT_CLOSED, "the client closed the connection") from None
    return buf


def _inflate(inflater: zlib._Decompress, data: bytes) -> bytes:
    try:
        return inflater.decompress(data, INFLATE_STEP_BYTES)
    except zlib.error as e:
        raise HttpError(400, f"the compressed request body is not valid: {e}") from None
