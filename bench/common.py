"""Shared helpers for the node agent's benchmarks: arrival traces, percentiles, replay.

Nothing here decides a result: benchmarks measure both sides of a ratio in one run
with these helpers and report what they saw.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from node_agent.runtime.backends.base import Backend
    from node_agent.runtime.repository import ModelRepository
    from node_agent.types import ModelConfig


T = TypeVar("T")


def run_on_agent_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on the event loop the agent serves on (`node_agent.serving.event_loop`:
    uvloop where installed): the engine's hand-offs measured as the agent runs them."""
    from node_agent.serving.event_loop import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


def quick() -> bool:
    """BENCH_QUICK=1: a run of a few seconds (smoke test), not a measurement."""
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def poisson_trace(rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    """Arrival times (s from 0) of a Poisson process."""
    rng = np.random.default_rng(seed)
    n = int(rate_per_s * duration_s * 1.5) + 10
    times = np.cumsum(rng.exponential(1.0 / rate_per_s, size=n))
    return [float(t) for t in times if t < duration_s]


def bursty_trace(
    base_per_s: float, burst_per_s: float, period_s: float, burst_s: float, duration_s: float,
    seed: int,
) -> list[float]:  # fmt: skip
    """Poisson arrivals whose rate is `burst_per_s` for `burst_s` of every `period_s`,
    `base_per_s` otherwise (an on-off modulated Poisson process)."""
    rng = np.random.default_rng(seed)
    out: list[float] = []
    t = 0.0
    peak = max(base_per_s, burst_per_s)
    while True:  # thinning
        t += float(rng.exponential(1.0 / peak))
        if t >= duration_s:
            return out
        rate = burst_per_s if (t % period_s) < burst_s else base_per_s
        if rng.random() < rate / peak:
            out.append(t)


@dataclass
class Outcome:
    """What happened to one request of a replayed trace."""

    arrival_s: float
    latency_s: float
    error: str | None = None
    tag: Any = None


@dataclass
class ReplayResult:
    outcomes: list[Outcome] = field(default_factory=list)
    duration_s: float = 0.0

    def ok(self, tag: Any = None) -> list[Outcome]:
        """Requests that got their result (on time, where a benchmark marks lateness)."""
        return [o for o in self.outcomes if o.error is None and (tag is None or o.tag == tag)]

    def completed(self, tag: Any = None) -> list[Outcome]:
        """Requests that got their result, late ones included (error None or 'late')."""
        return [o for o in self.outcomes
                if o.error in (None, "late") and (tag is None or o.tag == tag)]  # fmt: skip

    def errors(self, kind: str) -> int:
        return sum(1 for o in self.outcomes if o.error == kind)

    def throughput(self) -> float:
        """Completed requests per second of trace."""
        return len(self.ok()) / self.duration_s if self.duration_s else 0.0

    def p(self, q: float, tag: Any = None) -> float:
        """Latency percentile over every request that got its result."""
        return percentile([o.latency_s for o in self.completed(tag)], q)


async def replay(
    arrivals: Sequence[float],
    call: Callable[[int], Awaitable[Any]],
    tags: Sequence[Any] | None = None,
) -> ReplayResult:
    """Start `call(i)` at each arrival time (real time, monotonic clock), open loop.

    Latency is measured from the scheduled arrival, so a late start (the loop was busy)
    counts against the system, as it would for a real client. `duration_s` runs to the
    last completion.

    What existed before the replay is frozen out of the cyclic GC meanwhile (`gc.freeze`,
    as the agent does once it is ready), and finished requests are not kept: otherwise a
    full collection walking the harness's own objects paused the loop for 50-115 ms, which
    a p99 over a few seconds of requests reported as the system's latency.
    """
    result = ReplayResult()
    gc.collect()
    gc.freeze()
    try:
        await _replay(arrivals, call, tags, result)
    finally:
        gc.unfreeze()
    return result


async def _replay(
    arrivals: Sequence[float],
    call: Callable[[int], Awaitable[Any]],
    tags: Sequence[Any] | None,
    result: ReplayResult,
) -> None:
    start = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, at: float) -> None:
        tag = tags[i] if tags is not None else None
        try:
            await call(i)
        except Exception as e:
            result.outcomes.append(Outcome(at, time.monotonic() - start - at, type(e).__name__, tag))
        else:
            result.outcomes.append(Outcome(at, time.monotonic() - start - at, None, tag))

    for i, at in enumerate(arrivals):
        delay = start + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(i, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.wait(list(tasks))
    result.duration_s = max(time.monotonic() - start, arrivals[-1] if arrivals else 0.0)


class RepositoryView:
    """A model repository whose configs of `model` have `changes` applied (an SLA, a batch
    size, `parameters`), as if its model.yaml said so; everything else as stored."""

    def __init__(self, repo: ModelRepository, model: str, **changes: Any) -> None:
        self.repo, self.model, self.changes = repo, model, changes

    def config(self, name: str, version: str | None = None) -> ModelConfig:
        config = self.repo.config(name, version)
        return dataclasses.replace(config, **self.changes) if name == self.model else config

    def load(self, config: ModelConfig, device: str) -> Backend:
        return self.repo.load(config, device)


def example_repo() -> Path:
    """A fresh example model repository in a temporary folder (deleted at exit)."""
    from node_agent.examples import make_examples

    tmp = tempfile.TemporaryDirectory(prefix="edgefleet-bench-")
    _KEEP.append(tmp)
    root = Path(tmp.name)
    make_examples(root)
    return root


_KEEP: list[tempfile.TemporaryDirectory[str]] = []


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def bare_rows_per_s(
    backend: Any, inputs: dict[str, np.ndarray], seconds: float, threads: int
) -> tuple[float, float]:
    """The loaded backend's `run` in a loop on one ready batch, on the calling thread with
    `threads` torch threads: rows per second of wall time, and per second of this thread's
    CPU time. Run it on a worker thread, as the pool runs batches."""
    import torch

    torch.set_num_threads(threads)  # per thread (OpenMP): a reused thread keeps its last setting
    x = {name: torch.from_numpy(a) for name, a in inputs.items()}
    batch = len(next(iter(inputs.values())))
    backend.run(x)
    rows, t0, cpu0 = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - t0 < seconds:
        backend.run(x)
        rows += batch
    return rows / (time.perf_counter() - t0), rows / (time.thread_time() - cpu0)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"
