"""The agent's inference API: KServe v2 (Open Inference Protocol) over HTTP, on aiohttp.

Routes (Triton's binary tensor data, model configuration and model repository extensions
included, so `tritonclient.http` works with its defaults):

| method | path | |
| --- | --- | --- |
| GET | /v2/health/live, /v2/health/ready | probes; never need a token |
| GET | /v2 | server metadata |
| GET | /v2/models/{m}[/versions/{v}] | model metadata |
| GET | /v2/models/{m}[/versions/{v}]/ready, .../config | readiness; Triton's model config |
| GET | /v2/models/stats, /v2/models/{m}[/versions/{v}]/stats | Triton's statistics (`serving.statistics`) |
| POST | /v2/models/{m}[/versions/{v}]/infer | inference |
| POST | /v2/models/{m}[/versions/{v}]/generate, .../generate_stream | text generation (`serving.generate`) |
| GET, POST | /v1/models, /v1/completions, /v1/chat/completions | OpenAI-compatible (`serving.openai_api`) |
| POST | /v2/repository/index | every model version and its state |
| POST | /v2/repository/models/{m}/load, .../unload | repository control |
| GET | /metrics | Prometheus text, when the agent was given a registry |
| GET | /edgefleet/v1/artifacts/sha256/{hex} | a verified artifact, for peers (`serving.artifact_route`) |

Handlers are thin: decode (`v2_codec`) -> `api.infer` on the `ServingApi` -> encode, the path the
gRPC API (`serving.grpc_server`) shares. Errors become responses in `serving.responses`
(`error_status.ERROR_STATUS` is the one place the agent's errors become status codes);
every error body is `{"error": "..."}`, one line, never a stack trace (unexpected exceptions
are logged and answered 500).

Protections, all before any model code runs:
- connections are capped in all and per peer, and closed when a request's headers do not arrive
  in time (`serving.connections`);
- request bodies are limited to `max_request_bytes`: a larger Content-Length is refused with
  413 before a byte of the body is read, a body without one is read in chunks and refused when
  it passes the limit; bodies must arrive within `body_timeout_s` (408); compressed bodies are
  inflated in bounded steps; bytes held by requests in progress, counted as they arrive, are
  bounded by `max_inflight_request_bytes` (past it: 503 with Retry-After) (`serving.bodies`);
- with an auth token, every endpoint but the probes and /metrics needs
  `Authorization: Bearer <token>` (401 otherwise; compared in constant time);
- repository load/unload is served only to peers inside `repository_control_from` (loopback
  by default: 403 for others) and only for names that are valid model names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import hdrs, web

from node_agent import __version__
from node_agent.errors import AgentError, InvalidInput
from node_agent.serving import api, v2_codec
from node_agent.serving.api import EXTENSIONS as EXTENSIONS
from node_agent.serving.api import LOOPBACK_NETWORKS as LOOPBACK_NETWORKS
from node_agent.serving.api import IndexEntry as IndexEntry
from node_agent.serving.api import ServingApi as ServingApi
from node_agent.serving.api import control_networks as control_networks
from node_agent.serving.api import peer_allowed as peer_allowed
from node_agent.serving.artifact_route import ArtifactRoute
from node_agent.serving.bodies import BodyBudget, check_length, read_body
from node_agent.serving.connections import ConnectionGuard, ConnectionLimits
from node_agent.serving.generate import add_generate_routes
from node_agent.serving.openai_api import add_openai_routes
from node_agent.serving.responses import HttpError, error_response, json_object, json_response
from node_agent.serving.statistics import statistics_json

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics"})
"""Paths served without a token: probes must work for the kubelet, and Prometheus scrapes."""
_SMALL_BODY_BYTES = 64 * 1024
"""Limit for the bodies of repository requests (a few parameters)."""


MetricsHook = Callable[[], tuple[bytes, str]]
"""Returns (body, content type) for GET /metrics."""


class RequestObserver(Protocol):
    """Told about every request once answered (`node_agent.metrics.agent.ApiMetrics`); `route` is
    the route template (bounded label values), 'unmatched' for unknown paths."""

    def observe(self, method: str, route: str, code: int, duration_s: float) -> None: ...


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The HTTP server's settings; validated at construction."""

    host: str = "0.0.0.0"
    """Address to listen on; all interfaces, as tritonserver and MLServer do (a pod's port must
    be reachable). Repository control stays loopback-only regardless (see below)."""
    port: int = 8000
    """TCP port; 0 picks a free one (see `Agent.port`). 8000 is Triton's HTTP port."""
    auth_token: str | None = field(default=None, repr=False)
    """Bearer token required by every endpoint but the probes and /metrics; None: no auth."""
    max_request_bytes: int = 64 * 2**20
    """Largest request body. 64 MiB holds a batch of 64 images of 3x224x224 FP32 as JSON text
    (about 12 bytes per value) with room to spare, and is small next to an edge box's RAM."""
    max_inflight_request_bytes: int = 256 * 2**20
    """Request body bytes held at once by requests in progress, counted as they arrive (a
    declared Content-Length reserves nothing); past it requests get 503 + Retry-After. Four
    full-size bodies: a burst of large requests cannot take the host's memory."""
    body_timeout_s: float = 60.0
    """A request's whole body must arrive within this (408 and the connection closed): 64 MiB
    at about 9 Mbit/s, a slow edge uplink."""
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    """Connection caps and header/keep-alive timeouts (`serving.connections`)."""
    repository_control_from: tuple[str, ...] = LOOPBACK_NETWORKS
    """Networks (CIDR) whose peers may load and unload models. Loopback only by default, so a
    model can be swapped from the node (or kubectl exec), not from the network; widen it
    explicitly (e.g. "0.0.0.0/0") to allow remote control, ideally with an auth token."""
    access_log: bool = False
    """Log every request (aiohttp's access log); off by default: a line per request costs more
    than the inference of a small model."""

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if self.auth_token is not None and (not self.auth_token or any(c.isspace() for c in self.auth_token)):
            raise ValueError("auth_token must be a non-empty string without whitespace")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes!r}")
        if self.max_inflight_request_bytes < self.max_request_bytes:
            raise ValueError("max_inflight_request_bytes must be >= max_request_bytes")
        if self.body_timeout_s <= 0:
            raise ValueError(f"body_timeout_s must be > 0, got {self.body_timeout_s!r}")
        control_networks(self.repository_control_from)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GoneWatch:
    """Cancels the handlers of infer requests whose clients have gone (their connection
    closed) while they wait for their results, so their queued rows are dropped, never run.

    aiohttp >= 3.9 leaves a handler running when its client disconnects (its
    `handler_cancellation` is off by default, and on for every handler it would also cut
    load/unload short); one timer checks the watched connections every `interval_s`, so a
    request costs a dict entry, not a task or a timer of its own."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self._watched: dict[asyncio.Task[Any], asyncio.BaseTransport] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.cancelled = 0
        """Handlers cancelled because their client had gone."""

    @contextlib.contextmanager
    def watching(self, transport: asyncio.BaseTransport | None) -> Iterator[None]:
        """Within it, the current task is cancelled if `transport` closes."""
        task = asyncio.current_task()
        if transport is None or task is None:
            yield
            return
        self._watched[task] = transport
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._check)
        try:
            yield
        finally:
            self._watched.pop(task, None)

    def _check(self) -> None:
        self._timer = None
        gone = [t for t, transport in self._watched.items() if transport.is_closing()]
        for task in gone:
            del self._watched[task]
            task.cancel()
            self.cancelled += 1
        if self._watched:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._check)


class V2Api:
    """The routes over one `ServingApi`; `app` is the aiohttp application."""

    def __init__(
        self,
        api: ServingApi,
        settings: HttpSettings,
        metrics: MetricsHook | None = None,
        observer: RequestObserver | None = None,
    ) -> None:
        self.api = api
        self.settings = settings
        self._metrics = metrics
        self._gone = GoneWatch()
        self._observer = observer
        self._token = settings.auth_token.encode() if settings.auth_token else None
        self._control = control_networks(settings.repository_control_from)
        self.bodies = BodyBudget(settings.max_inflight_request_bytes)
        """Request body bytes held now by requests in progress (bounded)."""
        self.guard = ConnectionGuard(settings.connections)
        """Listen through it (`connections.GuardedSite`) for the connection limits to apply."""
        self.app = web.Application(middlewares=[self._around], client_max_size=_SMALL_BODY_BYTES)
        self.artifacts = ArtifactRoute()
        """Peer fetch (`serving.artifact_route`): serves nothing until given a lookup."""
        self._routes()

    def _routes(self) -> None:
        r = self.app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/models/stats", self.model_statistics)  # before {model}: Triton's route
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self.model_metadata)
            r.add_get(base + "/ready", self.model_ready)
            r.add_get(base + "/config", self.model_config)
            r.add_get(base + "/stats", self.model_statistics)
            r.add_post(base + "/infer", self.infer, expect_handler=self._expect)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_post("/v2/repository/models/{model}/load", self.load)
        r.add_post("/v2/repository/models/{model}/unload", self.unload)
        if self._metrics is not None:
            r.add_get("/metrics", self.metrics)
        self.artifacts.add_to(self.app)
        add_generate_routes(self.app, self.api.generator, self.settings.body_timeout_s)
        add_openai_routes(
            self.app, self.api.generator, self.api.generating_models, self.settings.body_timeout_s
        )

    # -- middleware -------------------------------------------------------------------------

    @web.middleware
    async def _around(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """What every request passes through, in one middleware (each level of aiohttp's chain
        costs a coroutine and a partial per request): the connection's header timer stops while
        the request is served and restarts (keep-alive) once it is answered; the bearer token is
        checked; every error becomes a JSON answer; the request is observed (route, status,
        seconds)."""
        transport = request.transport
        self.guard.request_started(transport)
        start = time.monotonic()
        try:
            try:
                self._check_auth(request)
                response = await handler(request)
            except (AgentError, HttpError) as e:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s %s -> %s: %s", request.method, request.path, type(e).__name__, e)
                response = error_response(e)
            except web.HTTPException as e:  # routing (404, 405) and aiohttp's own refusals
                if e.status < 400:
                    raise
                response = json_response({"error": _routing_message(request, e)}, e.status, _allow_header(e))
            except Exception:
                log.exception("unhandled error serving %s %s", request.method, request.path)
                response = json_response({"error": "internal error (details are in the agent's log)"}, 500)
            observer = self._observer
            if observer is not None:
                resource = request.match_info.route.resource
                route = resource.canonical if resource is not None else "unmatched"
                observer.observe(request.method, route, response.status, time.monotonic() - start)
            return response
        finally:
            self.guard.request_finished(transport)

    def _check_auth(self, request: web.Request) -> None:
        if self._token is None or request.path in OPEN_PATHS:
            return
        if not api.bearer_token_matches(request.headers.get(hdrs.AUTHORIZATION), self._token):
            raise HttpError(
                401,
                api.BEARER_HINT,
                {"WWW-Authenticate": 'Bearer realm="edgefleet-agent"'},
            )

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: refuse an oversized or unauthorised body before it is sent."""
        try:
            self._check_auth(request)
            check_length(request, self.settings.max_request_bytes)
        except HttpError as e:
            return error_response(e)
        if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
            return error_response(HttpError(417, f"unknown Expect: {request.headers[hdrs.EXPECT]!r}"))
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    # -- bodies -----------------------------------------------------------------------------

    async def _small_json(self, request: web.Request) -> dict[str, Any]:
        body = await read_body(request, _SMALL_BODY_BYTES, timeout_s=self.settings.body_timeout_s)
        if not body.strip():
            return {}
        return json_object(body)

    # -- health and metadata ----------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        """Alive while the event loop answers and the inference workers are not all hung;
        independent of load, models and readiness, so a busy agent or a model that is loading
        never gets the agent restarted."""
        reason = self.api.not_live_reason()
        if reason is not None:
            return json_response({"error": f"not live: {reason}"}, 503)
        return json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        reason = self.api.not_ready_reason()
        if reason is not None:
            return json_response({"error": f"not ready: {reason}"}, 503)
        return json_response({"ready": True})

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response({"name": api.SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model_path(request)
        config = self.api.config(name, version)
        return json_response(v2_codec.model_metadata(config, self.api.versions(name)))

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = _model_path(request)
        return json_response(v2_codec.triton_model_config(self.api.config(name, version)))

    async def model_statistics(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get("version")
        return json_response(statistics_json(self.api.statistics(name, version)))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model_path(request)
        reason = self.api.model_not_ready_reason(name, version)
        if reason is not None:  # Triton answers 400 for a model that is not ready
            return json_response({"error": f"model {name!r} is not ready: {reason}"}, 400)
        return json_response({"name": name, "version": version, "ready": True})

    async def metrics(self, request: web.Request) -> web.Response:
        assert self._metrics is not None
        body, content_type = self._metrics()
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})

    # -- inference --------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model_path(request)
        limit = self.settings.max_request_bytes
        check_length(request, limit)
        config = self.api.config(name, version)
        with self.bodies.hold() as hold:
            body = await read_body(request, limit, hold, self.settings.body_timeout_s)
            decoded = v2_codec.decode_request(
                body, v2_codec.parse_header_length(request.headers.get(HEADER_LENGTH))
            )
            with self._gone.watching(request.transport):  # client gone: its work is dropped
                outputs = await api.infer(self.api, config, decoded)
            encoded = v2_codec.encode_response(config, decoded, outputs)
        if encoded.header_length is None:
            return web.Response(body=encoded.body, content_type="application/json")
        return web.Response(
            body=encoded.body,
            headers={
                HEADER_LENGTH: str(encoded.header_length),
                hdrs.CONTENT_TYPE: "application/octet-stream",
            },
        )

    # -- model repository -------------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        doc = await self._small_json(request)
        ready_only = doc.get("ready", False)
        if not isinstance(ready_only, bool):
            raise InvalidInput(f"'ready' must be true or false, got {ready_only!r:.40}")
        entries = self.api.index()
        return json_response(
            [
                {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                for e in entries
                if not ready_only or e.state == "READY"
            ]
        )

    async def load(self, request: web.Request) -> web.Response:
        name = self._control_target(request)
        params = (await self._small_json(request)).get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be a JSON object")
        api.check_no_load_parameters(list(params))
        await self.api.load(name)
        return json_response({"name": name, "state": "READY"})

    async def unload(self, request: web.Request) -> web.Response:
        name = self._control_target(request)
        await self._small_json(request)  # unload_dependents: there are no dependents
        await self.api.unload(name)
        return json_response({"name": name, "state": "UNAVAILABLE"})

    def _control_target(self, request: web.Request) -> str:
        """The model name of a load/unload, after the peer and name checks."""
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = peername[0] if isinstance(peername, tuple) and peername else None
        refusal = api.control_refusal(peer, self._control, self.settings.repository_control_from)
        if refusal is not None:
            raise HttpError(403, refusal)
        return api.check_control_name(request.match_info["model"])


def _model_path(request: web.Request) -> tuple[str, str | None]:
    return request.match_info["model"], request.match_info.get("version")


def _routing_message(request: web.Request, e: web.HTTPException) -> str:
    if e.status == 404:
        return f"no such endpoint: {request.method} {request.path[:200]}"
    if e.status == 405:
        allowed = e.headers.get(hdrs.ALLOW, "")
        return f"{request.method} is not allowed on {request.path[:200]} (allowed: {allowed})"
    return e.reason


def _allow_header(e: web.HTTPException) -> dict[str, str]:
    allow = e.headers.get(hdrs.ALLOW)
    return {hdrs.ALLOW: allow} if allow else {}
