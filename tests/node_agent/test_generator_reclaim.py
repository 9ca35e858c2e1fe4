"""A text generator holds its model's lease while it runs; an unload (the link taking a version out
of service after a rollout) asks the scheduler's reclaimers first, and the agent's stops a
generator with no request waiting or running. Invariants: a stream in progress is never cut (the
unload is refused, IN_FLIGHT, and asked again later); an idle generator never keeps its model in
memory past an unload.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_runner import RunningAgent
from test_scheduler import FakeLoader, cfg, run

from edgefleet_api.types import ModelId
from node_agent.agent import AgentSettings
from node_agent.cli import main as agent_cli
from node_agent.runtime.scheduler import ModelScheduler, UnloadOutcome
from node_agent.serving.http import HttpSettings

LM = ModelId("tiny-lm", "1")


def test_unload_asks_the_reclaimers_before_refusing_a_leased_model() -> None:
    async def main() -> None:
        sched = ModelScheduler(1000, FakeLoader())
        a = ModelId("a", "1")
        asked: list[ModelId] = []
        lease = await sched.acquire(cfg("a"))
        keep = True

        async def reclaim(model_id: ModelId) -> None:
            asked.append(model_id)
            await asyncio.sleep(0)
            if not keep:
                lease.release()

        sched.add_reclaimer(reclaim)
        assert await sched.unload(a) is UnloadOutcome.IN_FLIGHT  # the holder has work: kept
        keep = False
        assert await sched.unload(a) is UnloadOutcome.UNLOADED  # idle: released, then unloaded
        assert asked == [a, a]
        assert await sched.unload(a) is UnloadOutcome.NOT_LOADED and asked == [a, a]  # not leased: not asked
        sched.check_invariants()

    run(main)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    root = tmp_path_factory.mktemp("reclaim") / "models"
    assert agent_cli(["make-examples", str(root)]) == 0
    running = RunningAgent(AgentSettings(Path(root), workers=1, http=HttpSettings(host="127.0.0.1", port=0)))
    yield running
    running.close()


def test_a_generator_leaves_memory_on_unload_only_once_its_streams_are_done(agent: RunningAgent) -> None:
    scheduler = agent.agent.scheduler
    serving = agent.agent.serving
    assert scheduler is not None and serving is not None
    body = {"text_input": "hello", "parameters": {"max_tokens": 400, "temperature": 0, "ignore_eos": True}}
    request = urllib.request.Request(
        f"http://{agent.url}/v2/models/tiny-lm/generate_stream",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as stream:
        events = [json.loads(next(line for line in stream if line.startswith(b"data:"))[5:])]
        # the stream is in progress: the unload is refused and the generator stays
        assert agent.call(scheduler.unload(LM)) is UnloadOutcome.IN_FLIGHT
        assert [m for m, _ in serving.generation_stats()] == [LM]
        events += [json.loads(line[5:]) for line in stream if line.startswith(b"data:")]
    assert len(events) == 400 and events[-1]["finish_reason"] == "length"
    assert not any("error" in e for e in events)
    # done: the next unload stops the idle generator and unloads its model
    assert agent.call(scheduler.unload(LM)) is UnloadOutcome.UNLOADED
    assert serving.generation_stats() == [] and not scheduler.is_resident(LM)
    # and it serves again on demand
    again = urllib.request.Request(
        f"http://{agent.url}/v2/models/tiny-lm/generate",
        json.dumps({"text_input": "hi", "parameters": {"max_tokens": 4}}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(again, timeout=60) as r:
        assert json.loads(r.read())["completion_tokens"] == 4
