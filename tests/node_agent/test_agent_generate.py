"""Text generation through the real agent: a repository written by `edgefleet-agent
make-examples`, an in-process agent on 127.0.0.1, and HTTP clients. The generate routes,
their errors, the generation metrics on /metrics, preemption under a small KV pool,
repository unload/load and a clean stop are all checked over the wire."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agent_runner import RunningAgent
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node_agent.agent import AgentSettings
from node_agent.cli import main as agent_cli
from node_agent.generation.engine import EngineConfig, GenerationEngine
from node_agent.generation.kv_cache import block_size_for_context
from node_agent.generation.sampling_params import SamplingParams
from node_agent.generation.transformer import KV_CACHE_PARAMETER, ByteTokenizer, TinyLM, load_tiny_lm
from node_agent.metrics.generation import GENERATION_METRICS, register_generation_metrics
from node_agent.runtime.model_yaml import parse_model_config, write_model_config
from node_agent.serving.http import HttpSettings

TOKEN = "gen-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SMALL = "tiny-lm-small"
"""tiny-lm with a KV pool of 128 token slots (32 blocks of 4 tokens: the default block size
at its 512-token context, `block_size_for_context`)."""
SAMPLED = {"max_tokens": 24, "temperature": 0.8, "top_p": 0.95, "seed": 42, "ignore_eos": True}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `edgefleet-agent make-examples` writes, plus tiny-lm-small (same weights)."""
    root = tmp_path_factory.mktemp("gen") / "models"
    assert agent_cli(["make-examples", str(root)]) == 0
    shutil.copytree(root / "tiny-lm" / "1", root / SMALL / "1")
    config = parse_model_config(root / SMALL / "1" / "model.yaml")
    params = {**config.parameters, KV_CACHE_PARAMETER: "128Ki"}
    write_model_config(root / SMALL / "1", dataclasses.replace(config, name=SMALL, parameters=params))
    return root


@pytest.fixture(scope="module")
def lm(repo: Path) -> TinyLM:
    return load_tiny_lm(repo / "tiny-lm" / "1" / "model.npz")


def start_agent(repo: Path, **settings: Any) -> RunningAgent:
    http = HttpSettings(host="127.0.0.1", port=0, auth_token=TOKEN)
    return RunningAgent(AgentSettings(repo, workers=1, http=http, thermal_source="off", **settings))


@pytest.fixture(scope="module")
def served(repo: Path) -> Iterator[RunningAgent]:
    running = start_agent(repo)
    yield running
    running.close()


def reference(lm: TinyLM, text: str, params: dict[str, Any]) -> list[int]:
    """The tokens a request yields run alone, uninterrupted, on a roomy KV cache."""
    eng = GenerationEngine(lm, EngineConfig(64, block_size=16))
    sid = eng.add(ByteTokenizer.encode(text), SamplingParams.from_mapping(params))
    out: list[int] = []
    while eng.has_work():
        out += [o.token_id for o in eng.step() if o.seq_id == sid and o.token_id is not None]
    return out


def events_of(raw: bytes) -> list[dict[str, Any]]:
    chunks = [c for c in raw.decode().split("\n\n") if c]
    assert all(c.startswith("data: ") for c in chunks), chunks[:2]
    return [json.loads(c[len("data: ") :]) for c in chunks]


async def post(session: aiohttp.ClientSession, port: int, path: str, body: Any,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:  # fmt: skip
    async with session.post(f"http://127.0.0.1:{port}{path}", json=body,
                            headers=AUTH if headers is None else headers) as resp:  # fmt: skip
        raw = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, json.loads(raw)
        assert resp.content_type == "text/event-stream"
        return resp.status, events_of(raw)


def call(port: int, *requests: tuple[str, Any]) -> list[tuple[int, Any]]:
    """POST each (path, body) in turn over one session; (status, JSON or SSE events) each."""

    async def run() -> list[tuple[int, Any]]:
        async with aiohttp.ClientSession() as s:
            return [await post(s, port, path, body) for path, body in requests]

    return asyncio.run(run())


def scrape(port: int, model: str) -> dict[str, float]:
    """Generation samples of `model` from /metrics (no token needed): name without the
    'edgefleet_generation_' prefix -> value, histogram buckets as 'name{le}'."""

    async def get() -> str:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            return await resp.text()

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(asyncio.run(get())):
        for sample in family.samples:
            if sample.name.startswith("edgefleet_generation_") and sample.labels.get("model") == model:
                assert sample.labels["version"] == "1"
                le = sample.labels.get("le")
                name = sample.name.removeprefix("edgefleet_generation_")
                out[name + (f"{{{le}}}" if le else "")] = sample.value
    return out


def test_generate_and_generate_stream_over_http(served: RunningAgent, lm: TinyLM) -> None:
    want = reference(lm, "hello agent", SAMPLED)
    want_stream = reference(lm, "stream to me", SAMPLED)
    (s1, whole), (s2, pinned), (s3, events) = call(
        served.port,
        ("/v2/models/tiny-lm/generate", {"text_input": "hello agent", "parameters": SAMPLED}),
        ("/v2/models/tiny-lm/versions/1/generate", {"text_input": "hello agent", "parameters": SAMPLED}),
        ("/v2/models/tiny-lm/generate_stream", {"text_input": "stream to me", "parameters": SAMPLED}),
    )
    assert (s1, s2, s3) == (200, 200, 200)
    assert whole["token_ids"] == pinned["token_ids"] == want
    assert whole["text_output"] == ByteTokenizer.decode(want)
    assert (whole["model_name"], whole["model_version"], whole["finish_reason"]) == ("tiny-lm", "1", "length")
    assert (whole["prompt_tokens"], whole["completion_tokens"]) == (12, 24)
    assert [e["token_id"] for e in events] == want_stream
    assert [e["index"] for e in events] == list(range(24))
    assert "".join(e["text_output"] for e in events) == ByteTokenizer.decode(want_stream)
    assert "finish_reason" not in events[0] and events[-1]["finish_reason"] == "length"
    assert (events[-1]["prompt_tokens"], events[-1]["completion_tokens"]) == (13, 24)


def test_generate_routes_need_the_token_and_refuse_bad_requests(served: RunningAgent) -> None:
    async def run() -> None:
        async with aiohttp.ClientSession() as s:
            p = served.port
            status, body = await post(s, p, "/v2/models/tiny-lm/generate", {"text_input": "x"}, headers={})
            assert status == 401
            cases: list[tuple[str, Any, int, str]] = [
                ("/v2/models/nope/generate", {"text_input": "x"}, 404, "nope"),
                ("/v2/models/tiny-lm/versions/9/generate", {"text_input": "x"}, 404, "9"),
                ("/v2/models/mlp/generate_stream", {"text_input": "x"}, 400, "does not generate"),
                ("/v2/models/tiny-lm/generate", {"text_input": "x", "parameters": {"top_p": 0}}, 400,
                 "top_p"),
                ("/v2/models/tiny-lm/generate", {"text_input": "x" * 500, "parameters": {"max_tokens": 100}},
                 413, "context"),
                # 100 + 1 + 40 tokens > the 128 slots of tiny-lm-small's KV pool
                (f"/v2/models/{SMALL}/generate_stream", {"text_input": "y" * 100,
                 "parameters": {"max_tokens": 40}}, 413, "KV blocks"),
            ]  # fmt: skip
            for path, req, want_status, text in cases:
                status, body = await post(s, p, path, req)
                assert (status, path) == (want_status, path)
                assert text in body["error"], body

    asyncio.run(run())


def test_preemption_keeps_outputs_exact_and_shows_in_the_metrics(served: RunningAgent, lm: TinyLM) -> None:
    """Two requests of 113 tokens each on a pool of 128 slots: the second starts while the
    first runs, so one is preempted (its blocks freed) and recomputed later."""
    params = {"max_tokens": 110, "temperature": 0.0, "ignore_eos": True}
    want_a, want_b = reference(lm, "ab", params), reference(lm, "cd", params)
    call(served.port, (f"/v2/models/{SMALL}/generate", {"text_input": "z", "parameters": {"max_tokens": 1}}))
    before = scrape(served.port, SMALL)

    async def run() -> tuple[list[int], list[int]]:
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{served.port}/v2/models/{SMALL}/generate_stream"
            async with s.post(url, json={"text_input": "ab", "parameters": params}, headers=AUTH) as resp:
                first = await resp.content.readuntil(b"\n\n")  # a is running: now send b
                status, b = await post(s, served.port, f"/v2/models/{SMALL}/generate",
                                       {"text_input": "cd", "parameters": params})  # fmt: skip
                assert status == 200
                a = events_of(first + await resp.read())
        return [e["token_id"] for e in a], b["token_ids"]

    got_a, got_b = asyncio.run(run())
    assert (got_a, got_b) == (want_a, want_b)
    after = scrape(served.port, SMALL)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["preemptions_total"] >= 1
    assert delta["output_tokens_total"] == 220 and delta["requests_finished_total"] == 2
    assert delta["prompt_tokens_total"] == 6  # a recompute is not a new prompt
    assert delta["time_to_first_token_seconds_count"] == 2
    assert delta["time_per_output_token_seconds_count"] == 218
    assert delta["time_to_first_token_seconds_sum"] > 0
    buckets = [v for k, v in after.items() if k.startswith("time_per_output_token_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == after["time_per_output_token_seconds_count"]
    assert after["running_sequences"] == after["waiting_sequences"] == after["kv_used_blocks"] == 0
    assert after["kv_free_blocks"] == 128 // block_size_for_context(lm.config.max_seq_len) == 32


def test_unload_stops_the_generator_and_load_restarts_it(served: RunningAgent, lm: TinyLM) -> None:
    body = {"text_input": "again", "parameters": SAMPLED}
    ((status, before),) = call(served.port, ("/v2/models/tiny-lm/generate", body))
    assert status == 200 and scrape(served.port, "tiny-lm")

    async def resident() -> list[str]:
        assert served.agent.scheduler is not None
        return [str(r.model_id) for r in served.agent.scheduler.resident()]

    assert "tiny-lm:1" in served.call(resident())
    (status, _), (gone, err) = call(
        served.port, ("/v2/repository/models/tiny-lm/unload", {}), ("/v2/models/tiny-lm/generate", body)
    )
    assert status == 200 and gone == 503 and "unloaded" in err["error"]  # known: retry later
    assert "tiny-lm:1" not in served.call(resident())  # the generator let go of its model
    assert scrape(served.port, "tiny-lm") == {}
    (status, _), (ok, again) = call(
        served.port, ("/v2/repository/models/tiny-lm/load", {}), ("/v2/models/tiny-lm/generate", body)
    )
    assert (status, ok) == (200, 200)
    assert again["token_ids"] == before["token_ids"] == reference(lm, "again", SAMPLED)


def test_stopping_the_agent_stops_its_generators(repo: Path) -> None:
    """A stream in progress when the agent stops ends (cut after the drain timeout, or
    finished), and the stop releases the generator's model: nothing stays loaded."""
    running = start_agent(repo, drain_timeout_s=0.3)
    params = {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True}
    received: list[dict[str, Any]] = []

    async def stream() -> None:
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{running.port}/v2/models/tiny-lm/generate_stream"
            async with s.post(url, json={"text_input": "x", "parameters": params}, headers=AUTH) as resp:
                received.extend(events_of(await resp.content.readuntil(b"\n\n")))
                stopper.start()
                with contextlib.suppress(aiohttp.ClientPayloadError):  # cut mid-stream by the stop
                    received.extend(events_of(await resp.read()))

    stopper = threading.Thread(target=running.close)
    asyncio.run(stream())
    stopper.join(30)
    assert not stopper.is_alive(), "the agent did not stop"
    assert received and received[0]["index"] == 0
    assert running.agent.serving is not None and running.agent.serving.generation_stats() == []
    assert running.agent.scheduler is not None and running.agent.scheduler.resident() == []


def test_generation_metric_names_follow_the_conventions() -> None:
    for name, spec in GENERATION_METRICS.items():
        assert name == spec.name and name.startswith("edgefleet_generation_")
        assert (spec.kind == "counter") == name.endswith("_total"), name
        assert name.endswith(("_seconds", "_sequences", "_blocks", "_total")), name
        assert spec.labels == ("model", "version")
    registry = CollectorRegistry()
    register_generation_metrics(registry, list)
    assert generate_latest(registry) == b""  # no generator running: no series invented
    with pytest.raises(ValueError, match="Duplicated"):
        register_generation_metrics(registry, list)  # describe() names clash on one registry
