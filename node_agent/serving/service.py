"""What the HTTP layer serves (`api.ServingApi`): `Serving`, the engine behind the agent's
readiness, the repository extension's load/unload, and the generators of `task: generate` models.

Models load on demand (the scheduler), so every valid model in the repository is servable;
`unload` takes a model out of service (and out of memory) until `load` puts it back: its
requests in flight finish, new ones get `ModelNotReady` (503 with Retry-After), a name never
known stays `ModelNotFound` (404). In EdgeNode mode (`assigned`) the operator's assignment, not
the repository, says what is served.

Health (`HealthSettings`): ready while the agent can serve inference: started and not draining,
its inference workers not all stuck on one batch past `worker_stuck_s`, its repository
readable and (standalone) holding at least one servable model; a busy agent, or one broken
model among others, stays ready. Live while the process makes progress: the event loop
answers the probe, and the workers are not all stuck past `worker_dead_s` (only a restart
frees a hung device call). Load never makes an agent un-live.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edgefleet_api.types import ModelId, Priority
from node_agent.errors import Conflict, InvalidInput, InvalidModel, ModelNotFound, ModelNotReady, ShuttingDown
from node_agent.runtime.engine import Engine
from node_agent.runtime.repository import ModelRepository
from node_agent.runtime.scheduler import ModelScheduler, UnloadOutcome
from node_agent.serving.api import IndexEntry
from node_agent.serving.statistics import ModelStatistics, Summed, model_statistics
from node_agent.types import ModelConfig

if TYPE_CHECKING:
    from node_agent.generation.async_generator import AsyncGenerator
    from node_agent.generation.engine import GenerationStats
    from node_agent.runtime.scheduler import Lease

log = logging.getLogger(__name__)

HistogramSource = Callable[[ModelId], Mapping[str, Summed] | None]
"""A model version's lifetime histograms, None when untracked (`SlaMonitor.stats(m).histograms`)."""


class AssignedModels(Protocol):
    """The model versions assigned to this node (EdgeNode mode: the agent's `ConfigOverlay`)."""

    def versions(self, name: str) -> list[str]:
        """Servable versions of `name`, oldest first."""
        ...

    def models(self) -> list[ModelConfig]:
        """Every servable version."""
        ...

    def assigned(self) -> frozenset[ModelId]:
        """Every assigned version, servable or not yet (being fetched, loaded, replaced)."""
        ...


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """When the agent stops reporting ready or live (seconds)."""

    worker_stuck_s: float = 30.0
    """Not ready once every inference worker has run one batch step this long: no batch of an
    edge model takes half a minute, so the worker is hung (a device call that never returns),
    and the Service should send its work elsewhere."""
    worker_dead_s: float = 120.0
    """Not live once every worker has been stuck this long: the kubelet restarts the agent
    (a hung device call is freed by nothing else). Above `worker_stuck_s`, so the agent leaves
    the Service first."""
    check_interval_s: float = 1.0
    """Readiness is computed at most this often (it lists the repository); probes in between
    get the last answer, so a flood of probes costs nothing."""
    unloaded_retry_after_s: float = 5.0
    """Retry-After of a request for a model unloaded through the repository API (one being
    unloaded or loaded gets 1 s)."""

    def __post_init__(self) -> None:
        if not 0 < self.worker_stuck_s <= self.worker_dead_s:
            raise ValueError("health bounds need 0 < worker_stuck_s <= worker_dead_s")
        if not self.check_interval_s >= 0 or not self.unloaded_retry_after_s > 0:
            raise ValueError("check_interval_s must be >= 0 and unloaded_retry_after_s > 0")


class Serving:
    """The HTTP layer's view of the agent (`api.ServingApi`); loop thread only.

    Invariants: a model name in `_unloaded` gets ModelNotReady (503, Retry-After) from
    `config`/`infer` and is reported UNAVAILABLE; load/unload run one at a time. With
    `assigned` (EdgeNode mode) the servable versions are the assigned ones, not the
    repository's, and load/unload are refused (409): the operator owns the assignment.
    """

    def __init__(
        self,
        repository: ModelRepository,
        scheduler: ModelScheduler,
        engine: Engine,
        *,
        unload_wait_s: float = 10.0,
        assigned: AssignedModels | None = None,
        health: HealthSettings | None = None,
        histograms: HistogramSource | None = None,
    ) -> None:
        self.repository = repository
        self.histograms = histograms
        """Where `statistics` reads durations and batch sizes (none: zeros)."""
        self._last_inference: dict[ModelId, float] = {}
        """Model version -> wall-clock time (s) of its last request answered with outputs."""
        self.health = health or HealthSettings()
        self.assigned = assigned
        self.scheduler = scheduler
        self.engine = engine
        self.unload_wait_s = unload_wait_s
        self._not_ready: str | None = "starting"
        self._checked: tuple[float, str | None] = (0.0, None)
        """(when readiness was last computed, monotonic; its answer)."""
        self._unloaded: dict[str, str] = {}
        """Model name -> its state while out of service: 'unloading', 'unloaded', 'loading'."""
        self._control = asyncio.Lock()
        self._generators: dict[ModelId, tuple[AsyncGenerator, Lease]] = {}
        self._generator_starts: dict[ModelId, asyncio.Future[AsyncGenerator]] = {}
        self._generators_closed = False

    # -- readiness ---------------------------------------------------------------------------

    def set_ready(self) -> None:
        self._not_ready = None

    def set_not_ready(self, reason: str) -> None:
        self._not_ready = reason

    def not_ready_reason(self) -> str | None:
        """Why the agent should get no traffic now, or None (see the module docstring)."""
        if self._not_ready is not None:
            return self._not_ready
        now = time.monotonic()
        at, reason = self._checked
        if now - at >= self.health.check_interval_s or at == 0.0:
            reason = self._serving_problem()
            self._checked = (now, reason)
        return reason

    def not_live_reason(self) -> str | None:
        """Why the agent should be restarted, or None: every worker stuck past `worker_dead_s`."""
        pool = self.engine.pool
        stuck = pool.stuck(self.health.worker_dead_s)
        if stuck and stuck >= pool.num_workers:
            return f"{stuck} inference worker(s) stuck on one batch for over {self.health.worker_dead_s:g} s"
        return None

    def _serving_problem(self) -> str | None:
        pool = self.engine.pool
        stuck = pool.stuck(self.health.worker_stuck_s)
        if stuck and stuck >= pool.num_workers:
            return f"{stuck} inference worker(s) stuck on one batch for over {self.health.worker_stuck_s:g} s"
        unreadable = self.repository.readable()
        if unreadable is not None:
            return unreadable
        if self.assigned is None:
            models = self.repository.scan().models
            if not any(self.repository.problem(c) is None for c in models):
                return "no servable model in the model repository"
        elif self.assigned.assigned() and not self.assigned.models():
            return f"none of the {len(self.assigned.assigned())} assigned model version(s) is servable"
        return None

    # -- serving -----------------------------------------------------------------------------

    def config(self, name: str, version: str | None) -> ModelConfig:
        self._check_loaded(name)
        try:
            return self.engine.config(name, version)
        except ModelNotFound:
            self._check_assigned(name, version)
            raise

    def versions(self, name: str) -> list[str]:
        if self.assigned is None:
            return self.repository.versions(name)
        versions = self.assigned.versions(name)
        if not versions:
            self._check_assigned(name, None)
            raise ModelNotFound(f"model {name!r} is not assigned to this node")
        return versions

    def _check_assigned(self, name: str, version: str | None) -> None:
        """EdgeNode mode, for a model the engine cannot serve: ModelNotReady (503, retry soon)
        if the assignment names it (fetching, loading, or between two versions), else nothing
        (the caller's ModelNotFound stands: 404)."""
        if self.assigned is None:
            return
        ids = self.assigned.assigned()
        known = any(m.name == name for m in ids) if version is None else ModelId(name, version) in ids
        if known:
            raise ModelNotReady(
                f"model {name!r} is assigned to this node but not servable yet; retry shortly"
            )

    def model_not_ready_reason(self, name: str, version: str | None) -> str | None:
        state = self._unloaded.get(name)
        if state is not None:
            return f"{state} through the repository API"
        try:
            config = self.engine.config(name, version)
        except InvalidModel as e:
            return str(e)
        except ModelNotFound:
            try:
                self._check_assigned(name, version)
            except ModelNotReady as e:
                return str(e)
            raise
        return self.repository.problem(config) or self._not_ready

    async def infer(
        self,
        name: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        priority: Priority,
        timeout_s: float | None,
    ) -> Mapping[str, np.ndarray]:
        self._check_loaded(name)
        outputs = await self.engine.infer(name, version, inputs, priority, timeout_s)
        self._last_inference[ModelId(name, version)] = time.time()
        return outputs

    def statistics(self, name: str, version: str | None) -> list[ModelStatistics]:
        """Triton's statistics of every servable version (`name` ""), of every version of
        `name` (`version` None), or of one; ModelNotFound for a name or version not served."""
        if not name:
            ids = [ModelId(e.name, e.version) for e in self.index() if e.state == "READY"]
        else:
            versions = self.versions(name)
            if version is not None and version not in versions:
                raise ModelNotFound(f"no model {name}:{version}")
            ids = [ModelId(name, v) for v in ([version] if version is not None else versions)]
        out = []
        for m in ids:
            histograms = self.histograms(m) if self.histograms is not None else None
            counters = self.engine.made_batcher(m.name, m.version)
            out.append(model_statistics(m.name, m.version, histograms, counters, self._last_inference.get(m)))
        return out

    def _check_loaded(self, name: str) -> None:
        state = self._unloaded.get(name)
        if state is None:
            return
        if state == "unloaded":
            raise ModelNotReady(
                f"model {name!r} is unloaded; POST /v2/repository/models/{name}/load serves it again",
                self.health.unloaded_retry_after_s,
            )
        raise ModelNotReady(f"model {name!r} is {state}; retry shortly", 1.0)

    # -- repository extension ----------------------------------------------------------------

    def index(self) -> list[IndexEntry]:
        if self.assigned is not None:
            return [self._entry(c) for c in self.assigned.models()]
        scan = self.repository.scan()
        entries = [self._entry(c) for c in scan.models]
        for path, why in scan.broken.items():
            if path != self.repository.root:
                entries.append(IndexEntry(path.parent.name, path.name, "UNAVAILABLE", why))
        entries.sort(key=lambda e: (e.name, e.version))
        return entries

    async def generating_models(self) -> list[str]:
        """The servable models that generate text: each model's name (its newest version) and
        `name:version` for each of its versions (the OpenAI API's /v1/models)."""
        configs = self.assigned.models() if self.assigned is not None else self.repository.scan().models
        ready = {(e.name, e.version) for e in self.index() if e.state == "READY"}
        out: set[str] = set()
        for c in configs:
            if c.task == "generate" and (c.name, c.version) in ready:
                out |= {c.name, f"{c.name}:{c.version}"}
        return sorted(out)

    def _entry(self, config: ModelConfig) -> IndexEntry:
        state = self._unloaded.get(config.name)
        if state is not None:
            return IndexEntry(config.name, config.version, "UNAVAILABLE", state)
        problem = self.repository.problem(config)
        if problem is not None:
            return IndexEntry(config.name, config.version, "UNAVAILABLE", problem)
        return IndexEntry(config.name, config.version, "READY")

    async def load(self, name: str) -> None:
        """Put `name` (back) into service and load its newest version into memory."""
        self._check_unmanaged()
        async with self._control:
            self._check_inside(name)
            self.engine.invalidate(name)
            config = self.repository.config(name)
            previous = self._unloaded.get(name)
            if previous is not None:
                self._unloaded[name] = "loading"
            try:
                await self.scheduler.preload(config)
            except BaseException:
                if previous is not None:
                    self._unloaded[name] = previous
                raise
            self._unloaded.pop(name, None)
            log.info("repository: loaded %s", config.id)

    async def unload(self, name: str) -> None:
        """Take `name` out of service; unload its resident versions once their in-flight
        batches are done (waiting at most `unload_wait_s`; after that the scheduler may evict
        it like any idle model)."""
        self._check_unmanaged()
        async with self._control:
            resident = [r.model_id for r in self.scheduler.resident() if r.model_id.name == name]
            if not resident:
                self.repository.versions(name)  # ModelNotFound for an unknown model
            self._unloaded[name] = "unloading"
            try:
                await self.stop_generators(name)
                self.engine.invalidate(name)
                deadline = time.monotonic() + self.unload_wait_s
                for model_id in resident:
                    await self._unload_when_idle(model_id, deadline)
            finally:
                self._unloaded[name] = "unloaded"
            log.info("repository: unloaded %s", name)

    async def _unload_when_idle(self, model_id: ModelId, deadline_s: float) -> None:
        """Unload once the requests admitted before the unload are answered: their batches
        drained from the batcher and their leases released (polled; bounded by `deadline_s`)."""
        while True:
            outcome = UnloadOutcome.IN_FLIGHT
            if not self.engine.busy(model_id.name):
                outcome = await self.scheduler.unload(model_id)
            if outcome in (UnloadOutcome.UNLOADED, UnloadOutcome.NOT_LOADED):
                return
            if time.monotonic() >= deadline_s:
                log.warning("repository: %s still %s; left to eviction", model_id, outcome.value)
                return
            await asyncio.sleep(0.005)  # poll: the scheduler offers no 'released' event

    def _check_unmanaged(self) -> None:
        if self.assigned is not None:
            raise Conflict(
                "this agent serves the models its EdgeNode assigns; change the InferenceService "
                "instead of loading or unloading models here"
            )

    # -- generation (the v2 generate extension, `serving.generate`) ------------------------

    async def generator(self, name: str, version: str | None) -> AsyncGenerator:
        """The running generator of a `task: generate` model version, started on first use
        (single-flight). Its model loads through the scheduler (digest checked; weights and
        KV pool counted in the budget) and stays leased, so resident, while the generator
        runs: until `unload(name)` or `stop_generators()`. ModelNotFound (404) for an unknown
        or unloaded model, InvalidInput (400) for one that does not generate."""
        self._check_loaded(name)
        config = self.engine.config(name, version)
        if config.task != "generate":
            raise InvalidInput(
                f"model {config.id} has task {config.task!r}; it does not generate text (use /infer)"
            )
        running = self._generators.get(config.id)
        if running is not None and running[0].running:
            return running[0]
        if self._generators_closed:
            raise ShuttingDown("the agent is stopping")
        start = self._generator_starts.get(config.id)
        if start is None:
            start = self._generator_starts[config.id] = asyncio.ensure_future(self._start_generator(config))
        return await asyncio.shield(start)

    async def _start_generator(self, config: ModelConfig) -> AsyncGenerator:
        # imported here: torch loads with the first generator, not with the agent
        from node_agent.generation.async_generator import AsyncGenerator
        from node_agent.generation.engine import engine_for_backend
        from node_agent.generation.transformer import TinyLMBackend

        try:
            failed = self._generators.pop(config.id, None)  # its engine failed: start afresh
            if failed is not None:
                await self._stop_generator(config.id, *failed)
            lease = await self.scheduler.acquire(config)
            try:
                backend = lease.backend
                if not isinstance(backend, TinyLMBackend):
                    raise InvalidModel(f"{config.id}: format {config.format!r} cannot generate text")
                loop = asyncio.get_running_loop()  # allocating the KV pool may take a while:
                engine = await loop.run_in_executor(None, engine_for_backend, backend)
                generator = AsyncGenerator(engine, model_id=config.id)
                await generator.start()
            except BaseException:
                lease.release()
                raise
            self._generators[config.id] = (generator, lease)
        finally:
            del self._generator_starts[config.id]
        log.info("generation: started %s, %d KV blocks of %d tokens", config.id,
                 engine.config.num_blocks, engine.config.block_size)  # fmt: skip
        return generator

    async def stop_generators(self, name: str | None = None) -> None:
        """Stop the generators of model `name` (None: all, and start no more: the agent is
        stopping). Their requests in progress fail with ShuttingDown (503); their KV pools
        go and their models' leases are released, so the scheduler may unload them."""
        if name is None:
            self._generators_closed = True
        starts = [f for m, f in self._generator_starts.items() if name is None or m.name == name]
        await asyncio.gather(*starts, return_exceptions=True)
        for model_id in [m for m in self._generators if name is None or m.name == name]:
            await self._stop_generator(model_id, *self._generators.pop(model_id))

    async def release_idle_generator(self, model_id: ModelId) -> None:
        """Stop `model_id`'s generator if no request of it waits or runs, releasing its lease
        (a `ModelScheduler` reclaimer). A generator holds its model for as long as it runs, so
        without this a version taken out of service (the stable one after a rollout) would
        never leave memory. Requests in progress are never cut: with any, the generator stays
        and the next unload asks again; the version is out of the configs by then, so no new
        request reaches it."""
        running = self._generators.get(model_id)
        if running is not None and running[0].idle:
            del self._generators[model_id]
            await self._stop_generator(model_id, *running)

    async def _stop_generator(self, model_id: ModelId, generator: AsyncGenerator, lease: Lease) -> None:
        try:
            await generator.stop()
        finally:
            lease.release()
        log.info("generation: stopped %s", model_id)

    def generation_stats(self) -> list[tuple[ModelId, GenerationStats]]:
        """Each running generator's model version and latest stats (for /metrics)."""
        return [(model_id, g.stats()) for model_id, (g, _lease) in self._generators.items()]

    def _check_inside(self, name: str) -> None:
        root = self.repository.root
        resolved = (root / name).resolve()
        if not resolved.is_relative_to(root) or resolved == root:
            raise ModelNotFound(f"model {name!r} resolves outside the repository; not loading it")
