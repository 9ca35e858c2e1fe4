"""Dispatch overhead: the cost of Engine.infer's path around a model that does nothing.

A no-op backend (its `run` returns its input) is served through the whole engine path:
input validation, the adaptive batcher, the model scheduler's lease per ticket (a ticket
runs due batches back to back), the stream pool's worker thread and the hand-back to the
event loop. Per-request time is
wall time / requests under a closed loop of concurrent clients, minus the no-op model's
own time per request (measured in the same run). Goals (issue 21, raised from the "Node
agent runtime" issue's 50 and 10): <= 30 us per request at batch 1, <= 5 us per request
amortized at batch 32. `bench.dispatch_profile` then says where each microsecond goes.

A batch predicted to take less than a thread hand-off runs inline on the loop's thread
(`StreamPool.run_inline`): the no-op model's batches do. Each configuration is also run
with inline jobs off (`inline_max_s=0`), every batch then paying the worker hand-off,
which is what any model slower than ~50 us per batch pays.

For context the run also times one round trip at concurrency 1 and the bare hand-off
primitive (an asyncio future resolved by a worker thread woken through a condition
variable), which bounds a lone request's latency on the worker path from below.

    python -m bench.dispatch            # full run (~30 s)
    BENCH_QUICK=1 python -m bench.dispatch
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import percentile, quick, run_on_agent_loop
from bench.report import table, write_section
from node_agent.errors import TooManyRequests
from node_agent.runtime.backends.base import Backend
from node_agent.runtime.engine import Engine
from node_agent.runtime.scheduler import ModelScheduler
from node_agent.runtime.stream_pool import PoolSettings, StreamPool
from node_agent.types import ModelConfig, TensorSpec

FEATURES = 16
INLINE_MAX_S = 50e-6
"""`PoolSettings.inline_max_s` for the inline runs (inline is opt-in; off by default)."""


class NoopBackend(Backend):
    """Returns its input: the model costs (almost) nothing, the path is what is timed."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    @classmethod
    def load(cls, config: ModelConfig, version_dir: Path, device: str) -> NoopBackend:
        return cls(config)

    def run(self, inputs: dict[str, Any], stream: object | None = None) -> dict[str, Any]:
        return {"y": inputs["x"]}

    @property
    def memory_bytes(self) -> int:
        return 0

    def unload(self) -> None:
        pass


class MemoryRepository:
    """Configs held in memory (the engine's ConfigSource)."""

    def __init__(self, *configs: ModelConfig) -> None:
        self._configs = {(c.name, c.version): c for c in configs}

    def config(self, name: str, version: str | None = None) -> ModelConfig:
        return self._configs[(name, version or "1")]


def noop_config(max_batch: int) -> ModelConfig:
    return ModelConfig(
        name=f"noop-b{max_batch}", version="1", format="noop",
        inputs=(TensorSpec("x", "FP32", (FEATURES,)),),
        outputs=(TensorSpec("y", "FP32", (FEATURES,)),),
        artifact="none", digest="sha256:" + "0" * 64,
        max_batch_size=max_batch, max_queue_delay_s=0.0,
    )  # fmt: skip


async def serve(max_batch: int, concurrency: int, requests: int, inline: bool = True) -> dict[str, float]:
    """Closed loop: `concurrency` clients send `requests` in all; per-request timings."""
    config = noop_config(max_batch)
    settings = PoolSettings(num_workers=1, torch_threads=1, inline_max_s=INLINE_MAX_S if inline else 0.0)
    pool = StreamPool(settings).start()
    scheduler = ModelScheduler(1 << 30, NoopBackend)
    engine = Engine(MemoryRepository(config), scheduler, pool)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, FEATURES)).astype(np.float32) for _ in range(requests)]
    per_client = requests // concurrency
    outs: list[Any] = [None] * requests  # each request's output, checked after the timing

    refused = [0]

    async def client(c: int) -> None:
        for i in range(c * per_client, (c + 1) * per_client):
            while True:  # a refusal (a machine so loaded that admission sheds) is retried, as a client would
                try:
                    outs[i] = (await engine.infer(config.name, "1", {"x": xs[i]}))["y"]
                    break
                except TooManyRequests as e:
                    refused[0] += 1
                    await asyncio.sleep(e.retry_after_s)

    await asyncio.gather(*[client(c) for c in range(min(8, concurrency))])  # warm up
    batcher = engine.batcher(config.name, "1")
    batches0, rows0 = batcher.batches, batcher.rows_run
    wall0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*[client(c) for c in range(concurrency)])
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    done = per_client * concurrency
    # every caller got its own row back (checked after the clock stopped: not dispatch cost)
    assert all(np.array_equal(outs[i], xs[i]) for i in range(done))
    batches = batcher.batches - batches0
    mean_batch = (batcher.rows_run - rows0) / max(1, batches)
    inline_share = pool.inline / max(1, pool.completed)
    await engine.stop()
    await scheduler.close()
    pool.stop()
    return {"us": wall / done * 1e6, "cpu_us": cpu / done * 1e6, "batch": mean_batch, "inline": inline_share,
            "refused": refused[0]}  # fmt: skip


def model_us_per_request(batch: int, reps: int) -> float:
    """The no-op model's own time per request at `batch` rows (it is not overhead)."""
    import torch

    backend = NoopBackend(noop_config(batch))
    x = {"x": torch.zeros(batch, FEATURES)}
    t0 = time.perf_counter()
    for _ in range(reps):
        backend.run(x)
    return (time.perf_counter() - t0) / reps / batch * 1e6


async def round_trip_us(requests: int) -> float:
    """One request at a time (concurrency 1, batch 1): median latency in us."""
    config = noop_config(1)
    pool = StreamPool(PoolSettings(num_workers=1, torch_threads=1, inline_max_s=INLINE_MAX_S)).start()
    scheduler = ModelScheduler(1 << 30, NoopBackend)
    engine = Engine(MemoryRepository(config), scheduler, pool)
    x = np.zeros((1, FEATURES), np.float32)
    lat = []
    for _ in range(requests):
        t0 = time.perf_counter()
        await engine.infer(config.name, "1", {"x": x})
        lat.append(time.perf_counter() - t0)
    await engine.stop()
    await scheduler.close()
    pool.stop()
    return percentile(lat, 50) * 1e6


async def handoff_floor_us(rounds: int) -> float:
    """Median round trip of the bare primitive: loop -> worker thread -> loop."""
    loop = asyncio.get_running_loop()
    cond = threading.Condition()
    box: collections.deque[asyncio.Future[int] | None] = collections.deque()

    def worker() -> None:
        while True:
            with cond:
                while not box:
                    cond.wait()
                fut = box.popleft()
            if fut is None:
                return
            loop.call_soon_threadsafe(fut.set_result, 1)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    lat = []
    for _ in range(rounds):
        fut = loop.create_future()
        t0 = time.perf_counter()
        with cond:
            box.append(fut)
            cond.notify()
        await fut
        lat.append(time.perf_counter() - t0)
    with cond:
        box.append(None)
        cond.notify()
    t.join()
    return percentile(lat, 50) * 1e6


async def asyncio_floor_us(requests: int, concurrency: int = 256) -> float:
    """Per-request cost of the bare asyncio pattern every caller pays: a client coroutine
    awaiting a future that a callback resolves, 32 at a time (no engine, no thread)."""
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[int]] = []

    def flush() -> None:
        batch = pending[:]
        pending.clear()
        for f in batch:
            f.set_result(1)

    async def client(k: int) -> None:
        for _ in range(k):
            f = loop.create_future()
            pending.append(f)
            if len(pending) == 32 or len(pending) == 1:
                loop.call_soon(flush)
            await f

    t0 = time.perf_counter()
    await asyncio.gather(*[client(requests // concurrency) for _ in range(concurrency)])
    return (time.perf_counter() - t0) / requests * 1e6


async def main() -> None:
    from bench.dispatch_profile import profile  # (it runs `serve` of this module)

    q = quick()
    n1, n32 = (2_000, 6_400) if q else (16_000, 64_000)
    reps = 5 if not q else 1
    rows: list[list[object]] = []
    results: dict[tuple[int, int, bool], list[dict[str, float]]] = {}
    for _ in range(reps):  # interleaved repetitions: the machine's noise hits all alike
        for batch, conc, n in ((1, 64, n1), (32, 256, n32)):
            for inline in (True, False):
                results.setdefault((batch, conc, inline), []).append(await serve(batch, conc, n, inline))
    for (batch, conc, inline), runs in results.items():
        best = min(runs, key=lambda r: r["us"])
        model = model_us_per_request(batch, 2000)
        overhead = best["us"] - model
        goal = 30.0 if batch == 1 else 5.0
        rows.append([
            batch, conc, "on" if inline else "off", f"{best['inline']:.0%}", f"{best['batch']:.1f}",
            f"{best['us']:.1f}", f"{model:.2f}", f"{overhead:.1f}", f"{best['cpu_us']:.1f}",
            f"<= {goal:.0f}", "yes" if overhead <= goal else "no",
            ", ".join(f"{r['us']:.1f}" for r in runs)
            + (f" ({n} refusals, retried)" if (n := sum(r["refused"] for r in runs)) else ""),
        ])  # fmt: skip
    rt = await round_trip_us(300 if q else 3000)  # inline: the no-op batch never leaves the loop
    floor = await handoff_floor_us(300 if q else 3000)
    aio = min([await asyncio_floor_us(20_000 if q else 100_000) for _ in range(reps)])
    body = (
        "No-op model (returns its input) served through `Engine.infer` (validation, adaptive\n"
        "batcher, scheduler lease per ticket, the batch run inline on the loop's thread or on\n"
        "a stream-pool worker, which goes on from batch to batch while batches are due, with\n"
        "the hand-back to the loop), on the agent's event loop (uvloop); closed loop of concurrent\n"
        "clients, 1 worker, 1 torch thread. Overhead = wall time per request - the no-op\n"
        "model's own time per request. Inline: jobs predicted under 50 us may run on the\n"
        "loop's thread (on) or never (off: every batch is handed to the worker). Best of the\n"
        "interleaved repetitions (all listed). Wall above CPU time is time the process\n"
        "waited for a core (a shared machine) or for a thread wake-up.\n\n"
        + table(
            [
                "max batch",
                "clients",
                "inline",
                "batches inline",
                "mean batch",
                "us/request",
                "model us/request",
                "overhead us",
                "CPU us/request",
                "goal",
                "met",
                "all runs (us/request)",
            ],
            rows,
        )
        + "\n\nLatency of one request alone (concurrency 1, batch 1, inline), median: "
        f"**{rt:.0f} us**; the bare loop -> thread -> loop hand-off primitive on this machine: "
        f"**{floor:.0f} us** (two thread wake-ups; the floor for a lone request's latency).\n"
        "For scale, the bare asyncio pattern each request pays (a coroutine awaiting a future\n"
        f"that a callback resolves, no engine, no thread) costs **{aio:.1f} us** per request on\n"
        "this machine in the same run.\n"
    )
    for batch, conc, n, inline in ((1, 64, n1, False), (32, 256, n32, False)):  # (inline, stages nest)
        body += (
            f"\nWhere the time goes, max batch {batch}, {conc} clients, inline {'on' if inline else 'off'} "
            "(`bench.dispatch_profile`: each stage's CPU time, timed in place during a run):\n\n"
            + table(
                ["stage", "CPU us/request", "share of the process's CPU"],
                await profile(batch, conc, n, inline),
            )
            + "\n"
        )
    body += (
        "\nLoad average (1, 5, 15 min) at the end of the run: "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        + f" ({os.cpu_count()} cores).\n"
    )
    print(body)
    if not q:
        write_section("dispatch", "Dispatch overhead (no-op model)", body)


if __name__ == "__main__":
    run_on_agent_loop(main())
