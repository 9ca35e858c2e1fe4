"""The agent's link to the operator: EdgeNode spec in; EdgeNode status and a Lease out.

`OperatorLink` runs on the agent's event loop beside the engine and composes:

- watch (`watch.EdgeNodeWatch`, a worker thread): list, then watch this agent's EdgeNode;
  each new spec is persisted (`watch.AssignmentStore`) and reconciled.
- reconcile (here): `plan.plan` on the latest assignment and the runtime's view, run in
  order: traffic weights -> unloads -> memory budget -> prepare (`artifacts.materialize`:
  resolve the artifact into the model repository, verify its digest) -> preloads, most
  urgent first; then planned again on what that did, a few rounds a pass (make before break:
  a replaced version is unloaded in the round after its replacement is ready, see `plan`).
  Passes repeat every `reconcile_interval_s`, so refused unloads (requests in flight) and
  failures (after `retry_failed_s`) are retried. A version kept serving in place of a target
  that cannot be prepared is reported Ready with the reason, and the ServingPrevious
  condition says so.
- status (`status_writer.StatusWriter`): the full EdgeNode.status (`status()`, built here
  from what the link tracks) every `status_tick_s`, written when the pacer says so.
- lease (`lease.LeaseRenewer`): the Lease `edgefleet-agent-<node>` in `namespace`, renewed
  every `lease_renew_s` (the operator's liveness signal).
- offline (`connection.ApiConnection`): a failed call marks the link offline (`connected`
  False) and spaces further calls by the backoff; the runtime keeps serving the last
  assignment, and on a start with the API server out of reach it serves the persisted one.
  When a call succeeds again the watch relists, the Lease is renewed and the status catches
  up at once.

Threading: the kubernetes client is synchronous; its calls run on the link's own small
thread pool (`ApiConnection.run`; never the loop's default executor, which the scheduler's
loads use). Link state lives on the loop's thread; the watch thread hands objects over with
`call_soon_threadsafe`.

RBAC the agent needs: edgenodes get/list/watch; edgenodes/status patch; leases
get/create/patch in its namespace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet_api import names
from edgefleet_api.edge_node import (
    EdgeNodeSpec,
    EdgeNodeStatus,
    GpuStatus,
    ModelAssignment,
    ModelCounters,
    ModelState,
)
from edgefleet_api.sla import SlaWindow
from edgefleet_api.types import ModelId
from node_agent.errors import AgentError, InsufficientMemory
from node_agent.link.artifacts import materialize, prepared_file
from node_agent.link.assigned_configs import AssignedConfigs
from node_agent.link.assignment import Assignment, InvalidAssignment, desired_versions, parse_edge_node
from node_agent.link.connection import ApiConnection, LinkStats, wait_event
from node_agent.link.download import Delivery
from node_agent.link.lease import LeaseRenewer
from node_agent.link.node_cache import NodeCache
from node_agent.link.node_status import ModelRecord, StatusInputs, build_status
from node_agent.link.plan import ModelView, RuntimeView, plan, servable_weights
from node_agent.link.prefetch import Prefetcher
from node_agent.link.settings import LinkSettings, rfc3339
from node_agent.link.status_writer import GpuProbe, StatusWriter
from node_agent.link.watch import AssignmentStore, EdgeNodeWatch
from node_agent.runtime.repository import ModelRepository
from node_agent.runtime.scheduler import ModelScheduler, UnloadOutcome
from node_agent.types import ModelConfig

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Tracked:
    """What the link knows of one model version it manages."""

    service: str
    config: ModelConfig | None = None
    prepared_digest: str | None = None
    busy: str = ""
    """'preparing', 'loading', 'unloading' while the link acts on it."""
    preloaded: bool = False
    failed_digest: str | None = None
    failed_at_s: float = 0.0
    message: str = ""
    insufficient_memory: bool = False
    stale: bool = False
    """Resident, but the loaded copy is not of `prepared_digest` (see `plan.ModelView.stale`)."""


_ROUNDS = 3
"""Plan rounds in one reconcile pass: prepare and load the new, then unload the old (and, where
memory cannot hold both, unload the old, then load the new)."""
DRAIN_S = 1.0
"""A version no longer assigned is unloaded only once it has been out of the traffic split this
long (seconds): requests already routed to it (queued in its batcher, holding no lease yet) run
on it first instead of finding it gone. Requests that hold it are waited for in any case (the
scheduler refuses to unload them)."""


class OperatorLink:
    """Keeps the runtime holding its EdgeNode's spec and the API server informed.

    `start()` and `stop()` explicitly, on the loop that runs the scheduler.
    """

    def __init__(
        self,
        settings: LinkSettings,
        client: ApiClient,
        repository: ModelRepository,
        scheduler: ModelScheduler,
        *,
        device: str = "cpu",
        configs: AssignedConfigs | None = None,
        device_budget_bytes: int | None = None,
        gpu: Callable[[], GpuStatus] | None = None,
        thermal: Callable[[], Mapping[str, Any] | None] | None = None,
        sla: Callable[[ModelId], SlaWindow | None] | None = None,
        counters: Callable[[ModelId], ModelCounters | None] | None = None,
        delivery: Delivery | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`configs`: the engine's config source (default: a new one; pass the one whose
        `loader` wraps the scheduler's). `device_budget_bytes`: the most the device allows
        (default: the scheduler's budget now); a spec budget is capped to it. `gpu`: the
        device reading (default: CUDA memory info, or the scheduler's budget on CPU).
        `thermal`: a mapping of `GpuStatus` field names (temperature_c, soft_limit_c,
        throttled, ...) merged into it. `sla`: a model version's last SLA window (None: none
        yet). `counters`: a model version's cumulative counts (None: none yet). `delivery`: the
        node's downloader (bandwidth limit, retries; its peers follow spec.artifactPeers)."""
        from kubernetes import client as k8s

        self.settings = settings
        self.client = client
        self.repository = repository
        self.scheduler = scheduler
        self.device = device
        self.configs = configs if configs is not None else AssignedConfigs()
        self.traffic = self.configs.traffic
        self.assignment: Assignment | None = None
        self.source = ""
        """Where `assignment` came from: 'live' (the API server) or 'persisted' (disk)."""
        self.observed_generation = 0
        self.stats = LinkStats()
        self.delivery = delivery if delivery is not None else Delivery()
        self._clock = clock
        self._device_budget = scheduler.budget_bytes if device_budget_bytes is None else device_budget_bytes
        self._sla = sla
        self._counters = counters
        self._tracked: dict[ModelId, _Tracked] = {}
        self._spec: Any = None
        self._absent = False
        self._weights: dict[str, dict[str, int]] = {}
        self._held: tuple[ModelId, ...] = ()
        """Versions no longer assigned that serve in place of their model's unready target."""
        self._leaving: dict[ModelId, float] = {}
        """Versions no longer assigned, due to be unloaded -> when they left the traffic split."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty = asyncio.Event()
        self._converged = asyncio.Event()
        self._persisted: dict[str, Any] | None = None
        custom = k8s.CustomObjectsApi(client)
        self._connection = ApiConnection(
            settings,
            self.stats,
            clock,
            on_reconnect=self._on_reconnect,
            on_unreachable=self._serve_persisted,
            on_offline=lambda: self._watch.restart(),
        )
        self._watch = EdgeNodeWatch(
            settings,
            custom,
            clock,
            listed=self._on_listed,
            event=self._on_event,
            answered=self._connection.online,
            failed=self._connection.failed,
        )
        self._store = AssignmentStore(settings, self.stats, self._connection)
        self.cache: NodeCache | None = None
        if settings.cache_dir is not None:
            budget = settings.cache_budget_bytes
            self.cache = NodeCache(settings.cache_dir, budget, in_use=self._assigned_digests)
        self._prefetcher: Prefetcher | None = None
        if self.cache is not None:
            scratch = settings.state_dir / "prefetch"
            run, retry_s = self._connection.run, settings.retry_failed_s
            self._prefetcher = Prefetcher(
                self.cache, run, self.delivery, scratch, lambda: self.assignment, clock, retry_s, self.stats
            )
        self._gpu = GpuProbe(device, self._device_budget, scheduler, gpu, thermal)
        self._reporter = StatusWriter(
            settings,
            custom,
            self._connection,
            self.stats,
            clock,
            build=self.status,
            active=self._reporting,
            on_absent=self._on_absent,
        )
        self._lease = LeaseRenewer(
            settings, k8s.CoordinationV1Api(client), self._connection, self.stats, lambda: self.node_name
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start watching, reconciling, reporting; returns once the API server answered (or
        failed to, or `startup_timeout_s` passed: then the persisted assignment is served)."""
        if self._loop is not None:
            raise RuntimeError("OperatorLink.start() called twice")
        loop = self._loop = asyncio.get_running_loop()
        self._connection.open(loop)
        self._persisted = await self._connection.run(self._store.read)
        if self.cache is not None:
            try:
                await self._connection.run(self.cache.open)
            except OSError as e:  # a read-only or foreign disk: serve without a cache
                log.warning("node cache %s unusable (%s); running without it", self.cache.root, e)
                self.cache = None
        self._tasks = [
            asyncio.create_task(self._connection.run(self._watch.run, loop), name="link-watch"),
            asyncio.create_task(self._reconcile_task(), name="link-reconcile"),
            asyncio.create_task(self._reporter.run(), name="link-status"),
            asyncio.create_task(self._lease.run(), name="link-lease"),
        ]
        with suppress(TimeoutError):
            await asyncio.wait_for(self._connection.first_contact.wait(), self.settings.startup_timeout_s)
        if self.assignment is None:
            self._serve_persisted("no answer from the API server")

    async def stop(self) -> None:
        """Stop every task and the watch thread. Models stay loaded (the caller owns the
        scheduler); the Lease is left to expire."""
        self._watch.stop()
        self.delivery.stop()  # a download waiting out a backoff ends now (its part is kept)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._connection.close()

    async def wait_converged(self, timeout_s: float) -> bool:
        """Wait until a reconcile pass finds nothing left to do; False on timeout."""
        try:
            await asyncio.wait_for(self._converged.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @property
    def node_name(self) -> str:
        return self.assignment.node_name if self.assignment is not None else self.settings.edge_node

    @property
    def lease_name(self) -> str:
        return names.agent_name(self.node_name)

    @property
    def connected(self) -> bool:
        """Whether the API server answered the last call."""
        return self._connection.connected

    def _assigned_digests(self) -> set[str]:
        """The digests the node cache must keep: the assignment's (read from the link's threads:
        `assignment` is replaced whole, never changed in place)."""
        assignment = self.assignment
        if assignment is None:
            return set()
        return {m.artifact.digest for m in (*assignment.models, *assignment.spec.prefetch)}

    def _on_reconnect(self) -> None:
        self._lease.kick()
        self._reporter.kick()

    def _reporting(self) -> bool:
        return self.assignment is not None and not self._absent

    # -- objects in (loop thread) --------------------------------------------------------------

    def _on_listed(self, obj: dict[str, Any] | None) -> None:
        self.stats.relists += 1
        self._connection.online()
        if obj is None:
            self._on_absent()
            return
        self._absent = False
        self._reporter.adopt(obj)
        self._accept(obj, "live")

    def _on_event(self, kind: str, obj: dict[str, Any]) -> None:
        self.stats.watch_events += 1
        self._connection.online()
        if kind == "DELETED":
            self._on_absent()
        elif kind in ("ADDED", "MODIFIED"):
            self._absent = False
            if kind == "ADDED" or self._reporter.server_status is None:
                self._reporter.adopt(obj)
            else:
                self._reporter.observed(obj)
            self._accept(obj, "live")

    def _on_absent(self) -> None:
        if self._absent and self.assignment is not None and not self.assignment.models:
            return
        log.warning("EdgeNode %s does not exist; holding no models", self.settings.edge_node)
        self._absent = True
        self._reporter.server_status, self._reporter.server_version = None, None
        name = self.settings.edge_node
        self._set_assignment(Assignment(name, 0, EdgeNodeSpec(node_name=name)), None, "live")

    def _accept(self, obj: Mapping[str, Any], source: str) -> None:
        try:
            assignment = parse_edge_node(obj)
        except InvalidAssignment as e:
            log.error("EdgeNode %s: %s; keeping the previous assignment", self.settings.edge_node, e)
            return
        spec = obj.get("spec")
        current = self.assignment
        if current is not None and spec == self._spec and assignment.generation == current.generation:
            if source == "live" and self.source != "live":
                self.source = "live"  # the API server confirms what was persisted
            return  # a status write echoed back, or a resync without news
        self._set_assignment(assignment, spec, source)
        if source == "live":
            self._spawn(self._store.save(obj))

    def _set_assignment(self, assignment: Assignment, spec: Any, source: str) -> None:
        log.info(
            "EdgeNode %s generation %d (%s): %d model(s)%s",
            assignment.edge_node,
            assignment.generation,
            source,
            len(assignment.models),
            ", draining" if assignment.drain else "",
        )
        self.assignment, self._spec, self.source = assignment, spec, source
        self.delivery.peers = assignment.spec.artifact_peers
        self._converged.clear()
        self._dirty.set()

    def _serve_persisted(self, why: str) -> None:
        if self.assignment is not None or self._persisted is None:
            return
        log.warning("serving the persisted assignment of EdgeNode %s (%s)", self.settings.edge_node, why)
        self._accept(self._persisted, "persisted")

    # -- reconcile -----------------------------------------------------------------------------

    async def _reconcile_task(self) -> None:
        while True:
            await wait_event(self._dirty, self.settings.reconcile_interval_s)
            self._dirty.clear()
            if self.assignment is None:
                continue
            try:
                await self._reconcile_once()
            except Exception:
                log.exception("reconciling EdgeNode %s failed", self.settings.edge_node)

    async def _reconcile_once(self) -> None:
        """One pass: rounds of `plan.plan`'s actions (see the module docstring) until a round
        finds nothing it can do now."""
        assignment = self.assignment
        assert assignment is not None
        self.stats.reconcile_passes += 1
        refused: set[ModelId] = set()
        for _ in range(_ROUNDS):
            progressed = await self._round(assignment, refused)
            if self.assignment is not assignment or not progressed:
                break
        self.observed_generation = assignment.generation
        self._reporter.kick()
        if self._prefetcher is not None:
            self._prefetcher.start(assignment, self._spawn)
        if self.assignment is assignment and not refused:
            after = plan(assignment, self._view(), self._clock(), self.settings.retry_failed_s)
            if after.idle:  # else the next periodic pass carries on (never a busy loop)
                self._converged.set()

    async def _round(self, assignment: Assignment, refused: set[ModelId]) -> bool:
        """One plan and its actions; whether any of them changed the runtime."""
        desired = desired_versions(assignment).versions
        self.configs.assign(desired)  # known to the API (503 until servable, not 404)
        p = plan(assignment, self._view(), self._clock(), self.settings.retry_failed_s)
        for model_id in p.forget:
            self._tracked.pop(model_id, None)
            self.configs.remove(model_id)
        for model_id, want in desired.items():
            self._tracked.setdefault(model_id, _Tracked(want.service)).service = want.service
        self._weights, self._held = p.weights, p.held
        self._publish_weights()
        now = self._clock()
        self._leaving = {m: self._leaving.get(m, now) for m in p.unload if m not in desired}
        draining = {m for m, since in self._leaving.items() if now - since < DRAIN_S}
        refused |= draining  # unloaded by a later pass (the pass is not converged meanwhile)
        todo = [m for m in p.unload if m not in refused]
        now_refused = await self._unload(tuple(todo), desired)
        refused |= now_refused
        progressed = len(todo) > len(now_refused) or bool(p.forget)
        if p.budget_bytes != self.scheduler.budget_bytes:
            self.scheduler.set_budget(p.budget_bytes)
        for entry in p.prepare:
            if entry.id not in refused:
                progressed |= await self._prepare(entry)
        for model_id in p.preload:
            want = desired[model_id]
            tracked = self._tracked[model_id]
            if (
                model_id not in refused
                and tracked.prepared_digest == want.artifact.digest
                and not tracked.stale
            ):
                progressed |= await self._preload(model_id, tracked)
        self._publish_weights()
        return progressed

    async def _unload(
        self, unload: tuple[ModelId, ...], desired: Mapping[ModelId, ModelAssignment]
    ) -> set[ModelId]:
        refused: set[ModelId] = set()
        for model_id in unload:
            self.configs.remove(model_id)  # no new requests for it
            tracked = self._tracked.get(model_id)
            if tracked is not None:
                tracked.busy = "unloading"
            outcome = await self.scheduler.unload(model_id)
            keep = tracked is not None and model_id in desired and tracked.config is not None
            if keep:
                assert tracked is not None and tracked.config is not None
                self.configs.put(tracked.config)  # a stale copy went: the prepared one serves next
            if outcome in (UnloadOutcome.IN_FLIGHT, UnloadOutcome.LOADING):
                log.info("unloading %s: %s; retrying", model_id, outcome.value)
                refused.add(model_id)
                if tracked is not None:
                    tracked.busy = ""  # the next pass tries again (if it is still resident)
                continue
            log.info("unloaded %s", model_id)
            if model_id not in desired:
                self._tracked.pop(model_id, None)
            elif tracked is not None:
                tracked.busy, tracked.preloaded, tracked.stale = "", False, False
                if not keep:
                    tracked.prepared_digest = tracked.config = None
        return refused

    async def _prepare(self, entry: ModelAssignment) -> bool:
        """Fetch and verify `entry`'s artifact; whether it succeeded. A copy of the version
        resident now is of another artifact: it is marked stale (unloaded before the new loads),
        and keeps serving until then."""
        tracked = self._tracked[entry.id]
        tracked.busy = "preparing"
        try:
            config = await self._connection.run(
                materialize, self.repository, entry, self.delivery, self.cache
            )
        except (AgentError, OSError, ValueError) as e:
            self._fail(tracked, entry.artifact.digest, e)
            return False
        finally:
            tracked.busy = ""
        tracked.config, tracked.prepared_digest = config, entry.artifact.digest
        tracked.stale = self.scheduler.is_resident(entry.id)
        tracked.preloaded = False
        tracked.failed_digest, tracked.message, tracked.insufficient_memory = None, "", False
        if not tracked.stale:
            self.configs.put(config)  # a stale copy keeps its config until it is unloaded
        self._publish_weights()
        log.info("prepared %s (%s)", entry.id, entry.artifact.digest)
        return True

    async def _preload(self, model_id: ModelId, tracked: _Tracked) -> bool:
        assert tracked.config is not None
        tracked.busy = "loading"
        try:
            await self.scheduler.preload(tracked.config)
        except Exception as e:  # a backend may raise anything while loading
            self._fail(tracked, tracked.prepared_digest, e)
            return False
        finally:
            tracked.busy = ""
        tracked.preloaded = True
        tracked.failed_digest, tracked.message, tracked.insufficient_memory = None, "", False
        return True

    def verified_artifact(self, digest: str) -> Path | None:
        """The file of a version this agent prepared (its bytes verified against `digest`,
        'sha256:<hex>': its artifact, or a file of a checkpoint folder, `prepared_file`), for
        peers to fetch; None when it holds none. Thread-safe enough for the HTTP handler: it
        reads a snapshot of what the link tracks."""
        for tracked in list(self._tracked.values()):
            config, prepared = tracked.config, tracked.prepared_digest
            if config is None or prepared is None or tracked.busy:
                continue
            try:
                path = prepared_file(self.repository.artifact_path(config), prepared, config.format, digest)
            except AgentError:
                continue
            if path is not None:
                return path
        return None

    def _fail(self, tracked: _Tracked, digest: str | None, exc: BaseException) -> None:
        message = str(exc) or type(exc).__name__
        log.warning("%s", message)
        tracked.failed_digest, tracked.failed_at_s = digest, self._clock()
        tracked.message = message
        tracked.insufficient_memory = isinstance(exc, InsufficientMemory)
        self._publish_weights()

    def _publish_weights(self) -> None:
        """Traffic to the assigned versions that are ready; while a model has none, to the
        versions it held before (make before break); else to those that load on demand."""
        desired = desired_versions(self.assignment).versions
        servable, ready = [], []
        for m, t in self._tracked.items():
            if m not in self.configs or t.failed_digest is not None:
                continue
            servable.append(m)
            want = desired.get(m)
            if want is not None and (t.preloaded or not want.preload or self.scheduler.is_resident(m)):
                ready.append(m)
        held = [m for m in self._held if m in self.configs or self.scheduler.is_resident(m)]
        self.traffic.set_weights(servable_weights(self._weights, servable, ready=ready, held=held))

    def _view(self) -> RuntimeView:
        scheduler = self.scheduler
        resident = {r.model_id for r in scheduler.resident()}
        models: dict[ModelId, ModelView] = {}
        for model_id in self._tracked.keys() | resident:
            t = self._tracked.get(model_id)
            models[model_id] = ModelView(
                prepared_digest=t.prepared_digest if t else None,
                resident=model_id in resident,
                preloaded=t.preloaded if t else False,
                failed_digest=t.failed_digest if t else None,
                failed_at_s=t.failed_at_s if t else 0.0,
                measured_bytes=scheduler.measured_bytes(model_id),
                stale=t.stale if t else False,
                insufficient_memory=t.insufficient_memory if t else False,
            )
        free = max(scheduler.budget_bytes - scheduler.used_bytes, 0)
        return RuntimeView(models, free, self._device_budget)

    # -- status --------------------------------------------------------------------------------

    def status(self) -> EdgeNodeStatus:
        """The EdgeNode.status this agent would write now."""
        assignment = self.assignment
        desired = desired_versions(assignment).versions
        resident = {r.model_id: r for r in self.scheduler.resident()}
        records = {
            m: self._record(m, want.artifact.digest, want.preload, m in resident)
            for m, want in desired.items()
        }
        leftovers = []
        weights = self.traffic.weights
        held = {m for m in self._held if m not in desired and (m in resident or m in self.configs)}
        for model_id in sorted((resident.keys() - desired.keys()) | held, key=str):
            t = self._tracked.get(model_id)
            size = resident[model_id].size_bytes if model_id in resident else None
            digest = t.prepared_digest if t else None
            if model_id in held:
                why = self._why_held(model_id, desired, records)
                weight = weights.get(model_id.name, {}).get(model_id.version, 0)
                record = ModelRecord(ModelState.READY, digest, size, why, held=True, traffic_weight=weight)
            else:
                record = ModelRecord(ModelState.UNLOADING, digest, size)
            leftovers.append((t.service if t else "", model_id, record))
        sla: dict[ModelId, SlaWindow] = {}
        if self._sla is not None:
            for model_id in desired:
                window = self._sla(model_id)
                if window is not None:
                    sla[model_id] = window
        counts: dict[ModelId, ModelCounters] = {}
        if self._counters is not None:
            for model_id in (*desired, *(m for _, m, _ in leftovers)):
                c = self._counters(model_id)
                if c is not None:
                    counts[model_id] = c
        written = self._reporter.written()
        previous = written.conditions if written is not None else ()
        return build_status(
            StatusInputs(
                assignment=assignment,
                records=records,
                gpu=self.gpu_reading(),
                budget_bytes=self.scheduler.budget_bytes,
                used_bytes=self.scheduler.used_bytes,
                loaded_models=len(resident),
                observed_generation=self.observed_generation,
                now=rfc3339(),
                sla=sla,
                counters=counts,
                leftovers=leftovers,
                previous_conditions=previous,
                endpoint=self.settings.endpoint,
                agent_version=self.settings.agent_version,
                memory_pressure_fraction=self.settings.memory_pressure_fraction,
            )
        )

    @staticmethod
    def _why_held(
        model_id: ModelId, desired: Mapping[ModelId, ModelAssignment], records: Mapping[ModelId, ModelRecord]
    ) -> str:
        """Why `model_id` still serves: its model's assigned versions and what they wait on."""
        targets = sorted((m for m in desired if m.name == model_id.name), key=str)
        parts = []
        for m in targets:
            r = records.get(m)
            state = r.state.value if r is not None else ModelState.PENDING.value
            parts.append(f"{m} {state}" + (f" ({r.message})" if r is not None and r.message else ""))
        return f"serving in place of {', '.join(parts) or 'its target'}: not replaced until one is ready"

    def _record(self, model_id: ModelId, digest: str, preload: bool, resident: bool) -> ModelRecord:
        t = self._tracked.get(model_id)
        measured = self.scheduler.measured_bytes(model_id)
        if t is None:
            return ModelRecord(ModelState.PENDING)
        if t.busy == "unloading":
            return ModelRecord(ModelState.UNLOADING, t.prepared_digest, measured)
        if t.failed_digest == digest:  # Failed while it is retried, too: no flapping status
            return ModelRecord(
                ModelState.FAILED, message=t.message, insufficient_memory=t.insufficient_memory
            )
        if t.prepared_digest != digest:
            return ModelRecord(ModelState.LOADING if t.busy else ModelState.PENDING)
        if resident:
            return ModelRecord(ModelState.READY, digest, measured)
        if t.busy:
            return ModelRecord(ModelState.LOADING, digest)
        if not preload:
            return ModelRecord(ModelState.READY, digest, measured, "not resident; loads on its first request")
        if t.preloaded:
            evicted = "evicted to make room; loads on its next request"
            return ModelRecord(ModelState.EVICTED, digest, measured, evicted)
        return ModelRecord(ModelState.PENDING, digest)

    def gpu_reading(self) -> GpuStatus:
        """The device as the status reports it now (see `status_writer.GpuProbe`)."""
        return self._gpu.read()

    # -- helpers -------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)
