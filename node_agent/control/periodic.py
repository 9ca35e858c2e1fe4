"""A background task that calls a tick on a fixed schedule: the loop both monitors run.

The schedule does not drift (the next tick is due `interval_s` after the previous one was due,
however long the tick took); a failing tick is logged and the schedule goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls `tick()` (sync or async) every `interval_s()` seconds between `start()` and `stop()`."""

    def __init__(self, name: str, interval_s: Callable[[], float], tick: Callable[[], object]) -> None:
        self.name = name
        self.interval_s = interval_s
        self.tick = tick
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Tick until cancelled."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                result = self.tick()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("%s: tick failed", self.name)
            next_at += self.interval_s()
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.name}: start() called twice")
        self._task = asyncio.get_running_loop().create_task(self.run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
