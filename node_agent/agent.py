"""A standalone agent: model repository + scheduler + stream pool + engine + HTTP API.

`Agent(settings).start()` brings the parts up in dependency order and `stop()` takes them
down in reverse, draining first:

    start: repository -> scheduler -> stream pool -> controls, SLA and thermal monitors
           -> engine -> HTTP and gRPC (live, not ready) -> extensions -> preloads -> ready
    stop:  not ready -> drain delay -> extensions -> HTTP and gRPC (stop listening, wait for
           the requests in progress, bounded, at once) -> generators -> monitors -> engine
           -> scheduler -> stream pool

Load control (`node_agent.control.mitigation`): one `Controls` takes the limits of both monitors.
The SLA monitor wraps every model version's batching policy (it measures each batch and
caps batch size, delay and queue bound while a model mitigates) and the engine asks the
controls before queueing a request, so a class the mitigation sheds is refused with 429
and Retry-After. The thermal monitor reads a real sensor (NVML, a sysfs GPU zone) or, when
asked, the simulated one heated by the concurrency gate's occupancy, and lowers the gate's
concurrency and every model's batch size above its soft limit. Both tick on the event loop.

HTTP starts before the preloads so the liveness probe answers while models load (a slow load
must not get the agent restarted); readiness turns on once they are loaded, and goes off again
while the agent cannot serve (workers hung, repository unreadable: `serving.service`). Temp
files a killed agent left in the repository (partial downloads) are removed at start. `serve(settings)`
runs an agent until SIGTERM or SIGINT, then drains it: `edgefleet-agent serve`.

What the HTTP layer serves is `serving.service.Serving` (the engine behind the agent's
readiness, the repository extension, the generators). An `AgentExtension` (e.g. the operator
link's EdgeNode mode) is started after the core and stopped before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from edgefleet_api.types import ModelId
from node_agent.control.mitigation import Controls
from node_agent.control.sla_monitor import SlaMonitor, SlaSettings
from node_agent.control.thermal import ThermalMonitor, ThermalSettings
from node_agent.control.thermal_sources import SOURCE_KINDS, ThermalSource, detect_source, select_source
from node_agent.errors import InvalidModel
from node_agent.runtime.engine import ConfigSource, Engine, EngineSettings
from node_agent.runtime.memory_budget import device_budget_bytes
from node_agent.runtime.model_names import validate_name, validate_version
from node_agent.runtime.repository import ModelRepository
from node_agent.runtime.scheduler import ModelScheduler
from node_agent.runtime.stream_pool import PoolSettings, StreamPool
from node_agent.serving.connections import GuardedSite
from node_agent.serving.grpc_server import GrpcApi, GrpcSettings
from node_agent.serving.http import HttpSettings, MetricsHook, V2Api
from node_agent.serving.service import HealthSettings, Serving
from node_agent.types import ModelConfig

if TYPE_CHECKING:
    from node_agent.metrics.agent import AgentCollector, ApiMetrics
    from node_agent.runtime.backends.base import Backend

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
    (see `memory_budget.device_budget_bytes`)."""
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
    grpc: GrpcSettings | None = None
    """The v2 gRPC API beside HTTP (same engine, limits and token); None: HTTP only."""
    health: HealthSettings = field(default_factory=HealthSettings)
    """When the agent reports not ready and not live (`serving.service`)."""
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


class AgentExtension(Protocol):
    """Something started with the agent (after its core) and stopped before it; `stop` is called
    also when `start` was cut short (a signal, a failure), so it stops whatever part started."""

    async def start(self, agent: Agent) -> None: ...

    async def stop(self) -> None: ...


class ConfigOverlay(Protocol):
    """Where the engine takes model configs from instead of the repository, and a gate on the
    scheduler's loads (EdgeNode mode: `operator_link.AssignedConfigs`, assigned versions only);
    `Serving` serves its versions (`service.AssignedModels`)."""

    def config(self, name: str, version: str | None = None) -> ModelConfig: ...

    def versions(self, name: str) -> list[str]: ...

    def models(self) -> list[ModelConfig]: ...

    def assigned(self) -> frozenset[ModelId]: ...

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
        self.http_api: V2Api | None = None
        """The HTTP routes, once started."""
        self.grpc_api: GrpcApi | None = None
        """The gRPC service, once started (None without `settings.grpc`)."""
        self._started_extensions: list[AgentExtension] = []
        self._stopped = False

    @property
    def port(self) -> int:
        """The TCP port the HTTP API listens on (useful with port 0)."""
        assert self._runner is not None, "the agent is not started"
        address = self._runner.addresses[0]
        return int(address[1])

    @property
    def grpc_port(self) -> int | None:
        """The TCP port the gRPC API listens on; None without one."""
        return None if self.grpc_api is None else self.grpc_api.port

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
                # Listed before it starts: a start cut short (a signal while an edge node's link
                # waits to converge) is stopped too, threads and all.
                self._started_extensions.append(extension)
                await extension.start(self)
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
        if self.overlay is not None:
            # EdgeNode mode: the repository is ours (artifacts are fetched into it), so it may start
            # as an empty volume: made here. A path that is a file still fails below.
            with contextlib.suppress(FileExistsError):
                root.mkdir(parents=True, exist_ok=True)
        if not root.is_dir():
            raise NotADirectoryError(f"model repository {root} is not a directory")
        if s.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"device {s.device} requested but CUDA is not available")
        repository = self.repository = ModelRepository(root)
        repository.remove_temp_files()  # a killed agent's partial downloads and writes
        budget = s.memory_budget_bytes
        if budget is None:
            budget = device_budget_bytes(s.device)

        def load(config: ModelConfig) -> Backend:
            return repository.load(config, s.device)

        source: ConfigSource = repository
        loader: Callable[[ModelConfig], Backend] = load
        engine_settings = s.engine
        if self.overlay is not None:  # EdgeNode mode: assigned versions only
            source, loader = self.overlay, self.overlay.loader(load)
            # A request naming no version asks the overlay's traffic split each time (a lookup, not a
            # listing): its weights move with every reconcile (canary shares, make before break).
            engine_settings = dataclasses.replace(engine_settings, latest_ttl_s=0.0)
        self.scheduler = ModelScheduler(budget, loader)
        self.pool = StreamPool(
            PoolSettings(num_workers=s.num_workers, device=s.device, urgent_workers=s.urgent_workers)
        ).start()
        controls = self.controls = Controls(shed_retry_after_s=s.sla.interval_s)
        gate = controls.gate_for(self.scheduler, s.max_concurrency)
        sla = self.sla = SlaMonitor(controls, s.sla)
        policies = sla.policy_factory(workers=s.num_workers, max_queue_rows=s.engine.max_queue_rows)
        engine = self.engine = Engine(
            source,
            gate,
            self.pool,
            engine_settings,
            policy_factory=policies,
            admission=controls.check_admission,
        )
        sla.attach(lambda m: engine.batcher(m.name, m.version), configs=source.config)
        thermal_source = self._thermal_source(gate.meter())
        if thermal_source is not None:
            self.thermal = ThermalMonitor(thermal_source, controls, s.thermal)
        self.serving = Serving(
            repository,
            self.scheduler,
            self.engine,
            unload_wait_s=s.unload_wait_s,
            assigned=self.overlay,
            health=s.health,
            histograms=lambda m: sla.stats(m).histograms() if m in sla.models() else None,
        )
        self.scheduler.add_reclaimer(self.serving.release_idle_generator)
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
        api = self.http_api = V2Api(self.serving, h, self.metrics, self.api_metrics)
        self._runner = web.AppRunner(
            api.app,
            handle_signals=False,
            access_log=logging.getLogger("node_agent.access") if h.access_log else None,
            shutdown_timeout=self.settings.drain_timeout_s,
            auto_decompress=False,  # serving.bodies inflates, bounded and in steps
        )
        await self._runner.setup()
        await GuardedSite(self._runner, h.host, h.port, api.guard).start()
        if self.settings.grpc is not None:  # same budget of request bytes in flight as HTTP
            from node_agent.metrics.agent import GrpcMetrics

            grpc_metrics = GrpcMetrics(self.registry)
            grpc_api = GrpcApi(self.serving, self.settings.grpc, h, api.bodies, grpc_metrics)
            await grpc_api.start()
            self.grpc_api = grpc_api

    def serve_artifacts(self, lookup: Callable[[str], Path | None]) -> None:
        """Serve to peers the artifacts `lookup` ('sha256:<hex>' -> verified file) finds
        (`serving.artifact_route`); EdgeNode mode gives its link's verified versions."""
        assert self.http_api is not None, "listen() first"
        self.http_api.artifacts.lookup = lookup

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
        drains = []  # both protocols drain at once, within the one budget
        if self._runner is not None:
            drains.append(self._runner.cleanup())
        if self.grpc_api is not None:
            drains.append(self.grpc_api.stop(self.settings.drain_timeout_s))
        await asyncio.gather(*drains)
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
