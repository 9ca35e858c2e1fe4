"""Side by side with serving peers (issue 21): our agent against KServe's model server, Ray Serve,
LitServe, TorchServe and MLServer, same models, same machine, same load, one run.

Every server is started at once (and paused while another is measured), each peer from its own
virtualenv under the user's cache dir (~/.cache/edgefleet/bench-<peer>-venv), pip-installed at a
pinned version and sharing the project's torch (bench.harness); how each is configured is in
bench.peer_servers.launch (and in the results). Two models from the example repository, each on
its own: `classifier/1` (a small CNN, 3x64x64 FP32 -> 10 logits; max batch 16, 5 ms window) and
`mlp/1` (32 -> 4; max batch 64, 5 ms window); one row per request, in each server's v2 format
(ours in v2 JSON and v2 binary) or its native JSON where it has no v2 endpoint. Per model, the
same open-loop Poisson load generator measures every target in turn at each rate (A B .. B A
halves):
1. requests/s at a fixed p99 (P99_TARGET_S): the highest rate meeting it with <= 1% errors;
2. p99 at a fixed rate: 70% of the lowest peer's sustainable rate (at least FIXED_FLOOR).
Goal: ours at least 2x every peer's requests/s at the same p99. A peer that cannot be installed
or started is reported with the reason, and the rest still run.

    python -m bench.peers                 # full run (~15 min; the first one installs the peers)
    BENCH_QUICK=1 python -m bench.peers   # ours and the installed peers, 1 s each; writes nothing
    BENCH_PEERS=kserve,ray python -m bench.peers   # ours and only those peers
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
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
from bench.peer_servers.formats import ModelSpec, model_specs
from bench.peer_servers.launch import OURS, PEERS, Peer
from bench.report import recorded, table

P99_TARGET_S = float(os.environ.get("BENCH_P99_MS", "200")) / 1e3
"""The fixed p99 (200 ms, as bench.vs_mlserver): a few batches of the CNN on a small shared CPU."""
GOAL = 2.0
START_RATE = 16.0
SECONDS = 3.0
FIXED_SECONDS = 6.0
FIXED_FLOOR = 5.0
MODELS = (("classifier", "1"), ("mlp", "1"))
OURS_LABEL = OURS.label


@dataclass
class ModelResult:
    spec: ModelSpec
    targets: list[Target]
    measured: Comparison


def server_of(target: Target) -> str:
    """The server's label (the target's name without its model; formats kept)."""
    return target.name.rsplit(" [", 1)[0]


def rate(point: Point | None) -> float:
    return point.rate if point else 0.0


def verdict(model: str, best: dict[str, Point | None], names: list[str]) -> str:
    """One line: ours (its best format) against the strongest peer at the same p99, goal >= GOAL x."""
    ours = {n: rate(best.get(n)) for n in names if n.startswith(OURS_LABEL)}
    peers = {n: rate(best.get(n)) for n in names if not n.startswith(OURS_LABEL)}
    if not ours or not peers:
        return f"- `{model}`: no peer measured, no verdict."
    o_name, o_rate = max(ours.items(), key=lambda kv: kv[1])
    p_name, p_rate = max(peers.items(), key=lambda kv: kv[1])
    if o_rate == 0 and p_rate == 0:
        return f"- `{model}`: no server met the p99 at any rate tried: no verdict."
    if p_rate == 0:
        return f"- `{model}`: no peer met the p99 at any rate tried; ours {o_rate:.0f} req/s: **met**."
    ratio = o_rate / p_rate
    met = "met" if ratio >= GOAL else f"not met, {GOAL / ratio:.2f}x short" if ratio > 0 else "not met"
    others = ", ".join(
        f"{server_of_name(n)} {o_rate / r:.1f}x" if r else f"{server_of_name(n)} (none met)"
        for n, r in sorted(peers.items(), key=lambda kv: -kv[1])
    )
    return (
        f"- `{model}`: ours ({server_of_name(o_name)}) {o_rate:.0f} req/s vs the best peer "
        f"({server_of_name(p_name)}) {p_rate:.0f} req/s at p99 <= {fmt_ms(P99_TARGET_S)}: **{ratio:.2f}x**, "
        f"goal >= {GOAL:.0f}x **{met}** (ours / each peer: {others})."
    )


def server_of_name(name: str) -> str:
    return name.rsplit(" [", 1)[0]


def tables(r: ModelResult) -> list[str]:
    rows_rate: list[list[object]] = []
    rows_fixed: list[list[object]] = []
    ours_p99 = min((p.p99 for n, p in r.measured.at_fixed.items() if n.startswith(OURS_LABEL)), default=0.0)
    for t in r.targets:
        b = r.measured.best.get(t.name)
        rows_rate.append(
            [
                server_of(t),
                f"**{b.rate:.1f}**" if b else "**none**",
                f"{b.result.throughput():.1f}" if b else "-",
                fmt_ms(b.result.p(50)) if b else "-",
                fmt_ms(b.p99) if b else "-",
            ]
        )
        p = r.measured.at_fixed.get(t.name)
        if p is not None:
            rows_fixed.append(
                [
                    server_of(t),
                    f"{p.result.throughput():.1f}",
                    fmt_ms(p.result.p(50)),
                    f"**{fmt_ms(p.p99)}**",
                    f"{p.p99 / ours_p99:.2f}x" if ours_p99 else "-",
                    f"{p.error_ratio:.1%}",
                ]
            )
    every = "; ".join(
        f"{server_of(t)}: "
        + ", ".join(f"{p.rate:.1f}/s {fmt_ms(p.p99)}" for p in r.measured.log.get(t.name, []))
        for t in r.targets
    )
    spec = r.spec
    head = (
        f"### `{spec.name}/{spec.version}` (max batch {spec.max_batch}, window {spec.window_s * 1e3:.0f} ms)"
    )
    fixed = [
        f"p99 at a fixed rate of {r.measured.fixed:.1f} req/s, {r.measured.fixed_seconds:.0f} s each "
        "(p99 / our best format's p99):",
        "",
        table(["server", "completed/s", "p50", "p99", "p99 / ours", "errors"], rows_fixed),
        "",
    ]
    if not r.measured.best:  # a quick run: no sweep
        return [head, "", *fixed]
    return [
        head,
        "",
        f"Requests/s at a fixed p99 of {fmt_ms(P99_TARGET_S)} "
        "(the highest Poisson rate meeting it, <= 1% errors):",
        "",
        table(["server", "rate meeting the p99 (req/s)", "completed/s", "p50", "p99 there"], rows_rate),
        "",
        *fixed,
        f"Every point measured (rate, p99): {every}.",
        "",
    ]


def install(peer: Peer, notes: list[str]) -> Path | None:
    log: list[str] = []
    python = ensure_venv(peer.venv, peer.requirements, peer.check, log) if peer.needs(log) else None
    if python is None:
        notes.append(f"- **{peer.label}: not measured.** " + " ".join(log))
    return python


async def start_all(
    peers: list[tuple[Peer, Path]],
    specs: list[ModelSpec],
    tmp: Path,
    notes: list[str],
    session: aiohttp.ClientSession,
) -> tuple[list[Process], list[Target]]:
    """Launch every server, then wait for each target; a server that fails to start twice is
    stopped and noted."""
    processes: list[Process] = []

    def launch(peer: Peer, python: Path, workdir: Path, what: str) -> list[Target]:
        """The peer's targets, launched in `workdir`; none (noted) when it cannot be launched."""
        workdir.mkdir()
        try:
            process, targets = peer.start(python, specs, workdir)
        except Exception as e:  # a peer that cannot even be launched: the rest still run
            notes.append(f"- **{peer.label}: not measured**, {what} it failed: {type(e).__name__}: {e}")
            return []
        processes.append(process)
        return targets

    launched = [
        (peer, python, ts)
        for peer, python in peers
        if (ts := launch(peer, python, tmp / peer.key, "launching"))
    ]

    async def wait(peer: Peer, python: Path, targets: list[Target]) -> list[Target]:
        """Its targets once ready. A server that does not start is launched once more, afresh (a
        port it was given can be taken by another server's process before it binds it)."""
        for attempt in (1, 2):
            try:
                for t in targets:
                    print(f"waiting for {t.name} ...", flush=True)
                    await wait_ready(session, t)
                print(f"{peer.label} ready", flush=True)
                return targets
            except RuntimeError as e:
                process = targets[0].process
                print(f"{peer.label} failed to start:\n{process.tail(40)}", flush=True)
                process.stop()
                processes.remove(process)
                if attempt == 2:
                    notes.append(
                        f"- **{peer.label}: not measured**, it did not start (twice): {e}. Its log ends: "
                        f"`{' / '.join(process.tail(6).splitlines())[-600:]}`"
                    )
                    break
                targets = launch(peer, python, tmp / f"{peer.key}-again", "relaunching")
                if not targets:
                    break
        return []

    ready = [t for ts in await asyncio.gather(*(wait(p, py, ts) for p, py, ts in launched)) for t in ts]
    return processes, ready


async def run(
    peers: list[tuple[Peer, Path]], specs: list[ModelSpec], tmp: Path, notes: list[str], q: bool
) -> list[ModelResult]:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        processes, targets = await start_all(peers, specs, tmp, notes, session)
        try:
            results = []
            for spec in specs:
                mine = [t for t in targets if t.name.endswith(f"[{spec.name}]")]
                print(f"== {spec.name}/{spec.version}", flush=True)
                measured = await compare(session, mine, P99_TARGET_S, start=START_RATE, seconds=SECONDS,
                                         fixed_seconds=FIXED_SECONDS, floor=FIXED_FLOOR, quick=q)  # fmt: skip
                results.append(ModelResult(spec, mine, measured))
            return results
        finally:
            for p in processes:
                p.stop()


def intro(measured: list[Peer], notes: list[str]) -> str:
    settings = "\n".join(f"- **{p.label}**: {p.settings}." for p in [OURS, *measured])
    return "\n".join(
        [
            "Every server is started at once on this machine, each peer from its own virtualenv (pinned from",
            "PyPI, the project's torch shared), all on loopback with the same TorchScript files and, where",
            "they batch, each model's own batching policy; torch uses every core in each. While one server",
            "is measured the others are paused (SIGSTOP to their process groups), so an idle peer's",
            "background work (LitServe's polling loop, Ray's cluster) takes nothing from it. One row per",
            "request, open-loop Poisson arrivals from one asyncio/aiohttp load generator (the same",
            f"process for all, at most {MAX_CONNECTIONS} connections per server), latency from the",
            "scheduled arrival; a request beyond rate x the p99 target in flight counts as an error. At",
            "each rate the targets take turns (A B .. B A halves, so the shared machine's background load",
            "hits all alike); a near miss",
            "(p99 < 3x the target) is measured once more and counts only if repeated. Rates start at",
            f"{START_RATE:.0f}/s, x1.5 steps, then two bisection steps; {SECONDS:.0f} s per target and rate.",
            "Settings (each at its documented best for CPU):",
            "",
            settings,
            "",
            "The last line says how loaded the machine was: at a load average above its CPU count the",
            "figures measure the servers under contention with other jobs, not at their best, and vary",
            "run to run.",
            *(["", *notes] if notes else []),
        ]
    )


def main() -> None:
    q = quick()
    notes: list[str] = []
    interrupt_on_sigterm()  # stop the servers on the way out
    load_at_start = load_average()
    only = {k for k in os.environ.get("BENCH_PEERS", "").split(",") if k}
    peers: list[tuple[Peer, Path]] = [(OURS, Path(sys.executable))]
    for peer in PEERS:
        if (only and peer.key not in only) or (q and not (peer.venv / ".edgefleet-ready").exists()):
            continue  # not asked for; or a quick run, which installs nothing
        python = install(peer, notes)
        if python is not None:
            peers.append((peer, python))
    specs = model_specs(example_repo(), MODELS)
    with tempfile.TemporaryDirectory(prefix="edgefleet-peers-") as tmp:
        try:
            results = asyncio.run(run(peers, specs, Path(tmp), notes, q))
        finally:
            Process.stop_all()
    measured = [p for p, _ in peers[1:] if not any(p.label in n and "not measured" in n for n in notes)]
    with recorded("peers", "Side by side with serving peers (issue 21)", intro(measured, notes)):
        for r in results:
            print("\n".join(tables(r)))
        if not q:
            print("Verdicts (goal: ours >= 2x every peer's requests/s at the same p99):")
            print("")
            for r in results:
                print(
                    verdict(f"{r.spec.name}/{r.spec.version}", r.measured.best, [t.name for t in r.targets])
                )
        cpus = os.cpu_count()
        print(f"\nThe machine's load (1/5/15-min load average; {cpus} CPUs, shared with other jobs): "
              f"{load_at_start} at the start, {load_average()} at the end.")  # fmt: skip


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return "unknown"


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
