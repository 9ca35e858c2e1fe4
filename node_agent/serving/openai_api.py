"""The OpenAI-compatible API over the generation engine, for the clients LLM users already have
(the official `openai` client, LangChain, curl examples):

| method | path | |
| --- | --- | --- |
| GET | /v1/models | the models that generate |
| POST | /v1/completions | `prompt` -> `choices[0].text` |
| POST | /v1/chat/completions | `messages` -> `choices[0].message`, by the model's chat template |

A Hugging Face checkpoint's chat template renders the messages (as transformers'
`apply_chat_template`); a model without one gets `default_chat_prompt`.

Both POSTs take `model` ("name", or "name:version"), `max_tokens` (chat: also
`max_completion_tokens`), `temperature`, `top_p`, `seed`, `stop` (a string or up to 4), `stream`
(server-sent events ending with `data: [DONE]`; `stream_options.include_usage` adds a last chunk
with the counts) and `n` = 1; `usage` counts prompt and completion tokens. Stop sequences end the
output before them and abort the request there (its KV blocks are freed at the next step); a
streamed piece that might begin one is held back until it cannot.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the statuses of
the agent's other APIs (400, 404 `model_not_found`, 413, 429/503 with Retry-After). A failure after
a stream started is a last `data: {"error": ...}` event.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from node_agent.errors import AgentError, InvalidInput, ModelNotFound
from node_agent.generation.sampling_params import SamplingParams
from node_agent.serving.bodies import read_body
from node_agent.serving.responses import (
    HttpError,
    error_response,
    error_status,
    json_object,
    json_response,
    public_message,
    sse_event,
)

if TYPE_CHECKING:
    from node_agent.generation.async_generator import AsyncGenerator
    from node_agent.serving.generate import GeneratorProvider

__all__ = ["ChatMessage", "StopMatcher", "add_openai_routes", "default_chat_prompt", "parse_request"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
"""Chat histories are longer than a v2 prompt; still far beyond any context the agent serves."""
MAX_STOPS = 4
ROLES = ("system", "user", "assistant", "tool", "developer")
DONE = b"data: [DONE]\n\n"

ModelsProvider = Callable[[], Awaitable[Sequence[str]]]
"""The names of the models that generate (for GET /v1/models)."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """One /v1/completions or /v1/chat/completions request, validated."""

    model: str
    version: str | None
    prompt: str | None
    messages: tuple[ChatMessage, ...]
    params: SamplingParams
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_request(doc: Mapping[str, Any], chat: bool) -> CompletionRequest:
    """Validate a request body (pure); `InvalidInput` names the field at fault."""
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInput("'model' must be a non-empty string")
    name, _, version = model.partition(":")
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    if chat:
        messages = _messages(doc.get("messages"))
    else:
        raw = doc.get("prompt")
        if isinstance(raw, list) and len(raw) == 1:
            raw = raw[0]
        if not isinstance(raw, str) or not raw:
            raise InvalidInput("'prompt' must be a non-empty string (or a list of one)")
        prompt = raw
    n = doc.get("n", 1)
    if n != 1:
        raise InvalidInput("'n' must be 1: one choice per request")
    for unsupported in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "tool_choice"):
        if doc.get(unsupported) not in (None, False):
            raise InvalidInput(f"'{unsupported}' is not supported")
    if doc.get("best_of") not in (None, 1):
        raise InvalidInput("'best_of' must be 1")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if doc.get(penalty) not in (None, 0, 0.0):
            raise InvalidInput(f"'{penalty}' is not supported (only 0)")
    default_max = 16 if not chat else 256  # OpenAI's completions default; chat: up to the context
    max_tokens = doc.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = doc.get("max_tokens", default_max)
    given = {"max_tokens": max_tokens, "temperature": doc.get("temperature"), "top_p": doc.get("top_p"),
           "seed": doc.get("seed")}  # fmt: skip
    params = SamplingParams.from_mapping({k: v for k, v in given.items() if v is not None})
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidInput("'stream' must be true or false")
    options = doc.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidInput("'stream_options' must be an object")
    return CompletionRequest(
        name, version or None, prompt, messages, params, _stops(doc.get("stop")), stream,
        bool(options.get("include_usage", False)),
    )  # fmt: skip


def _messages(raw: object) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidInput("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidInput(f"messages[{i}] needs a role, one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise InvalidInput(f"messages[{i}].content: only text parts are supported")
            content = "".join(texts)  # type: ignore[arg-type]
        if not isinstance(content, str):
            raise InvalidInput(f"messages[{i}].content must be a string")
        out.append(ChatMessage(m["role"], content))
    return tuple(out)


def _stops(raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidInput("'stop' must be a non-empty string or a list of them")
    if len(stops) > MAX_STOPS:
        raise InvalidInput(f"'stop' takes at most {MAX_STOPS} sequences")
    return tuple(stops)


def default_chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """The prompt of a model without a chat template of its own: each message as
    `<|role|>\\ncontent\\n`, then `<|assistant|>\\n` to answer."""
    return "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages) + "<|assistant|>\n"


class StopMatcher:
    """Cuts generated text at the first stop sequence, releasing only what cannot be the start of
    one. Pure: `feed(piece)` -> (text safe to send now, whether a stop was reached); `flush()`
    -> what was held back, once the output ended without a stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        text = self._held + piece
        if not self.stops:
            self._held = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class _Handlers:
    def __init__(
        self, generators: GeneratorProvider, models: ModelsProvider, body_timeout_s: float | None
    ) -> None:
        self.generators = generators
        self.models = models
        self.body_timeout_s = body_timeout_s

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        names = await self.models()
        now = int(time.time())
        data = [{"id": n, "object": "model", "created": now, "owned_by": "edgefleet"} for n in names]
        return json_response({"object": "list", "data": data})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            doc = json_object(await read_body(request, MAX_BODY_BYTES, timeout_s=self.body_timeout_s))
            req = parse_request(doc, chat)
            gen = await self.generators(req.model, req.version)
            prompt: str | list[int] | None = _render(gen, req.messages) if chat else req.prompt
            assert prompt is not None
            prompt_tokens = len(gen.encode(prompt))
            events = gen.stream(prompt, req.params)  # refusals raise here, before any byte is sent
        except (AgentError, HttpError) as e:
            return openai_error(e)
        reply = _Reply(chat, doc["model"], prompt_tokens)
        if req.stream:
            return await self._stream(request, reply, events, req)
        matcher, text, reason, n = StopMatcher(req.stops), [], "length", 0
        try:
            async with aclosing(events) as stream:  # leaving at a stop sequence aborts the request
                async for ev in stream:
                    n += 1
                    safe, stopped = matcher.feed(ev.text)
                    text.append(safe)
                    if stopped:
                        reason = "stop"
                        break
                    if ev.finish_reason is not None:
                        reason = _finish(ev.finish_reason)
                        text.append(matcher.flush())
        except AgentError as e:
            return openai_error(e)
        return json_response(reply.whole("".join(text), reason, n))

    async def _stream(
        self, request: web.Request, reply: _Reply, events: Any, req: CompletionRequest
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        matcher, n = StopMatcher(req.stops), 0
        async with aclosing(events) as stream:  # leaving early (client gone, stop) aborts the request
            await response.prepare(request)
            if reply.chat:
                await response.write(sse_event(reply.chunk("", None, role=True)))
            try:
                async for ev in stream:
                    n += 1
                    safe, stopped = matcher.feed(ev.text)
                    reason = "stop" if stopped else (_finish(ev.finish_reason) if ev.finish_reason else None)
                    if reason is not None and not stopped:
                        safe += matcher.flush()
                    if safe:
                        await response.write(sse_event(reply.chunk(safe, None)))
                    if reason is not None:
                        await response.write(sse_event(reply.chunk("", reason)))
                        break
                if req.include_usage:
                    await response.write(sse_event(reply.usage_chunk(n)))
            except AgentError as e:
                log.debug("openai stream of %s failed after %d tokens: %s", reply.model, n, e)
                await response.write(sse_event(_error_body(e)))
        await response.write(DONE)
        await response.write_eof()
        return response


def _render(gen: AsyncGenerator, messages: Sequence[ChatMessage]) -> str | list[int]:
    """The chat as the model's own template writes it (token ids, its special tokens included,
    as transformers' `apply_chat_template`) where its tokenizer has one, else the default prompt."""
    tokenizer = getattr(gen, "tokenizer", None)
    if getattr(tokenizer, "chat_template", None) is None:
        return default_chat_prompt(messages)
    chat = [{"role": m.role, "content": m.content} for m in messages]
    return list(tokenizer.apply_chat_template(chat, add_generation_prompt=True))  # type: ignore[union-attr]


def _finish(reason: object) -> str:
    """OpenAI's finish_reason for the engine's: stop (end of sequence or a stop token), length."""
    value = str(getattr(reason, "value", reason))
    return value if value in ("stop", "length") else "stop"


class _Reply:
    """The response objects of one request (same id and creation time on every chunk)."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int) -> None:
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}  # fmt: skip

    def whole(self, text: str, reason: str, completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": reason}  # fmt: skip
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self._usage(completion_tokens)}  # fmt: skip

    def chunk(self, text: str, reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            kind = "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [],
                "usage": self._usage(completion_tokens)}  # fmt: skip


def _error_body(exc: BaseException) -> dict[str, Any]:
    status, _ = error_status(exc)
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
            413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")  # fmt: skip
    code = "model_not_found" if isinstance(exc, ModelNotFound) else None
    return {"error": {"message": public_message(exc), "type": kind, "param": None, "code": code}}


def openai_error(exc: BaseException) -> web.Response:
    """An error in OpenAI's shape, with the status and headers of the agent's other APIs."""
    return error_response(exc, _error_body(exc))


def add_openai_routes(
    app: web.Application,
    generators: GeneratorProvider,
    models: ModelsProvider,
    body_timeout_s: float | None = None,
) -> None:
    """Add the /v1 routes to `app` (before it starts)."""
    h = _Handlers(generators, models, body_timeout_s)
    app.router.add_get("/v1/models", h.list_models)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_post("/v1/chat/completions", h.chat_completions)
