"""Fixtures shared by the node agent's tests.

`example_repo` is a model repository written once per session by
`node_agent.examples.make_examples` (real, small TorchScript models, fixed seeds).
Tests must treat it as read-only; copy it (`shutil.copytree`) before tampering.

Every event loop these tests make (`asyncio.run`, `asyncio.new_event_loop`) is the agent's own:
uvloop where installed (`node_agent.serving.event_loop`), so the agent is tested on the loop it
serves on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.serving.event_loop import new_event_loop


class _AgentLoopPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return new_event_loop()


@pytest.fixture(scope="session", autouse=True)
def agent_event_loop() -> Iterator[None]:
    """asyncio's loops in these tests are the agent's (`new_event_loop`: uvloop where installed)."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_AgentLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a ready model repository: classifier/{1,2,2-slow,2-failing}, mlp/1."""
    from node_agent.examples import make_examples

    root = tmp_path_factory.mktemp("model-repo")
    make_examples(root)
    return root


@pytest.fixture()
def one_torch_thread() -> None:
    """torch on one intra-op thread (small models: more threads only add contention here)."""
    import torch

    torch.set_num_threads(1)
