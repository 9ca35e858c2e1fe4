"""Adaptive batcher vs the best static (batch size, delay) and vs no batching.

Two parts per example model (CPU, one pool worker), each measured in one run:

1. Open-loop trace: one Poisson arrival trace is replayed in real time through
   `Engine.infer`, once per batching configuration: every static (max batch, max delay)
   of a small grid, and the adaptive policy given only the SLO (p99). Requests arriving
   in the first second are a warm-up for every configuration alike and are not counted.
   Throughput = requests completed by the end of the trace + one SLO, per second of
   trace (a configuration that falls behind is not credited for its backlog). Best
   static = the grid point with the highest throughput whose p99 is within the SLO.
   Goal: adaptive >= 0.95 x the best static's throughput, with its p99 within the SLO.
   The rate is 0.7 x the adaptive capacity measured in part 2, capped at what the
   open-loop replayer (one Python task per request) drives reliably here.
2. Saturation: 64 closed-loop clients; requests/s with the adaptive policy vs with no
   batching (batch 1, no delay). Goal: >= 3x.

    python -m bench.adaptive_batching       # full run (~2 min)
    BENCH_QUICK=1 python -m bench.adaptive_batching
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.common import (
    ReplayResult,
    RepositoryView,
    bare_rows_per_s,
    example_repo,
    fmt_ms,
    poisson_trace,
    quick,
    replay,
)
from bench.report import table, write_section
from edgefleet_api.sla import SlaObjectives
from node_agent.errors import Overloaded
from node_agent.runtime.batching_policy import BatchingPolicy, StaticPolicy, policy_for
from node_agent.runtime.engine import Engine
from node_agent.runtime.repository import ModelRepository
from node_agent.runtime.scheduler import ModelScheduler
from node_agent.runtime.stream_pool import PoolSettings, StreamPool

WARMUP_S = 1.0
MAX_OPEN_LOOP_RATE = 2500.0
"""Requests/s the open-loop replayer drives with room to spare on 2 shared cores."""


@dataclass(frozen=True)
class Case:
    model: str
    slo_s: float
    max_batch: int
    batches: tuple[int, ...]
    input_name: str
    row_shape: tuple[int, ...]


CASES = (
    Case("classifier", 0.15, 16, (1, 2, 4, 8, 16), "image", (3, 64, 64)),
    Case("mlp", 0.02, 64, (1, 8, 32, 64), "features", (32,)),
)


async def closed_loop_capacity(engine: Engine, case: Case, seconds: float) -> float:
    """Requests/s with 64 clients always waiting (1 row each)."""
    x = np.random.default_rng(0).standard_normal((1, *case.row_shape)).astype(np.float32)
    stop_at = time.perf_counter() + seconds
    done = [0]

    async def client() -> None:
        while time.perf_counter() < stop_at:
            try:
                await engine.infer(case.model, "1", {case.input_name: x})
                done[0] += 1
            except Overloaded as e:
                await asyncio.sleep(e.retry_after_s)

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(64)])
    return done[0] / (time.perf_counter() - t0)


async def model_batching_gain(scheduler: ModelScheduler, cfg: Any, case: Case, seconds: float) -> float:
    """The bare model's rows/s at its max batch over its rows/s at batch 1 (the backend's
    `run` in a loop, on a worker thread, with the pool's torch threads): the most any
    batching can gain for this model on this machine, engine costs aside."""
    lease = await scheduler.acquire(cfg)
    threads = torch.get_num_threads()  # (the pool set it at start)
    rng = np.random.default_rng(0)
    rates = []
    try:
        for batch in (1, case.max_batch, 1, case.max_batch):  # alternating
            x = {case.input_name: rng.standard_normal((batch, *case.row_shape)).astype(np.float32)}
            rows_s, _ = await asyncio.to_thread(bare_rows_per_s, lease.backend, x, seconds / 4, threads)
            rates.append(rows_s)
    finally:
        lease.release()
    return max(rates[1::2]) / max(rates[0::2])


async def run_config(
    repo: RepositoryView, scheduler: ModelScheduler, pool: StreamPool, case: Case,
    policy: BatchingPolicy | None, arrivals: list[float], payloads: list[np.ndarray],
) -> ReplayResult:  # fmt: skip
    factory = (lambda cfg: policy) if policy is not None else None
    engine = Engine(repo, scheduler, pool, policy_factory=factory)
    await engine.infer(case.model, "1", {case.input_name: payloads[0]})  # create the batcher

    async def call(i: int) -> Any:
        return await engine.infer(case.model, "1", {case.input_name: payloads[i]})

    result = await replay(arrivals, call)
    await engine.stop()
    end = arrivals[-1] + case.slo_s
    counted = [
        o if o.arrival_s + o.latency_s <= end or o.error else dataclasses.replace(o, error="late")
        for o in result.outcomes
        if o.arrival_s >= WARMUP_S
    ]
    return ReplayResult(counted, arrivals[-1] - WARMUP_S)


def static(case: Case, batch: int, delay_s: float) -> StaticPolicy:
    return StaticPolicy(batch, delay_s, 4096)


async def bench_case(case: Case, q: bool) -> tuple[list[list[object]], str]:
    root = example_repo()
    sla = {"sla": SlaObjectives(p99_latency_s=case.slo_s), "max_batch_size": case.max_batch}
    repo = RepositoryView(ModelRepository(root), case.model, **sla)
    pool = StreamPool(PoolSettings(num_workers=1)).start()
    scheduler = ModelScheduler(2 << 30, lambda cfg: repo.load(cfg, "cpu"))
    cal_s = 0.5 if q else 3.0
    cfg = repo.config(case.model, "1")

    async def capacity(policy: BatchingPolicy) -> float:
        engine = Engine(repo, scheduler, pool, policy_factory=lambda cfg: policy)
        cap = await closed_loop_capacity(engine, case, cal_s)
        await engine.stop()
        return cap

    await capacity(static(case, case.max_batch, 0.0))  # load the model, warm up
    unbatched, adaptive_cap = [], []
    for _ in range(1 if q else 2):  # alternate: the machine's load changes by the second
        unbatched.append(await capacity(static(case, 1, 0.0)))
        adaptive_cap.append(await capacity(policy_for(cfg, workers=pool.num_workers)))
    unbatched_rps, adaptive_rps = max(unbatched), max(adaptive_cap)
    own_gain = await model_batching_gain(scheduler, cfg, case, cal_s)
    rate = min(0.7 * adaptive_rps, MAX_OPEN_LOOP_RATE)
    duration = WARMUP_S + (0.7 if q else 3.0)
    arrivals = poisson_trace(rate, duration, seed=42)
    rng = np.random.default_rng(7)
    payloads = [rng.standard_normal((1, *case.row_shape)).astype(np.float32)
                for _ in range(len(arrivals))]  # fmt: skip
    delays = (0.0, 0.3 * case.slo_s)
    grid = [(b, d) for b in case.batches for d in delays]
    if q:
        grid = [(1, 0.0), (case.max_batch, 0.0)]
    rows: list[list[object]] = []
    results: dict[str, ReplayResult] = {}
    for b, d in grid:
        r = await run_config(repo, scheduler, pool, case, static(case, b, d), arrivals, payloads)
        results[f"static b={b} delay={fmt_ms(d)}"] = r
    adaptive_policy = policy_for(cfg, workers=pool.num_workers)
    adaptive = await run_config(repo, scheduler, pool, case, adaptive_policy, arrivals, payloads)
    results["adaptive (SLO only)"] = adaptive
    await scheduler.close()
    pool.stop()

    def within(r: ReplayResult) -> bool:
        return r.p(99) <= case.slo_s

    statics = {k: v for k, v in results.items() if k.startswith("static")}
    ok = {k: v for k, v in statics.items() if within(v)}
    best_name = max(ok, key=lambda k: ok[k].throughput()) if ok else None
    for name, r in results.items():
        tag = " (best static)" if name == best_name else ""
        rows.append([
            case.model, name + tag, f"{r.throughput():.0f}", fmt_ms(r.p(50)), fmt_ms(r.p(99)),
            "yes" if within(r) else "no", r.errors("Overloaded") + r.errors("TooManyRequests"),
            r.errors("late"),
            len(r.outcomes),
        ])  # fmt: skip
    final = adaptive_policy.decision()
    summary = (
        f"**{case.model}** (p99 SLO {fmt_ms(case.slo_s)}, max batch {case.max_batch}). "
        f"Saturation, adaptive vs no batching: {adaptive_rps:.0f} vs {unbatched_rps:.0f} "
        f"req/s = **{adaptive_rps / unbatched_rps:.2f}x** (goal >= 3x); the bare model alone "
        f"runs {own_gain:.2f}x the rows/s at batch {case.max_batch} as at batch 1 (what batching "
        "can gain for this model here, engine costs aside). "
        f"Trace: Poisson {rate:.0f} req/s for {duration - WARMUP_S:.0f} s "
        f"(+{WARMUP_S:.0f} s warm-up); the adaptive batcher ended at batch "
        f"{final.batch_size}, delay {fmt_ms(final.delay_s)}, queue bound "
        f"{final.queue_limit_rows} rows. "
    )
    if best_name is not None:
        best = results[best_name]
        summary += (
            f"Adaptive / best static ({best_name}) throughput: "
            f"**{adaptive.throughput() / best.throughput():.3f}** (goal >= 0.95); adaptive p99 "
            f"{fmt_ms(adaptive.p(99))}, {'within' if within(adaptive) else 'OVER'} the SLO."
        )
    else:
        summary += "No static configuration met the SLO on this trace."
    return rows, summary


async def main() -> None:
    q = quick()
    rows: list[list[object]] = []
    summaries = []
    for case in CASES:
        r, s = await bench_case(case, q)
        rows += r
        summaries.append(s)
        print(s)
    body = (
        "Open-loop Poisson traces replayed in real time through `Engine.infer` (1 worker, CPU).\n"
        "Throughput = requests completed by the trace's end + one SLO, per second of trace\n"
        "after the warm-up; refused = `Overloaded` (admission control); late = completed\n"
        "after that. Same trace and payloads for every configuration of a model.\n\n"
        + table(
            [
                "model",
                "batching",
                "throughput req/s",
                "p50",
                "p99",
                "p99 within SLO",
                "refused",
                "late",
                "requests",
            ],
            rows,
        )
        + "\n\n"
        + "\n\n".join(summaries)
        + "\n"
    )
    print(body)
    if not q:
        write_section("adaptive_batching", "Adaptive batching vs static and no batching", body)


if __name__ == "__main__":
    asyncio.run(main())
