"""The generate extension over real HTTP (aiohttp test server on 127.0.0.1): JSON
generate, server-sent events, error statuses, and abort when a client goes away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from node_agent.errors import InvalidInput, ModelNotFound
from node_agent.generation.async_generator import AsyncGenerator
from node_agent.generation.engine import EngineConfig, GenerationEngine
from node_agent.generation.sampling_params import SamplingParams
from node_agent.generation.transformer import ByteTokenizer, TinyLM, TinyLMConfig
from node_agent.serving.generate import add_generate_routes

CFG = TinyLMConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=128)
PARAMS = {"max_tokens": 16, "temperature": 0.8, "seed": 42, "ignore_eos": True}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> TinyLM:
    return TinyLM.random(CFG, seed=5)


def expected_tokens(model: TinyLM, text: str, params: dict[str, Any]) -> list[int]:
    eng = GenerationEngine(model, EngineConfig(64, block_size=4))
    sid = eng.add(ByteTokenizer.encode(text), SamplingParams.from_mapping(params))
    out = []
    while eng.has_work():
        out += [o.token_id for o in eng.step() if o.seq_id == sid and o.token_id is not None]
    return out


Scenario = Callable[[TestClient[web.Request, web.Application], AsyncGenerator], Awaitable[None]]


def serve(model: TinyLM, scenario: Scenario, num_blocks: int = 64) -> None:
    async def main() -> None:
        gen = AsyncGenerator(GenerationEngine(model, EngineConfig(num_blocks, block_size=4)))
        await gen.start()

        async def provider(name: str, version: str | None) -> AsyncGenerator:
            if name == "mlp":
                raise InvalidInput("model mlp does not generate text")
            if name != "tiny-lm" or version not in (None, "1"):
                raise ModelNotFound(f"no model {name!r}")
            return gen

        app = web.Application()
        add_generate_routes(app, provider)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await scenario(client, gen)
        await gen.stop()

    asyncio.run(main())


async def read_events(resp: Any) -> list[dict[str, Any]]:
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    raw = (await resp.read()).decode()
    chunks = [c for c in raw.split("\n\n") if c]
    assert all(c.startswith("data: ") for c in chunks)
    return [json.loads(c[len("data: ") :]) for c in chunks]


def test_generate_returns_text_and_token_counts(model: TinyLM) -> None:
    want = expected_tokens(model, "hello", PARAMS)

    async def scenario(client: Any, _gen: AsyncGenerator) -> None:
        for path in ("/v2/models/tiny-lm/generate", "/v2/models/tiny-lm/versions/1/generate"):
            resp = await client.post(path, json={"text_input": "hello", "parameters": PARAMS})
            assert resp.status == 200
            body = await resp.json()
            assert body["model_name"] == "tiny-lm"
            assert body["token_ids"] == want
            assert body["text_output"] == ByteTokenizer.decode(want)
            assert (body["prompt_tokens"], body["completion_tokens"]) == (6, 16)
            assert body["finish_reason"] == "length"

    serve(model, scenario)


def test_generate_stream_sends_one_event_per_token(model: TinyLM) -> None:
    want = expected_tokens(model, "stream me", PARAMS)

    async def scenario(client: Any, _gen: AsyncGenerator) -> None:
        resp = await client.post("/v2/models/tiny-lm/generate_stream",
                                 json={"text_input": "stream me", "parameters": PARAMS})  # fmt: skip
        events = await read_events(resp)
        assert [e["token_id"] for e in events] == want
        assert [e["index"] for e in events] == list(range(16))
        assert "".join(e["text_output"] for e in events) == ByteTokenizer.decode(want)
        assert "finish_reason" not in events[0]
        assert events[-1]["finish_reason"] == "length"
        assert (events[-1]["prompt_tokens"], events[-1]["completion_tokens"]) == (10, 16)

    serve(model, scenario)


def test_errors_have_their_status_and_an_error_body(model: TinyLM) -> None:
    async def scenario(client: Any, gen: AsyncGenerator) -> None:
        too_long = {"text_input": "x" * 120, "parameters": {"max_tokens": 60}}
        cases: list[tuple[str, Any, int, str]] = [
            ("/v2/models/nope/generate", {"text_input": "x"}, 404, "no model"),
            ("/v2/models/mlp/generate", {"text_input": "x"}, 400, "does not generate"),
            ("/v2/models/tiny-lm/generate", {"text": "x"}, 400, "text_input"),
            ("/v2/models/tiny-lm/generate", {"text_input": "x", "parameters": {"top_p": 2}}, 400, "top_p"),
            ("/v2/models/tiny-lm/generate", [1], 400, "object"),
            # 64 blocks of 4 = 256 slots, context 128: one is checked before the other
            ("/v2/models/tiny-lm/generate", too_long, 413, "context"),
            ("/v2/models/tiny-lm/generate_stream", too_long, 413, "context"),
        ]  # fmt: skip
        for path, body, status, text in cases:
            resp = await client.post(path, json=body)
            assert resp.status == status, (path, body)
            assert text in (await resp.json())["error"]
        resp = await client.post("/v2/models/tiny-lm/generate", data=b"{not json")
        assert resp.status == 400
        resp = await client.post("/v2/models/tiny-lm/generate", data=b"x" * (2 << 20))
        assert resp.status == 413

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(40):
                yield b" " * 65536

        resp = await client.post("/v2/models/tiny-lm/generate", data=chunked())
        assert resp.status == 413
        big_prompt = json.dumps({"text_input": "y" * 200_000}).encode()  # many chunks, under 1 MiB
        resp = await client.post("/v2/models/tiny-lm/generate", data=big_prompt)
        assert resp.status == 413 and "context" in (await resp.json())["error"]
        await gen.stop()
        resp = await client.post("/v2/models/tiny-lm/generate_stream", json={"text_input": "x"})
        assert resp.status == 503 and "Retry-After" in resp.headers

    serve(model, scenario)


def test_a_request_too_big_for_the_kv_cache_is_413(model: TinyLM) -> None:
    async def scenario(client: Any, _gen: AsyncGenerator) -> None:
        body = {"text_input": "x" * 30, "parameters": {"max_tokens": 20}}  # 51 tokens > 48 slots
        resp = await client.post("/v2/models/tiny-lm/generate", json=body)
        assert resp.status == 413 and "KV blocks" in (await resp.json())["error"]

    serve(model, scenario, num_blocks=12)


def test_a_client_leaving_mid_stream_aborts_its_request(model: TinyLM) -> None:
    async def scenario(client: Any, gen: AsyncGenerator) -> None:
        body = {"text_input": "go", "parameters": {"max_tokens": 100, "seed": 1, "ignore_eos": True}}
        resp = await client.post("/v2/models/tiny-lm/generate_stream", json=body)
        line = await resp.content.readuntil(b"\n\n")
        assert json.loads(line[len(b"data: ") :])["index"] == 0
        resp.close()
        for _ in range(300):
            s = gen.stats()
            if s.running == 0 and s.waiting == 0:
                break
            await asyncio.sleep(0.01)
        s = gen.stats()
        assert (s.running, s.waiting, s.kv_blocks_used) == (0, 0, 0)
        assert s.generation_tokens < 100

    serve(model, scenario)
