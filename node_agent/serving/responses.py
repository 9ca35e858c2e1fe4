"""How the HTTP layer answers: JSON responses, and the one translation of errors into responses
(request bodies are read by `serving.bodies`).

`ERROR_STATUS` (through `status_for`, in `serving.error_status`, shared with gRPC) is the one
place the agent's errors become HTTP status codes; every error body is `{"error": "..."}`, one
line (`public_message`), never a stack trace. Shared by the v2 routes (`serving.http`) and the
generate extension (`serving.generate`), so neither imports the other's helpers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from node_agent.errors import AgentError, InvalidInput, ShuttingDown
from node_agent.serving import v2_codec
from node_agent.serving.error_status import ERROR_STATUS as ERROR_STATUS
from node_agent.serving.error_status import public_message as public_message
from node_agent.serving.error_status import retry_after_s
from node_agent.serving.error_status import status_for as status_for


class HttpError(Exception):
    """A refusal decided by the HTTP layer itself (size limit, auth, bad path)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(payload, separators=(",", ":")).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def json_object(body: bytes | bytearray) -> dict[str, Any]:
    """The body as a JSON object; `InvalidInput` (400) saying what is wrong otherwise."""
    doc = v2_codec.parse_json(body)
    if not isinstance(doc, dict):
        raise InvalidInput("the request body must be a JSON object")
    return doc


def error_status(exc: BaseException) -> tuple[int, dict[str, str]]:
    """The one translation of errors into an HTTP status and headers (Retry-After)."""
    if isinstance(exc, HttpError):
        return exc.status, dict(exc.headers)
    if not isinstance(exc, AgentError):
        raise TypeError(f"not an error the API answers: {exc!r}")
    headers: dict[str, str] = {}
    retry_s = retry_after_s(exc)
    if retry_s is not None:
        headers["Retry-After"] = str(retry_s)
    return status_for(exc), headers


def error_response(exc: BaseException, body: Any = None) -> web.Response:
    """An error as an HTTP response: `{"error": message}` (the v2 shape), or `body`."""
    status, headers = error_status(exc)
    response = json_response(body if body is not None else {"error": public_message(exc)}, status, headers)
    if isinstance(exc, ShuttingDown) or status in (408, 413):  # the rest of the body is not read
        response.force_close()
    return response


def sse_event(payload: Any) -> bytes:
    """One server-sent event carrying `payload` as JSON (every stream of the agent frames its
    events with this)."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
