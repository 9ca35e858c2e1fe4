"""A 10x flood against a real agent on loopback (issue 16, "overload that answers fast").

The agent serves the example repository's slow model (`classifier/2-slow`, no SLA: its
requests' budget is `admission.DEFAULT_BUDGET_S`), one pool worker, over real HTTP. Its
capacity is measured closed-loop first, then it is flooded open-loop at ten times that for a
few seconds. Invariants:
- every request gets exactly one answer, 200 or 429 (with a whole-second Retry-After), and
  nothing hangs;
- admitted requests finish within their budget (loosely: three times it, seen from the client,
  where the old fixed queue bound let them wait a minute); refusals are fast (p99 < 1 s here,
  on a loaded 2-core machine; the 10 ms goal is the benchmark's) and `/v2/health/live` stays
  fast throughout;
- a client that disconnects while its request is queued has its rows dropped, never run:
  every row sent is either run or counted in `edgefleet_abandoned_rows_total`.
Timed bounds are loose on purpose: they separate the behaviour from the old one (tens of
seconds), not fast machines from slow ones.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from node_agent.agent import AgentSettings
from node_agent.runtime.admission import DEFAULT_BUDGET_S
from node_agent.runtime.batcher import Batcher
from node_agent.serving.connections import ConnectionLimits
from node_agent.serving.http import HttpSettings
from tests.faults.overload_support import MODEL, PATH, VERSION, body
from tests.node_agent.agent_runner import RunningAgent

FLOOD_FACTOR = 10
FLOOD_S = 2.5
ROWS = 4
"""Rows per request of the flood: the model, not the HTTP layer, is what 10x its capacity
overloads (at one row, ten times the model's requests per second is near what the event loop
can parse and answer on a shared 2-core machine)."""


@pytest.fixture(scope="module")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from node_agent.examples import make_examples

    root = tmp_path_factory.mktemp("overload-repo")
    make_examples(root)
    return root


@pytest.fixture(scope="module")
def agent(example_repo: Path) -> Iterator[RunningAgent]:
    limits = ConnectionLimits(max_connections=4096, max_connections_per_peer=4096)
    http = HttpSettings(host="127.0.0.1", port=0, connections=limits)
    running = RunningAgent(AgentSettings(example_repo, workers=1, http=http, thermal_source="off"))
    yield running
    running.close()


def batcher(agent: RunningAgent) -> Batcher:
    """The slow model's batcher (made on the agent's loop if it is not yet)."""
    engine = agent.agent.engine
    assert engine is not None

    async def get() -> Batcher:
        return engine.batcher(MODEL, VERSION)

    return agent.call(get())


def client(*args: object) -> object:
    """Run `overload_support` in a process of its own (the flood's client must not share the
    agent's interpreter lock); its JSON answer."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.faults.overload_support", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def test_a_10x_flood_gets_fast_refusals_and_admitted_requests_meet_their_budget(agent: RunningAgent) -> None:
    url = f"http://{agent.url}"
    cap = client("capacity", url, 2.0, ROWS)
    assert isinstance(cap, float) and cap > 0
    got = client("flood", url, FLOOD_FACTOR * cap, FLOOD_S, ROWS)
    assert isinstance(got, dict)
    assert not got["errors"], f"{len(got['errors'])} requests got no answer, e.g. {got['errors'][0]}"
    outcomes, live = got["outcomes"], got["live"]

    statuses = {s for s, _, _ in outcomes}
    assert statuses <= {200, 429}, statuses
    admitted = [t for s, t, _ in outcomes if s == 200]
    refused = [(t, r) for s, t, r in outcomes if s == 429]
    summary = (
        f"capacity {cap:.0f} req/s of {ROWS} rows; {len(outcomes)} requests: {len(admitted)} admitted "
        f"(p99 {p(admitted, 99):.3f} s), {len(refused)} refused (p50 "
        f"{p([t for t, _ in refused], 50) * 1e3:.1f} ms, p99 {p([t for t, _ in refused], 99) * 1e3:.1f} "
        f"ms); live p99 {p(live, 99) * 1e3:.1f} ms"
    )
    print(summary)
    assert len(outcomes) == int(FLOOD_FACTOR * cap * FLOOD_S), summary
    assert admitted and refused, summary
    # refusals carry a Retry-After in whole seconds, >= 1, and seconds, not minutes
    assert all(r is not None and r.isdigit() and 1 <= int(r) <= 10 for _, r in refused), summary
    assert p([t for t, _ in refused], 99) < 1.0, summary
    # seen from the client: the time before admission (the agent's loop busy refusing the
    # flood) is not in the budget the agent plans with
    assert p(admitted, 99) < 3 * DEFAULT_BUDGET_S, summary
    assert max(live) < 1.0, summary
    b = batcher(agent)
    assert b.refused_late > 0 and b.refused_too_large == 0


def test_a_request_larger_than_the_model_can_ever_serve_gets_413_with_the_limit(agent: RunningAgent) -> None:
    """Retrying cannot help such a request, so 413 (not 503 or 429), no Retry-After, and the
    limit in the message: 5,000 rows of the fast `mlp/1` (past the queue's hard cap of 4,096
    rows, the issue's case), and 1,000 rows of the slow model (more than it serves within the
    1 s budget even with nothing queued)."""
    url = f"http://{agent.url}"
    features = np.zeros((5000, 32), np.float32)
    mlp = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [5000, 32],
                    "data": features.ravel().tolist(),
                }
            ]
        }
    ).encode()
    slow, slow_headers = body(1000)

    async def main() -> list[tuple[int, str, str | None]]:
        out = []
        async with aiohttp.ClientSession() as session:
            for path, payload, headers in (
                ("/v2/models/mlp/versions/1/infer", mlp, {"Content-Type": "application/json"}),
                (PATH, slow, slow_headers),
            ):
                async with session.post(url + path, data=payload, headers=headers) as resp:
                    out.append((resp.status, (await resp.json())["error"], resp.headers.get("Retry-After")))
        return out

    (status, error, retry), (slow_status, slow_error, slow_retry) = asyncio.run(main())
    assert status == 413 and retry is None, (status, error)
    assert "at most 4096 rows (got 5000)" in error, error
    assert slow_status == 413 and slow_retry is None, (slow_status, slow_error)
    assert "at most" in slow_error and "rows (got 1000)" in slow_error, slow_error


def _send(port: int, payload: bytes, headers: dict[str, str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode() + payload)
    return sock


def _answered(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)


def test_work_of_a_client_that_disconnected_is_dropped_before_it_runs(agent: RunningAgent) -> None:
    """Four 16-row requests occupy the model; three 4-row requests queue behind them and their
    clients hang up. Every row sent is then either run or dropped as abandoned, and some were
    dropped (they were queued, not running, when their clients went)."""
    b = batcher(agent)
    rows_before, abandoned_before = b.rows_run, b.abandoned_rows
    # with a timeout long enough that neither admission (whatever rate the flood before left
    # it measuring) nor shedding turns them away
    filler, filler_headers = body(16, seed=1, timeout_s=30)
    small, small_headers = body(4, seed=2, timeout_s=30)
    fillers = [_send(agent.port, filler, filler_headers) for _ in range(4)]
    time.sleep(0.05)
    gone = [_send(agent.port, small, small_headers) for _ in range(3)]
    time.sleep(0.03)  # read and queued (behind 64 rows: this model runs ~100-200 rows/s)
    refused_rows = 0
    for sock in gone:
        if _answered(sock):  # refused (429) or already done: it did not go away while queued
            refused_rows += 4 if b"429" in sock.recv(64) else 0
        sock.close()
    for sock in fillers:
        sock.settimeout(30)
        assert sock.recv(64).startswith(b"HTTP/1.1 200"), "a filler was not served"
        sock.close()
    deadline = time.monotonic() + 10
    while b.queued_rows() or b.batches_out:  # the rest of the queue ran or was dropped
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.02)
    ran = b.rows_run - rows_before
    dropped = b.abandoned_rows - abandoned_before
    assert dropped > 0, (ran, dropped, refused_rows)
    assert ran + dropped + refused_rows == 4 * 16 + 3 * 4, (ran, dropped, refused_rows)

    async def scrape() -> str:
        async with aiohttp.ClientSession() as session, session.get(f"http://{agent.url}/metrics") as resp:
            return await resp.text()

    metrics = asyncio.run(scrape())
    line = f'edgefleet_abandoned_rows_total{{model="{MODEL}",version="{VERSION}"}}'
    assert any(m.startswith(line) and float(m.split()[-1]) >= dropped for m in metrics.splitlines()), line
