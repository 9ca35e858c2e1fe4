"""A standalone agent: model repository + scheduler + stream pool + engine + HTTP API.

`Agent(settings).start()` brings the parts up in dependency order and `stop()` takes them
down in reverse, draining first:

    start: repository -> scheduler -> stream pool -> controls, SLA and thermal monitors
           -> engine -> HTTP (live, not ready) -> extensions -> preloads -> ready
    stop:  not ready -> drain delay -> extensions -> HTTP (stops listening, waits for the
           requests in progress, bounded) -> generators -> monitors -> engine -> scheduler -> stream pool

Load control (`node_agent.control.mitigation`): one `Controls` takes the limits of both monitors.
The SLA monitor wraps every model version's batching policy (it measures each batch and
caps batch size, delay and queue bound while a model mitigates) and the engine asks the
controls before queueing a request, so a class the mitigation sheds is refused with 429
and Retry-After. The thermal monitor reads a real sensor (NVML, a sysfs GPU zone) or, when
asked, the simulated one heated by the concurrency gate's occupancy, and lowers the gate's
concurrency and every model's batch size above its soft limit. Both tick on the event loop.

HTTP starts before the preloads so the liveness probe answers while models load (a slow load
must not get the agent restarted); readiness turns on once they are loaded. `serve(settings)`
runs an agent until SIGTERM or SIGINT, then drains it: `edgefleet-agent serve`.

`Serving` is what the HTTP layer serves: the engine behind the agent's readiness and the
repository extension's load/unload. Models load on demand (the scheduler), so every valid
model in the repository is servable; `unload` takes a model out of service (and out of
memory) until `load` puts it back. An `AgentExtension` (e.g. the operator link's EdgeNode
mode) is started after the core and stopped before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry

from edgefleet_api.types import ModelId, Priority
from node_agent.control.mitigation import Controls
from node_agent.control.sla_monitor import SlaMonitor, SlaSettings
from node_agent.control.thermal import ThermalMonitor, ThermalSettings
from node_agent.control.thermal_sources import SOURCE_KINDS, ThermalSource, detect_source, select_source
from node_agent.errors import Conflict, InvalidInput, InvalidModel, ModelNotFound, ShuttingDown
from node_agent.runtime.engine import ConfigSource, Engine, EngineSettings
from node_agent.runtime.repository import ModelRepository, validate_name, validate_version
from node_agent.runtime.scheduler import ModelScheduler, UnloadOutcome, device_budget_bytes
from node_agent.runtime.stream_pool import PoolSettings, StreamPool
from node_agent.serving.http import HttpSettings, IndexEntry, MetricsHook, build_app
from node_agent.types import ModelConfig

if TYPE_CHECKING:
    from node_agent.generation.async_generator import AsyncGenerator
    from node_agent.generation.engine import GenerationStats
    from node_agent.metrics.agent import AgentCollector, ApiMetrics
    from node_agent.runtime.backends.base import Backend
    from node_agent.runtime.scheduler import Lease

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """A standalone agent's settings; validated at construction."""

    model_repository: Path
    """Root of the model repository (`<model>/<version>/model.yaml`)."""
    device: str = "cpu"
    """'cpu' or 'cuda[:n]'."""
    memory_budget_bytes: int | None = None
    """Bytes models may take; None: the device's total minus a reserve on CUDA, 2 GiB on CPU
    (see `scheduler.device_budget_bytes`)."""
    workers: int | None = None
    """Stream pool workers (one CUDA stream each); None: 1 on CPU (torch already uses every
    core inside an op), 2 on CUDA (one stream computes while the other copies)."""
    urgent_workers: int = 1
    """Stream pool workers that run only critical and high-priority batches (the urgent lane,
    at the highest stream priority on a GPU); 0: none."""
    preload: tuple[str, ...] = ()
    """Models loaded before the agent reports ready: 'name' (newest version) or 'name:version'."""
    drain_delay_s: float = 0.0
    """After SIGTERM, seconds to keep serving while reporting not ready, so load balancers
    (Kubernetes endpoints) stop sending before the listener closes; 0 standalone, a few
    seconds in a cluster."""
    drain_timeout_s: float = 20.0
    """Longest wait for requests in progress when stopping; below Kubernetes' default 30 s
    termination grace period, so the agent exits on its own before it is killed."""
    unload_wait_s: float = 10.0
    """How long a repository unload waits for in-flight batches to release the model."""
    http: HttpSettings = field(default_factory=HttpSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    sla: SlaSettings = field(default_factory=SlaSettings)
    thermal: ThermalSettings = field(default_factory=ThermalSettings)
    thermal_source: str = "auto"
    """'auto' (NVML, else a sysfs GPU zone, else no thermal monitor), 'nvml', 'sysfs',
    'simulated' (a first-order model heated by the agent's own load: demos, tests) or 'off'."""

    def __post_init__(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {self.memory_budget_bytes!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"workers must be an integer >= 1, got {self.workers!r}")
        if not isinstance(self.urgent_workers, int) or self.urgent_workers < 0:
            raise ValueError(f"urgent_workers must be an integer >= 0, got {self.urgent_workers!r}")
        for value in (self.drain_delay_s, self.drain_timeout_s, self.unload_wait_s):
            if not value >= 0:
                raise ValueError("drain_delay_s, drain_timeout_s and unload_wait_s must be >= 0")
        for entry in self.preload:
            parse_model_ref(entry)
        if self.thermal_source not in (*SOURCE_KINDS, "off"):
            kinds = ", ".join((*SOURCE_KINDS, "off"))
            raise ValueError(f"thermal_source must be one of {kinds}, got {self.thermal_source!r}")

    @property
    def num_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return 1 if self.device == "cpu" else 2

    @property
    def max_concurrency(self) -> int:
        """Batches holding a model lease at once (the concurrency gate's ceiling): one per
        worker plus one being prepared, so a worker never waits for the next batch."""
        return self.num_workers + 1

    @property
    def gpu_index(self) -> int:
        _, _, index = self.device.partition(":")
        return int(index) if index.isdigit() else 0


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """'name' or 'name:version' -> (name, version or None); ValueError when malformed."""
    name, sep, version = ref.strip().partition(":")
    try:
        validate_name(name)
        if sep:
            validate_version(version)
    except InvalidModel as e:
        raise ValueError(f"model {ref!r}: {e}") from None
    return name, version if sep else None


class Serving:
    """The HTTP layer's view of the agent (`http_api.ServingApi`); loop thread only.

    Invariants: a model name in `_unloaded` gets ModelNotFound from `config`/`infer` and is
    reported UNAVAILABLE; load/unload run one at a time. With `assigned` (EdgeNode mode) the
    servable versions are the assigned ones, not the repository's, and load/unload are
    refused (409): the operator owns the assignment.
    """

    def __init__(
        self,
        repository: ModelRepository,
        scheduler: ModelScheduler,
        engine: Engine,
        *,
        unload_wait_s: float = 10.0,
        assigned: ConfigOverlay | None = None,
    ) -> None:
        self.repository = repository
        self.assigned = assigned
        self.scheduler = scheduler
        self.engine = engine
        self.unload_wait_s = unload_wait_s
        self._not_ready: str | None = "starting"
        self._unloaded: set[str] = set()
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
        return self._not_ready

    # -- serving -----------------------------------------------------------------------------

    def config(self, name: str, version: str | None) -> ModelConfig:
        self._check_loaded(name)
        return self.engine.config(name, version)

    def versions(self, name: str) -> list[str]:
        if self.assigned is None:
            return self.repository.versions(name)
        versions = self.assigned.versions(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} is not assigned to this node")
        return versions

    def model_not_ready_reason(self, name: str, version: str | None) -> str | None:
        if name in self._unloaded:
            return "unloaded through the repository API"
        try:
            self.engine.config(name, version)
        except InvalidModel as e:
            return str(e)
        return self._not_ready

    async def infer(
        self,
        name: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        priority: Priority,
        timeout_s: float | None,
    ) -> Mapping[str, np.ndarray]:
        self._check_loaded(name)
        return await self.engine.infer(name, version, inputs, priority, timeout_s)

    def _check_loaded(self, name: str) -> None:
        if name in self._unloaded:
            raise ModelNotFound(
                f"model {name!r} is unloaded; POST /v2/repository/models/{name}/load serves it again"
            )

    # -- repository extension ----------------------------------------------------------------

    def index(self) -> list[IndexEntry]:
        if self.assigned is not None:
            return [IndexEntry(c.name, c.version, "READY") for c in self.assigned.models()]
        scan = self.repository.scan()
        entries = [
            IndexEntry(c.name, c.version, "UNAVAILABLE", "unloaded")
            if c.name in self._unloaded
            else IndexEntry(c.name, c.version, "READY")
            for c in scan.models
        ]
        for path, why in scan.broken.items():
            if path != self.repository.root:
                entries.append(IndexEntry(path.parent.name, path.name, "UNAVAILABLE", why))
        entries.sort(key=lambda e: (e.name, e.version))
        return entries

    async def load(self, name: str) -> None:
        """Put `name` (back) into service and load its newest version into memory."""
        self._check_unmanaged()
        async with self._control:
            self._check_inside(name)
            self.engine.invalidate(name)
            config = self.repository.config(name)
            await self.scheduler.preload(config)
            self._unloaded.discard(name)
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
            self._unloaded.add(name)
            await self.stop_generators(name)
            self.engine.invalidate(name)
            deadline = time.monotonic() + self.unload_wait_s
            for model_id in resident:
                await self._unload_when_idle(model_id, deadline)
            log.info("repository: unloaded %s", name)

    async def _unload_when_idle(self, model_id: ModelId, deadline_s: float) -> None:
        while True:
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

    # -- generation (the v2 generate extension, `generate_api`) -----------------------------

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
            raise ModelNotFound(f"model {name!r} resolves outside the repository {root}; not loading it")


class AgentExtension(Protocol):
    """Something started with the agent (after its core) and stopped before it."""

    async def start(self, agent: Agent) -> None: ...

    async def stop(self) -> None: ...


class ConfigOverlay(Protocol):
    """Where the engine takes model configs from instead of the repository, and a gate on the
    scheduler's loads (EdgeNode mode: `operator_link.AssignedConfigs`, assigned versions only)."""

    def config(self, name: str, version: str | None = None) -> ModelConfig: ...

    def versions(self, name: str) -> list[str]: ...

    def models(self) -> list[ModelConfig]: ...

    def loader(self, load: Callable[[ModelConfig], Backend]) -> Callable[[ModelConfig], Backend]: ...


class Agent:
    """The composition (see the module docstring). Start and stop explicitly, on one loop."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        extensions: Sequence[AgentExtension] = (),
        metrics: MetricsHook | None = None,
        overlay: ConfigOverlay | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.extensions = tuple(extensions)
        self.overlay = overlay
        """Config source and load gate for the engine (None: the repository, every model)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        """Where the agent's metrics live (its own, never prometheus_client's global one)."""
        self.metrics = metrics
        """GET /metrics body and content type; None: the exposition of `registry`."""
        self.collector: AgentCollector | None = None
        """The scrape-time collector (set at start); others may attach components to it
        later (`collector.sla`, `collector.thermal`)."""
        self.api_metrics: ApiMetrics | None = None
        self.repository: ModelRepository | None = None
        self.scheduler: ModelScheduler | None = None
        self.pool: StreamPool | None = None
        self.engine: Engine | None = None
        self.serving: Serving | None = None
        self.controls: Controls | None = None
        self.sla: SlaMonitor | None = None
        self.thermal: ThermalMonitor | None = None
        """None when no thermal source (see `AgentSettings.thermal_source`)."""
        self._runner: web.AppRunner | None = None
        self._started_extensions: list[AgentExtension] = []
        self._stopped = False

    @property
    def port(self) -> int:
        """The TCP port the HTTP API listens on (useful with port 0)."""
        assert self._runner is not None, "the agent is not started"
        address = self._runner.addresses[0]
        return int(address[1])

    async def start(self) -> None:
        """Start every part; returns once the agent is ready (preloads done). On failure,
        whatever was started is stopped again and the error propagates."""
        await self.listen()
        await self.become_ready()

    async def listen(self) -> None:
        """First half of `start`: the core and the HTTP API (live, not yet ready)."""
        try:
            await self._start_core()
            await self._start_http()
        except BaseException:
            await self.stop()
            raise

    async def become_ready(self) -> None:
        """Second half of `start`: extensions, then preloads, then ready."""
        assert self.serving is not None and self.scheduler is not None and self.repository is not None
        try:
            for extension in self.extensions:
                await extension.start(self)
                self._started_extensions.append(extension)
            for ref in self.settings.preload:
                name, version = parse_model_ref(ref)
                config = self.repository.config(name, version)
                self.serving.set_not_ready(f"loading {config.id}")
                await self.scheduler.preload(config)
                log.info("preloaded %s", config.id)
        except BaseException:
            await self.stop()
            raise
        # What exists now (torch, the preloaded models, the app) lives as long as the process:
        # frozen out of the cyclic GC, full collections no longer walk it (walking a loaded
        # process paused the event loop for 50-115 ms in bench.overload).
        gc.collect()
        gc.freeze()
        self.serving.set_ready()
        s = self.settings
        log.info(
            "agent ready: repository %s, device %s, %d worker(s), budget %d bytes, port %d",
            self.repository.root, s.device, s.num_workers, self.scheduler.budget_bytes, self.port,
        )  # fmt: skip

    async def _start_core(self) -> None:
        s = self.settings
        root = Path(s.model_repository)
        if not root.is_dir():
            raise NotADirectoryError(f"model repository {root} is not a directory")
        if s.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"device {s.device} requested but CUDA is not available")
        repository = self.repository = ModelRepository(root)
        budget = s.memory_budget_bytes
        if budget is None:
            budget = device_budget_bytes(s.device)

        def load(config: ModelConfig) -> Backend:
            return repository.load(config, s.device)

        source: ConfigSource = repository
        loader: Callable[[ModelConfig], Backend] = load
        if self.overlay is not None:  # EdgeNode mode: assigned versions only
            source, loader = self.overlay, self.overlay.loader(load)
        self.scheduler = ModelScheduler(budget, loader)
        self.pool = StreamPool(
            PoolSettings(num_workers=s.num_workers, device=s.device, urgent_workers=s.urgent_workers)
        ).start()
        controls = self.controls = Controls(shed_retry_after_s=s.sla.interval_s)
        gate = controls.gate_for(self.scheduler, s.max_concurrency)
        sla = self.sla = SlaMonitor(controls, s.sla)
        policies = sla.policy_factory(workers=s.num_workers, max_queue_rows=s.engine.max_queue_rows)
        engine = self.engine = Engine(
            source, gate, self.pool, s.engine, policy_factory=policies, admission=controls.check_admission
        )
        sla.attach(lambda m: engine.batcher(m.name, m.version), configs=source.config)
        thermal_source = self._thermal_source(gate.meter())
        if thermal_source is not None:
            self.thermal = ThermalMonitor(thermal_source, controls, s.thermal)
        self.serving = Serving(
            repository, self.scheduler, self.engine, unload_wait_s=s.unload_wait_s, assigned=self.overlay
        )
        self._register_metrics()
        sla.start()
        if self.thermal is not None:
            self.thermal.start()

    def _thermal_source(self, load: Callable[[], float]) -> ThermalSource | None:
        kind, index = self.settings.thermal_source, self.settings.gpu_index
        if kind == "off":
            return None
        if kind == "auto":
            found = detect_source(index)
            if found is None:
                log.info("thermal: no sensor found; thermal monitor off (see --thermal-source)")
            return found
        return select_source(kind, gpu_index=index, load=load)

    def _register_metrics(self) -> None:
        """The agent's collector and the HTTP layer's per-request metrics, on `registry`."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from node_agent.metrics.agent import (
            ApiMetrics,
            engine_batchers,
            register_agent_metrics,
            torch_gpu_memory,
        )

        scheduler, device = self.scheduler, self.settings.device
        assert scheduler is not None and self.engine is not None
        self.collector = register_agent_metrics(
            self.registry,
            batchers=engine_batchers(self.engine, lambda: [r.model_id for r in scheduler.resident()]),
            pool=self.pool,
            scheduler=scheduler,
            sla=self.sla,
            thermal=self.thermal,
            controls=self.controls,
            gpu_memory=torch_gpu_memory(device) if device.startswith("cuda") else None,
        )
        self.api_metrics = ApiMetrics(self.registry)
        if self.serving is not None:  # the generate extension's metrics
            from node_agent.metrics.generation import register_generation_metrics

            register_generation_metrics(self.registry, self.serving.generation_stats)
        if self.metrics is None:
            registry = self.registry
            self.metrics = lambda: (generate_latest(registry), CONTENT_TYPE_LATEST)

    async def _start_http(self) -> None:
        assert self.serving is not None
        h = self.settings.http
        app = build_app(self.serving, h, self.metrics, self.api_metrics)
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=logging.getLogger("node_agent.access") if h.access_log else None,
            shutdown_timeout=self.settings.drain_timeout_s,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, h.host, h.port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        """Drain and stop (idempotent): requests in progress finish (bounded by
        `drain_timeout_s`); queued work that cannot is failed with ShuttingDown."""
        if self._stopped:
            return
        self._stopped = True
        if self.serving is not None:
            self.serving.set_not_ready("draining")
            if self.settings.drain_delay_s and self._runner is not None:
                await asyncio.sleep(self.settings.drain_delay_s)  # endpoints drop the agent meanwhile
        for extension in reversed(self._started_extensions):
            try:
                await extension.stop()
            except Exception:
                log.exception("stopping extension %r", extension)
        if self._runner is not None:
            await self._runner.cleanup()
        if self.serving is not None:
            await self.serving.stop_generators()  # after HTTP drained; the rest get ShuttingDown
        for monitor in (self.thermal, self.sla):
            if monitor is not None:
                await monitor.stop()
        if self.engine is not None:
            await self.engine.stop()
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.pool.stop)
        log.info("agent stopped")

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(agent: Agent, on_listening: Callable[[Agent], None] | None = None) -> None:
    """Run `agent` until SIGTERM or SIGINT, then drain and stop it. A signal during startup
    (preloading) stops it too. `on_listening` runs once the HTTP API is up."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def start() -> None:
        await agent.listen()
        if on_listening is not None:
            on_listening(agent)
        await agent.become_ready()

    starting = asyncio.ensure_future(start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start raises here
            await stopping
            log.info("signal received: draining")
        else:
            log.info("signal received while starting: stopping")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    finally:
        stopping.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await agent.stop()
