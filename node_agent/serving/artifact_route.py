"""Peer fetch, the serving side: `GET /edgefleet/v1/artifacts/sha256/<hex>` (and HEAD) answers
with an artifact this agent holds and verified, so agents of one site fetch a model from each
other instead of each over the uplink (`link.download.Delivery`).

Invariants: read-only; the only thing taken from the request is a digest that must be 64
lowercase hex characters, and it is only ever a key for `lookup` (the link's verified
versions), never a path: a digest the agent does not hold is 404. Range requests are served
(aiohttp's `FileResponse`: 206 with Content-Range), so a cut peer transfer resumes. The token
check of the API applies as to every other route.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from node_agent.serving.responses import HttpError, error_response

ROUTE = "/edgefleet/v1/artifacts/sha256/{hex}"
_HEX = re.compile(r"^[a-f0-9]{64}$")

ArtifactLookup = Callable[[str], Path | None]
"""'sha256:<hex>' -> the verified file holding those bytes, or None."""


class ArtifactRoute:
    """The route; `lookup` is set once something holds artifacts (EdgeNode mode's link)."""

    def __init__(self, lookup: ArtifactLookup | None = None) -> None:
        self.lookup = lookup
        self.served = 0
        """Responses that carried an artifact (counted for tests and benchmarks)."""

    def add_to(self, app: web.Application) -> None:
        app.router.add_get(ROUTE, self.get)  # GET routes answer HEAD too

    async def get(self, request: web.Request) -> web.StreamResponse:
        hex_ = request.match_info["hex"]
        lookup = self.lookup
        if not _HEX.match(hex_) or lookup is None:
            return error_response(HttpError(404, "no such artifact here"))
        path = lookup("sha256:" + hex_)  # a dict walk and a stat: cheap enough for the loop
        if path is None:
            return error_response(HttpError(404, f"this agent holds no verified artifact sha256:{hex_}"))
        self.served += 1
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
