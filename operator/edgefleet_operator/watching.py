"""How long the operator waits on the API server: kopf's watches and requests, and every call
of the fleet pass's kubernetes client. Nothing the operator sends may wait forever: a
connection that stalls (the socket stays open, nothing arrives: a middlebox dropped the flow,
an API server hung) must end in an error that the caller retries.

Bounds with the defaults (each setting is read from `EDGEFLEET_<SETTING>`, e.g.
EDGEFLEET_API_READ_TIMEOUT_S):
- a kopf watch ends after `watch_server_timeout_s` (server side, 60 s) and is resumed from
  its resourceVersion; one that sends nothing at all is dropped after
  `watch_inactivity_timeout_s` (70 s: the API server sends a bookmark each minute) and
  resumed on a new connection; 410 Gone relists (kopf does both).
- every call of the fleet pass has a connect timeout (`api_connect_timeout_s`, 10 s) and a
  read timeout between bytes (`api_read_timeout_s`, 30 s), and is retried once at most: a
  pass stalled on a dead connection fails within 60 s, and the fleet loop retries it on a
  new connection.
- the operator's informers (`fleet_cache`) watch with the same server timeout and inactivity
  bound; a call (a pass's write, a Lease round) that finds the API server out of reach cuts
  every watch, which resumes on a new connection from its last resourceVersion: an event a
  stalled watch missed is applied within a read timeout and a pass after the calls work
  again (the fault test, with a 3 s read timeout and 1 s Lease rounds: under 15 s).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client import rest
from urllib3.util.retry import Retry


@dataclass(frozen=True, slots=True)
class WatchingSettings:
    """Timeouts towards the API server, in seconds (see the module docstring)."""

    watch_server_timeout_s: float = 60.0
    """`timeoutSeconds` of one watch request (whole seconds); then kopf resumes it from its
    resourceVersion."""
    watch_client_timeout_s: float = 90.0
    """The most one watch request may last, client side (server timeout + margin)."""
    watch_inactivity_timeout_s: float = 70.0
    """A watch that delivers nothing (no event, no bookmark) for this long is dropped and
    relisted: longer than the API server's 60 s bookmark period, so a quiet watch is kept."""
    api_connect_timeout_s: float = 10.0
    api_read_timeout_s: float = 30.0
    """Per read, not per call: a large list streaming slowly is not cut."""
    api_request_timeout_s: float = 60.0
    """kopf's own non-watch requests (peering, events, patches), whole request."""

    def __post_init__(self) -> None:
        for name in _names(type(self)):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.watch_client_timeout_s < self.watch_server_timeout_s:
            raise ValueError("watch_client_timeout_s must be >= watch_server_timeout_s")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WatchingSettings:
        """Each field from `EDGEFLEET_<FIELD>` (e.g. EDGEFLEET_API_READ_TIMEOUT_S), else its default."""
        env = os.environ if env is None else env
        values: dict[str, float] = {}
        for name in _names(cls):
            raw = env.get(f"EDGEFLEET_{name.upper()}", "").strip()
            if raw:
                try:
                    values[name] = float(raw)
                except ValueError:
                    raise ValueError(f"EDGEFLEET_{name.upper()} is not a number: {raw!r}") from None
        return cls(**values)


def _names(cls: type[WatchingSettings]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def configure_kopf(kopf_settings: Any, watching: WatchingSettings) -> None:
    """Set kopf's watching and networking timeouts (`kopf.OperatorSettings`) from `watching`."""
    w = kopf_settings.watching
    w.server_timeout = max(1, round(watching.watch_server_timeout_s))  # timeoutSeconds: an integer
    w.client_timeout = watching.watch_client_timeout_s
    w.connect_timeout = watching.api_connect_timeout_s
    w.inactivity_timeout = watching.watch_inactivity_timeout_s
    kopf_settings.networking.connect_timeout = watching.api_connect_timeout_s
    kopf_settings.networking.request_timeout = watching.api_request_timeout_s


class BoundedRestClient(rest.RESTClientObject):
    """The kubernetes client's transport with a default (connect, read) timeout for every call
    that names none (the generated API methods pass none unless told)."""

    def __init__(self, configuration: Any, timeout: tuple[float, float]) -> None:
        super().__init__(configuration)
        self.default_timeout = timeout

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("_request_timeout"):
            kwargs["_request_timeout"] = self.default_timeout
        return super().request(method, url, *args, **kwargs)


class NoticedRetry(Retry):
    """urllib3's Retry that calls `on_error` for every failed attempt it retries or gives up on (a
    connect or read error, a timeout): a call that succeeded on its retry still tells that the link
    failed once, and connections opened before it (watches) may be dead too."""

    on_error: Callable[[], None] | None = None

    def new(self, **kw: Any) -> NoticedRetry:
        retry = super().new(**kw)
        retry.on_error = self.on_error
        return retry

    def increment(self, *args: Any, **kwargs: Any) -> NoticedRetry:
        if kwargs.get("error") is not None and self.on_error is not None:
            self.on_error()
        return super().increment(*args, **kwargs)


def bounded(api_client: Any, watching: WatchingSettings, on_error: Callable[[], None] | None = None) -> Any:
    """`api_client` (a kubernetes ApiClient) with every call bounded by the connect and read
    timeouts of `watching` and retried once at most (urllib3 retries a timed-out read of a GET:
    a stalled call costs at most two read timeouts); `on_error` is told of every failed attempt
    (`NoticedRetry`); returns it."""
    old = api_client.rest_client
    timeout = (watching.api_connect_timeout_s, watching.api_read_timeout_s)
    # One retry: for a kept-alive connection the server closed; not 3.
    retry = NoticedRetry(total=1)
    retry.on_error = on_error
    api_client.configuration.retries = retry
    api_client.rest_client = BoundedRestClient(api_client.configuration, timeout)
    old.close()
    return api_client
