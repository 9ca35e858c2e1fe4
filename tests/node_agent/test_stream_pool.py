"""Stream pool: ordering, deadlines, admission, displacement, the urgent lane, inline jobs."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from edgefleet_api.types import Priority
from node_agent.errors import DeadlineExceeded, Overloaded, ShuttingDown
from node_agent.runtime.stream_pool import PoolSettings, Refusal, StreamPool
from node_agent.runtime.urgency_queue import UrgencyQueue

P = Priority


class Recorder:
    """Collects on_done outcomes from worker threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: dict[str, tuple[Any, BaseException | None]] = {}
        self.all_done = threading.Event()
        self.expected = 0

    def cb(self, name: str) -> Callable[[Any, BaseException | None], None]:
        def on_done(result: Any, error: BaseException | None) -> None:
            with self.lock:
                assert name not in self.outcomes, f"{name} got two outcomes"
                self.outcomes[name] = (result, error)
                if len(self.outcomes) == self.expected:
                    self.all_done.set()

        return on_done


@pytest.fixture
def linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(16, 4).eval()


def gate_job(started: threading.Event, release: threading.Event) -> Callable[[object], str]:
    def fn(stream: object) -> str:
        started.set()
        assert release.wait(10)
        return "gate"

    return fn


def test_pool_runs_jobs_in_priority_then_deadline_order(linear: torch.nn.Module) -> None:
    ran: list[str] = []
    x = torch.randn(2, 16)

    def job(name: str) -> Callable[[object], torch.Tensor]:
        def fn(stream: object) -> torch.Tensor:
            ran.append(name)
            with torch.no_grad():
                return linear(x)

        return fn

    rec = Recorder()
    started, release = threading.Event(), threading.Event()
    with StreamPool(PoolSettings(num_workers=1, max_queued_jobs=16, urgent_workers=0)) as pool:
        rec.expected = 8
        assert pool.submit(gate_job(started, release), rec.cb("gate")) is None
        assert started.wait(5)
        far = time.monotonic() + 60
        plan = [
            ("low", P.LOW, None),
            ("normal-none", P.NORMAL, None),
            ("normal-far", P.NORMAL, far + 10),
            ("normal-near", P.NORMAL, far),
            ("high", P.HIGH, None),
            ("critical", P.CRITICAL, None),
            ("normal-none-2", P.NORMAL, None),
        ]
        for name, prio, deadline in plan:
            assert pool.submit(job(name), rec.cb(name), priority=prio, deadline_s=deadline) is None
        release.set()
        assert rec.all_done.wait(10)
    assert ran == [
        "critical", "high", "normal-near", "normal-far", "normal-none", "normal-none-2", "low"
    ]  # fmt: skip
    expected = linear(x).detach()
    for name in ran:
        result, error = rec.outcomes[name]
        assert error is None and torch.equal(result, expected)


def test_expired_job_is_never_run_and_caller_told(linear: torch.nn.Module) -> None:
    calls: list[str] = []

    def fn(stream: object) -> torch.Tensor:
        calls.append("expired-job")
        return linear(torch.ones(1, 16))

    rec = Recorder()
    rec.expected = 3
    started, release = threading.Event(), threading.Event()
    with StreamPool(PoolSettings(num_workers=1)) as pool:
        pool.submit(gate_job(started, release), rec.cb("gate"))
        assert started.wait(5)
        deadline = time.monotonic() + 0.05
        pool.submit(fn, rec.cb("expired"), deadline_s=deadline)
        pool.submit(lambda s: linear(torch.ones(1, 16)), rec.cb("fine"))
        while time.monotonic() <= deadline:  # let the deadline pass while the worker is busy
            time.sleep(0.01)
        release.set()
        assert rec.all_done.wait(10)
    assert calls == []
    result, error = rec.outcomes["expired"]
    assert result is None and isinstance(error, DeadlineExceeded)
    assert rec.outcomes["fine"][1] is None
    assert pool.expired == 1


def test_admission_refuses_at_bound_and_displaced_caller_gets_overloaded() -> None:
    rec = Recorder()
    rec.expected = 4
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []
    with StreamPool(PoolSettings(num_workers=1, max_queued_jobs=2)) as pool:
        pool.submit(gate_job(started, release), rec.cb("gate"))
        assert started.wait(5)
        work = torch.arange(8.0)

        def job(name: str) -> Callable[[object], float]:
            def fn(stream: object) -> float:
                ran.append(name)
                return float(work.sum())

            return fn

        assert pool.submit(job("n1"), rec.cb("n1")) is None
        assert pool.submit(job("n2"), rec.cb("n2")) is None
        refusal = pool.submit(job("n3"), rec.cb("n3"))
        assert isinstance(refusal, Refusal) and refusal.retry_after_s > 0
        assert isinstance(refusal.error(), Overloaded)
        assert "n3" not in rec.outcomes  # refused jobs get no callback: the caller has the refusal
        # a high-priority arrival displaces the least urgent (newest normal) job
        assert pool.submit(job("h1"), rec.cb("h1"), priority=P.HIGH) is None
        assert isinstance(rec.outcomes["n2"][1], Overloaded)
        release.set()
        assert rec.all_done.wait(10)
    assert ran == ["h1", "n1"]
    assert rec.outcomes["h1"] == (28.0, None) and rec.outcomes["n1"] == (28.0, None)
    assert pool.refused == 1 and pool.displaced == 1


def test_errors_reach_their_caller_and_worker_survives() -> None:
    rec = Recorder()
    rec.expected = 2
    with StreamPool(PoolSettings(num_workers=1)) as pool:
        pool.submit(lambda s: torch.ones(2, 3) @ torch.ones(4, 5), rec.cb("bad"))
        pool.submit(lambda s: torch.ones(2, 3) @ torch.ones(3, 5), rec.cb("good"))
        assert rec.all_done.wait(10)
    assert isinstance(rec.outcomes["bad"][1], RuntimeError)
    result, error = rec.outcomes["good"]
    assert error is None and torch.equal(result, torch.full((2, 5), 3.0))


def test_stop_fails_queued_jobs_with_shutting_down_and_refuses_new() -> None:
    rec = Recorder()
    rec.expected = 3
    started, release = threading.Event(), threading.Event()
    pool = StreamPool(PoolSettings(num_workers=1)).start()
    pool.submit(gate_job(started, release), rec.cb("gate"))
    assert started.wait(5)
    pool.submit(lambda s: torch.zeros(1), rec.cb("q1"))
    pool.submit(lambda s: torch.zeros(1), rec.cb("q2"))
    stopper = threading.Thread(target=pool.stop)
    stopper.start()
    deadline = time.monotonic() + 5
    while ("q1" not in rec.outcomes) and time.monotonic() < deadline:
        time.sleep(0.005)
    release.set()
    stopper.join(10)
    assert rec.all_done.wait(5)
    assert isinstance(rec.outcomes["q1"][1], ShuttingDown)
    assert isinstance(rec.outcomes["q2"][1], ShuttingDown)
    assert rec.outcomes["gate"] == ("gate", None)  # the running job finished
    with pytest.raises(ShuttingDown):
        pool.submit(lambda s: None, rec.cb("late"))


def test_two_workers_run_jobs_concurrently() -> None:
    """Both workers hold a job at once (each waits for the other to start)."""
    both = threading.Barrier(2, timeout=10)
    rec = Recorder()
    rec.expected = 2

    def fn(stream: object) -> float:
        both.wait()
        a = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
        return float((a @ a).trace())

    with StreamPool(PoolSettings(num_workers=2, torch_threads=0)) as pool:
        pool.submit(fn, rec.cb("a"))
        pool.submit(fn, rec.cb("b"))
        assert rec.all_done.wait(10)
    assert rec.outcomes["a"][1] is None and rec.outcomes["a"][0] == rec.outcomes["b"][0]


def test_a_stepping_job_yields_only_to_jobs_of_other_owners() -> None:
    """`should_yield(owner)` between steps: False while the queue is empty or holds only
    the same owner's jobs (the job serves them itself), True once another owner's job
    waits; each step is one service time for Retry-After."""
    rec = Recorder()
    rec.expected = 3
    answers: list[bool] = []
    steps = [threading.Event() for _ in range(3)]
    answered = threading.Event()

    with StreamPool(PoolSettings(num_workers=1)) as pool:
        assert not pool.should_yield()  # no job waits (and not on a job's thread)

        def stepping(stream: object) -> str:
            for step in steps:
                assert step.wait(5)
                answers.append(pool.should_yield("me"))
                answered.set()
            return "stepped"

        pool.submit(stepping, rec.cb("stepping"), owner="me")
        steps[0].set()  # nothing waits
        assert answered.wait(5)
        answered.clear()
        pool.submit(lambda s: "mine", rec.cb("mine"), owner="me")
        steps[1].set()  # only its own owner's job waits
        assert answered.wait(5)
        answered.clear()
        pool.submit(lambda s: "theirs", rec.cb("theirs"), owner="them", priority=P.LOW)
        steps[2].set()
        assert rec.all_done.wait(10)
    assert answers == [False, False, True]
    assert rec.outcomes["stepping"] == ("stepped", None)
    assert pool.completed == 3


@pytest.mark.parametrize("lane", [1, 0])
def test_the_urgent_lane_runs_critical_and_high_jobs_while_the_regular_worker_is_busy(lane: int) -> None:
    """An urgent worker takes CRITICAL and HIGH jobs only: with the regular worker inside a
    job, those run at once and a NORMAL one waits; without the lane, all wait."""
    rec = Recorder()
    rec.expected = 4
    started, release = threading.Event(), threading.Event()
    urgent_done = threading.Event()

    def urgent(name: str) -> Callable[[Any, BaseException | None], None]:
        cb = rec.cb(name)

        def on_done(result: Any, error: BaseException | None) -> None:
            cb(result, error)
            if {"critical", "high"} <= rec.outcomes.keys():
                urgent_done.set()

        return on_done

    with StreamPool(PoolSettings(num_workers=1, urgent_workers=lane)) as pool:
        assert pool.submit(gate_job(started, release), rec.cb("gate")) is None
        assert started.wait(5)
        pool.submit(lambda s: "normal", rec.cb("normal"), priority=P.NORMAL)
        pool.submit(lambda s: "high", urgent("high"), priority=P.HIGH)
        pool.submit(lambda s: "critical", urgent("critical"), priority=P.CRITICAL)
        assert urgent_done.wait(5 if lane else 0.3) == bool(lane)
        assert "normal" not in rec.outcomes  # never on the urgent lane
        release.set()
        assert rec.all_done.wait(10)
    assert {n: r for n, (r, _) in rec.outcomes.items()} == {
        "gate": "gate", "normal": "normal", "high": "high", "critical": "critical"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("lane", "lane_busy", "want"), [(1, False, False), (1, True, True), (0, False, False)]
)
def test_a_stepping_job_yields_to_its_own_urgent_job_only_when_the_lane_is_busy(
    lane: int, lane_busy: bool, want: bool
) -> None:
    """An urgent job of the same owner waits: the stepping job goes on if an urgent-lane worker
    is idle to take it (it has taken it, or is about to), yields if the lane is busy, and goes
    on without a lane (the owner's own order then, as for any job of the same owner)."""
    rec = Recorder()
    rec.expected = 2 + lane_busy
    step, answered = threading.Event(), threading.Event()
    answers: list[bool] = []
    lane_started, lane_release = threading.Event(), threading.Event()
    running = threading.Event()
    with StreamPool(PoolSettings(num_workers=1, urgent_workers=lane)) as pool:

        def stepping(stream: object) -> str:
            running.set()
            assert step.wait(5)
            answers.append(pool.should_yield("me"))
            answered.set()
            return "stepped"

        pool.submit(stepping, rec.cb("stepping"), owner="me")
        assert running.wait(5)
        if lane_busy:  # (the regular worker is busy: the lane takes it)
            pool.submit(gate_job(lane_started, lane_release), rec.cb("lane"), priority=P.CRITICAL)
            assert lane_started.wait(5)
        pool.submit(lambda s: "urgent", rec.cb("urgent"), priority=P.HIGH, owner="me")
        step.set()
        assert answered.wait(5)
        lane_release.set()
        assert rec.all_done.wait(10)
    assert answers == [want], (lane, lane_busy)


def test_jobs_cheaper_than_a_hand_off_run_inline_only_when_nothing_waits() -> None:
    """run_inline runs on the calling thread a job predicted under `inline_max_s`, and
    refuses (the caller then submits) an unmeasured or slower job, or any job while another
    waits in the queue (it would overtake it)."""
    rec = Recorder()
    rec.expected = 3
    here = threading.get_ident()
    ran_on: dict[str, int] = {}

    def job(tag: str) -> Callable[[Any], str]:
        def fn(stream: object) -> str:
            ran_on[tag] = threading.get_ident()
            return tag

        return fn

    with StreamPool(PoolSettings(num_workers=1, inline_max_s=1e-3)) as pool:
        assert pool.run_inline(job("tiny"), rec.cb("tiny"), predicted_s=50e-6)
        assert ran_on["tiny"] == here and rec.outcomes["tiny"] == ("tiny", None)
        assert not pool.run_inline(job("unmeasured"), rec.cb("unmeasured"), predicted_s=0.0)
        assert not pool.run_inline(job("slow"), rec.cb("slow"), predicted_s=5e-3)
        started, release = threading.Event(), threading.Event()
        pool.submit(gate_job(started, release), rec.cb("gate"))
        assert started.wait(5)
        pool.submit(job("queued"), rec.cb("queued"))
        assert not pool.run_inline(job("overtaker"), rec.cb("overtaker"), predicted_s=50e-6)
        release.set()
        assert rec.all_done.wait(10)  # tiny, gate, queued
        assert ran_on["queued"] != here
        errors: list[BaseException | None] = []
        assert pool.run_inline(lambda s: 1 / 0, lambda r, e: errors.append(e), predicted_s=50e-6)
        assert len(errors) == 1 and isinstance(errors[0], ZeroDivisionError)
        assert pool.inline == 2 and pool.completed == 4
    assert set(ran_on) == {"tiny", "queued"}


def test_inline_is_off_on_cuda_and_when_disabled() -> None:
    with StreamPool(PoolSettings(num_workers=1, inline_max_s=0.0)) as pool:
        assert not pool.run_inline(lambda s: None, lambda r, e: None, predicted_s=1e-9)
    with pytest.raises(ValueError, match="inline_max_s"):
        PoolSettings(inline_max_s=-1.0)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="num_workers"):
        PoolSettings(num_workers=0)
    with pytest.raises(ValueError, match="device"):
        PoolSettings(device="tpu")
    with pytest.raises(ValueError, match="bound"):
        UrgencyQueue(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_jobs_run_on_their_workers_stream() -> None:
    rec = Recorder()
    rec.expected = 4
    seen: list[int] = []
    with StreamPool(PoolSettings(num_workers=2, device="cuda")) as pool:
        stream_ids = {s.cuda_stream for s in pool.streams}
        assert len(stream_ids) == 3  # two regular workers and the urgent lane
        regular, urgent = pool.streams[:2], pool.streams[2]
        highest = torch.cuda.Stream.priority_range()[1]  # (lowest, highest); lower is higher
        assert urgent.priority == highest < regular[0].priority == regular[1].priority

        def fn(stream: Any) -> torch.Tensor:
            seen.append(torch.cuda.current_stream().cuda_stream)
            assert torch.cuda.current_stream() == stream
            a = torch.randn(256, 256, device="cuda", generator=None)
            return (a @ a.T).diagonal().min().cpu()  # synchronised by the pool

        for i in range(4):
            pool.submit(fn, rec.cb(str(i)))
        assert rec.all_done.wait(30)
    assert set(seen) <= stream_ids
    assert all(err is None and res >= 0 for res, err in rec.outcomes.values())


def test_spare_core_says_whether_the_workers_threads_leave_the_loop_a_core() -> None:
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()  # (start() sets torch's process-wide count)
    try:
        with StreamPool(PoolSettings(num_workers=1, torch_threads=cores)) as pool:
            assert pool.spare_core is False  # the model's threads take every core
        with StreamPool(PoolSettings(num_workers=1, torch_threads=1)) as pool:
            assert pool.spare_core is (cores > 1)
    finally:
        torch.set_num_threads(threads)
    assert StreamPool(PoolSettings(device="cuda")).spare_core  # (not started: no GPU needed)
