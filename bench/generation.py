"""Generation on the paged KV cache: paged vs preallocating, continuous vs static batching.

    python -m bench.generation                # full run (about 100 s of CPU, one core)
    BENCH_QUICK=1 python -m bench.generation  # a few seconds, a smoke test

A real TinyLM (random weights, fixed seed) generates on the CPU with one torch thread, for
one heavy-tailed trace (lognormal prompt and output lengths), replayed against engines that
differ in one setting each, in one run:
1. KV reservation, with the same KV memory, every request queued at t=0 (offline
   throughput): paged blocks vs each sequence reserving the whole context up front.
2. Batching, same KV memory, Poisson arrivals: continuous (join and leave at any step) vs
   static (a batch runs until its last sequence finishes): tokens/s and time to first token.

Time is a virtual clock advanced by the CPU time of each engine step (`time.thread_time`;
with one torch thread the step computes on this thread), and arrivals follow that clock:
the machines these run on are shared, and wall time there measures the neighbours' load.
On an idle machine the two clocks agree.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from bench.report import table, write_section
from node_agent.generation import EngineConfig, GenerationEngine, SamplingParams
from node_agent.transformer import TinyLM, TinyLMConfig

QUICK = os.environ.get("BENCH_QUICK") == "1"
MODEL = TinyLMConfig(d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=512)
BLOCK = 16
PREALLOC_SEQS = 4
"""KV memory of every run: room for this many sequences preallocated to the full context."""
NUM_BLOCKS = PREALLOC_SEQS * MODEL.max_seq_len // BLOCK
N_REQUESTS = 6 if QUICK else 64
ROUNDS = 1 if QUICK else 2
"""Each engine runs the trace this many times, interleaved with the others; the fastest run
counts (other processes on a shared machine only ever slow a run down)."""
PROMPT_MEDIAN, OUTPUT_MEDIAN, SIGMA = 24, 40, 0.9
MAX_NUM_SEQS = 16
"""Decode batch size at most: 16 gives the most tokens per CPU second on this model."""
ARRIVAL_RATES = (12.0, 30.0)
"""Requests per second in the batching comparison: below the engines' capacity (about 16/s
continuous), where tokens/s is the offered load and latency differs, and beyond it."""
SEED = 0


@dataclass(frozen=True, slots=True)
class Request:
    arrival_s: float
    prompt: list[int]
    max_tokens: int


def make_trace(n: int, rate: float, rng: np.random.Generator) -> list[Request]:
    """Lognormal prompt and output lengths (heavy right tail), Poisson arrivals."""
    ctx = MODEL.max_seq_len
    p = np.clip(rng.lognormal(np.log(PROMPT_MEDIAN), SIGMA, n), 2, ctx // 2).astype(int)
    o = np.clip(rng.lognormal(np.log(OUTPUT_MEDIAN), SIGMA, n), 1, None).astype(int)
    o = np.minimum(o, ctx - p)
    t = np.cumsum(rng.exponential(1.0 / rate, n)) if rate > 0 else np.zeros(n)
    return [Request(float(t[i]), rng.integers(0, 256, int(p[i])).tolist(), int(o[i])) for i in range(n)]


@dataclass(frozen=True, slots=True)
class RunResult:
    tokens_per_s: float
    wall_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    mean_running: float
    preemptions: int
    generated: int


class VirtualClock:
    """Seconds of engine CPU time (see the module docstring)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def replay(model: TinyLM, trace: list[Request], **config: object) -> RunResult:
    """Feed `trace` (arrivals on the virtual clock) and run to the end."""
    clock = VirtualClock()
    cfg = EngineConfig(NUM_BLOCKS, BLOCK, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=2048,
                       **config)  # type: ignore[arg-type]  # fmt: skip
    eng = GenerationEngine(model, cfg, clock=clock)
    pending = deque(sorted(trace, key=lambda r: r.arrival_s))
    arrival: dict[int, float] = {}
    ttft: list[float] = []
    running: list[int] = []
    generated = 0
    while pending or eng.has_work():
        while pending and pending[0].arrival_s <= clock.now:
            r = pending.popleft()
            params = SamplingParams(max_tokens=r.max_tokens, temperature=0.8, seed=len(arrival) + len(ttft),
                                    ignore_eos=True)  # fmt: skip
            sid = eng.add(r.prompt, params, arrival_s=r.arrival_s)
            arrival[sid] = r.arrival_s
        if not eng.has_work():
            clock.now = pending[0].arrival_s  # idle until the next arrival
            continue
        t0 = time.thread_time()
        outputs = eng.step()
        clock.now += time.thread_time() - t0
        running.append(len(outputs))
        for o in outputs:
            generated += 1
            if o.seq_id in arrival:
                ttft.append(clock.now - arrival.pop(o.seq_id))
    wall = clock.now - min(r.arrival_s for r in trace)
    return RunResult(generated / wall, wall, float(np.percentile(ttft, 50)), float(np.percentile(ttft, 99)),
                     float(np.mean(running)), eng.preemptions, generated)  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    model = TinyLM.random(MODEL, seed=SEED)
    rng = np.random.default_rng(SEED)
    offline = make_trace(N_REQUESTS, 0.0, rng)
    online = {rate: make_trace(N_REQUESTS, rate, np.random.default_rng(SEED)) for rate in ARRIVAL_RATES}
    replay(model, offline[:4])  # warm-up
    plan: dict[str, tuple[list[Request], dict[str, object]]] = {
        "paged": (offline, {}),
        "max_length": (offline, {"kv_reservation": "max_length"}),
    }
    for rate, trace in online.items():
        plan[f"continuous@{rate:g}"] = (trace, {})
        plan[f"static@{rate:g}"] = (trace, {"batching": "static"})
    tries: dict[str, list[RunResult]] = {name: [] for name in plan}
    for _ in range(ROUNDS):
        for name, (trace, settings) in plan.items():
            tries[name].append(replay(model, trace, **settings))
    runs = {name: min(rs, key=lambda r: r.wall_s) for name, rs in tries.items()}
    for name, r in runs.items():
        print(
            f"{name:>11}: {r.tokens_per_s:8.1f} tok/s  time {r.wall_s:6.2f} s  ttft p50 {r.ttft_p50_s:.3f} "
            f"p99 {r.ttft_p99_s:.3f} s  seqs/step {r.mean_running:5.1f}  preemptions {r.preemptions}"
        )
    p, m = runs["paged"], runs["max_length"]
    out_lens = [r.max_tokens for r in offline]
    prompt_lens = [len(r.prompt) for r in offline]
    body = "\n\n".join(
        [
            f"TinyLM d_model {MODEL.d_model}, {MODEL.n_layers} layers, {MODEL.n_heads} heads, context "
            f"{MODEL.max_seq_len}, random weights; CPU, 1 torch thread, times in engine CPU seconds, "
            f"fastest of {ROUNDS} interleaved runs per engine. "
            f"KV pool {NUM_BLOCKS} blocks of "
            f"{BLOCK} tokens (= {PREALLOC_SEQS} sequences at full context) in every run; "
            f"max {MAX_NUM_SEQS} running sequences. Trace: {N_REQUESTS} requests, prompt tokens "
            f"median {int(np.median(prompt_lens))} / max {max(prompt_lens)}, output tokens median "
            f"{int(np.median(out_lens))} / max {max(out_lens)} (lognormal, sigma {SIGMA}).",
            "**KV reservation** (all requests queued at t=0):\n\n"
            + table(
                ["engine", "tokens/s", "time s", "mean seqs per step", "preemptions"],
                [
                    ["paged blocks", p.tokens_per_s, p.wall_s, p.mean_running, p.preemptions],
                    ["preallocate to max length", m.tokens_per_s, m.wall_s, m.mean_running, m.preemptions],
                ],
            )
            + f"\n\nPaged / preallocated throughput: **{p.tokens_per_s / m.tokens_per_s:.2f}x**.",
            "**Batching** (Poisson arrivals, paged KV; the same trace at two rates):\n\n"
            + table(
                ["requests/s", "batching", "tokens/s", "TTFT p50 s", "TTFT p99 s", "mean seqs per step"],
                [
                    [f"{rate:g}", mode, r.tokens_per_s, r.ttft_p50_s, r.ttft_p99_s, r.mean_running]
                    for rate in ARRIVAL_RATES
                    for mode in ("continuous", "static")
                    for r in [runs[f"{mode}@{rate:g}"]]
                ],
            )
            + "\n\n"
            + "; ".join(
                f"at {rate:g}/s continuous / static throughput **{c.tokens_per_s / s.tokens_per_s:.2f}x**, "
                f"p99 time to first token static / continuous **{s.ttft_p99_s / c.ttft_p99_s:.2f}x**"
                for rate in ARRIVAL_RATES
                for c, s in [(runs[f"continuous@{rate:g}"], runs[f"static@{rate:g}"])]
            )
            + ".",
        ]
    )
    if QUICK:
        print("BENCH_QUICK: not writing docs/benchmarks.md")
    else:
        write_section("generation", "Generation: paged KV cache and continuous batching", body)
    print(body)


if __name__ == "__main__":
    main()
