"""The agent's inference API over gRPC: KServe v2's `inference.GRPCInferenceService` (grpc.aio).

Beside the HTTP API (`serving.http`), on the same `ServingApi` (engine, scheduler, batcher) and
the same `HttpSettings` limits, token and repository-control networks, so the two protocols
refuse the same requests the same way. Served: ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelConfig, ModelStatistics, ModelInfer, ModelStreamInfer,
RepositoryIndex, RepositoryModelLoad and RepositoryModelUnload (`proto/grpc_service.proto`);
anything else answers UNIMPLEMENTED.

One path for inference: decode (`grpc_codec`) -> `api.infer` -> encode, for ModelInfer and for
each request on a ModelStreamInfer stream. A stream answers every request it reads, in the
order they finish (match them by `id`), at most `max_stream_in_flight` at once (then it stops
reading until one finishes); a request that fails is answered with its `error_message` (the
same one-line message ModelInfer's status would carry) and the stream goes on. The stream
itself ends with a status only when it cannot go on: no valid token (UNAUTHENTICATED, checked
once, from the stream's metadata), a message over `max_request_bytes` (RESOURCE_EXHAUSTED, from
gRPC itself, which cannot skip a message: answers already sent stay delivered, requests still
running get none), the client cancelling, or the server stopping.

Errors: the agent's errors become HTTP statuses in `error_status` (one table), and those become
gRPC codes in `GRPC_CODES`; details are one line, never a stack trace. A retry hint (Overloaded,
queue full, model not ready, shutting down) travels in the trailing metadata as `retry-after`
(seconds, as HTTP's header) and `grpc-retry-pushback-ms` (gRPC's own retry pushback).

Protections, as HTTP's: messages larger than `max_request_bytes` are refused by gRPC itself
(RESOURCE_EXHAUSTED) before a handler runs; request bytes held by RPCs in progress are charged
to the same `BodyBudget` as HTTP bodies (past it: UNAVAILABLE with a retry hint); with a token,
every RPC but ServerLive and ServerReady needs `authorization: Bearer <token>` metadata
(UNAUTHENTICATED); load/unload only from `repository_control_from` (PERMISSION_DENIED).
At most `max_concurrent_rpcs` RPCs run at once (the excess gets RESOURCE_EXHAUSTED at once).
Idle connections are not closed by the agent: gRPC's `max_connection_idle_ms` sends GOAWAY, and
RPCs racing it failed with UNAVAILABLE in bench.grpc_vs_http (a request without an answer).
A client that cancels (or goes away) has its handler cancelled by grpc.aio, so its queued rows
are dropped, never run.

Stopping: `stop(grace_s)` refuses new RPCs and lets those in progress finish within the grace
(the agent gives it the HTTP drain budget, both drained at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf.message import Message

from node_agent import __version__
from node_agent.errors import AgentError, ModelNotFound
from node_agent.serving import api, grpc_codec, v2_codec
from node_agent.serving.api import ServingApi
from node_agent.serving.bodies import BodyBudget
from node_agent.serving.error_status import public_message, retry_after_s, status_for
from node_agent.serving.http import HttpSettings
from node_agent.serving.proto import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})
"""Served without a token: probes (a gRPC health check) must work for the kubelet."""

GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""HTTP status (`error_status.ERROR_STATUS`) -> gRPC code. 413 is RESOURCE_EXHAUSTED, the code
gRPC itself gives a message over its size limit; 429 (queue full, shed by mitigation) is
RESOURCE_EXHAUSTED and 503 (not ready, too many bytes in flight, stopping) UNAVAILABLE, as
Triton answers; 409 (the model's files conflict with serving it, or the operator owns the
assignment) is FAILED_PRECONDITION."""


@dataclass(frozen=True, slots=True)
class GrpcSettings:
    """The gRPC server's own settings (limits, token and control networks are `HttpSettings`')."""

    host: str = "0.0.0.0"
    """Address to listen on (all interfaces, as the HTTP API)."""
    port: int = 8001
    """TCP port; 0 picks a free one (`GrpcApi.port`). 8001 is Triton's gRPC port."""
    max_concurrent_rpcs: int = 1024
    """RPCs handled at once; the excess is refused with RESOURCE_EXHAUSTED at once. The HTTP
    API's connection cap (one request in progress per HTTP/1.1 connection)."""
    max_stream_in_flight: int = 64
    """Requests of one ModelStreamInfer stream in progress at once (enough to fill batches of
    the example models; a client sending faster is slowed by gRPC's flow control)."""

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"grpc port must be an integer in [0, 65535], got {self.port!r}")
        if self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs!r}")
        if self.max_stream_in_flight < 1:
            raise ValueError(f"max_stream_in_flight must be >= 1, got {self.max_stream_in_flight!r}")


class _Refused(Exception):
    """A refusal decided by this layer (auth, peer), with its HTTP-equivalent status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


class CallObserver(Protocol):
    """Told about every RPC once answered (`node_agent.metrics.agent.GrpcMetrics`)."""

    def observe(self, rpc: str, code: str, duration_s: float) -> None: ...


def peer_address(peer: str) -> str | None:
    """The IP address in a gRPC peer string ('ipv4:1.2.3.4:5', 'ipv6:[::1]:5'); None otherwise."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or None
    return None


class GrpcApi:
    """The service over one `ServingApi`; `start` listens, `stop` drains."""

    def __init__(
        self,
        serving: ServingApi,
        settings: GrpcSettings,
        http: HttpSettings,
        bodies: BodyBudget | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        self.api = serving
        self.observer = observer
        self.settings = settings
        self.http = http
        self.bodies = bodies if bodies is not None else BodyBudget(http.max_inflight_request_bytes)
        """Request bytes held by RPCs in progress: the HTTP API's budget when shared."""
        self._token = http.auth_token.encode() if http.auth_token else None
        self._networks = api.control_networks(http.repository_control_from)
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        """The port listened on, once started."""

    async def start(self) -> None:
        s = self.settings
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.http.max_request_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not shared
            ],
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, self._handlers()),))
        host = f"[{s.host}]" if ":" in s.host else s.host
        try:
            port = server.add_insecure_port(f"{host}:{s.port}")
        except RuntimeError as e:
            raise OSError(f"gRPC cannot listen on {s.host}:{s.port}: {e}") from None
        if port == 0:
            raise OSError(f"gRPC cannot listen on {s.host}:{s.port}")
        await server.start()
        self._server, self.port = server, port

    async def stop(self, grace_s: float) -> None:
        """Refuse new RPCs; those in progress finish within `grace_s`, then are cancelled."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    def _handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        methods: dict[str, tuple[Handler, type[Message], type[Message]]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelConfig": (self.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
            "ModelStatistics": (self.model_statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
            "RepositoryModelLoad": (self.load, pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
            "RepositoryModelUnload": (
                self.unload, pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse
            ),
        }  # fmt: skip
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._guarded(name, handler),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for name, (handler, request, response) in methods.items()
        }
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString,
        )
        return handlers

    def _guarded(self, name: str, handler: Handler) -> Handler:
        """`handler` behind the token check, with errors turned into status codes."""
        open_method = name in OPEN_METHODS

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Message:
            started, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                if not open_method:
                    self._check_auth(context)
                return await handler(request, context)
            except (AgentError, _Refused) as e:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("gRPC %s -> %s: %s", name, type(e).__name__, e)
                code = grpc_code(e)
                await _abort(context, e)
            except Exception:
                if isinstance(context.code(), grpc.StatusCode):  # aborted on purpose
                    code = context.code()
                    raise
                log.exception("unhandled error serving gRPC %s", name)
                code = grpc.StatusCode.INTERNAL
                await context.abort(
                    grpc.StatusCode.INTERNAL, "internal error (details are in the agent's log)"
                )
            finally:
                if self.observer is not None:
                    self.observer.observe(name, code.name, time.perf_counter() - started)

        return guarded

    def _check_auth(self, context: grpc.aio.ServicerContext) -> None:
        if self._token is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        authorization = metadata.get("authorization")
        if not isinstance(authorization, str) or not api.bearer_token_matches(authorization, self._token):
            raise _Refused(401, api.BEARER_HINT.replace("'Authorization:", "'authorization:"))

    # -- health and metadata ----------------------------------------------------------------

    async def server_live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.api.not_live_reason() is None)

    async def server_ready(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.api.not_ready_reason() is None)

    async def model_ready(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            reason = self.api.model_not_ready_reason(request.name, request.version or None)
        except ModelNotFound:
            reason = "unknown"  # Triton answers ready: false for a model it does not know
        return pb.ModelReadyResponse(ready=reason is None)

    async def server_metadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=api.SERVER_NAME, version=__version__, extensions=api.EXTENSIONS)

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        config = self.api.config(request.name, request.version or None)
        return grpc_codec.model_metadata(v2_codec.model_metadata(config, self.api.versions(request.name)))

    async def model_config(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        config = self.api.config(request.name, request.version or None)
        return grpc_codec.model_config(v2_codec.triton_model_config(config))

    async def model_statistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        return grpc_codec.model_statistics(self.api.statistics(request.name, request.version or None))

    # -- inference --------------------------------------------------------------------------

    async def model_infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        config = self.api.config(request.model_name, request.model_version or None)
        with self.bodies.hold() as hold:
            hold.charge(request.ByteSize())
            decoded = grpc_codec.decode_infer(request)
            outputs = await api.infer(self.api, config, decoded)
            return grpc_codec.encode_infer(config, decoded, outputs)

    async def model_stream_infer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Every request read is answered once on the stream (see the module docstring)."""
        started, code = time.perf_counter(), grpc.StatusCode.OK
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.settings.max_stream_in_flight)
        running: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                answers.put_nowait(await self._stream_answer(request))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
            finally:
                answers.put_nowait(None)

        reader: asyncio.Task[None] | None = None
        try:
            self._check_auth(context)
            reader = asyncio.create_task(read())
            while (item := await answers.get()) is not None:
                yield item
            await reader  # a failed read (a message over the limit) ends the stream with its status
        except _Refused as e:
            code = grpc_code(e)
            await _abort(context, e)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = context.code() if isinstance(context.code(), grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            raise
        finally:
            for task in (reader, *running):
                if task is not None:
                    task.cancel()
            if self.observer is not None:
                self.observer.observe("ModelStreamInfer", code.name, time.perf_counter() - started)

    async def _stream_answer(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        """One stream request's answer: its response, or its error as `error_message`."""
        try:
            return pb.ModelStreamInferResponse(infer_response=await self.model_infer(request, None))
        except AgentError as e:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("gRPC ModelStreamInfer %r -> %s: %s", request.id, type(e).__name__, e)
            message = public_message(e)
        except Exception:
            log.exception("unhandled error serving a gRPC ModelStreamInfer request")
            message = "internal error (details are in the agent's log)"
        return pb.ModelStreamInferResponse(
            error_message=message,
            infer_response=pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            ),
        )

    # -- model repository -------------------------------------------------------------------

    async def repository_index(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for e in self.api.index():
            if not request.ready or e.state == "READY":
                response.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
        return response

    async def load(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        name = self._control_target(request.model_name, context)
        api.check_no_load_parameters(list(request.parameters))
        await self.api.load(name)
        return pb.RepositoryModelLoadResponse()

    async def unload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        name = self._control_target(request.model_name, context)  # unload_dependents: none exist
        await self.api.unload(name)
        return pb.RepositoryModelUnloadResponse()

    def _control_target(self, name: str, context: grpc.aio.ServicerContext) -> str:
        refusal = api.control_refusal(
            peer_address(context.peer()), self._networks, self.http.repository_control_from
        )
        if refusal is not None:
            raise _Refused(403, refusal)
        return api.check_control_name(name)


def grpc_code(exc: AgentError | _Refused) -> grpc.StatusCode:
    """The gRPC status code of `exc`: its HTTP-equivalent status through `GRPC_CODES`."""
    status = exc.status if isinstance(exc, _Refused) else status_for(exc)
    return GRPC_CODES.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.UNKNOWN)


async def _abort(context: grpc.aio.ServicerContext, exc: AgentError | _Refused) -> NoReturn:
    """End the RPC with the code of `exc` and, for errors worth retrying, the retry hint."""
    trailers: tuple[tuple[str, str], ...] = ()
    if not isinstance(exc, _Refused):
        retry_s = retry_after_s(exc)
        if retry_s is not None:
            trailers = (("retry-after", str(retry_s)), ("grpc-retry-pushback-ms", str(retry_s * 1000)))
    await context.abort(grpc_code(exc), public_message(exc), trailing_metadata=trailers)
    raise AssertionError("context.abort returned")  # it raises, to end the RPC
