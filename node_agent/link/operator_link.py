"""The agent's link to the operator: EdgeNode spec in; EdgeNode status and a Lease out.

`OperatorLink` runs on the agent's event loop beside the engine:

- watch: a worker thread lists this agent's EdgeNode (field selector on its name), then
  watches it from the list's resourceVersion (server-side timeout `watch_timeout_s`, then
  resumed; relisted every `resync_s` and at once on 410 Gone). Errors back off
  exponentially, bounded by `backoff_max_s`. Each new spec is persisted
  (`<state_dir>/assignment-<edge node>.json`, atomic replace) and reconciled.
- reconcile: `plan.plan` on the latest assignment and the runtime's view, run in
  order: traffic weights -> unloads -> memory budget -> prepare (resolve the artifact into
  the model repository, verify its digest) -> preloads, most urgent first. Passes repeat
  every `reconcile_interval_s`, so refused unloads (requests in flight) and failures
  (after `retry_failed_s`) are retried.
- status: every `status_tick_s` the full EdgeNode.status is built; `StatusPacer` decides
  whether it is worth a write; a write is a JSON merge patch against what the API server
  holds, so an unchanged status sends nothing but, at most every `max_interval_s`, a new
  heartbeatTime.
- lease: the coordination.k8s.io Lease `edgefleet-agent-<node>` in `namespace` is renewed
  every `lease_renew_s` (the operator's liveness signal).
- offline: a failed call marks the link offline (`connected` False) and spaces further
  calls by the backoff; the runtime keeps serving the last assignment, and on a start with
  the API server out of reach it serves the persisted one. When a call succeeds again the
  watch relists, the Lease is renewed and the status catches up at once.

In EdgeNode mode (`EdgeNodeMode`, an agent extension; `edgefleet-agent serve --edge-node`)
the engine reads configs from `AssignedConfigs` and the scheduler loads through its
`loader`: only assigned, verified versions are served, with the spec's priority, pinning,
batching and SLA; a request that names no version gets one from `TrafficSplit`.

Threading: the kubernetes client is synchronous; its calls run on the link's own small
thread pool (never the loop's default executor, which the scheduler's loads use). Link
state lives on the loop's thread; the watch thread hands objects over with
`call_soon_threadsafe`.

RBAC the agent needs: edgenodes get/list/watch; edgenodes/status patch; leases
get/create/patch in its namespace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import urljoin, urlsplit

from edgefleet_api import names
from edgefleet_api.patch import merge_patch
from edgefleet_api.types import ModelId
from node_agent import __version__
from node_agent.errors import AgentError, DigestMismatch, InsufficientMemory, InvalidModel, ModelNotFound
from node_agent.link.assignment import (
    Assignment,
    DesiredModel,
    InvalidAssignment,
    desired_versions,
    effective_config,
    parse_artifact_uri,
    parse_edge_node,
)
from node_agent.link.node_status import GpuReading, ModelRecord, StatusInputs, StatusPacer, build_status
from node_agent.link.persistence import decode_persisted, encode_persisted
from node_agent.link.plan import ModelView, RuntimeView, plan, servable_weights
from node_agent.link.traffic import TrafficSplit
from node_agent.runtime.repository import (
    CONFIG_FILE,
    ModelRepository,
    parse_model_config,
    sha256_file,
    version_sort_key,
    write_model_config,
)
from node_agent.runtime.scheduler import ModelScheduler, UnloadOutcome
from node_agent.types import ModelConfig

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from node_agent.control.sla_monitor import SlaMonitor
    from node_agent.control.thermal import ThermalMonitor
    from node_agent.runtime.backends.base import Backend

log = logging.getLogger(__name__)
T = TypeVar("T")

_CHUNK_BYTES = 1 << 20
_GPU_FIELDS = frozenset(f.name for f in dataclasses.fields(GpuReading))


# ---------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """How the link talks to the API server. Times in seconds."""

    edge_node: str
    """Name of this agent's EdgeNode (cluster-scoped; the operator names it after the Node)."""
    namespace: str
    """Namespace of the agent's Lease (the agent Pod's own, `EDGEFLEET_NAMESPACE`)."""
    state_dir: Path
    """Where the last assignment is persisted (must survive a container restart)."""
    endpoint: str | None = None
    """Base URL of this agent's v2 API, reported in status.endpoint."""
    agent_version: str = __version__
    holder_identity: str | None = None
    """Lease holder; default: the Lease's name."""
    watch_timeout_s: int = 60
    """Server-side length of one watch request; it is then resumed from its resourceVersion.
    60 s keeps a half-open connection (an edge link that died silently) from hiding changes
    for long, at one cheap request a minute."""
    resync_s: float = 300.0
    """A full relist this often, whatever the watch says (guards against a missed event)."""
    request_timeout_s: float = 10.0
    """Client-side limit on every call other than the watch; an API server behind a dead
    link is noticed within it."""
    lease_renew_s: float = 10.0
    lease_duration_s: int = 30
    """3 renewals: one lost renewal never makes the operator think the agent is gone
    (its agent grace is 30 s by default)."""
    status_tick_s: float = 1.0
    """How often the status is built and the pacer asked whether to write it."""
    status_min_interval_s: float = 2.0
    status_metrics_interval_s: float = 10.0
    status_max_interval_s: float = 30.0
    reconcile_interval_s: float = 2.0
    """A reconcile pass at least this often, to retry what the last one could not do."""
    retry_failed_s: float = 30.0
    """A failed version (digest mismatch, load error, no memory) is retried after this."""
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    startup_timeout_s: float = 10.0
    """`start()` waits this long for the first answer of the API server; without one it
    serves the persisted assignment."""
    memory_pressure_fraction: float = 0.95

    def __post_init__(self) -> None:
        if not self.edge_node or not self.namespace:
            raise ValueError("edge_node and namespace must be non-empty")
        positive = (
            "watch_timeout_s", "resync_s", "request_timeout_s", "lease_renew_s", "lease_duration_s",
            "status_tick_s", "reconcile_interval_s", "backoff_initial_s", "backoff_max_s",
        )  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.lease_duration_s <= self.lease_renew_s:
            raise ValueError("lease_duration_s must exceed lease_renew_s")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        StatusPacer(self.status_min_interval_s, self.status_metrics_interval_s, self.status_max_interval_s)

    @property
    def state_file(self) -> Path:
        return Path(self.state_dir) / f"assignment-{self.edge_node}.json"


class Backoff:
    """Bounded exponential backoff: initial, x2 per failure, at most `max_s`; each delay is
    drawn from [d/2, d] so a fleet that lost its API server together does not retry in step."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError("need 0 < initial_s <= max_s")
        self.initial_s, self.max_s = initial_s, max_s
        self._rng = rng or random.Random()
        self._failures = 0

    def next(self) -> float:
        """The delay before the next attempt after one more failure."""
        delay = min(self.max_s, self.initial_s * 2.0 ** min(self._failures, 60))
        self._failures += 1
        return delay * (0.5 + 0.5 * self._rng.random())

    def reset(self) -> None:
        self._failures = 0

    @property
    def failures(self) -> int:
        return self._failures


def api_client(kubeconfig: Path | str | None = None, context: str | None = None) -> ApiClient:
    """A kubernetes ApiClient from a kubeconfig file, or in-cluster (service account) if None."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(
            config_file=str(kubeconfig), context=context, client_configuration=configuration
        )
    else:
        config.load_incluster_config(client_configuration=configuration)
    configuration.retries = 1  # one retry for a kept-alive connection the server closed; the link backs off
    return client.ApiClient(configuration)


def rfc3339(seconds: bool = True) -> str:
    """Now, UTC: second precision (metav1.Time) or microseconds (metav1.MicroTime)."""
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%SZ" if seconds else "%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------------------------
# artifacts -> repository


def materialize(repository: ModelRepository, entry: DesiredModel) -> ModelConfig:
    """Make the entry's artifact present in `repository` as `<model>/<version>`, verified
    against the spec's digest, and return its effective config. Blocking (copies, hashes).

    repo:// inside the version's own folder is used in place (model.yaml is left alone);
    anything else (file://, https://, or repo:// naming another folder) is copied or
    downloaded, through a temp file hashed while it is written: bytes that do not match the
    digest never replace anything, and an artifact already there with the digest is kept.
    The signature comes from the model.yaml next to the source, else the one already in the
    target folder. Raises `UnsupportedArtifact`, `DigestMismatch`, `InvalidModel`, OSError.
    """
    where = parse_artifact_uri(entry.artifact_uri)
    target_dir = repository.version_dir(entry.id)
    if where.scheme in ("https", "http"):
        return _download(repository, entry, where.path, target_dir)
    if where.scheme == "repo":
        source = (repository.root / where.path).resolve()
        if not source.is_relative_to(repository.root):
            raise InvalidModel(f"{entry.id}: {entry.artifact_uri} resolves outside the model repository")
    else:
        source = Path(where.path).resolve()
    if not source.exists():
        raise InvalidModel(f"{entry.id}: artifact {entry.artifact_uri} not found ({source})")
    if source == target_dir or (source.is_file() and source.is_relative_to(target_dir)):
        base = _base_config((target_dir,), entry)
        artifact = source if source.is_file() else target_dir / base.artifact
        if not artifact.is_file():
            raise InvalidModel(f"{entry.id}: artifact {artifact} is missing")
        actual = sha256_file(artifact)
        if actual != entry.digest:
            raise DigestMismatch(_mismatch(entry, actual))
        name = artifact.relative_to(target_dir).as_posix()
        config = effective_config(dataclasses.replace(base, artifact=name), entry)
    else:
        source_dir = source if source.is_dir() else source.parent
        base = _base_config((source_dir, target_dir), entry)
        name = source.name if source.is_file() else base.artifact
        _copy_verified(source_dir / name, target_dir / Path(name).name, entry)
        config = effective_config(dataclasses.replace(base, artifact=Path(name).name), entry)
        write_model_config(target_dir, config)
    repository.artifact_path(config)  # the artifact stays inside its version folder
    return config


DOWNLOAD_TIMEOUT_S = 30.0
"""Per read on a download's connection (not the whole transfer: artifacts may be large)."""


def _download(repository: ModelRepository, entry: DesiredModel, url: str, target_dir: Path) -> ModelConfig:
    """https:// (or http://): the artifact and the model.yaml beside it (same URL folder)
    into `target_dir`; the artifact verified against the digest while it streams in."""
    name = PurePosixPath(urlsplit(url).path).name
    _store_verified(lambda: _open_url(url, entry), target_dir / name, entry, url)
    config_file = target_dir / CONFIG_FILE
    if not config_file.is_file():
        text = _fetch_text(urljoin(url, CONFIG_FILE), entry)
        write_atomic(config_file, text)
    try:
        base = parse_model_config(config_file)
    except InvalidModel as e:
        config_file.unlink(missing_ok=True)  # fetched again next time
        raise InvalidModel(f"{entry.id}: the {CONFIG_FILE} beside {url} is invalid: {e}") from None
    config = effective_config(dataclasses.replace(base, artifact=name), entry)
    write_model_config(target_dir, config)
    repository.artifact_path(config)
    return config


def _open_url(url: str, entry: DesiredModel) -> Any:
    request = urllib.request.Request(url, headers={"User-Agent": f"edgefleet-agent/{__version__}"})
    try:
        return urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)  # http(s) only: parsed before
    except urllib.error.HTTPError as e:
        raise InvalidModel(f"{entry.id}: fetching {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise InvalidModel(f"{entry.id}: fetching {url} failed: {reason}") from None


def _fetch_text(url: str, entry: DesiredModel, limit_bytes: int = 1 << 20) -> str:
    with _open_url(url, entry) as response:
        data = response.read(limit_bytes + 1)
    if len(data) > limit_bytes:
        raise InvalidModel(f"{entry.id}: {url} is larger than {limit_bytes} bytes; not a {CONFIG_FILE}")
    return data.decode("utf-8", errors="replace")


def _base_config(folders: tuple[Path, ...], entry: DesiredModel) -> ModelConfig:
    for folder in folders:
        if (folder / CONFIG_FILE).is_file():
            return parse_model_config(folder / CONFIG_FILE)
    raise InvalidModel(
        f"{entry.id}: no {CONFIG_FILE} next to {entry.artifact_uri} (nor in {folders[-1]}); "
        "the agent needs the model's inputs and outputs"
    )


def _mismatch(entry: DesiredModel, actual: str) -> str:
    return (
        f"{entry.id}: artifact {entry.artifact_uri} has digest {actual}, but the EdgeNode spec "
        f"requires {entry.digest}; refusing to load it"
    )


def _copy_verified(source: Path, target: Path, entry: DesiredModel) -> None:
    if not source.is_file():
        raise InvalidModel(f"{entry.id}: artifact {source} is not a file")
    _store_verified(lambda: source.open("rb"), target, entry, str(source))


def _store_verified(
    open_source: Callable[[], AbstractContextManager[BinaryIO]],
    target: Path,
    entry: DesiredModel,
    source: str,
) -> None:
    """The bytes of `open_source()` into `target` through a temp file hashed as it is written:
    bytes that do not match the entry's digest never replace anything. A `target` that
    already has the digest is kept and the source not opened."""
    if target.is_file() and sha256_file(target) == entry.digest:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with open_source() as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = "sha256:" + digest.hexdigest()
        if actual != entry.digest:
            raise DigestMismatch(_mismatch(entry, actual))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("stored %s -> %s", source, target)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (temp file, fsync, rename, fsync of the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with suppress(OSError):  # not every filesystem lets a folder be fsynced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---------------------------------------------------------------------------------------------
# what the engine serves


class AssignedConfigs:
    """The engine's config source in EdgeNode mode (`engine.ConfigSource`): the assigned,
    verified versions only, with the spec's amendments. `version=None` asks `traffic`.
    Mutated on the event loop's thread only; `loader` reads it from executor threads."""

    def __init__(self, traffic: TrafficSplit | None = None) -> None:
        self.traffic = traffic if traffic is not None else TrafficSplit()
        self._configs: dict[ModelId, ModelConfig] = {}

    def loader(self, load: Callable[[ModelConfig], Backend]) -> Callable[[ModelConfig], Backend]:
        """Wrap the scheduler's loader so that it loads assigned versions only, with their
        current config: a batcher the engine built for a version since withdrawn (or whose
        artifact changed) gets `ModelNotFound` (or the new artifact), never the old bytes."""

        def assigned_only(config: ModelConfig) -> Backend:
            current = self._configs.get(config.id)
            if current is None:
                raise ModelNotFound(f"model {config.id} is not assigned to this node")
            return load(current)

        return assigned_only

    def config(self, name: str, version: str | None = None) -> ModelConfig:
        if version is None:
            version = self.traffic.choose(name)
            if version is None or ModelId(name, version) not in self._configs:
                versions = self.versions(name)
                if not versions:
                    raise ModelNotFound(f"model {name!r} is not assigned to this node")
                version = versions[-1]
        config = self._configs.get(ModelId(name, version))
        if config is None:
            raise ModelNotFound(f"model {name}:{version} is not assigned to this node")
        return config

    def versions(self, name: str) -> list[str]:
        """Servable versions of `name`, oldest first."""
        return sorted((m.version for m in self._configs if m.name == name), key=version_sort_key)

    def models(self) -> list[ModelConfig]:
        """Every servable version, by name then version."""
        return [
            self._configs[m]
            for m in sorted(self._configs, key=lambda m: (m.name, version_sort_key(m.version)))
        ]

    def put(self, config: ModelConfig) -> None:
        self._configs[config.id] = config

    def remove(self, model_id: ModelId) -> None:
        self._configs.pop(model_id, None)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._configs


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


@dataclass(slots=True)
class LinkStats:
    """Counters since start (tests and /metrics read them)."""

    status_writes: int = 0
    status_skipped: int = 0
    """Ticks where the pacer or the diff found nothing worth a write."""
    lease_renewals: int = 0
    relists: int = 0
    watch_events: int = 0
    api_errors: int = 0
    reconcile_passes: int = 0
    persisted_writes: int = 0
    last_error: str = ""
    offline_since_s: float | None = None
    errors_by_call: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# the link


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
        gpu: Callable[[], GpuReading] | None = None,
        thermal: Callable[[], Mapping[str, Any] | None] | None = None,
        sla: Callable[[ModelId], Mapping[str, Any] | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`configs`: the engine's config source (default: a new one; pass the one whose
        `loader` wraps the scheduler's). `device_budget_bytes`: the most the device allows
        (default: the scheduler's budget now); a spec budget is capped to it. `gpu`: the
        device reading (default: CUDA memory info, or the scheduler's budget on CPU).
        `thermal`: a mapping of `GpuReading` field names (temperature_c, soft_limit_c,
        throttled, ...) merged into it. `sla`: a model version's SLA window in the CRD's
        shape (p95LatencyMs, ..., met)."""
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
        self.connected = False
        self.stats = LinkStats()
        self._custom = k8s.CustomObjectsApi(client)
        self._coordination = k8s.CoordinationV1Api(client)
        self._device_budget = scheduler.budget_bytes if device_budget_bytes is None else device_budget_bytes
        self._gpu = gpu
        self._thermal = thermal
        self._sla = sla
        self._clock = clock
        self._tracked: dict[ModelId, _Tracked] = {}
        self._spec: Any = None
        self._absent = False
        self._server_status: dict[str, Any] | None = None
        self._weights: dict[str, dict[str, int]] = {}
        self._pacer = StatusPacer(
            settings.status_min_interval_s, settings.status_metrics_interval_s, settings.status_max_interval_s
        )
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._retry_at_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = threading.Event()
        self._watch_response: Any = None
        self._dirty = asyncio.Event()
        self._status_kick = asyncio.Event()
        self._lease_kick = asyncio.Event()
        self._first_contact = asyncio.Event()
        self._converged = asyncio.Event()
        self._persisted: dict[str, Any] | None = None
        self._persist_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start watching, reconciling, reporting; returns once the API server answered (or
        failed to, or `startup_timeout_s` passed: then the persisted assignment is served)."""
        if self._loop is not None:
            raise RuntimeError("OperatorLink.start() called twice")
        self._loop = asyncio.get_running_loop()
        self._pool = ThreadPoolExecutor(max_workers=5, thread_name_prefix="edgefleet-link")
        self._persisted = await self._in_thread(self._read_persisted)
        self._tasks = [
            asyncio.create_task(self._watch_task(), name="link-watch"),
            asyncio.create_task(self._reconcile_task(), name="link-reconcile"),
            asyncio.create_task(self._status_task(), name="link-status"),
            asyncio.create_task(self._lease_task(), name="link-lease"),
        ]
        with suppress(TimeoutError):
            await asyncio.wait_for(self._first_contact.wait(), self.settings.startup_timeout_s)
        if self.assignment is None:
            self._serve_persisted("no answer from the API server")

    async def stop(self) -> None:
        """Stop every task and the watch thread. Models stay loaded (the caller owns the
        scheduler); the Lease is left to expire."""
        self._stopping.set()
        response = self._watch_response
        if response is not None:
            with suppress(Exception):
                response.shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

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

    # -- connectivity ------------------------------------------------------------------------

    def _online(self) -> None:
        was = self.connected
        self.connected = True
        self._backoff.reset()
        self._retry_at_s = 0.0
        if not self._first_contact.is_set():
            self._first_contact.set()
        if not was:
            if self.stats.offline_since_s is not None:
                log.info(
                    "API server reachable again after %.1f s", self._clock() - self.stats.offline_since_s
                )
            self.stats.offline_since_s = None
            self._lease_kick.set()
            self._status_kick.set()

    def _failed(self, call: str, exc: BaseException) -> bool:
        """Account a failed call. True when the API server answered and refused it (4xx other
        than 408/429: RBAC, validation): the link is up, the call is wrong, and it is logged;
        anything else (no answer, timeouts, 5xx) means offline."""
        from kubernetes.client.exceptions import ApiException

        status = exc.status if isinstance(exc, ApiException) else None
        if status is None or not 400 <= status < 500 or status in (408, 429):
            self._offline(call, exc)
            return False
        reason = getattr(exc, "reason", "")
        self.stats.api_errors += 1
        self.stats.errors_by_call[call] = self.stats.errors_by_call.get(call, 0) + 1
        self.stats.last_error = f"{call}: {status} {reason}"
        log.error(
            "EdgeNode %s: the API server refused %s: %s %s", self.settings.edge_node, call, status, reason
        )
        self._online()
        return True

    def _offline(self, call: str, exc: BaseException) -> None:
        self.stats.api_errors += 1
        self.stats.errors_by_call[call] = self.stats.errors_by_call.get(call, 0) + 1
        self.stats.last_error = f"{call}: {type(exc).__name__}: {exc}"
        if self.connected or self.stats.offline_since_s is None:
            log.warning("API server unreachable (%s: %s); serving the last assignment", call, exc)
            self.stats.offline_since_s = self._clock()
        self.connected = False
        self._retry_at_s = self._clock() + self._backoff.next()
        if not self._first_contact.is_set():
            self._first_contact.set()
            self._serve_persisted(str(exc))

    def _may_call(self) -> bool:
        return self.connected or self._clock() >= self._retry_at_s

    # -- the watch (worker thread) -------------------------------------------------------------

    async def _watch_task(self) -> None:
        await self._in_thread(self._watch_forever)

    def _watch_forever(self) -> None:
        """List, then watch from the list's resourceVersion, until stopped (its own thread)."""
        from kubernetes.client.exceptions import ApiException

        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        rv: str | None = None
        listed_at = -float("inf")
        while not self._stopping.is_set():
            try:
                if rv is None or self._clock() - listed_at >= self.settings.resync_s:
                    obj, rv = self._list()
                    listed_at = self._clock()
                    self._post(self._on_listed, obj)
                rv = self._watch_once(rv)
                backoff.reset()
            except Exception as exc:
                if self._stopping.is_set():
                    return
                rv = None
                if isinstance(exc, ApiException) and exc.status == 410:
                    log.info("watch of EdgeNode %s: 410 Gone; relisting", self.settings.edge_node)
                    continue
                self._post(self._failed, "watch", exc)
                self._stopping.wait(backoff.next())

    def _list(self) -> tuple[dict[str, Any] | None, str]:
        t = self.settings.request_timeout_s
        result: Any = self._custom.list_cluster_custom_object(
            names.GROUP,
            names.VERSION,
            names.EDGE_NODE_PLURAL,
            field_selector=f"metadata.name={self.settings.edge_node}",
            _request_timeout=(t, t),
        )
        items = result.get("items") or []
        return (items[0] if items else None), str(result["metadata"]["resourceVersion"])

    def _watch_once(self, rv: str) -> str | None:
        """One watch request; returns the resourceVersion to resume from, None to relist."""
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        s = self.settings
        response: Any = self._custom.list_cluster_custom_object(
            names.GROUP,
            names.VERSION,
            names.EDGE_NODE_PLURAL,
            field_selector=f"metadata.name={s.edge_node}",
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=int(s.watch_timeout_s),
            watch=True,
            _preload_content=False,
            _request_timeout=(s.request_timeout_s, s.watch_timeout_s + s.request_timeout_s),
        )
        self._watch_response = response
        try:
            if response.status != 200:
                raise ApiException(status=response.status, reason=response.reason)
            self._post(self._online)
            for line in iter_resp_lines(response):
                if self._stopping.is_set():
                    return rv
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                if kind != "BOOKMARK":
                    self._post(self._on_event, kind, obj)
            return rv
        finally:
            self._watch_response = None
            response.close()
            response.release_conn()

    def _post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn(*args)` on the loop's thread (from the watch thread)."""
        assert self._loop is not None
        with suppress(RuntimeError):  # the loop closed under a stopping link
            self._loop.call_soon_threadsafe(fn, *args)

    # -- objects in (loop thread) --------------------------------------------------------------

    def _on_listed(self, obj: dict[str, Any] | None) -> None:
        self.stats.relists += 1
        self._online()
        if obj is None:
            self._on_absent()
            return
        self._absent = False
        self._server_status = obj.get("status") or {}
        self._accept(obj, "live")

    def _on_event(self, kind: str, obj: dict[str, Any]) -> None:
        self.stats.watch_events += 1
        self._online()
        if kind == "DELETED":
            self._on_absent()
        elif kind in ("ADDED", "MODIFIED"):
            self._absent = False
            if kind == "ADDED" or self._server_status is None:
                self._server_status = obj.get("status") or {}
            self._accept(obj, "live")

    def _on_absent(self) -> None:
        if self._absent and self.assignment is not None and not self.assignment.models:
            return
        log.warning("EdgeNode %s does not exist; holding no models", self.settings.edge_node)
        self._absent = True
        self._server_status = None
        name = self.settings.edge_node
        self._set_assignment(Assignment(name, name, 0), None, "live")

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
            self._spawn(self._persist(obj))

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
        self._converged.clear()
        self._dirty.set()

    def _serve_persisted(self, why: str) -> None:
        if self.assignment is not None or self._persisted is None:
            return
        log.warning("serving the persisted assignment of EdgeNode %s (%s)", self.settings.edge_node, why)
        self._accept(self._persisted, "persisted")

    # -- persistence ---------------------------------------------------------------------------

    def _read_persisted(self) -> dict[str, Any] | None:
        path = self.settings.state_file
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("cannot read %s: %s", path, e)
            return None
        try:
            return decode_persisted(text, self.settings.edge_node)
        except InvalidAssignment as e:
            log.error("ignoring %s: %s", path, e)
            return None

    async def _persist(self, obj: Mapping[str, Any]) -> None:
        text = encode_persisted(obj, rfc3339())
        async with self._persist_lock:  # writes land in the order specs arrived
            try:
                await self._in_thread(write_atomic, self.settings.state_file, text)
            except OSError as e:
                log.error("cannot persist the assignment to %s: %s", self.settings.state_file, e)
                return
        self.stats.persisted_writes += 1

    # -- reconcile -----------------------------------------------------------------------------

    async def _reconcile_task(self) -> None:
        while True:
            await _wait(self._dirty, self.settings.reconcile_interval_s)
            self._dirty.clear()
            if self.assignment is None:
                continue
            try:
                await self._reconcile_once()
            except Exception:
                log.exception("reconciling EdgeNode %s failed", self.settings.edge_node)

    async def _reconcile_once(self) -> None:
        """One pass of `plan.plan`'s actions (see the module docstring)."""
        assignment = self.assignment
        assert assignment is not None
        self.stats.reconcile_passes += 1
        desired = desired_versions(assignment).versions
        p = plan(assignment, self._view(), self._clock(), self.settings.retry_failed_s)
        for model_id in p.forget:
            self._tracked.pop(model_id, None)
            self.configs.remove(model_id)
        for model_id, want in desired.items():
            self._tracked.setdefault(model_id, _Tracked(want.service)).service = want.service
        self._weights = p.weights
        self._publish_weights()

        refused = await self._unload(p.unload, desired)
        if p.budget_bytes != self.scheduler.budget_bytes:
            self.scheduler.set_budget(p.budget_bytes)
        for entry in p.prepare:
            if entry.id not in refused:
                await self._prepare(entry)
        for model_id in p.preload:
            want = desired[model_id]
            tracked = self._tracked[model_id]
            if model_id not in refused and tracked.prepared_digest == want.digest:
                await self._preload(model_id, tracked)
        self.observed_generation = assignment.generation
        self._status_kick.set()
        if self.assignment is assignment and not refused:
            after = plan(assignment, self._view(), self._clock(), self.settings.retry_failed_s)
            if after.idle:  # else the next periodic pass carries on (never a busy loop)
                self._converged.set()

    async def _unload(
        self, unload: tuple[ModelId, ...], desired: Mapping[ModelId, DesiredModel]
    ) -> set[ModelId]:
        refused: set[ModelId] = set()
        for model_id in unload:
            self.configs.remove(model_id)  # no new requests for it
            tracked = self._tracked.get(model_id)
            if tracked is not None:
                tracked.busy = "unloading"
            outcome = await self.scheduler.unload(model_id)
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
                tracked.busy, tracked.preloaded = "", False
                tracked.prepared_digest = tracked.config = None
        return refused

    async def _prepare(self, entry: DesiredModel) -> None:
        tracked = self._tracked[entry.id]
        tracked.busy = "preparing"
        try:
            config = await self._in_thread(materialize, self.repository, entry)
        except (AgentError, OSError, ValueError) as e:
            self._fail(tracked, entry.digest, e)
            return
        finally:
            tracked.busy = ""
        tracked.config, tracked.prepared_digest = config, entry.digest
        tracked.preloaded = False
        tracked.failed_digest, tracked.message = None, ""
        self.configs.put(config)
        self._publish_weights()
        log.info("prepared %s (%s)", entry.id, entry.digest)

    async def _preload(self, model_id: ModelId, tracked: _Tracked) -> None:
        assert tracked.config is not None
        tracked.busy = "loading"
        try:
            await self.scheduler.preload(tracked.config)
        except Exception as e:  # a backend may raise anything while loading
            self._fail(tracked, tracked.prepared_digest, e)
            return
        finally:
            tracked.busy = ""
        tracked.preloaded = True
        tracked.failed_digest, tracked.message, tracked.insufficient_memory = None, "", False

    def _fail(self, tracked: _Tracked, digest: str | None, exc: BaseException) -> None:
        message = str(exc) or type(exc).__name__
        log.warning("%s", message)
        tracked.failed_digest, tracked.failed_at_s = digest, self._clock()
        tracked.message = message
        tracked.insufficient_memory = isinstance(exc, InsufficientMemory)
        self._publish_weights()

    def _publish_weights(self) -> None:
        servable = [m for m, t in self._tracked.items() if m in self.configs and t.failed_digest is None]
        self.traffic.set_weights(servable_weights(self._weights, servable))

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
            )
        free = max(scheduler.budget_bytes - scheduler.used_bytes, 0)
        return RuntimeView(models, free, self._device_budget)

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The EdgeNode.status this agent would write now."""
        assignment = self.assignment
        desired = desired_versions(assignment).versions
        resident = {r.model_id: r for r in self.scheduler.resident()}
        records = {
            m: self._record(m, want.digest, want.preload, m in resident) for m, want in desired.items()
        }
        leftovers = []
        for model_id in sorted(resident.keys() - desired.keys(), key=str):
            t = self._tracked.get(model_id)
            record = ModelRecord("Unloading", t.prepared_digest if t else None, resident[model_id].size_bytes)
            leftovers.append((t.service if t else "", model_id, record))
        sla: dict[ModelId, Mapping[str, Any]] = {}
        if self._sla is not None:
            for model_id in desired:
                window = self._sla(model_id)
                if window:
                    sla[model_id] = window
        previous = (self._server_status or {}).get("conditions") or []
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
                leftovers=leftovers,
                previous_conditions=previous,
                endpoint=self.settings.endpoint,
                agent_version=self.settings.agent_version,
                memory_pressure_fraction=self.settings.memory_pressure_fraction,
            )
        )

    def _record(self, model_id: ModelId, digest: str, preload: bool, resident: bool) -> ModelRecord:
        t = self._tracked.get(model_id)
        measured = self.scheduler.measured_bytes(model_id)
        if t is None:
            return ModelRecord("Pending")
        if t.busy == "unloading":
            return ModelRecord("Unloading", t.prepared_digest, measured)
        if t.failed_digest == digest and not t.busy:
            return ModelRecord("Failed", message=t.message, insufficient_memory=t.insufficient_memory)
        if t.prepared_digest != digest:
            return ModelRecord("Loading" if t.busy else "Pending")
        if resident:
            return ModelRecord("Ready", digest, measured)
        if t.busy:
            return ModelRecord("Loading", digest)
        if not preload:
            return ModelRecord("Ready", digest, measured, "not resident; loads on its first request")
        if t.preloaded:
            return ModelRecord("Evicted", digest, measured, "evicted to make room; loads on its next request")
        return ModelRecord("Pending", digest)

    def gpu_reading(self) -> GpuReading:
        reading = self._gpu() if self._gpu is not None else self._default_gpu()
        if self._thermal is not None:
            extra = self._thermal() or {}
            updates = {k: v for k, v in extra.items() if k in _GPU_FIELDS and not k.startswith("memory_")}
            if "throttle_reasons" in updates:
                updates["throttle_reasons"] = tuple(updates["throttle_reasons"] or ())
            reading = dataclasses.replace(reading, **updates)
        return reading

    def _default_gpu(self) -> GpuReading:
        if self.device.startswith("cuda"):
            import torch

            device = torch.device(self.device)
            free, total = torch.cuda.mem_get_info(device)
            return GpuReading(torch.cuda.get_device_name(device), int(total), int(total - free), int(free))
        # The device's budget, not the scheduler's (capped by the spec's memoryBudgetBytes): the operator
        # grants from memoryTotalBytes, and a total that echoed its grant would shrink every pass.
        budget, used = self._device_budget, self.scheduler.used_bytes
        return GpuReading("cpu", budget, used, max(budget - used, 0))

    async def _status_task(self) -> None:
        while True:
            await _wait(self._status_kick, self.settings.status_tick_s)
            self._status_kick.clear()
            if self.assignment is None or self._absent or not self._may_call():
                continue
            try:
                await self._report()
            except Exception:
                log.exception("building the status of EdgeNode %s failed", self.settings.edge_node)

    async def _report(self) -> None:
        from kubernetes.client.exceptions import ApiException

        status = self.status()
        now = self._clock()
        if not self._pacer.due(now, self._server_status, status):
            self.stats.status_skipped += 1
            return
        patch = merge_patch(self._server_status or {}, status)
        if not patch:
            self.stats.status_skipped += 1
            return
        t = self.settings.request_timeout_s
        try:
            obj: Any = await self._in_thread(
                self._custom.patch_cluster_custom_object_status,
                names.GROUP,
                names.VERSION,
                names.EDGE_NODE_PLURAL,
                self.settings.edge_node,
                {"status": patch},
                _request_timeout=(t, t),
            )
        except Exception as e:
            if isinstance(e, ApiException) and e.status == 404:
                self._on_absent()
            elif self._failed("status", e):
                self._pacer.wrote(now)  # refused: retry at the pacer's pace, not every tick
            return
        self._online()
        self._server_status = obj.get("status") or {}
        self._pacer.wrote(now)
        self.stats.status_writes += 1

    # -- lease ---------------------------------------------------------------------------------

    async def _lease_task(self) -> None:
        while True:
            if self._may_call():
                try:
                    await self._in_thread(self._renew_lease)
                except Exception as e:
                    self._failed("lease", e)
                else:
                    self._online()
                    self.stats.lease_renewals += 1
            await _wait(self._lease_kick, self.settings.lease_renew_s)
            self._lease_kick.clear()

    def _renew_lease(self) -> None:
        from kubernetes.client.exceptions import ApiException

        s = self.settings
        name = self.lease_name
        now = rfc3339(seconds=False)
        spec = {
            "holderIdentity": s.holder_identity or name,
            "leaseDurationSeconds": s.lease_duration_s,
            "renewTime": now,
        }
        timeout = (s.request_timeout_s, s.request_timeout_s)
        try:
            self._coordination.patch_namespaced_lease(
                name,
                s.namespace,
                {"spec": spec},
                _content_type="application/merge-patch+json",
                _request_timeout=timeout,
            )
        except ApiException as e:
            if e.status != 404:
                raise
            labels = {"app.kubernetes.io/name": names.AGENT_APP, names.LABEL_NODE: self.node_name}
            body: Any = {"metadata": {"name": name, "labels": labels}, "spec": {**spec, "acquireTime": now}}
            try:
                self._coordination.create_namespaced_lease(s.namespace, body, _request_timeout=timeout)
            except ApiException as e:
                if e.status != 409:  # 409: created meanwhile; the next renewal patches it
                    raise

    # -- helpers -------------------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._loop is not None and self._pool is not None
        call = (lambda: fn(*args, **kwargs)) if kwargs else (lambda: fn(*args))
        return await self._loop.run_in_executor(self._pool, call)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """Until `event` is set or `timeout_s` passes."""
    with suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)


# ---------------------------------------------------------------------------------------------
# the agent's EdgeNode mode


def thermal_fields(monitor: ThermalMonitor) -> Callable[[], Mapping[str, Any] | None]:
    """`OperatorLink(thermal=...)` from a `ThermalMonitor`: its last reading as GpuReading fields."""

    def read() -> Mapping[str, Any] | None:
        status = monitor.status
        if status is None:
            return None
        r = status.reading
        fields: dict[str, Any] = {
            "temperature_c": r.temperature_c,
            "soft_limit_c": status.soft_limit_c,
            "throttled": r.throttled,
            "throttle_reasons": r.throttle_reasons,
            "power_w": r.power_w,
            "utilization": r.utilization,
        }
        if r.name:
            fields["name"] = r.name
        return fields

    return read


def sla_windows(monitor: SlaMonitor) -> Callable[[ModelId], Mapping[str, Any] | None]:
    """`OperatorLink(sla=...)` from an `SlaMonitor`: a model version's last window, or None."""

    def read(model_id: ModelId) -> Mapping[str, Any] | None:
        try:
            return monitor.status(model_id)
        except KeyError:  # not tracked (no request yet)
            return None

    return read


class EdgeNodeMode:
    """The agent's EdgeNode mode, an `agent.AgentExtension`: runs an `OperatorLink` on the
    agent's repository and scheduler. Give the agent `configs` as its config overlay, so the
    engine serves assigned versions only: `Agent(settings, extensions=[mode], overlay=mode.configs)`.

    `start` returns once the first assignment (live or persisted) is in place, bounded by
    `ready_timeout_s`, so the agent reports ready with its models loaded. Thermal and SLA
    fields in the status come from `thermal`/`sla` when given, else from the agent's own
    monitors (`agent.thermal`, `agent.sla`)."""

    def __init__(
        self,
        settings: LinkSettings,
        kubeconfig: Path | str | None = None,
        *,
        ready_timeout_s: float = 300.0,
        thermal: Callable[[], Mapping[str, Any] | None] | None = None,
        sla: Callable[[ModelId], Mapping[str, Any] | None] | None = None,
    ) -> None:
        self.settings = settings
        self.kubeconfig = kubeconfig
        self.ready_timeout_s = ready_timeout_s
        self.thermal, self.sla = thermal, sla
        self.configs = AssignedConfigs()
        self.link: OperatorLink | None = None
        self._client: ApiClient | None = None

    async def start(self, agent: Any) -> None:
        """`agent`: a started core (`node_agent.agent.Agent`: repository, scheduler, settings)."""
        assert agent.repository is not None and agent.scheduler is not None
        thermal, sla = self.thermal, self.sla
        if thermal is None and getattr(agent, "thermal", None) is not None:
            thermal = thermal_fields(agent.thermal)
        if sla is None and getattr(agent, "sla", None) is not None:
            sla = sla_windows(agent.sla)
        self._client = await asyncio.to_thread(api_client, self.kubeconfig)
        self.link = OperatorLink(
            self.settings,
            self._client,
            agent.repository,
            agent.scheduler,
            device=agent.settings.device,
            configs=self.configs,
            thermal=thermal,
            sla=sla,
        )
        await self.link.start()
        if self.link.assignment is not None and not await self.link.wait_converged(self.ready_timeout_s):
            log.warning(
                "EdgeNode %s: not converged after %.0f s", self.settings.edge_node, self.ready_timeout_s
            )

    async def stop(self) -> None:
        if self.link is not None:
            await self.link.stop()
        if self._client is not None:
            self._client.close()
