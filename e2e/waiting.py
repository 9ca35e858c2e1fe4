"""Polling for tests and benchmarks against a live cluster: `eventually(check)`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def eventually(
    check: Callable[[], Any],
    timeout_s: float = 60,
    what: str = "condition",
    step: Callable[[], None] | None = None,
    context: Callable[[], str] | None = None,
) -> Any:
    """Call `step` (if any) then `check` every 0.3 s until `check` returns something truthy, which is
    returned; past `timeout_s`, fail the test naming `what` (plus `context()`, e.g. a log tail)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if step:
            step()
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            extra = f"\n{context()}" if context else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{extra}")
        time.sleep(0.3)
