"""Where a dispatched request's microseconds go: the dispatch benchmark's run, with its
stages timed in place (issue 21: "profile before changing anything; say what each
microsecond was").

Each stage's function is wrapped to add its thread's CPU time (`time.thread_time`) to a
total, during an ordinary `bench.dispatch.serve` run, the wrapper's own cost inside the
interval (measured around an empty function: a clock read is a system call, ~0.3-1 us)
taken off. CPU time, not wall: on a shared machine a short call is often preempted, and
wall time there measures the neighbours. What no stage holds is the rest: the client
coroutines, `Engine.infer`'s own lines, asyncio (futures resolved, tasks woken, handles
run, the selector) and the pool's hand-off: the process's CPU time per request in an
unwrapped run of the same configuration, less the stages. The wrappers' reads slow the
wrapped run down, and the clock's grain is coarse next to a 1 us call: the split is an
estimate, good to a few tenths of a microsecond per stage.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from bench.dispatch import serve
from node_agent.runtime.batch_ticket import Ticket
from node_agent.runtime.batcher import Batcher
from node_agent.runtime.engine import InputValidator

STAGES: tuple[tuple[str, type, str, Callable[[], float]], ...] = (
    ("input validation (InputValidator.validate)", InputValidator, "validate", time.thread_time),
    ("queueing: admission, request, piece, urgency queue, tickets (Batcher.submit)", Batcher, "submit",
     time.thread_time),
    ("completion on the loop: policy fed, outputs split, futures set (Batcher._drain)", Batcher, "_drain",
     time.thread_time),
    ("worker: take (form the batch, concatenate), model call, post to the loop (Ticket.run)", Ticket, "run",
     time.thread_time),
)  # fmt: skip


def _timed(
    fn: Callable[..., Any], key: str, totals: dict[str, float], clock: Callable[[], float]
) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += clock() - t0
            totals[key + "#calls"] += 1

    return wrapper


def _wrapper_cost_s(clock: Callable[[], float], reps: int = 20_000) -> float:
    """Seconds a wrapper adds inside its own interval, per call (a clock read, the call, the
    `finally`): the least of 5 tries."""
    best = float("inf")
    for _ in range(5):
        totals = {"x": 0.0, "x#calls": 0.0}
        f = _timed(lambda: None, "x", totals, clock)
        for _ in range(reps):
            f()
        best = min(best, totals["x"] / reps)
    return best


async def profile(max_batch: int, concurrency: int, requests: int, inline: bool) -> list[list[object]]:
    """Rows (stage, us per request, share of the process's CPU) of one configuration."""
    plain = await serve(max_batch, concurrency, requests, inline)  # (also the warm-up)
    totals: dict[str, float] = {}
    saved = []
    for _, cls, name, clock in STAGES:
        totals[name] = totals[name + "#calls"] = 0.0
        original = cls.__dict__[name]
        saved.append((cls, name, original))
        setattr(cls, name, _timed(original, name, totals, clock))
    try:
        await serve(max_batch, concurrency, requests, inline)
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)
    cpu_us = plain["cpu_us"]
    rows: list[list[object]] = []
    staged = 0.0
    for label, _, name, clock in STAGES:
        own = max(0.0, totals[name] - totals[name + "#calls"] * _wrapper_cost_s(clock)) / requests * 1e6
        staged += own
        rows.append([label, own, own / cpu_us])
    rest = cpu_us - staged
    rows.append(["rest: client coroutines, Engine.infer, asyncio, pool hand-off", rest, rest / cpu_us])
    rows.append(["process CPU per request (all threads, unwrapped run)", cpu_us, 1.0])
    rows.append([f"wall per request, unwrapped run (mean batch {plain['batch']:.1f})", plain["us"], ""])
    return rows


if __name__ == "__main__":
    from bench.common import run_on_agent_loop
    from bench.report import table

    async def main() -> None:
        for batch, conc, n, inline in ((1, 64, 16_000, False), (32, 256, 64_000, False)):
            rows = await profile(batch, conc, n, inline)
            print(f"\nmax batch {batch}, {conc} clients, inline {'on' if inline else 'off'}")
            print(table(["stage", "CPU us/request", "share"], rows))

    run_on_agent_loop(main())
