"""How the HTTP layer answers: JSON responses, and the one translation of errors into responses
(request bodies are read by `serving.bodies`).

`ERROR_STATUS` (through `status_for`) is the one place the agent's errors become HTTP status
codes; every error body is `{"error": "..."}`, one line (`public_message`), never a stack
trace. Shared by the v2 routes (`serving.http`) and the generate extension
(`serving.generate`), so neither imports the other's helpers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from node_agent.errors import (
    AgentError,
    Conflict,
    DeadlineExceeded,
    DigestMismatch,
    InferenceFailed,
    InsufficientMemory,
    InvalidInput,
    InvalidModel,
    ModelNotFound,
    ModelNotReady,
    ModelUnavailable,
    Overloaded,
    RequestTooLarge,
    ShuttingDown,
    TooManyRequests,
)
from node_agent.serving import v2_codec

_MAX_MESSAGE_CHARS = 2000

ERROR_STATUS: dict[type[AgentError], int] = {
    InvalidInput: 400,
    ModelNotFound: 404,
    Conflict: 409,
    RequestTooLarge: 413,
    InvalidModel: 500,
    ModelUnavailable: 409,
    DigestMismatch: 409,
    ModelNotReady: 503,
    InferenceFailed: 500,
    InsufficientMemory: 503,
    Overloaded: 503,
    TooManyRequests: 429,
    ShuttingDown: 503,
    DeadlineExceeded: 504,
}
"""The agent's errors -> HTTP status codes (subclasses map as their nearest listed base).

InvalidModel is a 500: the repository holds a model the agent cannot serve, which its operator
(not the caller) must fix. A model whose files escape the repository or fail their digest is
a 409 (the model's state conflicts with serving it; the reason says why; retrying cannot help
until the files change). Overloaded, ModelNotReady and ShuttingDown carry Retry-After."""


def status_for(exc: AgentError) -> int:
    """The HTTP status of an agent error: its nearest base listed in `ERROR_STATUS`, else 500."""
    for cls in type(exc).__mro__:
        status = ERROR_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def public_message(exc: BaseException) -> str:
    """One line for the caller: a model's error may carry a (TorchScript) traceback, which
    stays in the log; the first and last lines say what failed."""
    text = str(exc) or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        text = f"{lines[0]} ... {lines[-1]}" if lines[-1] != lines[0] else lines[0]
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


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
    headers: dict[str, str] = {}
    if isinstance(exc, HttpError):
        return exc.status, dict(exc.headers)
    if not isinstance(exc, AgentError):
        raise TypeError(f"not an error the API answers: {exc!r}")
    if isinstance(exc, Overloaded | ModelNotReady):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif isinstance(exc, ShuttingDown):
        headers["Retry-After"] = "1"
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
