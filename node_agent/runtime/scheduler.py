"""The memory-aware model scheduler: loads models on demand within a memory budget.

`ModelScheduler.acquire(config)` hands out a `Lease` on a loaded model: at once
when it is resident (the hot path: no await, a few microseconds), otherwise after
loading it. Loads run the blocking `loader` in the loop's default executor and are
single-flight: concurrent acquirers of a model being loaded share one load and
one outcome. Room is made by evicting the models the `EvictionPolicy` chooses.

Memory rules:
- The budget is in bytes (GPU: total minus a reserve, see
  `memory_budget.device_budget_bytes`; CPU: configured). Used bytes = measured bytes
  of resident models + the bytes reserved by loads in progress.
- Before a model's first load its size is `config.memory_estimate_bytes` (else
  `default_estimate_bytes`); after it, the backend's measured `memory_bytes`,
  remembered per model version for every later reload.
- A model is never evicted while pinned or while a lease on it is held.
- Victims are chosen first and evicted only if the whole plan frees enough. When
  it cannot, but would once leases are released, the load waits for releases (at
  most `memory_wait_s`); when it cannot even then (pinned models and other loads
  leave too little), or the wait runs out, every acquirer gets `InsufficientMemory`
  naming the bytes needed and available, and nothing was evicted for it.
- If the measured size exceeds what was reserved and the rest cannot be freed,
  the new model is unloaded again and its acquirers get `InsufficientMemory`.
- `unload(model_id)` refuses (returns `UnloadOutcome.IN_FLIGHT`/`LOADING`) rather
  than waiting; callers retry. `set_budget` evicts down to the new budget what it
  can now and the rest as leases are released.

Threading: NOT thread-safe by design. All state lives on the event loop's thread;
call every method there. The one exception is `Lease.release()`, which may be
called from any thread (it hops to the loop when called elsewhere).

One module of about 600 lines because `Lease` belongs with the scheduler: it reads the
scheduler's books (`may_continue`) and releases through them; apart, one would reach into
the other's private state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgefleet_api.types import ModelId, Priority
from node_agent.errors import InsufficientMemory, ShuttingDown
from node_agent.runtime.eviction import EvictionPolicy, default_policy
from node_agent.types import ModelConfig

if TYPE_CHECKING:
    from node_agent.runtime.backends.base import Backend

log = logging.getLogger(__name__)

Loader = Callable[[ModelConfig], "Backend"]
"""Blocking: reads the artifact and builds the model (run in an executor thread)."""


class UnloadOutcome(enum.Enum):
    UNLOADED = "unloaded"
    NOT_LOADED = "not_loaded"
    IN_FLIGHT = "in_flight"
    """Refused: leases on the model are held; retry when they are released."""
    LOADING = "loading"
    """Refused: the model is being loaded; retry when the load has finished."""


@dataclass(slots=True)
class SchedulerStats:
    """Counters since start. Load time is measured with the scheduler's clock."""

    hits: int = 0
    """acquire() found the model resident."""
    misses: int = 0
    """acquire() found it absent: it started a load or joined one in progress."""
    loads: int = 0
    """Loads that succeeded (acquired or preloaded)."""
    load_failures: int = 0
    """Loads that failed, InsufficientMemory included."""
    insufficient_memory: int = 0
    """Loads refused or undone for lack of memory."""
    evictions: int = 0
    """Models unloaded to make room or to meet a smaller budget."""
    unloads: int = 0
    """Models unloaded on request (unload(), close())."""
    bytes_loaded: int = 0
    bytes_evicted: int = 0
    load_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ResidentModel:
    """A loaded model as `resident()` reports it."""

    model_id: ModelId
    size_bytes: int
    """Measured by the backend at load."""
    in_flight: int
    """Leases held."""
    pinned: bool
    priority: Priority
    load_seconds: float


@dataclass(slots=True, eq=False)
class _Slot:
    """A resident model."""

    config: ModelConfig
    model_id: ModelId
    backend: Backend
    size_bytes: int
    load_seconds: float
    in_flight: int = 0


@dataclass(slots=True, eq=False)
class _PendingLoad:
    """A load in progress; its acquirers all await `future`."""

    config: ModelConfig
    future: asyncio.Future[_Slot]
    estimate_bytes: int
    waiters: int = 0
    """Acquirers awaiting `future`; the slot starts with this many leases."""
    reserved_bytes: int = 0
    """Budget held for the model while it loads (its estimate, once admitted)."""


class Lease:
    """The right to use a loaded model until `release()`; the model is not evicted meanwhile.

    `release()` is idempotent and may be called from any thread. Also a context manager.
    """

    __slots__ = ("_released", "_scheduler", "_slot")

    def __init__(self, scheduler: ModelScheduler, slot: _Slot) -> None:
        self._scheduler = scheduler
        self._slot = slot
        self._released = False

    @property
    def backend(self) -> Backend:
        return self._slot.backend

    @property
    def config(self) -> ModelConfig:
        return self._slot.config

    @property
    def model_id(self) -> ModelId:
        return self._slot.model_id

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._scheduler._release_from_any_thread(self._slot)

    def may_continue(self) -> bool:
        """Whether the holder may use the model for more work instead of releasing the lease
        and acquiring it again (any thread): no load waits for memory, the budget is met and
        the scheduler is open. A held lease keeps its model from eviction, so a holder that
        goes on must ask: a False answer is the scheduler's turn to make room."""
        s = self._scheduler
        return not (
            self._released
            or s._closed
            or s._memory_waiters
            or s._resident_bytes + s._reserved_bytes > s._budget
        )

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<Lease {self._slot.model_id} {state}>"


class ModelScheduler:
    """Loads, leases and evicts models within `budget_bytes` (see the module docstring).

    Invariants (`check_invariants`): used bytes <= budget, unless every resident model is
    pinned or leased (a shrunk budget not yet met); leases held >= 0; a model is resident,
    loading, or neither, never both; the policy mirrors exactly the resident models and
    their measured sizes; pinned and leased models are never evicted (asserted at eviction).
    """

    def __init__(
        self,
        budget_bytes: int,
        loader: Loader,
        policy: EvictionPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        default_estimate_bytes: int = 0,
        memory_wait_s: float = 5.0,
    ) -> None:
        """`default_estimate_bytes`: size assumed before the first load of a model without a
        `memory_estimate_bytes`; 0 admits it optimistically (the measurement corrects it).
        `memory_wait_s`: how long a load may wait for leases to be released when that is
        what stands between it and the memory it needs; 5 s covers in-flight batches (ms to
        s) without holding a request forever behind a stuck one. 0 fails at once."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if default_estimate_bytes < 0 or memory_wait_s < 0:
            raise ValueError("default_estimate_bytes and memory_wait_s must be >= 0")
        self._budget = budget_bytes
        self._loader = loader
        self._policy = policy if policy is not None else default_policy()
        self._clock = clock
        self._default_estimate = default_estimate_bytes
        self._memory_wait_s = memory_wait_s
        self._slots: dict[ModelId, _Slot] = {}
        self._loading: dict[ModelId, _PendingLoad] = {}
        self._measured: dict[ModelId, int] = {}
        """model -> bytes measured at its last load (kept after eviction)."""
        self._resident_bytes = 0
        self._reserved_bytes = 0
        self._stats = SchedulerStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._changed = asyncio.Event()
        """Set (and replaced) whenever memory may have been freed."""
        self._memory_waiters = 0
        self._reclaimers: list[Callable[[ModelId], Awaitable[None]]] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closed = False

    # -- acquiring -----------------------------------------------------------------------

    async def acquire(self, config: ModelConfig) -> Lease:
        """A lease on the model of `config`, loading it first if needed.

        Raises `InsufficientMemory` when it cannot fit, the loader's error when the load
        fails (the same error for every acquirer of that load), `ShuttingDown` after close().
        """
        slot = self._slots.get(config.id)
        if slot is not None and not self._closed:
            slot.in_flight += 1
            self._stats.hits += 1
            self._policy.record_access(slot.model_id, self._clock())
            return Lease(self, slot)
        return await self._acquire_slow(config)

    async def _acquire_slow(self, config: ModelConfig) -> Lease:
        self._bind_loop()
        if self._closed:
            raise ShuttingDown("the model scheduler is closed")
        model_id = config.id
        self._stats.misses += 1
        self._policy.record_access(model_id, self._clock())
        pending = self._loading.get(model_id) or self._start_load(config)
        pending.waiters += 1
        try:
            slot = await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            future = pending.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(future.result())  # the load counted this acquirer's lease
            else:
                pending.waiters -= 1
            raise
        return Lease(self, slot)

    async def preload(self, config: ModelConfig) -> None:
        """Load the model if it is not resident; hold no lease on it. Raises like acquire()."""
        self._bind_loop()
        if self._closed:
            raise ShuttingDown("the model scheduler is closed")
        if config.id in self._slots:
            return
        pending = self._loading.get(config.id) or self._start_load(config)
        await asyncio.shield(pending.future)

    # -- releasing and unloading ---------------------------------------------------------

    def _release_from_any_thread(self, slot: _Slot) -> None:
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._release(slot)
        else:
            self._loop.call_soon_threadsafe(self._release, slot)

    def _release(self, slot: _Slot) -> None:
        slot.in_flight -= 1
        assert slot.in_flight >= 0, f"{slot.model_id}: more releases than leases"
        if slot.in_flight:
            return
        if self._closed and self._slots.get(slot.model_id) is slot:
            self._remove(slot)
            self._stats.unloads += 1
        elif self._resident_bytes + self._reserved_bytes > self._budget:
            self._shrink()
        if self._memory_waiters:
            self._notify()

    def add_reclaimer(self, reclaim: Callable[[ModelId], Awaitable[None]]) -> None:
        """`reclaim(model_id)` is awaited by `unload` before it refuses a leased model: a holder
        that keeps a lease while it has no work (a text generator holds its model while it runs)
        releases it then, and keeps it while it has work (nothing in progress is cut)."""
        self._reclaimers.append(reclaim)

    async def unload(self, model_id: ModelId) -> UnloadOutcome:
        """Unload a model now, pinned or not; refuses while leased (after asking the reclaimers)
        or loading."""
        leased = self._slots.get(model_id)
        if leased is not None and leased.in_flight and model_id not in self._loading:
            for reclaim in self._reclaimers:  # they await: read the state again below
                await reclaim(model_id)
        if model_id in self._loading:
            return UnloadOutcome.LOADING
        slot = self._slots.get(model_id)
        if slot is None:
            return UnloadOutcome.NOT_LOADED
        if slot.in_flight:
            return UnloadOutcome.IN_FLIGHT
        await self._remove(slot)
        self._stats.unloads += 1
        self._notify()
        return UnloadOutcome.UNLOADED

    def set_budget(self, budget_bytes: int) -> bool:
        """Change the budget; evict down to it what can be evicted now, the rest as leases
        are released. True when usage is already within the new budget."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        log.info("memory budget %d -> %d bytes", self._budget, budget_bytes)
        self._budget = budget_bytes
        self._shrink()
        self._notify()
        return self.used_bytes <= budget_bytes

    async def close(self) -> None:
        """Refuse new acquires (ShuttingDown), let loads in progress finish, unload every
        model now, or, for leased ones, when their last lease is released."""
        self._closed = True
        self._notify()  # loads waiting for memory give up now
        loads = [p.future for p in self._loading.values()]
        await asyncio.gather(*loads, return_exceptions=True)
        idle = [slot for slot in self._slots.values() if not slot.in_flight]
        for slot in idle:
            await self._remove(slot)
            self._stats.unloads += 1
        self._notify()

    # -- views ---------------------------------------------------------------------------

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def used_bytes(self) -> int:
        """Measured bytes of resident models + bytes reserved by loads in progress."""
        return self._resident_bytes + self._reserved_bytes

    @property
    def stats(self) -> SchedulerStats:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats)

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    def is_resident(self, model_id: ModelId) -> bool:
        return model_id in self._slots

    def resident(self) -> list[ResidentModel]:
        """Loaded models with their measured sizes, by name and version."""
        return [
            ResidentModel(
                s.model_id, s.size_bytes, s.in_flight, s.config.pinned, s.config.priority, s.load_seconds
            )
            for s in sorted(self._slots.values(), key=lambda s: (s.model_id.name, s.model_id.version))
        ]

    def measured_bytes(self, model_id: ModelId) -> int | None:
        """Bytes measured at the model's last load, resident or not; None if never loaded."""
        return self._measured.get(model_id)

    def check_invariants(self) -> None:
        slots = self._slots
        assert self._resident_bytes == sum(s.size_bytes for s in slots.values())
        assert self._reserved_bytes == sum(p.reserved_bytes for p in self._loading.values())
        assert all(s.in_flight >= 0 for s in slots.values()), "negative lease count"
        assert not slots.keys() & self._loading.keys(), "a model both resident and loading"
        assert all(m == s.model_id == s.config.id for m, s in slots.items())
        assert self._policy.resident() == {m: s.size_bytes for m, s in slots.items()}
        if self.used_bytes > self._budget:
            assert all(s.in_flight or s.config.pinned for s in slots.values()), (
                f"{self.used_bytes} bytes used > budget {self._budget} with idle models resident"
            )
        assert self._memory_waiters >= 0
        self._policy.check_invariants()

    # -- loading -------------------------------------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop, self._loop_thread = loop, threading.get_ident()
        elif loop is not self._loop:
            raise RuntimeError("a ModelScheduler is bound to the event loop it first ran on")

    def _estimate(self, config: ModelConfig) -> int:
        measured = self._measured.get(config.id)
        if measured is not None:
            return measured
        if config.memory_estimate_bytes is not None:
            return config.memory_estimate_bytes
        return self._default_estimate

    def _start_load(self, config: ModelConfig) -> _PendingLoad:
        assert self._loop is not None
        future: asyncio.Future[_Slot] = self._loop.create_future()
        future.add_done_callback(_retrieve_exception)
        pending = _PendingLoad(config, future, self._estimate(config))
        self._loading[config.id] = pending
        self._spawn(self._load(pending))
        return pending

    async def _load(self, pending: _PendingLoad) -> None:
        """Admit (evicting if needed), load in the executor, install; resolve the future."""
        config, model_id = pending.config, pending.config.id
        assert self._loop is not None
        try:
            evicted = await self._admit(pending)
            if evicted:
                await asyncio.gather(*evicted)  # memory is free before the load starts
            started = self._clock()
            backend = await self._loop.run_in_executor(None, self._loader, config)
            load_seconds = max(self._clock() - started, 0.0)
            slot = self._install(pending, backend, load_seconds)
        except asyncio.CancelledError:
            self._stats.load_failures += 1
            pending.future.set_exception(ShuttingDown(f"loading {model_id} was cancelled"))
            raise
        except Exception as exc:
            self._stats.load_failures += 1
            if isinstance(exc, InsufficientMemory):
                self._stats.insufficient_memory += 1
            log.warning("loading %s failed: %s", model_id, exc)
            pending.future.set_exception(exc)
        else:
            pending.future.set_result(slot)
        finally:
            self._reserved_bytes -= pending.reserved_bytes
            pending.reserved_bytes = 0
            del self._loading[model_id]
            self._notify()

    async def _admit(self, pending: _PendingLoad) -> list[asyncio.Future[None]]:
        """Reserve the model's estimate, evicting what the policy chooses; returns the
        unloads started. Waits for leases to be released when only they are in the way."""
        assert self._loop is not None
        need = pending.estimate_bytes
        deadline = self._loop.time() + self._memory_wait_s
        while True:
            victims = self._plan(need)
            if victims is not None:
                unloads = [self._evict(model_id) for model_id in victims]
                pending.reserved_bytes = need
                self._reserved_bytes += need
                return unloads
            remaining = deadline - self._loop.time()
            if need > self._budget - self._pinned_bytes() or remaining <= 0:
                raise self._insufficient(pending.config.id, need)
            await self._wait_for_memory(remaining)
            if self._closed:
                raise ShuttingDown("the model scheduler closed while a load waited for memory")

    def _install(self, pending: _PendingLoad, backend: Backend, load_seconds: float) -> _Slot:
        """Account the measured size (evicting more if it exceeds the reservation) and make
        the model resident with a lease per waiting acquirer."""
        config, model_id = pending.config, pending.config.id
        measured = max(int(backend.memory_bytes), 0)
        self._measured[model_id] = measured
        self._reserved_bytes -= pending.reserved_bytes
        pending.reserved_bytes = 0
        victims = self._plan(measured)
        if victims is None:
            self._spawn_unload(backend)
            log.warning(
                "%s measured %d bytes (estimated %d): does not fit; unloaded it",
                model_id,
                measured,
                pending.estimate_bytes,
            )
            raise self._insufficient(model_id, measured)
        for victim in victims:
            self._evict(victim)
        slot = _Slot(config, model_id, backend, measured, load_seconds, pending.waiters)
        self._slots[model_id] = slot
        self._resident_bytes += measured
        self._policy.record_load(model_id, measured, load_seconds, config.priority, self._clock())
        self._stats.loads += 1
        self._stats.bytes_loaded += measured
        self._stats.load_seconds += load_seconds
        log.info(
            "loaded %s: %d bytes (estimated %d) in %.3f s; %d/%d bytes used",
            model_id,
            measured,
            pending.estimate_bytes,
            load_seconds,
            self.used_bytes,
            self._budget,
        )
        return slot

    # -- evicting ------------------------------------------------------------------------

    def _protected(self) -> set[ModelId]:
        return {m for m, s in self._slots.items() if s.in_flight or s.config.pinned}

    def _plan(self, need_bytes: int) -> list[ModelId] | None:
        """Victims that make room for `need_bytes` more; None if evicting cannot."""
        over = self.used_bytes + need_bytes - self._budget
        if over <= 0:
            return []
        return self._policy.choose_victims(over, self._clock(), self._protected())

    def _shrink(self) -> None:
        """Evict towards the budget: the policy's choice, or every evictable model when even
        all of them are not enough."""
        over = self.used_bytes - self._budget
        if over <= 0:
            return
        protected = self._protected()
        victims = self._policy.choose_victims(over, self._clock(), protected)
        if victims is None:
            victims = [m for m in self._slots if m not in protected]
        for model_id in victims:
            self._evict(model_id)

    def _evict(self, model_id: ModelId) -> asyncio.Future[None]:
        slot = self._slots[model_id]
        assert not slot.in_flight and not slot.config.pinned, f"evicting busy/pinned {model_id}"
        self._stats.evictions += 1
        self._stats.bytes_evicted += slot.size_bytes
        log.info("evicting %s (%d bytes)", model_id, slot.size_bytes)
        return self._remove(slot)

    def _remove(self, slot: _Slot) -> asyncio.Future[None]:
        """Drop a resident model from the books now; its backend unloads in the executor."""
        del self._slots[slot.model_id]
        self._resident_bytes -= slot.size_bytes
        self._policy.record_unload(slot.model_id)
        return self._spawn_unload(slot.backend)

    def _spawn_unload(self, backend: Backend) -> asyncio.Future[None]:
        assert self._loop is not None
        future = self._loop.run_in_executor(None, backend.unload)
        self._tasks.add(future)
        future.add_done_callback(self._unload_done)
        return future

    def _unload_done(self, future: asyncio.Future[Any]) -> None:
        self._tasks.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("unloading a model failed", exc_info=future.exception())

    # -- memory waits --------------------------------------------------------------------

    def _pinned_bytes(self) -> int:
        """Bytes no eviction will ever free: pinned models, resident or being loaded."""
        resident = sum(s.size_bytes for s in self._slots.values() if s.config.pinned)
        loading = sum(p.reserved_bytes for p in self._loading.values() if p.config.pinned)
        return resident + loading

    def _insufficient(self, model_id: ModelId, need_bytes: int) -> InsufficientMemory:
        pinned = sum(s.size_bytes for s in self._slots.values() if s.config.pinned)
        leased = sum(s.size_bytes for s in self._slots.values() if s.in_flight and not s.config.pinned)
        available = self._budget - pinned - leased - self._reserved_bytes
        return InsufficientMemory(
            f"{model_id} needs {need_bytes} bytes but at most {max(available, 0)} bytes of the "
            f"{self._budget}-byte budget can be made available ({pinned} bytes pinned, "
            f"{leased} in use by requests in flight, {self._reserved_bytes} reserved by "
            "other loads)"
        )

    async def _wait_for_memory(self, timeout_s: float) -> None:
        self._memory_waiters += 1
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            self._memory_waiters -= 1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coro: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _retrieve_exception(future: asyncio.Future[Any]) -> None:
    """Mark a load's exception as retrieved: its acquirers may all have been cancelled."""
    if not future.cancelled():
        future.exception()
