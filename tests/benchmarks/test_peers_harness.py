"""The pure parts of the server-vs-server benchmarks (bench.harness, bench.peers): the rate
search, the points, the verdicts, and the request formats' answer checks. No server runs here;
the sweep is driven by a fake trial whose p99 is a function of the rate."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import peers
from bench.common import Outcome, ReplayResult
from bench.harness import Point, Process, Sweep, Target, fixed_rate, in_flight_bound, next_rate
from bench.peer_servers.formats import (
    ModelSpec,
    check_native_json,
    check_v2_binary,
    check_v2_json,
    native_json_bodies,
    v2_binary_body,
    v2_json_bodies,
)
from bench.peer_servers.launch import Peer
from bench.peers import verdict

TARGET = 0.2


def point(rate: float, p99: float, sent: int = 100, errors: int = 0) -> Point:
    outcomes = [Outcome(i / rate, p99, "RuntimeError" if i < errors else None) for i in range(sent)]
    return Point(rate, ReplayResult(outcomes, sent / rate), sent, TARGET)


def test_point_meets_the_target_only_within_p99_and_one_percent_errors() -> None:
    assert point(10, 0.1).meets
    assert not point(10, 0.3).meets
    assert not point(10, 0.1, errors=2).meets
    assert point(10, 0.1, errors=1).meets
    merged = point(10, 0.1).merged(point(10, 0.3))
    assert merged.sent == 200 and merged.p99 == pytest.approx(0.3)
    assert point(10, 0.1, sent=100, errors=100).p99 == float("inf")


def test_next_rate_grows_then_halves_then_bisects_then_stops() -> None:
    assert next_rate(16, None, None, 0, 2) == 16
    assert next_rate(16, point(16, 0.1), None, 0, 2) == 24
    assert next_rate(16, None, point(16, 1.0), 0, 2) == 8
    assert next_rate(16, None, point(1.5, 1.0), 0, 2) is None  # would go below 1/s
    assert next_rate(16, point(24, 0.1), point(36, 1.0), 0, 2) == 30
    assert next_rate(16, point(24, 0.1), point(36, 1.0), 2, 2) is None  # bisections used up
    assert next_rate(16, point(24, 0.1), point(25, 1.0), 0, 2) is None  # within 5%


class FakeProcess(Process):
    """A server process that is only paused and continued."""

    def __init__(self) -> None:
        self.paused = False

    def pause(self, paused: bool) -> None:
        self.paused = paused


def fake_target(name: str, process: Process | None = None) -> Target:
    return Target(name, process or FakeProcess(), "http://127.0.0.1:1/", [b""], {}, lambda *_: None, "")


def test_each_trial_runs_with_every_other_server_paused() -> None:
    """Two formats of one server and a second server: in each trial only the measured target's
    server runs; `alone(None)` continues them all."""
    ours, peer = FakeProcess(), FakeProcess()
    targets = [fake_target("ours json", ours), fake_target("ours binary", ours), fake_target("peer", peer)]
    running: list[tuple[str, bool, bool]] = []

    async def trial(
        _session: Any, t: Target, rate: float, seconds: float, seed: int, target_s: float
    ) -> Point:
        running.append((t.name, not ours.paused, not peer.paused))
        return point(rate, 0.05)

    sweep = Sweep(None, targets, 2.0, TARGET, trial=trial, settle_s=0.0)  # type: ignore[arg-type]
    asyncio.run(sweep.paired(targets, 10.0, seed=0))
    assert running == [
        ("ours json", True, False), ("ours binary", True, False), ("peer", False, True),
        ("peer", False, True), ("ours binary", True, False), ("ours json", True, False),
    ]  # fmt: skip
    sweep.alone(None)
    assert not ours.paused and not peer.paused


def test_the_in_flight_bound_is_what_a_server_meeting_the_target_holds() -> None:
    assert in_flight_bound(100, 0.2) == 256  # at least the connections
    assert in_flight_bound(7000, 0.2) == 1400  # rate x target (Little's law)


def test_sweep_finds_each_servers_capacity_and_logs_every_point() -> None:
    """Two fake servers whose p99 crosses the target at 100/s and 30/s: the search ends just
    below each capacity, and every point measured is in the log."""
    capacity = {"fast": 100.0, "slow": 30.0}
    calls: list[tuple[str, float]] = []

    async def trial(
        _session: Any, t: Target, rate: float, seconds: float, seed: int, target_s: float
    ) -> Point:
        calls.append((t.name, rate))
        return point(rate, 0.05 if rate <= capacity[t.name] else 5.0)

    targets = [fake_target("fast"), fake_target("slow")]
    sweep = Sweep(None, targets, 2.0, TARGET, trial=trial, settle_s=0.0)  # type: ignore[arg-type]
    best = asyncio.run(sweep.sustainable_rates(start=16))
    fast, slow = best["fast"], best["slow"]
    assert fast is not None and slow is not None
    assert 0.8 * capacity["fast"] <= fast.rate <= capacity["fast"]
    assert 0.8 * capacity["slow"] <= slow.rate <= capacity["slow"]
    # halves in A B B A order at a shared rate: each server twice per rate
    assert calls[:4] == [("fast", 16), ("slow", 16), ("slow", 16), ("fast", 16)]
    assert [p.rate for p in sweep.log["slow"]] == sorted(
        {r for n, r in calls if n == "slow"}, key=[r for n, r in calls if n == "slow"].index
    )


def test_a_near_miss_is_measured_again_and_counts_only_if_repeated() -> None:
    seen: list[float] = []

    async def trial(
        _session: Any, t: Target, rate: float, seconds: float, seed: int, target_s: float
    ) -> Point:
        seen.append(rate)
        hiccup = rate == 16 and len(seen) <= 2  # both halves of the first point miss, narrowly
        return point(rate, 0.3 if hiccup else (0.05 if rate < 50 else 5.0))

    sweep = Sweep(None, [fake_target("a")], 2.0, TARGET, trial=trial, settle_s=0.0)  # type: ignore[arg-type]
    best = asyncio.run(sweep.sustainable_rates(start=16))
    assert best["a"] is not None and best["a"].rate >= 36
    assert [p.meets for p in sweep.log["a"][:2]] == [False, True]  # the miss, then the retry at 16/s


def test_verdict_compares_our_best_format_with_the_strongest_peer() -> None:
    best = {
        "edgefleet agent v2 JSON [m]": point(400, 0.1),
        "edgefleet agent v2 binary [m]": point(600, 0.1),
        "KServe v2 JSON [m]": point(100, 0.1),
        "Ray Serve [m]": point(250, 0.1),
        "TorchServe [m]": None,
    }
    line = verdict("m/1", best, list(best))
    assert "**2.40x**" in line and "**met**" in line and "edgefleet agent v2 binary" in line
    assert "Ray Serve" in line and "TorchServe (none met)" in line
    best["Ray Serve [m]"] = point(400, 0.1)
    line = verdict("m/1", best, list(best))
    assert "**1.50x**" in line and "not met, 1.33x short" in line
    assert "no peer measured" in verdict(
        "m/1", {"edgefleet agent v2 JSON [m]": point(1, 0.1)}, ["edgefleet agent v2 JSON [m]"]
    )


def test_fixed_rate_is_seventy_percent_of_the_lowest_sustainable_rate() -> None:
    assert fixed_rate({"a": point(100, 0.1), "b": point(50, 0.1), "c": None}, 5.0) == pytest.approx(35)
    assert fixed_rate({"a": point(4, 0.1)}, 5.0) == 5.0  # the floor
    assert fixed_rate({"a": None}, 1.0) == 1.0


SPEC = ModelSpec("classifier", "1", str(Path("model.pt")), "image", (3, 4, 4), "logits", 10, 16, 0.005)


def test_request_bodies_carry_one_row_and_the_checks_reject_a_wrong_answer() -> None:
    rows = SPEC.rows(2)
    assert rows[0].shape == (1, 3, 4, 4) and not np.array_equal(rows[0], rows[1])
    doc = json.loads(v2_json_bodies(SPEC, rows)[0])
    assert doc["inputs"][0]["shape"] == [1, 3, 4, 4] and len(doc["inputs"][0]["data"]) == 48
    body, header_len = v2_binary_body(SPEC, rows[0])
    head = json.loads(body[: int(header_len)])
    assert head["inputs"][0]["parameters"]["binary_data_size"] == 48 * 4
    assert np.array_equal(np.frombuffer(body[int(header_len) :], np.float32), rows[0].ravel())
    assert len(json.loads(native_json_bodies(rows)[0])["inputs"]) == 48

    check_v2_json(10)(json.dumps({"outputs": [{"data": [0.0] * 10}]}).encode(), {})
    with pytest.raises(ValueError):
        check_v2_json(10)(json.dumps({"outputs": [{"data": [0.0] * 9}]}).encode(), {})
    check_v2_binary(10)(b"{}" + bytes(40), {"Inference-Header-Content-Length": "2"})
    with pytest.raises(ValueError):
        check_v2_binary(10)(b"{}" + bytes(36), {"Inference-Header-Content-Length": "2"})
    check_native_json(4)(json.dumps({"outputs": [[1, 2, 3, 4]]}).encode(), {})
    with pytest.raises(ValueError):
        check_native_json(4)(json.dumps({"outputs": [1, 2, 3]}).encode(), {})


def test_a_trial_at_a_low_rate_runs_long_enough_for_a_few_requests() -> None:
    seconds: list[float] = []

    async def trial(_session: Any, t: Target, rate: float, s: float, seed: int, target_s: float) -> Point:
        seconds.append(s)
        return point(rate, 0.05)

    sweep = Sweep(None, [fake_target("a")], 2.0, TARGET, trial=trial, settle_s=0.0)  # type: ignore[arg-type]
    asyncio.run(sweep.paired(sweep.targets, 1.0, seed=0))
    asyncio.run(sweep.paired(sweep.targets, 100.0, seed=0))
    assert seconds == [6.0, 6.0, 1.0, 1.0]  # halves: >= 6 requests each at 1/s; as asked at 100/s


class StoppableProcess(FakeProcess):
    def __init__(self) -> None:
        super().__init__()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def tail(self, lines: int = 30) -> str:
        return "its log"


@pytest.mark.parametrize("failures", [1, 2])
def test_a_server_that_does_not_start_is_launched_once_more(
    failures: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer whose first launch never gets ready (a port taken before it bound it) is stopped and
    launched afresh; only a second failure leaves it out, noted."""
    launches: list[StoppableProcess] = []

    def start(_python: Path, _specs: list[ModelSpec], workdir: Path) -> tuple[Process, list[Target]]:
        assert workdir.is_dir()
        process = StoppableProcess()
        launches.append(process)
        return process, [fake_target("peer [m]", process)]

    async def wait_ready(_session: Any, t: Target, timeout_s: float = 420) -> None:
        if len(launches) <= failures:
            raise RuntimeError("not ready")

    monkeypatch.setattr(peers, "wait_ready", wait_ready)
    peer = Peer("peer", "Peer 1.0", (), "", "", start)
    notes: list[str] = []
    processes, ready = asyncio.run(peers.start_all([(peer, Path("python"))], [], tmp_path, notes, None))  # type: ignore[arg-type]
    assert len(launches) == 2 and launches[0].stopped
    if failures == 1:
        assert processes == [launches[1]] and [t.process for t in ready] == [launches[1]] and not notes
    else:
        assert launches[1].stopped and processes == [] and ready == []
        assert len(notes) == 1 and "did not start (twice)" in notes[0]
