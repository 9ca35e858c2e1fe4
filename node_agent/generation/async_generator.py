"""The generation engine behind asyncio: `AsyncGenerator`.

`start()` launches a loop task that runs each engine step on a worker thread, so the event
loop (HTTP streaming) stays responsive; requests and aborts are handed to the engine between
steps, on the loop, so only one thread touches the engine at a time. `generate` returns a
`GenerationResult`, `stream` yields `TokenEvent`s; every request gets exactly one outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node_agent.errors import InferenceFailed, InvalidInput, Overloaded, ShuttingDown
from node_agent.generation.engine import EngineConfig, GenerationEngine, GenerationStats, StepOutput
from node_agent.generation.transformer import kv_block_size_for, load_tiny_lm

if TYPE_CHECKING:
    from edgefleet_api.types import ModelId
    from node_agent.errors import AgentError
    from node_agent.generation.paged_lm import TextTokenizer
    from node_agent.generation.sampling_params import SamplingParams
    from node_agent.types import ModelConfig

__all__ = ["AsyncGenerator", "GenerationResult", "TokenEvent", "TokenStream", "load_generator"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token: its id, the text it completes (may be '' inside a multi-byte
    character), its index in the output, and the finish reason on the last one."""

    token_id: int
    text: str
    index: int
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    time_to_first_token_s: float
    total_s: float


@dataclass(slots=True, eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    arrival_s: float
    events: asyncio.Queue[TokenEvent | BaseException]
    seq_id: int | None = None
    done: bool = False
    produced: int = 0
    first_token_s: float | None = None


class TokenStream:
    """An async iterator of one request's `TokenEvent`s; raises the request's failure.
    `aclose()` before the last token aborts the request (also if never iterated)."""

    def __init__(self, owner: AsyncGenerator, request: _Request) -> None:
        self.request = request
        self._owner = owner
        self._decoder = owner.tokenizer.incremental_decoder()
        self._finished = False

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        ev = await self.request.events.get()
        if isinstance(ev, BaseException):
            self._finished = True
            raise ev
        last = ev.finish_reason is not None
        self._finished = last
        text = self._decoder.feed(ev.token_id) + (self._decoder.flush() if last else "")
        return TokenEvent(ev.token_id, text, ev.index, ev.finish_reason)

    async def aclose(self) -> None:
        self._finished = True
        self._owner._abort(self.request)


class AsyncGenerator:
    """The engine behind an asyncio API. `start()` launches the loop task; each step runs
    on a worker thread, so the event loop (HTTP streaming) stays responsive. Requests and
    aborts are handed to the engine between steps, on the loop, so the engine is only
    ever touched by one thread at a time. Every request gets exactly one outcome."""

    def __init__(
        self, engine: GenerationEngine, *, max_waiting: int = 1024, model_id: ModelId | None = None
    ) -> None:
        self.engine = engine
        self.model_id = model_id
        """The model version served, when known (responses name it)."""
        self.tokenizer: TextTokenizer = engine.tokenizer
        """The engine's model's tokenizer: text prompts are encoded with it, tokens decoded
        with it; token id prompts are used as given."""
        self.max_waiting = max_waiting
        self._inbox: list[_Request] = []
        self._aborts: list[_Request] = []
        self._live: dict[int, _Request] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stats = engine.stats()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="generation-loop")

    async def stop(self) -> None:
        """Refuse new work, fail requests in progress with `ShuttingDown`, end the loop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    @property
    def running(self) -> bool:
        """True from `start()` until `stop()` or a failure of the engine ends the loop."""
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def idle(self) -> bool:
        """No request waiting or in progress (those finished may still be read by their streams:
        their events are queued, so stopping an idle generator cuts nothing)."""
        return not self._live and not any(not r.done for r in self._inbox)

    def stats(self) -> GenerationStats:
        """The engine's counters as of the last step (safe to call from the loop)."""
        return self._stats

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams) -> GenerationResult:
        """The whole output; raises the refusal or failure of the request."""
        tokens: list[int] = []
        text: list[str] = []
        reason = ""
        stream = self.stream(prompt, params)
        async with aclosing(stream):
            async for ev in stream:
                tokens.append(ev.token_id)
                text.append(ev.text)
                reason = ev.finish_reason or reason
        req = stream.request
        now = time.monotonic()
        ttft = (req.first_token_s or now) - req.arrival_s if tokens else 0.0
        return GenerationResult(
            "".join(text), tuple(tokens), len(req.prompt), len(tokens), reason, ttft, now - req.arrival_s
        )

    def stream(self, prompt: str | Sequence[int], params: SamplingParams) -> TokenStream:
        """Tokens as they are generated. The request is checked (and refused) at once;
        closing the stream (`aclose`) before its last token aborts the request."""
        return TokenStream(self, self._submit(prompt, params))

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _submit(self, prompt: str | Sequence[int], params: SamplingParams) -> _Request:
        if not self.running:
            raise ShuttingDown("the generator is not running")
        tokens = self.encode(prompt)
        self.engine.check_request(tokens, params)  # reads only constants
        if len(self._inbox) + self._stats.waiting >= self.max_waiting:
            raise Overloaded(f"{self.max_waiting} generation requests are already waiting", 1.0)
        req = _Request(tokens, params, time.monotonic(), asyncio.Queue())
        self._inbox.append(req)
        self._wake.set()
        return req

    def _abort(self, req: _Request) -> None:
        if not req.done:
            req.done = True
            self._aborts.append(req)
            self._wake.set()

    async def _loop(self) -> None:
        eng = self.engine
        while not self._stopping:
            self._handover()
            if not eng.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await asyncio.to_thread(eng.step)
            except Exception as e:  # a bug in the engine: fail everyone rather than hang
                log.exception("generation loop failed")
                self._fail_all(InferenceFailed(f"generation engine failed: {e}"))
                return
            self._stats = eng.stats()
            self._deliver(outputs)
        self._handover()
        self._fail_all(ShuttingDown("the generator is stopping"))

    def _handover(self) -> None:
        """Move new requests and aborts into the engine (no step is running)."""
        for req in self._aborts:
            if req.seq_id is not None and self._live.pop(req.seq_id, None) is not None:
                self.engine.abort(req.seq_id)
        self._aborts.clear()
        for req in self._inbox:
            if req.done:
                continue
            req.seq_id = self.engine.add(req.prompt, req.params, arrival_s=req.arrival_s)
            self._live[req.seq_id] = req
        self._inbox.clear()
        self._stats = self.engine.stats()

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            req = self._live.get(out.seq_id)
            if req is None:
                continue
            if out.finish_reason is not None:
                del self._live[out.seq_id]
                req.done = True
            if out.error is not None:
                req.events.put_nowait(InferenceFailed(out.error))
            elif out.token_id is not None:
                if req.first_token_s is None:
                    req.first_token_s = time.monotonic()
                req.events.put_nowait(TokenEvent(out.token_id, "", req.produced, out.finish_reason))
                req.produced += 1

    def _fail_all(self, exc: AgentError) -> None:
        for req in [*self._live.values(), *self._inbox]:
            req.done = True
            req.events.put_nowait(exc)
        self._live.clear()
        self._inbox.clear()


def load_generator(
    version_dir: Path | str,
    config: ModelConfig,
    kv_budget_bytes: int,
    *,
    device: str = "cpu",
    block_size: int | None = None,
    **engine_settings: Any,
) -> AsyncGenerator:
    """An (unstarted) `AsyncGenerator` for a `task: generate` TinyLM version whose KV pool
    fills `kv_budget_bytes`, in blocks of `block_size` tokens (default: the model's
    `kv_block_size_for`); `engine_settings` are further `EngineConfig` fields."""
    if config.task != "generate":
        raise InvalidInput(f"model {config.id} has task {config.task!r}; it does not generate text")
    model = load_tiny_lm(Path(version_dir) / config.artifact, device)
    if block_size is None:
        block_size = kv_block_size_for(config, model.config)
    engine_config = EngineConfig.from_budget(model, kv_budget_bytes, block_size, **engine_settings)
    return AsyncGenerator(GenerationEngine(model, engine_config, device=device))
