"""Our agent vs Seldon MLServer: same model, same machine, same load generator, one run.

Both serve `classifier/1` (the example TorchScript CNN, 3x64x64 FP32 -> 10 logits) over the
KServe v2 HTTP protocol with the same batching policy (at most 16 rows, 5 ms window):
- ours: `edgefleet-agent serve` (one pool worker, torch on every core);
- MLServer: `mlserver start` with adaptive batching on and a custom runtime class that loads
  the same TorchScript file (`torch.jit.load`) and runs it under `torch.inference_mode`.

MLServer lives in its own virtualenv under the user's cache dir
(`~/.cache/edgefleet/bench-mlserver-venv`), so it never touches the project's environment; the
venv, the servers' launch and the load generator are bench.harness and bench.peer_servers, shared
with bench.peers (which puts more peers side by side).

The load generator (this process; asyncio + aiohttp, loopback only) sends open-loop Poisson
arrivals of JSON requests (MLServer's REST API has no binary tensor extension), each one image;
latency counts from the scheduled arrival, so a server that falls behind is charged for it.
Every trial is bounded in requests and time. Measured, alternating the servers at each step:
1. requests/s at a fixed p99: the highest Poisson rate whose p99 stays within the target
   (a geometric sweep, x1.5, then two bisection steps);
2. p99 at a fixed request rate (70% of the lower of the two sustainable rates).
Goal (issue "Node agent service"): more throughput than MLServer at the same p99.

    python -m bench.vs_mlserver          # full run (~2 min; the first one installs MLServer)
    BENCH_QUICK=1 python -m bench.vs_mlserver   # ours only, a few seconds; writes nothing
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import tempfile
from pathlib import Path

import aiohttp
import numpy as np

from bench.common import example_repo, quick
from bench.harness import (
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT_S,
    Comparison,
    Point,
    Process,
    Target,
    compare,
    ensure_venv,
    fmt_ms,
    interrupt_on_sigterm,
    wait_ready,
)
from bench.peer_servers.formats import model_specs
from bench.peer_servers.launch import OURS, PEERS
from bench.report import table, write_section

MLSERVER = next(p for p in PEERS if p.key == "mlserver")
TARGET_P99_S = 0.2
"""The fixed p99 (seconds): a few batches of the CNN on this 2-core class of machine."""
MAX_BATCH, BATCH_WINDOW_S = 16, 0.005
"""Both servers' batching policy (classifier/1's model.yaml: max_batch_size, max_queue_delay_s)."""


async def measure(servers: list[Target], q: bool) -> Comparison:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for s in servers:
            await wait_ready(session, s)
        return await compare(
            session, servers, TARGET_P99_S, start=8.0, seconds=3.0, fixed_seconds=6.0, floor=1.0, quick=q
        )


def report(servers: list[Target], best: dict[str, Point | None], fixed: float, at_fixed: dict[str, Point],
           log: dict[str, list[Point]], notes: list[str]) -> str:  # fmt: skip
    rows_rate: list[list[object]] = []
    rows_fixed: list[list[object]] = []
    for s in servers:
        b = best[s.name]
        rows_rate.append([s.name, f"**{b.rate:.1f}**" if b else "**< 1**",
                          f"{b.result.throughput():.1f}" if b else "-", fmt_ms(b.result.p(50)) if b else "-",
                          fmt_ms(b.p99) if b else "-"])  # fmt: skip
        p = at_fixed[s.name]
        rows_fixed.append([s.name, f"{fixed:.1f}", f"{p.result.throughput():.1f}", fmt_ms(p.result.p(50)),
                           f"**{fmt_ms(p.p99)}**", f"{p.error_ratio:.1%}"])  # fmt: skip
    lines = [
        "`classifier/1` (TorchScript CNN, 3x64x64 FP32 -> 10 logits) on CPU, one image per request as",
        "v2 JSON (about 250 kB) over HTTP on loopback; open-loop Poisson arrivals from one asyncio/aiohttp",
        "load generator, latency from the scheduled arrival. Both batch at most "
        f"{MAX_BATCH} rows with a {BATCH_WINDOW_S * 1e3:.0f} ms",
        "window. Ours: `edgefleet-agent serve`, 1 pool worker. MLServer: adaptive batching, its default",
        "inference worker process, a custom runtime that `torch.jit.load`s the same file (same torch",
        "build). The servers take turns at each rate (A B B A halves, so background load on the shared",
        "machine hits both alike); a near miss (p99 < 3x the target) is measured once more and counts",
        "only if repeated.",
        "",
        f"Requests/s at a fixed p99 of {fmt_ms(TARGET_P99_S)} (the highest Poisson rate meeting it with",
        "<= 1% errors; x1.5 steps, then two bisection steps):",
        "",
        table(["server", "rate meeting the p99 (req/s)", "completed/s", "p50", "p99 there"], rows_rate),
        "",
        f"p99 at a fixed rate of {fixed:.1f} req/s (70% of the lower sustainable rate), 6 s each:",
        "",
        table(["server", "rate (req/s)", "completed/s", "p50", "p99", "errors"], rows_fixed),
    ]
    if len(servers) == 2:
        ours, theirs = (best[s.name] for s in servers)
        p_ours, p_theirs = (at_fixed[s.name].p99 for s in servers)
        if ours is not None and theirs is not None:
            ratio, met = f"{ours.rate / theirs.rate:.2f}x", "yes" if ours.rate > theirs.rate else "no"
        else:
            ratio, met = "n/a", "yes" if ours is not None else "no"
        lines += ["", f"Throughput at the fixed p99, ours / MLServer: **{ratio}** (goal > 1: {met}). "
                  f"p99 at the fixed rate, MLServer / ours: **{p_theirs / p_ours:.2f}x**."]  # fmt: skip
    sweep = "; ".join(
        f"{s.name}: " + ", ".join(f"{p.rate:.1f}/s {fmt_ms(p.p99)}" for p in log[s.name]) for s in servers
    )
    lines += ["", f"Every point measured (rate, p99): {sweep}.", "", *notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    q = quick()
    notes: list[str] = []
    python = None
    if not q:
        log: list[str] = []
        python = ensure_venv(MLSERVER.venv, MLSERVER.requirements, MLSERVER.check, log)
        if python is None:
            notes.insert(
                0, "**MLServer could not be installed, so only our agent was measured.** " + " ".join(log)
            )
    spec = model_specs(example_repo(), [("classifier", "1")])[0]
    interrupt_on_sigterm()  # stop the servers on the way out
    with tempfile.TemporaryDirectory(prefix="edgefleet-vs-mlserver-") as tmp:
        starts = [(OURS, Path(sys.executable), "edgefleet agent")]
        if python is not None:
            starts.append((MLSERVER, python, MLSERVER.label))
        processes: list[Process] = []
        servers: list[Target] = []
        try:
            for peer, exe, label in starts:
                workdir = Path(tmp) / peer.key
                workdir.mkdir()
                process, targets = peer.start(exe, [spec], workdir)
                processes.append(process)
                servers.append(dataclasses.replace(targets[0], name=label))  # v2 JSON
            measured = asyncio.run(measure(servers, q))
        except BaseException:
            for process in processes:
                print(f"--- {process.name} (tail)\n{process.tail()}")
            raise
        finally:
            Process.stop_all()
    if q:
        p, name = measured.at_fixed[servers[0].name], servers[0].name
        print(
            f"quick: {name} at {measured.fixed:.0f} req/s for 1 s: {len(p.result.ok())}/{p.sent} ok, "
            f"p50 {fmt_ms(p.result.p(50))}, p99 {fmt_ms(p.p99)} (MLServer is not run quick)"
        )
        return
    body = report(servers, measured.best, measured.fixed, measured.at_fixed, measured.log, notes)
    print(body)
    write_section("vs_mlserver", "Agent vs MLServer (same model, same load)", body)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
