"""The one place the agent's errors become protocol status codes, for HTTP and gRPC.

`ERROR_STATUS` maps errors to HTTP status codes; gRPC codes are derived from those
(`serving.grpc_server.GRPC_CODES`), so both protocols refuse the same requests the same way.
Messages are one line (`public_message`), never a stack trace.
"""

from __future__ import annotations

import math

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
until the files change). Overloaded, ModelNotReady and ShuttingDown carry a retry hint."""


def status_for(exc: AgentError) -> int:
    """The HTTP status of an agent error: its nearest base listed in `ERROR_STATUS`, else 500."""
    for cls in type(exc).__mro__:
        status = ERROR_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def retry_after_s(exc: AgentError) -> int | None:
    """Whole seconds a client should wait before retrying (HTTP Retry-After, gRPC trailing
    metadata), or None when retrying cannot help."""
    if isinstance(exc, Overloaded | ModelNotReady):
        return max(1, math.ceil(exc.retry_after_s))
    if isinstance(exc, ShuttingDown):
        return 1
    return None


def public_message(exc: BaseException) -> str:
    """One line for the caller: a model's error may carry a (TorchScript) traceback, which
    stays in the log; the first and last lines say what failed."""
    text = str(exc) or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        text = f"{lines[0]} ... {lines[-1]}" if lines[-1] != lines[0] else lines[0]
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."
