"""The server-vs-server harness: peers' virtualenvs, server processes, and the sweep.

Shared by bench.vs_mlserver and bench.peers, so every server is measured by the same code:
- a peer lives in its own virtualenv under the user's cache dir, installed from PyPI at a pinned
  version, with the project's torch made importable there (the same build on both sides, and no
  multi-GB download) through a `.pth` file naming a folder of symlinks to torch and its
  dependency closure (appended to sys.path, so the venv's own packages come first);
- a `Target` is one server spoken to in one request format: its URL, the request bodies (built
  once up front), and a check of every answer;
- the load is open-loop Poisson arrivals from this process (asyncio + aiohttp, loopback only),
  latency from the scheduled arrival, so a server that falls behind is charged for it; every
  trial is bounded in requests (rate x seconds, at most `in_flight_bound` at once: what a
  server meeting the p99 target could hold at that rate) and time, over at most
  MAX_CONNECTIONS connections (a request waiting for one is in flight, its wait in its latency);
- while one server is measured the others are paused (SIGSTOP to their process groups), so
  an idle peer's background work (a polling loop, a cluster's heartbeats) taxes no other;
- `Sweep` measures the targets at the same rates, alternating them in A B .. B A halves (drift in
  the shared machine's background load hits all alike): the highest rate meeting a p99 target
  (x1.5 steps, then bisection), and p99 at a fixed rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata as md
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import aiohttp

from bench.common import ReplayResult, poisson_trace, replay

REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256
"""Connections per server (the load generator's pool): what a proxy in front would hold."""
MIN_REQUESTS = 6
"""Expected requests per trial at least (a trial at a low rate runs longer)."""
RESUME_SETTLE_S = 0.3
"""After a paused server resumes, before its trial starts."""
ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgefleet"


# --- peers' virtualenvs ------------------------------------------------------------------


def torch_closure() -> set[str]:
    """Distributions torch needs here (its requirements, recursively, markers evaluated)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, frozenset[str]] = {}
    todo: list[tuple[str, frozenset[str]]] = [("torch", frozenset())]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in seen and extras <= seen[key]:
            continue
        seen[key] = seen.get(key, frozenset()) | extras
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in (extras or {""})]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return set(seen)


def link_torch(venv: Path) -> None:
    """Make the project's torch importable in `venv`: symlinks to the top-level files of torch
    and of every dependency `venv` lacks, in a folder a `.pth` file appends to sys.path (so the
    venv's own packages come first)."""
    from packaging.utils import canonicalize_name

    site = Path(
        subprocess.check_output(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
            cwd=venv,
        ).strip()
    )
    have = {canonicalize_name(p.name.split("-")[0]) for p in site.glob("*.dist-info")}
    links = venv / "edgefleet-torch"
    shutil.rmtree(links, ignore_errors=True)
    links.mkdir()
    for name in sorted(torch_closure()):
        if name in have and name != "torch":
            continue
        dist = md.distribution(name)
        base = Path(str(dist.locate_file("")))
        tops = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] not in ("..", "__pycache__")}
        for top in sorted(tops):
            if (base / top).exists() and not (links / top).exists():
                (links / top).symlink_to(base / top)
    (site / "edgefleet_torch.pth").write_text(str(links) + "\n")


def ensure_venv(venv: Path, requirements: Sequence[str], check: str, log: list[str]) -> Path | None:
    """`venv`'s python with `requirements` installed (pip, on first use or when they change) and
    the project's torch linked in; None, with why in `log`, if pip fails or `check` (Python
    source run there) does not succeed."""
    python = venv / "bin" / "python"
    marker = venv / ".edgefleet-ready"
    recipe = " ".join(requirements)
    if marker.exists() and marker.read_text().strip() == recipe:
        return python
    print(f"installing {recipe} into {venv} (first run only; minutes) ...", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = (
        []
        if python.exists()
        else [[getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)]]
    )
    steps.append([str(python), "-m", "pip", "install", "--quiet", *requirements])
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=venv.parent)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            log.append(f"`{' '.join(cmd[2:])}` failed: " + " / ".join(tail))
            return None
    link_torch(venv)
    done = subprocess.run([str(python), "-c", check], capture_output=True, text=True, timeout=600, cwd=venv)
    if done.returncode != 0:
        log.append(f"`{check}` fails in {venv.name}: " + " / ".join(done.stderr.strip().splitlines()[-3:]))
        return None
    marker.write_text(recipe + "\n")
    return python


# --- servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A server process in its own session (so stop() ends its children too), output to a log.
    Every one started is in `Process.started` until stopped (`stop_all` on the way out)."""

    started: ClassVar[list[Process]] = []

    def __init__(
        self, name: str, cmd: Sequence[str], log: Path, cwd: Path = ROOT, env: Mapping[str, str] | None = None
    ) -> None:
        self.name, self.log = name, log
        out = open(log, "wb")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else dict(env),
        )
        Process.started.append(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def terminate(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)  # (a paused group takes no SIGTERM)
                os.killpg(self.proc.pid, signal.SIGTERM)

    def pause(self, paused: bool) -> None:
        """Stop (SIGSTOP) or continue (SIGCONT) its whole process group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM to its process group, 30 s to exit, then SIGKILL to what is left of the group."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ValueError):
            Process.started.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for process in cls.started:  # all at once, then wait for each
            process.terminate()
        for process in list(cls.started):
            process.stop()


def interrupt_on_sigterm() -> None:
    """SIGTERM ends a benchmark as Ctrl-C does (asyncio cancels its tasks, `finally` blocks run)."""

    def handler(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


Check = Callable[[bytes, Mapping[str, str]], None]
"""Raises unless a 200 answer's body (and headers) holds the expected output."""


@dataclass
class Target:
    """One server in one request format: what the sweep loads."""

    name: str
    process: Process
    url: str
    bodies: list[bytes]
    headers: dict[str, str]
    check: Check
    ready_url: str
    ready: Callable[[int, bytes], bool] = lambda status, _body: status == 200


async def wait_ready(session: aiohttp.ClientSession, target: Target, timeout_s: float = 420) -> None:
    """Until `target.ready_url` answers ready and one request gets a checked answer."""
    give_up = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < give_up:
        if not target.process.alive():
            raise RuntimeError(f"{target.name} exited with status {target.process.proc.returncode}")
        try:
            async with session.get(target.ready_url) as resp:
                if target.ready(resp.status, await resp.read()):
                    await send(session, target, 0)
                    return
                last = f"{target.ready_url}: HTTP {resp.status}"
        except (TimeoutError, aiohttp.ClientError, RuntimeError, ValueError, KeyError) as e:
            last = f"{type(e).__name__}: {e}"
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{target.name} not ready after {timeout_s:.0f} s (last: {last})")


async def send(session: aiohttp.ClientSession, target: Target, i: int) -> None:
    async with session.post(
        target.url, data=target.bodies[i % len(target.bodies)], headers=target.headers
    ) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
        target.check(body, resp.headers)


# --- load and sweep ----------------------------------------------------------------------


@dataclass
class Point:
    """One trial: `sent` requests offered at `rate`, against a p99 target `target_s`."""

    rate: float
    result: ReplayResult
    sent: int
    target_s: float
    why: Counter[str] = field(default_factory=Counter)
    """The failed requests' errors, by message."""

    @property
    def p99(self) -> float:
        return self.result.p(99) if self.result.ok() else float("inf")

    @property
    def error_ratio(self) -> float:
        return 1 - len(self.result.ok()) / self.sent if self.sent else 0.0

    @property
    def meets(self) -> bool:
        return self.p99 <= self.target_s and self.sent - len(self.result.ok()) <= 0.01 * self.sent

    def merged(self, other: Point) -> Point:
        assert self.rate == other.rate
        result = ReplayResult(
            self.result.outcomes + other.result.outcomes, self.result.duration_s + other.result.duration_s
        )
        return Point(self.rate, result, self.sent + other.sent, self.target_s, self.why + other.why)


def in_flight_bound(rate: float, target_s: float) -> int:
    """Requests a trial lets be in flight at once before it counts one more as an error: what a
    server answering within the p99 target holds at `rate` (Little's law, rate x target), at
    least MAX_CONNECTIONS. (A fixed bound below rate x target would fail a server for a burst
    the p99 target allows.)"""
    return max(MAX_CONNECTIONS, math.ceil(rate * target_s))


async def run_point(
    session: aiohttp.ClientSession, target: Target, rate: float, seconds: float, seed: int, target_s: float
) -> Point:
    """Open-loop Poisson arrivals at `rate` for `seconds` (at most rate x seconds requests)."""
    arrivals = poisson_trace(rate, seconds, seed)
    gate = asyncio.Semaphore(in_flight_bound(rate, target_s))
    why: Counter[str] = Counter()

    async def call(i: int) -> None:
        try:
            if gate.locked():
                raise RuntimeError("too many requests in flight")  # counts as an error, bounded
            async with gate:
                await send(session, target, i)
        except Exception as e:
            why[f"{type(e).__name__}: {e}"[:80]] += 1
            raise

    result = await replay(arrivals, call)
    await asyncio.sleep(0.3)  # let the server's queues drain before the next point
    return Point(rate, result, len(arrivals), target_s, why)


def fmt_ms(s: float) -> str:
    return "inf" if s == float("inf") else f"{s * 1e3:.0f} ms"


def next_rate(
    start: float, good: Point | None, bad: Point | None, bisected: int, bisections: int
) -> float | None:
    """The next rate to try for one target, None when its search is over: `start` first; x1.5
    while every rate met the target; halving (down to 1/s) while none did; then `bisections`
    midpoints between the best good and the lowest bad rate, while they are >5% apart."""
    if good is None and bad is None:
        return start
    if bad is None:
        assert good is not None
        return good.rate * 1.5
    if good is None:
        return bad.rate * 0.5 if bad.rate * 0.5 >= 1.0 else None
    if bisected < bisections and bad.rate > good.rate * 1.05:
        return (good.rate + bad.rate) / 2
    return None


@dataclass
class Sweep:
    """Measures `targets` at the same rates, alternating them in A B .. B A halves. A target that
    misses the p99 narrowly (under 3x the target) is measured once more there and fails the rate
    only if it misses again (one hiccup of the machine should not end a sweep); the same rule for
    every target. `log` keeps every point measured, per target name."""

    session: aiohttp.ClientSession
    targets: list[Target]
    seconds: float
    target_s: float
    bisections: int = 2
    log: dict[str, list[Point]] = field(default_factory=dict)
    trial: Callable[..., Awaitable[Point]] | None = None
    """What measures one point (run_point's signature; None: run_point)."""
    running: Process | None = None
    """The one server not paused (None: none paused)."""
    settle_s: float = RESUME_SETTLE_S

    def __post_init__(self) -> None:
        for t in self.targets:
            self.log.setdefault(t.name, [])

    async def _trial(self, t: Target, rate: float, seconds: float, seed: int) -> Point:
        seconds = max(seconds, MIN_REQUESTS / rate)  # a low rate still gets a p99 of something
        if self.alone(t):  # its timers that fell due while paused fire (idle connections close)
            await asyncio.sleep(self.settle_s)
        return await (self.trial or run_point)(self.session, t, rate, seconds, seed, self.target_s)

    def alone(self, t: Target | None) -> bool:
        """`t`'s server running and every other target's paused (None: all running). True if
        `t`'s server was paused until now."""
        for p in {id(x.process): x.process for x in self.targets}.values():
            if t is None or p is not t.process:
                p.pause(t is not None)
        if t is None:
            self.running = None
            return False
        resumed, self.running = self.running is not t.process, t.process
        t.process.pause(False)
        return resumed

    async def paired(self, targets: list[Target], rate: float, seed: int) -> dict[str, Point]:
        halves: dict[str, list[Point]] = {t.name: [] for t in targets}
        for k, t in enumerate([*targets, *reversed(targets)]):
            halves[t.name].append(await self._trial(t, rate, self.seconds / 2, seed + k))
        return {name: h[0].merged(h[1]) for name, h in halves.items()}

    async def at(self, targets: list[Target], rate: float, seed: int) -> dict[str, Point]:
        points = await self.paired(targets, rate, seed)
        for t in targets:
            point = points[t.name]
            self.show(t, point)
            if not point.meets and point.p99 < 3 * self.target_s:  # near miss: maybe a hiccup
                self.log[t.name].append(point)
                point = points[t.name] = await self._trial(t, rate, self.seconds, seed + 50)
                self.show(t, point, again=True)
            self.log[t.name].append(point)
        return points

    def show(self, t: Target, p: Point, again: bool = False) -> None:
        print(
            f"  {t.name}: {p.rate:.1f}/s{' (again)' if again else ''} -> p50 {fmt_ms(p.result.p(50))}, "
            f"p99 {fmt_ms(p.p99)}, errors {p.error_ratio:.1%}"
            + (f" (most: {p.why.most_common(1)[0][0]})" if p.why else ""),
            flush=True,
        )

    async def sustainable_rates(self, start: float, max_steps: int = 24) -> dict[str, Point | None]:
        """Per target, the point at the highest rate meeting the p99 (None: no rate tried did),
        searched by `next_rate`; targets due at the same rate are measured together (`paired`)."""
        lo: dict[str, Point | None] = {t.name: None for t in self.targets}
        hi: dict[str, Point | None] = {t.name: None for t in self.targets}
        bisected = {t.name: 0 for t in self.targets}
        for step in range(max_steps):
            due: dict[float, list[Target]] = {}
            for t in self.targets:
                r = next_rate(start, lo[t.name], hi[t.name], bisected[t.name], self.bisections)
                if r is not None:
                    if lo[t.name] is not None and hi[t.name] is not None:
                        bisected[t.name] += 1
                    due.setdefault(round(r, 3), []).append(t)
            if not due:
                break
            for r, group in sorted(due.items()):
                points = await self.at(group, r, seed=10 * step)
                for t in group:
                    if points[t.name].meets:
                        lo[t.name] = points[t.name]
                    else:
                        hi[t.name] = points[t.name]
        return lo


def fixed_rate(best: Mapping[str, Point | None], floor: float) -> float:
    """70% of the lowest sustainable rate among the targets that met the p99 somewhere, at least
    `floor` (a target meeting it nowhere is measured there too)."""
    rates = [p.rate for p in best.values() if p is not None]
    return max(floor, 0.7 * min(rates)) if rates else floor


@dataclass
class Comparison:
    """What `compare` measured: per target name, the point at the highest rate meeting the p99
    (None: none did), the point at the fixed rate, and every point of the sweep."""

    best: dict[str, Point | None]
    fixed: float
    fixed_seconds: float
    at_fixed: dict[str, Point]
    log: dict[str, list[Point]]


async def compare(session: aiohttp.ClientSession, targets: list[Target], target_s: float, *, start: float,
                  seconds: float, fixed_seconds: float, floor: float, quick: bool) -> Comparison:  # fmt: skip
    """Warm every target up, sweep them for requests/s at the p99 `target_s`, then measure p99
    at `fixed_rate` (a quick run: only 1 s at 8/s each, no sweep)."""
    for t in targets:  # TorchScript's profiling executor specialises per batch shape: batches of many sizes
        await run_point(session, t, 10.0 if quick else 40.0, 0.5 if quick else 2.0, seed=7, target_s=target_s)
    sweep = Sweep(session, targets, seconds, target_s)
    try:
        if quick:
            at_fixed = await sweep.paired(targets, 8.0, seed=1)
            for t in targets:
                sweep.show(t, at_fixed[t.name])
            return Comparison({}, 8.0, 1.0, at_fixed, {})
        print(f"sweep: p99 target {fmt_ms(target_s)}, {seconds:.0f} s per target and rate", flush=True)
        best = await sweep.sustainable_rates(start=start)
        fixed = fixed_rate(best, floor)
        print(f"fixed rate {fixed:.1f}/s", flush=True)
        await asyncio.sleep(2.0)  # an overload just measured is over
        sweep.seconds = fixed_seconds
        at_fixed = await sweep.paired(targets, fixed, seed=42)
        for t in targets:
            sweep.show(t, at_fixed[t.name])
        return Comparison(best, fixed, fixed_seconds, at_fixed, sweep.log)
    finally:
        sweep.alone(None)
