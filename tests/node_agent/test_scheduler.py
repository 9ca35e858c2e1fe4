"""The model scheduler: pure logic with a small fake loader first (exact sizes, controllable
load timing), then the same rules with real models from the example repository."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from edgefleet_api.types import ModelId, Priority
from node_agent.errors import DigestMismatch, InsufficientMemory, InvalidModel, ShuttingDown
from node_agent.runtime.backends.base import Backend
from node_agent.runtime.eviction import LRUPolicy
from node_agent.runtime.scheduler import Lease, ModelScheduler, UnloadOutcome
from node_agent.types import ModelConfig

T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(main(), 15))


async def settle(rounds: int = 5) -> None:
    """Let ready callbacks and tasks run (loop turns, not time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- a fake loader for the pure-logic tests --------------------------------------------------


class FakeBackend(Backend):
    """Holds nothing; reports the size the test chose."""

    def __init__(self, config: ModelConfig, size: int) -> None:
        self.config = config
        self.size = size
        self.unloaded = threading.Event()

    @classmethod
    def load(cls, config: ModelConfig, version_dir: Path, device: str) -> FakeBackend:
        raise NotImplementedError("built by FakeLoader")

    def run(self, inputs: dict[str, Any], stream: object | None = None) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def memory_bytes(self) -> int:
        return self.size

    def unload(self) -> None:
        self.unloaded.set()


class FakeLoader:
    """Measured sizes per model name (default: the estimate); optional gate to hold loads
    in progress, scripted failures, and a fake clock advanced by each load."""

    def __init__(self, sizes: dict[str, int] | None = None, clock: FakeClock | None = None) -> None:
        self.sizes = sizes or {}
        self.calls: list[str] = []
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.failures: dict[str, Exception] = {}
        self.load_seconds: dict[str, float] = {}
        self.clock = clock
        self.backends: dict[str, list[FakeBackend]] = {}
        self._lock = threading.Lock()

    def __call__(self, config: ModelConfig) -> FakeBackend:
        with self._lock:
            self.calls.append(config.name)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test never opened the gate"
        if config.name in self.failures:
            raise self.failures[config.name]
        if self.clock is not None:
            self.clock.now += self.load_seconds.get(config.name, 1.0)
        size = self.sizes.get(config.name, config.memory_estimate_bytes or 0)
        backend = FakeBackend(config, size)
        self.backends.setdefault(config.name, []).append(backend)
        return backend


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cfg(
    name: str, estimate: int | None = 100, *, pinned: bool = False, priority: Priority = Priority.NORMAL
) -> ModelConfig:
    return ModelConfig(
        name=name,
        version="1",
        format="fake",
        inputs=(),
        outputs=(),
        artifact="model.pt",
        digest="sha256:" + "0" * 64,
        pinned=pinned,
        priority=priority,
        memory_estimate_bytes=estimate,
    )


def ids(sched: ModelScheduler) -> list[str]:
    return [r.model_id.name for r in sched.resident()]


async def use(sched: ModelScheduler, config: ModelConfig, times: int = 1) -> None:
    for _ in range(times):
        (await sched.acquire(config)).release()
    sched.check_invariants()


# -- pure logic ------------------------------------------------------------------------------


def test_hit_miss_counters_and_idempotent_release() -> None:
    async def main() -> None:
        loader = FakeLoader(clock=(clock := FakeClock()))
        loader.load_seconds["a"] = 2.5
        sched = ModelScheduler(1000, loader, clock=clock)
        lease = await sched.acquire(cfg("a"))
        assert isinstance(lease.backend, FakeBackend) and lease.model_id == ModelId("a", "1")
        second = await sched.acquire(cfg("a"))
        assert sched.resident()[0].in_flight == 2
        lease.release()
        lease.release()  # idempotent
        assert sched.resident()[0].in_flight == 1 and lease.released
        with second:
            pass
        assert sched.resident()[0].in_flight == 0
        stats = sched.stats
        assert (stats.hits, stats.misses, stats.loads, stats.bytes_loaded) == (1, 1, 1, 100)
        assert stats.load_seconds == 2.5 and sched.resident()[0].load_seconds == 2.5
        assert loader.calls == ["a"]
        sched.check_invariants()

    run(main)


def test_fast_path_returns_without_suspending() -> None:
    async def main() -> None:
        sched = ModelScheduler(1000, FakeLoader())
        await use(sched, cfg("a"))
        coro = sched.acquire(cfg("a"))
        with pytest.raises(StopIteration) as done:
            coro.send(None)  # a resident model: the coroutine finishes in one step
        lease = done.value.value
        assert isinstance(lease, Lease) and not lease.released
        lease.release()

    run(main)


def test_single_flight_twenty_acquirers_one_load() -> None:
    async def main() -> None:
        loader = FakeLoader()
        loader.gate = threading.Event()
        sched = ModelScheduler(1000, loader)
        tasks = [asyncio.create_task(sched.acquire(cfg("a"))) for _ in range(20)]
        await settle()
        assert await asyncio.to_thread(loader.started.wait, 5)
        assert not any(t.done() for t in tasks) and sched.resident() == []
        sched.check_invariants()
        loader.gate.set()
        leases = await asyncio.gather(*tasks)
        assert loader.calls == ["a"]
        assert len({id(lease.backend) for lease in leases}) == 1
        assert sched.resident()[0].in_flight == 20
        assert (sched.stats.loads, sched.stats.misses, sched.stats.hits) == (1, 20, 0)
        for lease in leases:
            lease.release()
        assert sched.resident()[0].in_flight == 0
        sched.check_invariants()

    run(main)


def test_failed_load_fails_every_waiter_and_leaves_nothing_behind() -> None:
    async def main() -> None:
        loader = FakeLoader()
        loader.gate = threading.Event()
        error = InvalidModel("a: artifact is corrupt")
        loader.failures["a"] = error
        sched = ModelScheduler(1000, loader)
        tasks = [asyncio.create_task(sched.acquire(cfg("a"))) for _ in range(20)]
        await settle()
        assert sched.used_bytes == 100  # the estimate is reserved while it loads
        loader.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r is error for r in results)
        assert loader.calls == ["a"]
        assert sched.resident() == [] and sched.used_bytes == 0
        assert sched.measured_bytes(ModelId("a", "1")) is None
        assert sched.stats.load_failures == 1 and sched.stats.loads == 0
        sched.check_invariants()
        del loader.failures["a"]  # the next acquire tries again
        await use(sched, cfg("a"))
        assert loader.calls == ["a", "a"] and ids(sched) == ["a"]

    run(main)


def test_eviction_follows_the_policy_order() -> None:
    async def main() -> None:
        # Every load takes the same (fake) second, so the order is by use alone, not by how
        # long each load happened to take on a busy machine.
        loader = FakeLoader(clock=(clock := FakeClock()))
        sched = ModelScheduler(300, loader, clock=clock)  # the default, cost-aware policy
        await use(sched, cfg("a"), times=5)
        await use(sched, cfg("b"), times=1)
        await use(sched, cfg("c"), times=3)
        await use(sched, cfg("d"))  # evicts b: the least used
        assert ids(sched) == ["a", "c", "d"]
        assert loader.backends["b"][0].unloaded.wait(5)
        await use(sched, cfg("e"))  # evicts d (1 use) before c (3) and a (5)
        assert ids(sched) == ["a", "c", "e"]
        assert sched.stats.evictions == 2 and sched.stats.bytes_evicted == 200

        lru = ModelScheduler(300, FakeLoader(), policy=LRUPolicy())
        for name in ("a", "b", "c", "a", "d"):
            await use(lru, cfg(name))
        assert ids(lru) == ["a", "c", "d"]  # LRU evicted b

    run(main)


def test_pinned_and_leased_models_are_never_evicted() -> None:
    async def main() -> None:
        loader = FakeLoader()
        sched = ModelScheduler(300, loader, memory_wait_s=0)
        await use(sched, cfg("pinned", pinned=True))  # used once, pinned
        held = await sched.acquire(cfg("held"))  # a request in flight
        await use(sched, cfg("busy"), times=9)
        await use(sched, cfg("x"))  # must evict: only busy is evictable
        assert ids(sched) == ["held", "pinned", "x"]
        await use(sched, cfg("y"))
        assert ids(sched) == ["held", "pinned", "y"]
        with pytest.raises(InsufficientMemory) as err:
            await sched.acquire(cfg("big", 200))
        assert "needs 200 bytes" in str(err.value) and "at most 100 bytes" in str(err.value)
        assert ids(sched) == ["held", "pinned", "y"]  # nothing was evicted for it
        held.release()
        await use(sched, cfg("big", 200))
        assert ids(sched) == ["big", "pinned"]
        sched.check_invariants()

    run(main)


def test_model_that_cannot_fit_fails_and_leaves_the_others_loaded() -> None:
    async def main() -> None:
        loader = FakeLoader()
        sched = ModelScheduler(250, loader)
        await use(sched, cfg("a"))
        await use(sched, cfg("b"))
        tasks = [asyncio.create_task(sched.acquire(cfg("huge", 300))) for _ in range(3)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, InsufficientMemory) for r in results)
        message = str(results[0])
        assert "huge:1 needs 300 bytes" in message and "250-byte budget" in message
        assert ids(sched) == ["a", "b"] and "huge" not in loader.calls
        assert sched.stats.evictions == 0 and sched.stats.insufficient_memory == 1
        sched.check_invariants()

    run(main)


def test_a_load_waits_for_leases_to_be_released() -> None:
    async def main() -> None:
        sched = ModelScheduler(200, FakeLoader(), memory_wait_s=10)
        a = await sched.acquire(cfg("a"))
        b = await sched.acquire(cfg("b"))
        waiting = asyncio.create_task(sched.acquire(cfg("c")))
        await settle()
        assert not waiting.done() and ids(sched) == ["a", "b"]
        sched.check_invariants()
        b.release()  # now b can go
        lease = await waiting
        assert ids(sched) == ["a", "c"] and lease.model_id.name == "c"
        lease.release()
        a.release()
        sched.check_invariants()

    run(main)


def test_measured_size_replaces_the_estimate() -> None:
    async def main() -> None:
        loader = FakeLoader(sizes={"c": 120})
        sched = ModelScheduler(200, loader)
        await use(sched, cfg("b"))
        await use(sched, cfg("c", 50))  # admitted on its estimate, measured at 120
        assert ids(sched) == ["c"]  # b was evicted once c measured more than it claimed
        assert sched.resident()[0].size_bytes == 120 and sched.used_bytes == 120
        c = ModelId("c", "1")
        assert sched.measured_bytes(c) == 120
        assert await sched.unload(c) is UnloadOutcome.UNLOADED
        await use(sched, cfg("b"))
        await use(sched, cfg("b"))
        # A reload is admitted on the measured 120, not the estimated 50: b goes first.
        loader.gate = threading.Event()
        task = asyncio.create_task(sched.acquire(cfg("c", 50)))
        await settle()
        assert sched.used_bytes == 120 and ids(sched) == []
        loader.gate.set()
        (await task).release()
        sched.check_invariants()

    run(main)


def test_measured_size_that_cannot_fit_unloads_the_new_model() -> None:
    async def main() -> None:
        loader = FakeLoader(sizes={"c": 150})
        sched = ModelScheduler(200, loader)
        await use(sched, cfg("p", pinned=True))
        with pytest.raises(InsufficientMemory, match="needs 150 bytes"):
            await sched.acquire(cfg("c", 50))
        assert loader.backends["c"][0].unloaded.wait(5)
        assert ids(sched) == ["p"] and sched.used_bytes == 100
        # The measurement is remembered: the next try fails before loading.
        with pytest.raises(InsufficientMemory):
            await sched.acquire(cfg("c", 50))
        assert loader.calls == ["p", "c"]
        sched.check_invariants()

    run(main)


def test_a_lease_may_continue_until_memory_is_wanted_or_the_scheduler_closes() -> None:
    """A holder that goes on with more work under its lease (a batcher's ticket) asks
    `may_continue`: it says no while a load waits for memory, while the budget is not met,
    after release and after close, so the scheduler gets its turn to evict."""

    async def main() -> None:
        sched = ModelScheduler(200, FakeLoader(), memory_wait_s=10)
        a = await sched.acquire(cfg("a"))
        b = await sched.acquire(cfg("b"))
        assert a.may_continue() and b.may_continue()
        waiting = asyncio.create_task(sched.acquire(cfg("c")))  # needs a or b evicted
        await settle()
        assert not waiting.done()
        assert not a.may_continue() and not b.may_continue()
        b.release()
        assert not b.may_continue()
        c = await waiting
        assert a.may_continue() and c.may_continue()
        assert sched.set_budget(100) is False  # a and c leased: over budget until released
        assert not a.may_continue()
        c.release()
        assert a.may_continue()  # within the budget again
        await sched.close()
        assert not a.may_continue()
        a.release()
        sched.check_invariants()

    run(main)


def test_budget_shrink_evicts_now_and_as_leases_are_released() -> None:
    async def main() -> None:
        sched = ModelScheduler(400, FakeLoader())
        for name in ("a", "b", "c"):
            await use(sched, cfg(name))
        await use(sched, cfg("p", pinned=True))
        held = await sched.acquire(cfg("c"))
        assert sched.set_budget(200) is True  # a and b go; c is leased, p pinned
        assert ids(sched) == ["c", "p"]
        assert sched.set_budget(150) is False  # c is leased: over budget for now
        sched.check_invariants()
        with pytest.raises(InsufficientMemory):
            await sched.acquire(cfg("a"))
        held.release()  # c goes as soon as its lease is released
        assert ids(sched) == ["p"] and sched.used_bytes == 100
        sched.check_invariants()
        assert sched.set_budget(50) is False  # pinned stays
        assert ids(sched) == ["p"]
        sched.check_invariants()
        with pytest.raises(ValueError):
            sched.set_budget(-1)

    run(main)


def test_unload_refuses_while_leased_or_loading() -> None:
    async def main() -> None:
        loader = FakeLoader()
        sched = ModelScheduler(1000, loader)
        a, p = ModelId("a", "1"), ModelId("p", "1")
        lease = await sched.acquire(cfg("a"))
        assert await sched.unload(a) is UnloadOutcome.IN_FLIGHT
        lease.release()
        assert await sched.unload(a) is UnloadOutcome.UNLOADED
        assert loader.backends["a"][0].unloaded.is_set()
        assert await sched.unload(a) is UnloadOutcome.NOT_LOADED
        await use(sched, cfg("p", pinned=True))
        assert await sched.unload(p) is UnloadOutcome.UNLOADED  # pinning stops eviction only
        loader.gate = threading.Event()
        task = asyncio.create_task(sched.acquire(cfg("a")))
        await settle()
        assert await sched.unload(a) is UnloadOutcome.LOADING
        loader.gate.set()
        (await task).release()
        assert sched.stats.unloads == 2
        sched.check_invariants()

    run(main)


def test_cancelled_acquirer_does_not_leak_a_lease() -> None:
    async def main() -> None:
        loader = FakeLoader()
        loader.gate = threading.Event()
        sched = ModelScheduler(1000, loader)
        first = asyncio.create_task(sched.acquire(cfg("a")))
        second = asyncio.create_task(sched.acquire(cfg("a")))
        await settle()
        first.cancel()
        await settle()
        loader.gate.set()
        lease = await second
        assert first.cancelled()
        assert sched.resident()[0].in_flight == 1
        lease.release()
        assert sched.resident()[0].in_flight == 0
        sched.check_invariants()

    run(main)


def test_release_from_another_thread_hops_to_the_loop() -> None:
    async def main() -> None:
        sched = ModelScheduler(1000, FakeLoader())
        lease = await sched.acquire(cfg("a"))
        await asyncio.to_thread(lease.release)
        await settle()
        assert sched.resident()[0].in_flight == 0
        sched.check_invariants()

    run(main)


def test_close_refuses_new_work_and_unloads_everything() -> None:
    async def main() -> None:
        loader = FakeLoader()
        sched = ModelScheduler(1000, loader)
        await use(sched, cfg("a"))
        held = await sched.acquire(cfg("b"))
        await sched.close()
        assert ids(sched) == ["b"] and loader.backends["a"][0].unloaded.wait(5)
        with pytest.raises(ShuttingDown):
            await sched.acquire(cfg("b"))
        with pytest.raises(ShuttingDown):
            await sched.preload(cfg("c"))
        held.release()
        assert ids(sched) == [] and loader.backends["b"][0].unloaded.wait(5)
        sched.check_invariants()

    run(main)


def test_preload_loads_without_a_lease() -> None:
    async def main() -> None:
        loader = FakeLoader()
        sched = ModelScheduler(1000, loader)
        await sched.preload(cfg("a"))
        await sched.preload(cfg("a"))
        assert loader.calls == ["a"] and sched.resident()[0].in_flight == 0
        assert (sched.stats.loads, sched.stats.misses) == (1, 0)

    run(main)


def test_random_concurrent_workload_keeps_the_invariants() -> None:
    """Many tasks acquire, hold (across loop turns) and release random models under a tight
    budget, with a budget change midway; the invariants hold at every step."""

    async def main() -> None:
        rng = random.Random(7)
        sizes = {f"m{i}": rng.choice([50, 100, 150]) for i in range(8)}
        loader = FakeLoader(sizes=sizes)
        sched = ModelScheduler(400, loader, memory_wait_s=0.5)
        configs = [
            cfg(n, estimate=None if i % 3 == 0 else sizes[n], pinned=(n == "m0")) for i, n in enumerate(sizes)
        ]
        outcomes: dict[str, int] = {"ok": 0, "insufficient": 0}

        async def client(seed: int) -> None:
            r = random.Random(seed)
            for _ in range(25):
                config = configs[min(int(r.paretovariate(1.2)) - 1, len(configs) - 1)]
                try:
                    lease = await sched.acquire(config)
                except InsufficientMemory:
                    outcomes["insufficient"] += 1
                    continue
                sched.check_invariants()
                assert sched.is_resident(config.id) and lease.backend.config is config
                for _ in range(r.randrange(3)):
                    await asyncio.sleep(0)
                lease.release()
                outcomes["ok"] += 1
                sched.check_invariants()

        clients = [asyncio.create_task(client(i)) for i in range(12)]
        await settle(20)
        sched.set_budget(300)
        sched.check_invariants()
        await asyncio.gather(*clients)
        assert outcomes["ok"] + outcomes["insufficient"] == 12 * 25 and outcomes["ok"] > 200
        assert all(r.in_flight == 0 for r in sched.resident())
        assert sched.used_bytes <= 300
        stats = sched.stats
        assert stats.hits + stats.misses == 12 * 25
        assert stats.loads <= len(loader.calls) <= stats.loads + stats.insufficient_memory
        sched.check_invariants()

    run(main)


# -- real models from the example repository -------------------------------------------------
#
# CPU backends measure parameters exactly plus the process's RSS growth over a warm-up batch,
# which is noisy (0 to a few MB). Budget tests therefore use "wide" models whose exact
# parameter bytes (16 MiB) dwarf that noise, with budgets set from the parameter bytes.


class WideMLP(torch.nn.Module):
    """features [B,32] -> scores [B,4] through a 1024x4096 layer: 16.6 MB of parameters."""

    def __init__(self) -> None:
        super().__init__()
        from node_agent.examples import Dense

        self.fc1 = Dense(32, 1024)
        self.fc2 = Dense(1024, 4096)
        self.fc3 = Dense(4096, 4)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(features))
        return self.fc3(torch.relu(self.fc2(x)))


WIDE_PARAM_BYTES = 4 * (32 * 1024 + 1024 + 1024 * 4096 + 4096 + 4096 * 4 + 4)


@pytest.fixture(scope="module")
def wide_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """wide-a/1 .. wide-d/1: one WideMLP artifact (hard-linked; the names differ only in
    model.yaml). One warm-up load is made and thrown away: a process's first load also
    measures torch's one-time initialisation."""
    from node_agent.examples import Example, write_example
    from node_agent.runtime.model_yaml import write_model_config
    from node_agent.runtime.repository import ModelRepository
    from node_agent.types import TensorSpec

    root = tmp_path_factory.mktemp("wide-repo")
    example = Example(
        "wide-a",
        "1",
        WideMLP,
        11,
        (TensorSpec("features", "FP32", (32,)),),
        (TensorSpec("scores", "FP32", (4,)),),
        4,
        Priority.NORMAL,
        "wide MLP",
    )
    config = write_example(root, example)
    for name in ("wide-b", "wide-c", "wide-d"):
        shutil.copytree(root / "wide-a" / "1", root / name / "1", copy_function=os.link)
        write_model_config(root / name / "1", dataclasses.replace(config, name=name))
    ModelRepository(root).load(config, "cpu").unload()
    return root


class CountingLoader:
    """The real repository loader (digest check + TorchScript backend on CPU), counting calls."""

    def __init__(self, root: Path, device: str = "cpu") -> None:
        from node_agent.runtime.repository import ModelRepository

        self.repo = ModelRepository(root)
        self.device = device
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, config: ModelConfig) -> Backend:
        with self._lock:
            self.calls += 1
        return self.repo.load(config, self.device)

    def configs(self, *names: str) -> list[ModelConfig]:
        return [self.repo.config(name, "1") for name in names]


def features(rows: int) -> dict[str, Any]:
    torch.manual_seed(0)
    return {"features": torch.randn(rows, 32)}


def test_real_model_runs_through_its_lease_and_reports_measured_memory(
    example_repo: Path,
) -> None:
    async def main() -> None:
        loader = CountingLoader(example_repo)
        [config] = loader.configs("mlp")
        sched = ModelScheduler(10**9, loader)
        with await sched.acquire(config) as lease:
            out = lease.backend.run(features(3))
            assert tuple(out["scores"].shape) == (3, 4)
            measured = lease.backend.memory_bytes
        # The measurement, not the model.yaml estimate, is what the scheduler accounts.
        assert measured > 0 and measured != config.memory_estimate_bytes
        [resident] = sched.resident()
        assert resident.size_bytes == measured == sched.used_bytes
        assert sched.measured_bytes(config.id) == measured
        assert resident.load_seconds > 0 and sched.stats.load_seconds == resident.load_seconds
        await sched.close()
        with pytest.raises(ShuttingDown):  # close() really unloaded it
            await asyncio.to_thread(lease.backend.run, features(1))

    run(main)


def test_real_failed_load_reaches_every_waiter(example_repo: Path) -> None:
    async def main() -> None:
        loader = CountingLoader(example_repo)
        [good] = loader.configs("mlp")
        bad = dataclasses.replace(good, digest="sha256:" + "0" * 64)
        sched = ModelScheduler(10**9, loader)
        results = await asyncio.gather(*(sched.acquire(bad) for _ in range(20)), return_exceptions=True)
        assert all(isinstance(r, DigestMismatch) for r in results)
        assert len({id(r) for r in results}) == 1 and loader.calls == 1
        assert sched.resident() == [] and sched.used_bytes == 0
        sched.check_invariants()
        await use(sched, good)
        assert [r.model_id for r in sched.resident()] == [good.id]
        await sched.close()

    run(main)


def test_real_models_single_flight_and_eviction_order(wide_repo: Path) -> None:
    async def main() -> None:
        loader = CountingLoader(wide_repo)
        a, b, c = loader.configs("wide-a", "wide-b", "wide-c")
        sched = ModelScheduler(int(WIDE_PARAM_BYTES * 2.5), loader)  # room for two
        leases = await asyncio.gather(*(sched.acquire(a) for _ in range(20)))
        assert loader.calls == 1 and sched.stats.loads == 1
        assert len({id(lease.backend) for lease in leases}) == 1
        assert sched.resident()[0].size_bytes >= WIDE_PARAM_BYTES
        outputs = [lease.backend.run(features(2))["scores"] for lease in leases[:2]]
        assert outputs[0].equal(outputs[1])
        for lease in leases:
            lease.release()
        await use(sched, a, times=30)
        await use(sched, b, times=2)
        with await sched.acquire(b) as lease:
            b_backend = lease.backend
        assert [r.model_id for r in sched.resident()] == [a.id, b.id]
        await use(sched, c)  # evicts b: used 3 times to a's 50
        assert [r.model_id for r in sched.resident()] == [a.id, c.id]
        with pytest.raises(ShuttingDown):  # b's backend was really unloaded
            await asyncio.to_thread(b_backend.run, features(1))
        assert sched.stats.evictions == 1 and sched.used_bytes <= sched.budget_bytes
        sched.check_invariants()
        await sched.close()

    run(main)


def test_real_models_pinned_leased_too_big_and_budget_shrink(
    wide_repo: Path,
    example_repo: Path,
) -> None:
    async def main() -> None:
        loader = CountingLoader(wide_repo)
        a, b, c, d = loader.configs("wide-a", "wide-b", "wide-c", "wide-d")
        pinned_a = dataclasses.replace(a, pinned=True)
        [classifier] = CountingLoader(example_repo).configs("classifier")
        budget = int(WIDE_PARAM_BYTES * 2.5)
        sched = ModelScheduler(budget, loader, memory_wait_s=0)
        await use(sched, pinned_a)
        held = await sched.acquire(b)
        with pytest.raises(InsufficientMemory) as err:  # a pinned, b leased: no room for c
            await sched.acquire(c)
        assert f"needs {c.memory_estimate_bytes} bytes" in str(err.value)
        assert [r.model_id for r in sched.resident()] == [a.id, b.id]
        held.release()
        await use(sched, c, times=5)  # b goes; pinned a stays although used once
        assert [r.model_id for r in sched.resident()] == [a.id, c.id]
        big = dataclasses.replace(classifier, memory_estimate_bytes=budget + 1)
        with pytest.raises(InsufficientMemory) as err:  # bigger than the whole budget
            await sched.acquire(big)
        assert f"needs {budget + 1} bytes" in str(err.value)
        assert f"{budget}-byte budget" in str(err.value)
        assert [r.model_id for r in sched.resident()] == [a.id, c.id]  # nothing evicted
        held_d = await sched.acquire(d)  # c (idle) goes for d
        assert [r.model_id for r in sched.resident()] == [a.id, d.id]
        assert sched.set_budget(WIDE_PARAM_BYTES) is False  # a pinned + d leased stay
        sched.check_invariants()
        held_d.release()  # d goes at release: only pinned a is left
        assert [r.model_id for r in sched.resident()] == [a.id]
        sched.check_invariants()
        await sched.close()

    run(main)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_models_on_gpu_stay_within_budget_and_free_memory(wide_repo: Path) -> None:
    async def main() -> None:
        loader = CountingLoader(wide_repo, "cuda:0")
        a, b, c = loader.configs("wide-a", "wide-b", "wide-c")
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated(0)
        sched = ModelScheduler(int(WIDE_PARAM_BYTES * 2.5), loader)
        await use(sched, a, times=10)
        await use(sched, b)
        sizes = [r.size_bytes for r in sched.resident()]
        assert all(WIDE_PARAM_BYTES <= size < 1.25 * WIDE_PARAM_BYTES for size in sizes)
        with await sched.acquire(b) as lease:
            out = lease.backend.run({"features": torch.randn(2, 32, device="cuda:0")})
            assert out["scores"].device.type == "cuda"
        await use(sched, c)  # b (2 uses) goes, not a (10)
        assert [r.model_id for r in sched.resident()] == [a.id, c.id]
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated(0) - baseline
        assert held < 2.5 * WIDE_PARAM_BYTES  # b's weights were really freed
        await sched.close()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(0) - baseline < WIDE_PARAM_BYTES / 4

    run(main)


def test_close_ends_a_load_waiting_for_memory() -> None:
    async def main() -> None:
        sched = ModelScheduler(100, FakeLoader(), memory_wait_s=10)
        held = await sched.acquire(cfg("a"))
        waiting = asyncio.create_task(sched.acquire(cfg("b")))
        await settle()
        assert not waiting.done()
        await sched.close()
        with pytest.raises(ShuttingDown):
            await waiting
        held.release()
        assert sched.resident() == [] and sched.used_bytes == 0
        sched.check_invariants()

    run(main)


def test_acquirer_cancelled_as_its_load_completes_gives_its_lease_back() -> None:
    async def main() -> None:
        loader = FakeLoader()
        loader.gate = threading.Event()
        sched = ModelScheduler(1000, loader)
        task = asyncio.create_task(sched.acquire(cfg("a")))
        await settle()
        # Cancel in the window between the load's success and the acquirer resuming.
        sched._loading[ModelId("a", "1")].future.add_done_callback(lambda _: task.cancel())
        loader.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sched.resident()[0].in_flight == 0
        sched.check_invariants()

    run(main)
