"""Load controls: Limits, Controls, LimitedPolicy, and the ConcurrencyGate on a real
scheduler and a real engine."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet_api.types import ModelId, Priority
from node_agent.control.mitigation import NO_LIMITS, ConcurrencyGate, Controls, LimitedPolicy, Limits
from node_agent.runtime.batching_policy import BatchingDecision, StaticPolicy
from node_agent.runtime.engine import Engine
from node_agent.runtime.repository import ModelRepository
from node_agent.runtime.scheduler import ModelScheduler, UnloadOutcome
from node_agent.runtime.stream_pool import PoolSettings, StreamPool


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- limits -----------------------------------------------------------------------------


@given(
    st.integers(1, 512),
    st.floats(0, 1),
    st.integers(0, 4096),
    st.floats(0.01, 1),
    st.floats(0, 1),
    st.floats(0.01, 1),
)
def test_limits_apply_keeps_decision_invariants(
    batch: int, delay: float, extra: int, bf: float, df: float, qf: float
) -> None:
    d = BatchingDecision(batch, delay, batch + extra)
    out = Limits(bf, df, qf).apply(d)
    assert 1 <= out.batch_size <= d.batch_size
    assert out.batch_size <= out.queue_limit_rows <= d.queue_limit_rows
    assert 0 <= out.delay_s <= d.delay_s
    assert NO_LIMITS.apply(d) is d


def test_limits_combine_field_by_field_and_validate() -> None:
    a = Limits(0.5, 1.0, 0.75, Priority.NORMAL)
    b = Limits(0.75, 0.25, 1.0, Priority.HIGH)
    assert a.stricter(b) == Limits(0.5, 0.25, 0.75, Priority.HIGH)
    assert a.stricter(NO_LIMITS) is a and NO_LIMITS.stricter(b) is b
    assert a.admits(Priority.NORMAL) and not a.admits(Priority.LOW)
    with pytest.raises(ValueError, match="lowest_admitted"):
        Limits(lowest_admitted=Priority.CRITICAL)  # never shed high-priority work
    with pytest.raises(ValueError):
        Limits(batch_fraction=0)
    with pytest.raises(ValueError):
        Limits(delay_fraction=1.5)


class Sink:
    def __init__(self) -> None:
        self.batches: list[tuple[float, int, float, list[float]]] = []

    def record_batch(self, now_s: float, rows: int, service_s: float, latencies_s: Sequence[float]) -> None:
        self.batches.append((now_s, rows, service_s, list(latencies_s)))


def test_limited_policy_caps_caches_and_forwards() -> None:
    controls = Controls()
    inner = StaticPolicy(16, 0.01, 256)
    sink = Sink()
    mid = ModelId("m", "1")
    policy = LimitedPolicy(inner, controls, mid, sink)
    first = policy.decision()
    assert first is inner.decision()  # no limits: the inner decision itself
    assert policy.decision() is first  # cached
    controls.set_model_limits(mid, Limits(batch_fraction=0.5, delay_fraction=0.5))
    capped = policy.decision()
    assert (capped.batch_size, capped.delay_s, capped.queue_limit_rows) == (8, 0.005, 256)
    assert policy.decision() is capped
    controls.set_model_limits(ModelId("other", "1"), Limits(batch_fraction=0.25))
    assert policy.decision() == capped  # another model's limits do not apply
    policy.observe(1.0, 8, 0.004, [0.01, 0.02])
    assert sink.batches == [(1.0, 8, 0.004, [0.01, 0.02])]
    assert inner.service.known and policy.predict_service_s(8) == inner.predict_service_s(8)
    controls.set_model_limits(mid, NO_LIMITS)
    assert policy.decision() is inner.decision()


def test_controls_version_moves_only_on_change() -> None:
    controls = Controls()
    v = controls.version
    controls.set_global_limits(NO_LIMITS)
    controls.set_model_limits(ModelId("m", "1"), NO_LIMITS)
    assert controls.version == v
    controls.set_global_limits(Limits(batch_fraction=0.5))
    assert controls.version == v + 1
    assert controls.set_concurrency_fraction(0.5) is None  # no gate yet


# --- the gate on a real scheduler -------------------------------------------------------


def scheduler_for(root: Path) -> tuple[ModelRepository, ModelScheduler]:
    repo = ModelRepository(root)
    return repo, ModelScheduler(2 << 30, lambda cfg: repo.load(cfg, "cpu"))


def test_gate_bounds_leases_and_serves_waiters_most_urgent_first(example_repo: Path) -> None:
    async def main() -> None:
        repo, scheduler = scheduler_for(example_repo)
        mlp = repo.config("mlp", "1")  # priority HIGH
        clf = repo.config("classifier", "1")  # priority NORMAL
        gate = ConcurrencyGate(scheduler, 2)
        a = await gate.acquire(mlp)
        b = await gate.acquire(clf)
        assert gate.in_use == 2 and scheduler.is_resident(mlp.id)
        order: list[str] = []

        async def take(cfg_name: str) -> None:
            cfg = mlp if cfg_name == "mlp" else clf
            lease = await gate.acquire(cfg)
            order.append(cfg_name)
            lease.release()

        waiters = [asyncio.create_task(take(n)) for n in ("classifier", "classifier", "mlp")]
        await asyncio.sleep(0.01)
        assert gate.waiting == 3 and order == []
        gate.check_invariants()
        a.release()
        a.release()  # idempotent
        await asyncio.gather(*waiters)
        assert order == ["mlp", "classifier", "classifier"]  # HIGH before NORMAL, then FIFO
        assert gate.in_use == 1 and gate.waited == 3 and gate.peak_in_use == 2
        b.release()
        assert gate.in_use == 0
        gate.check_invariants()
        await scheduler.close()

    asyncio.run(main())


def test_an_urgent_lease_passes_the_gate_but_holds_the_model(example_repo: Path) -> None:
    """`acquire_urgent` (a batcher's urgent ticket, for the pool's urgent lane) takes no slot
    and waits for none, even at a lowered limit; its scheduler lease keeps the model loaded."""

    async def main() -> None:
        repo, scheduler = scheduler_for(example_repo)
        clf = repo.config("classifier", "1")
        gate = ConcurrencyGate(scheduler, 2)
        gate.set_limit(1)
        held = await gate.acquire(clf)
        waiter = asyncio.create_task(gate.acquire(clf))
        await asyncio.sleep(0.01)
        assert gate.waiting == 1
        urgent = await asyncio.wait_for(gate.acquire_urgent(clf), 1)
        assert gate.in_use == 1 and gate.waiting == 1 and gate.granted == 1
        held.release()
        (await waiter).release()
        assert gate.in_use == 0
        assert await scheduler.unload(clf.id) is UnloadOutcome.IN_FLIGHT  # the urgent lease holds it
        urgent.release()
        gate.check_invariants()
        await scheduler.close()

    asyncio.run(main())


def test_gate_limit_changes_cancellation_and_foreign_thread_release(example_repo: Path) -> None:
    async def main() -> None:
        repo, scheduler = scheduler_for(example_repo)
        cfg = repo.config("mlp", "1")
        gate = ConcurrencyGate(scheduler, 3)
        gate.set_limit(1)
        held = await gate.acquire(cfg)
        blocked = asyncio.create_task(gate.acquire(cfg))
        cancelled = asyncio.create_task(gate.acquire(cfg))
        await asyncio.sleep(0.01)
        assert gate.waiting == 2
        cancelled.cancel()
        await asyncio.sleep(0)
        assert gate.waiting == 1
        gate.set_limit(2)  # raising the limit wakes a waiter at once
        second = await asyncio.wait_for(blocked, 1)
        assert gate.in_use == 2
        gate.set_limit(1)  # lowering it revokes nothing...
        assert gate.in_use == 2
        third = asyncio.create_task(gate.acquire(cfg))
        await asyncio.sleep(0.01)
        assert not third.done()  # ...but grants nothing until below it
        t = threading.Thread(target=held.release)  # a pool worker releasing
        t.start()
        t.join()
        await asyncio.sleep(0.01)
        assert gate.in_use == 1 and not third.done()  # 1 in use = the limit
        second.release()
        (await asyncio.wait_for(third, 1)).release()
        assert gate.in_use == 0 and gate.waiting == 0
        gate.check_invariants()
        with pytest.raises(ValueError):
            gate.set_limit(4)
        await scheduler.close()

    asyncio.run(main())


def test_a_gate_slot_serves_more_batches_only_while_nobody_needs_it(example_repo: Path) -> None:
    """`may_continue` on a gate lease: yes while no one waits for a slot and the limit still covers
    the slots in use; no once a waiter queues or a mitigation lowers the limit; no once released."""

    async def main() -> None:
        repo, scheduler = scheduler_for(example_repo)
        cfg = repo.config("mlp", "1")
        gate = ConcurrencyGate(scheduler, 2)
        a = await gate.acquire(cfg)
        b = await gate.acquire(cfg)
        assert a.may_continue() and b.may_continue()
        waiter = asyncio.create_task(gate.acquire(cfg))
        await asyncio.sleep(0.01)
        assert gate.waiting == 1 and not a.may_continue()  # give the slot back: someone waits
        b.release()
        (await asyncio.wait_for(waiter, 1)).release()
        assert a.may_continue()
        b = await gate.acquire(cfg)
        gate.set_limit(1)  # e.g. the thermal monitor: 2 in use > 1
        assert not a.may_continue() and not b.may_continue()
        b.release()
        assert a.may_continue()  # 1 in use = the limit
        a.release()
        assert not a.may_continue()
        await scheduler.close()

    asyncio.run(main())


def test_gate_integrates_occupancy_for_the_load_meter(example_repo: Path) -> None:
    async def main() -> None:
        repo, scheduler = scheduler_for(example_repo)
        cfg = repo.config("mlp", "1")
        clock = FakeClock()
        gate = ConcurrencyGate(scheduler, 4, clock)
        meter = gate.meter()
        a = await gate.acquire(cfg)
        b = await gate.acquire(cfg)
        clock.t = 10.0  # 2 slots for 10 s
        a.release()
        clock.t = 20.0  # 1 slot for 10 s
        assert gate.busy_slot_seconds() == pytest.approx(30.0)
        assert meter() == pytest.approx(30.0 / (20.0 * 4))
        clock.t = 30.0
        assert meter() == pytest.approx(10.0 / (10.0 * 4))
        b.release()
        clock.t = 40.0
        assert meter() == 0.0
        await scheduler.close()

    asyncio.run(main())


def test_gate_bounds_batches_across_models_on_a_real_engine(example_repo: Path) -> None:
    """Two models, two workers, a gate of 1: batches never overlap, results stay right."""

    async def main() -> None:
        repo, scheduler = scheduler_for(example_repo)
        pool = StreamPool(PoolSettings(num_workers=2, torch_threads=1)).start()
        controls = Controls()
        gate = controls.gate_for(scheduler, 3)
        assert controls.set_concurrency_fraction(0.3) == 1
        engine = Engine(repo, gate, pool)
        try:
            rng = np.random.default_rng(0)
            xs = [rng.standard_normal((2, 32)).astype(np.float32) for _ in range(30)]
            ims = [rng.standard_normal((1, 3, 64, 64)).astype(np.float32) for _ in range(10)]
            out = await asyncio.gather(
                *[engine.infer("mlp", "1", {"features": x}) for x in xs],
                *[engine.infer("classifier", "1", {"image": im}) for im in ims],
            )
            assert all(o["scores"].shape == (2, 4) for o in out[:30])
            assert all(o["logits"].shape == (1, 10) for o in out[30:])
            batches = engine.batcher("mlp", "1").batches + engine.batcher("classifier", "1").batches
            # One slot at a time; a slot may serve several batches back to back (may_continue).
            assert 1 <= gate.granted <= batches and gate.peak_in_use == 1
            assert gate.in_use == 0
        finally:
            await engine.stop()
            await scheduler.close()
            pool.stop()

    asyncio.run(main())
