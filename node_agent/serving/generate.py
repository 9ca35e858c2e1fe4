"""The KServe v2 generate extension over HTTP: `generate` and `generate_stream` (SSE).

| method | path | |
| --- | --- | --- |
| POST | /v2/models/{m}[/versions/{v}]/generate | whole output as one JSON object |
| POST | /v2/models/{m}[/versions/{v}]/generate_stream | server-sent events, one per token |

Request: `{"text_input": "...", "parameters": {"max_tokens", "temperature", "top_p", "seed",
"stop_token_ids", "ignore_eos", "priority"}}`. Response: `{"model_name", "model_version",
"text_output", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens",
"time_to_first_token_s"}`. A stream sends `data: {"model_name", "text_output", "token_id",
"index"}` per token; the last event adds `finish_reason` and the token counts.

Errors are `{"error": "..."}`: 400 bad request, 404 unknown model, 413 a body or a request
too long for the model's context or its KV cache, 503 overloaded or stopping (statuses of
the other agent errors as `responses.status_for`). A refusal comes before the stream starts;
a failure after it is sent as a last `data: {"error": ...}` event. A client that goes away
mid-stream aborts its request, freeing its KV blocks at the next step.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from aiohttp import web

from node_agent.errors import AgentError, InvalidInput
from node_agent.generation.sampling_params import SamplingParams
from node_agent.serving.bodies import read_body
from node_agent.serving.responses import (
    HttpError,
    error_response,
    json_object,
    public_message,
    sse_event,
    status_for,
)

if TYPE_CHECKING:
    from node_agent.generation.async_generator import AsyncGenerator

__all__ = ["GeneratorProvider", "add_generate_routes"]

log = logging.getLogger(__name__)

GeneratorProvider = Callable[[str, str | None], Awaitable["AsyncGenerator"]]
"""(model name, version or None for the newest) -> the model's running generator; raises
`ModelNotFound` (404) for an unknown model, `InvalidInput` if it does not generate."""

MAX_BODY_BYTES = 1 << 20
"""Generate requests carry text only; 1 MiB is far beyond any context the agent serves."""


def add_generate_routes(
    app: web.Application, generator_provider: GeneratorProvider, body_timeout_s: float | None = None
) -> None:
    """Add the generate routes to `app` (before it starts); request bodies must arrive within
    `body_timeout_s`."""
    handlers = _GenerateHandlers(generator_provider, body_timeout_s)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_post(base + "/generate", handlers.generate)
        app.router.add_post(base + "/generate_stream", handlers.generate_stream)


class _GenerateHandlers:
    def __init__(self, provider: GeneratorProvider, body_timeout_s: float | None) -> None:
        self.provider = provider
        self.body_timeout_s = body_timeout_s

    async def _parse(self, request: web.Request) -> tuple[AsyncGenerator, str, SamplingParams]:
        doc = json_object(await read_body(request, MAX_BODY_BYTES, timeout_s=self.body_timeout_s))
        text = doc.get("text_input")
        if not isinstance(text, str) or not text:
            raise InvalidInput("'text_input' must be a non-empty string")
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be an object")
        sampling = SamplingParams.from_mapping(params)
        gen = await self.provider(request.match_info["model"], request.match_info.get("version"))
        return gen, text, sampling

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            gen, text, params = await self._parse(request)
            result = await gen.generate(text, params)
        except (AgentError, HttpError) as e:
            return error_response(e)
        version = gen.model_id.version if gen.model_id else request.match_info.get("version", "")
        return web.json_response(
            {
                "model_name": request.match_info["model"],
                "model_version": version,
                "text_output": result.text,
                "token_ids": list(result.token_ids),
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "time_to_first_token_s": result.time_to_first_token_s,
            }
        )

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        try:
            gen, text, params = await self._parse(request)
            prompt_tokens = len(gen.encode(text))
            events = gen.stream(text, params)  # refusals raise here, before any byte is sent
        except (AgentError, HttpError) as e:
            return error_response(e)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        n = 0
        async with aclosing(events) as stream:  # leaving early (client gone) aborts the request
            await response.prepare(request)
            try:
                async for ev in stream:
                    n += 1
                    payload: dict[str, Any] = {"model_name": model, "text_output": ev.text,
                                               "token_id": ev.token_id, "index": ev.index}  # fmt: skip
                    if ev.finish_reason is not None:
                        payload |= {"finish_reason": ev.finish_reason, "prompt_tokens": prompt_tokens,
                                    "completion_tokens": n}  # fmt: skip
                    await response.write(sse_event(payload))
            except AgentError as e:
                log.debug("generate_stream %s failed after %d tokens: %s", model, n, e)
                await response.write(sse_event({"error": public_message(e), "status": status_for(e)}))
        await response.write_eof()
        return response
