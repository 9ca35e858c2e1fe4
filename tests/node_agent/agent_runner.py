"""A real agent on 127.0.0.1 for tests: its own event loop in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from node_agent.agent import Agent, AgentSettings, ConfigOverlay

T = TypeVar("T")


class RunningAgent:
    """A real agent listening on 127.0.0.1 (ephemeral port), on its own loop thread."""

    def __init__(self, settings: AgentSettings, overlay: ConfigOverlay | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="agent-loop", daemon=True)
        self.thread.start()
        self.agent = Agent(settings, overlay=overlay)
        self.call(self.agent.start())
        self.port = self.agent.port
        self.url = f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.call(self.agent.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
