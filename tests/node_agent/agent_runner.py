"""A real agent on 127.0.0.1 for tests: its own event loop in a thread."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np

from node_agent.agent import Agent, AgentSettings, ConfigOverlay
from node_agent.serving.event_loop import new_event_loop

T = TypeVar("T")


class RunningAgent:
    """A real agent listening on 127.0.0.1 (ephemeral port), on its own loop thread."""

    def __init__(self, settings: AgentSettings, overlay: ConfigOverlay | None = None) -> None:
        self.loop = new_event_loop()  # the agent's own (uvloop where installed)
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


def post_infer(url: str, model: str, x: np.ndarray, **parameters: Any) -> int:
    """POST a v2 infer request of one FP32 `image` input to `url` (host:port); its HTTP status."""
    body: dict[str, Any] = {
        "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    if parameters:
        body["parameters"] = parameters
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        e.read()
        return int(e.code)
