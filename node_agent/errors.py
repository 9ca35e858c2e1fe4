"""The agent's error vocabulary. Domain code raises these; one place (the API layer)
maps them to HTTP status codes. Running out of capacity inside a policy is a return
value, not an exception; these are what a caller is finally told.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error a request's caller may receive."""


class ModelNotFound(AgentError):
    """No such model or version in the repository."""


class InvalidModel(AgentError):
    """A model folder or model.yaml is malformed, or its artifact is missing."""


class DigestMismatch(InvalidModel):
    """The artifact's sha256 is not the one model.yaml (or the EdgeNode spec) declares."""


class InvalidInput(AgentError):
    """A request's tensors do not match the model's inputs (name, dtype, shape, size)."""


class RequestTooLarge(AgentError):
    """The request itself is larger than the model can ever take (its context, its whole KV
    pool), whatever the load: retrying it unchanged cannot succeed."""


class InsufficientMemory(AgentError):
    """The model cannot fit in the memory budget even after evicting everything evictable."""


class Overloaded(AgentError):
    """Admission control refused the request; try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(AgentError):
    """The request's deadline passed before it could run; it was dropped, not run."""


class InferenceFailed(AgentError):
    """The model raised while running the batch this request was in."""


class Conflict(AgentError):
    """The request conflicts with who owns the state it would change (e.g. repository
    load/unload on an agent whose models the operator assigns)."""


class ShuttingDown(AgentError):
    """The component is stopping and takes no new work."""


class TooManyRequests(Overloaded):
    """A model's queue refused the request (429): it would wait past its deadline or the
    model's latency objective (admission by predicted wait), the queue is at its hard cap, or
    more urgent work displaced it. `retry_after_s` is when the queue will have drained far
    enough for it to fit; other components' overload (memory, bytes in flight) stays 503."""


class ModelUnavailable(InvalidModel):
    """The model is in the repository but is not served as it stands: a file of it resolves
    outside the repository (a symlink escape). Its operator, not the caller, must fix it;
    the caller is told why (4xx) and the index lists it UNAVAILABLE."""


class ModelNotReady(AgentError):
    """The model is known but cannot take new requests now: it is being unloaded or replaced,
    was unloaded, or is not loaded yet. Try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
