"""The agent's side of the EdgeNode contract, as pure functions and small value types.

EdgeNode.spec (the operator's) -> `Assignment` (what this node must hold) -> `Plan` (what
to do about it, given what the runtime has) -> EdgeNode.status (what the node has). No
function here touches the API server, the disk or a model; `operator_link` does, and calls
these.

- `parse_edge_node(obj)`: an EdgeNode (API JSON, or the agent's persisted copy) -> `Assignment`.
- `desired_versions(assignment)`: one `DesiredModel` per model version. Entries of several
  services naming one version share the loaded model: pinned and preload if any entry says
  so, the most urgent priority. Entries that name it with another artifact or digest are
  conflicts (reported Failed); the first by service name wins.
- `plan(assignment, view, now_s)`: desired versions + what the runtime has -> `Plan`.
- `TrafficSplit`: model name -> version by weight, deterministic given a seed and a counter.
- `encode_persisted` / `decode_persisted`: the assignment the agent keeps on disk to serve
  when the API server is out of reach.
- `build_status`, `StatusPacer`: EdgeNode.status, and when to send it (as `edgefleet_api.patch.merge_patch`).

Artifact URIs (`parse_artifact_uri`): `repo://<model>/<version>/<file>` lies inside the
agent's model repository; `file:///<absolute path>` is copied into it; `https://` (or
`http://`) is downloaded into it, with the model.yaml beside the artifact's URL (a model
repository served over HTTP: a web server, an object store's static site). Any other scheme
(s3, gs, oci, pvc) is `UnsupportedArtifact`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote

from edgefleet_api.types import ModelId, Priority
from node_agent.errors import InvalidModel
from node_agent.runtime.repository import version_sort_key
from node_agent.types import ModelConfig

MODEL_STATES = ("Pending", "Loading", "Ready", "Failed", "Unloading", "Evicted")
"""EdgeNode.status.models[].state, as the CRD enumerates them."""
MAX_STATUS_MODELS = 256
"""The CRD's maxItems for status.models."""
SUPPORTED_SCHEMES = ("repo", "file", "https", "http")
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.DOTALL)


class InvalidAssignment(ValueError):
    """An EdgeNode object (or its persisted copy) is malformed as a whole."""


class UnsupportedArtifact(InvalidModel):
    """An artifact URI with a scheme this agent cannot fetch from."""


# ---------------------------------------------------------------------------------------------
# spec -> assignment


@dataclass(frozen=True, slots=True)
class ArtifactLocation:
    """Where an artifact is: `repo` (path relative to the repository root, POSIX, no '..'),
    `file` (an absolute local path) or `https`/`http` (`path`: the whole URL)."""

    scheme: str
    path: str


def parse_artifact_uri(uri: str) -> ArtifactLocation:
    """`repo://m/v/file`, `file:///abs/path` or `https://host/path/file` -> location;
    `UnsupportedArtifact` for other schemes, `InvalidModel` for a malformed URI."""
    m = _SCHEME_RE.match(uri)
    if not m or not m.group(2):
        raise InvalidModel(f"artifact URI {uri!r} is not '<scheme>://<path>'")
    scheme, rest = m.group(1), unquote(m.group(2))
    if scheme not in SUPPORTED_SCHEMES:
        raise UnsupportedArtifact(
            f"unsupported artifact scheme {scheme!r} in {uri!r}: this agent resolves repo:// (a path "
            "in its model repository), file:// (a local path) and https:// or http:// (a download)"
        )
    if "\\" in rest or "\x00" in rest:
        raise InvalidModel(f"artifact URI {uri!r}: backslashes and NUL are not allowed")
    if scheme in ("https", "http"):
        host, _, path = m.group(2).partition("/")
        if not host or not path or path.endswith("/") or any(c.isspace() for c in uri):
            raise InvalidModel(f"artifact URI {uri!r}: expected {scheme}://<host>/<path of the artifact>")
        return ArtifactLocation(scheme, uri)
    if scheme == "file":
        if not rest.startswith("/"):
            raise InvalidModel(f"artifact URI {uri!r}: file:// needs an absolute path (file:///path)")
        return ArtifactLocation("file", str(PurePosixPath(rest)))
    parts = PurePosixPath(rest).parts
    if rest.startswith("/") or ".." in parts or len(parts) < 2:
        raise InvalidModel(
            f"artifact URI {uri!r}: repo:// takes <model>/<version>[/<file>] inside the repository"
        )
    return ArtifactLocation("repo", "/".join(parts))


@dataclass(frozen=True, slots=True)
class DesiredModel:
    """One entry of EdgeNode.spec.models: a model version a service needs on this node."""

    service: str
    model: str
    version: str
    artifact_uri: str
    digest: str
    format: str = "torchscript"
    task: str = "predict"
    traffic_weight: int = 100
    """Percent of this model's traffic on this node that goes to this version."""
    memory_budget_bytes: int | None = None
    priority: Priority = Priority.NORMAL
    pinned: bool = False
    preload: bool = True
    max_batch_size: int | None = None
    max_queue_delay_s: float | None = None
    p95_latency_s: float | None = None
    p99_latency_s: float | None = None
    min_throughput_rps: float | None = None
    max_error_rate: float | None = None
    sla_window_s: int | None = None

    @property
    def id(self) -> ModelId:
        return ModelId(self.model, self.version)

    @property
    def key(self) -> tuple[str, str, str]:
        """The spec's list-map key: (service, model, version)."""
        return (self.service, self.model, self.version)


@dataclass(frozen=True, slots=True)
class InvalidEntry:
    """A spec entry the agent cannot act on; reported Failed with `message`."""

    service: str
    model: str
    version: str
    message: str


@dataclass(frozen=True, slots=True)
class Assignment:
    """What the operator wants this node to hold (EdgeNode.spec), entries sorted by key."""

    edge_node: str
    node_name: str
    generation: int
    models: tuple[DesiredModel, ...] = ()
    memory_budget_bytes: int | None = None
    drain: bool = False
    invalid: tuple[InvalidEntry, ...] = ()


def parse_edge_node(obj: Mapping[str, Any]) -> Assignment:
    """EdgeNode JSON -> Assignment. A malformed entry becomes an `InvalidEntry`; a malformed
    object (no name, spec not a mapping) raises `InvalidAssignment`."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise InvalidAssignment("EdgeNode without metadata.name")
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise InvalidAssignment(f"EdgeNode {meta['name']}: spec is not a mapping")
    raw_models = spec.get("models") or []
    if not isinstance(raw_models, list):
        raise InvalidAssignment(f"EdgeNode {meta['name']}: spec.models is not a list")
    models: list[DesiredModel] = []
    invalid: list[InvalidEntry] = []
    for raw in raw_models:
        try:
            models.append(_desired(raw))
        except (KeyError, TypeError, ValueError, InvalidModel) as e:
            get = raw.get if isinstance(raw, Mapping) else (lambda _k, d=None: d)
            why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            invalid.append(
                InvalidEntry(str(get("service", "")), str(get("model", "")), str(get("version", "")), why)
            )
    budget = spec.get("memoryBudgetBytes")
    return Assignment(
        edge_node=meta["name"],
        node_name=str(spec.get("nodeName") or meta["name"]),
        generation=int(meta.get("generation") or 0),
        models=tuple(sorted(models, key=lambda d: d.key)),
        memory_budget_bytes=int(budget) if budget is not None else None,
        drain=bool(spec.get("drain", False)),
        invalid=tuple(invalid),
    )


def _desired(raw: Mapping[str, Any]) -> DesiredModel:
    artifact = raw["artifact"]
    digest = str(artifact["digest"])
    if not _DIGEST_RE.match(digest):
        raise ValueError(f"artifact digest {digest!r} is not 'sha256:' and 64 lowercase hex digits")
    weight = int(raw.get("trafficWeight", 100))
    if not 0 <= weight <= 100:
        raise ValueError(f"trafficWeight {weight} is not in [0, 100]")
    batching = raw.get("batching") or {}
    sla = raw.get("sla") or {}
    delay_ms = batching.get("maxQueueDelayMs")
    budget = raw.get("memoryBudgetBytes")
    return DesiredModel(
        service=str(raw["service"]),
        model=str(raw["model"]),
        version=str(raw["version"]),
        artifact_uri=str(artifact["uri"]),
        digest=digest,
        format=str(raw.get("format", "torchscript")),
        task=str(raw.get("task", "predict")),
        traffic_weight=weight,
        memory_budget_bytes=int(budget) if budget else None,
        priority=Priority.parse(raw.get("priority")),
        pinned=bool(raw.get("pinned", False)),
        preload=bool(raw.get("preload", True)),
        max_batch_size=int(batching["maxBatchSize"]) if "maxBatchSize" in batching else None,
        max_queue_delay_s=float(delay_ms) / 1000.0 if delay_ms is not None else None,
        p95_latency_s=_ms_to_s(sla.get("p95LatencyMs")),
        p99_latency_s=_ms_to_s(sla.get("p99LatencyMs")),
        min_throughput_rps=_float(sla.get("minThroughputRps")),
        max_error_rate=_float(sla.get("maxErrorRate")),
        sla_window_s=int(sla["windowSeconds"]) if sla.get("windowSeconds") is not None else None,
    )


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None


def _ms_to_s(value: Any) -> float | None:
    return float(value) / 1000.0 if value is not None else None


@dataclass(frozen=True, slots=True)
class Desired:
    """`desired_versions`' result: model version -> merged entry, and conflicting entries."""

    versions: dict[ModelId, DesiredModel]
    conflicts: dict[tuple[str, str, str], str] = field(default_factory=dict)
    """Entry key -> why it cannot be served (another entry names the version differently)."""


def desired_versions(assignment: Assignment | None) -> Desired:
    """One merged `DesiredModel` per model version (see the module docstring); none when
    there is no assignment or the node is draining."""
    if assignment is None or assignment.drain:
        return Desired({})
    versions: dict[ModelId, DesiredModel] = {}
    conflicts: dict[tuple[str, str, str], str] = {}
    for entry in assignment.models:  # sorted by (service, model, version)
        first = versions.get(entry.id)
        if first is None:
            versions[entry.id] = entry
        elif _artifact_of(first) != _artifact_of(entry):
            conflicts[entry.key] = (
                f"{entry.id} is also assigned by service {first.service} with artifact "
                f"{first.artifact_uri} ({first.digest}); one node holds one artifact per version"
            )
        else:
            versions[entry.id] = dataclasses.replace(
                first,
                pinned=first.pinned or entry.pinned,
                preload=first.preload or entry.preload,
                priority=min(first.priority, entry.priority),
            )
    return Desired(versions, conflicts)


def _artifact_of(entry: DesiredModel) -> tuple[str, str, str]:
    return (entry.artifact_uri, entry.digest, entry.format)


def traffic_weights(assignment: Assignment | None) -> dict[str, dict[str, int]]:
    """Model name -> version -> weight, summed over the services that assign that version
    (a request names a model, not a service). Conflicting entries carry no weight."""
    desired = desired_versions(assignment)
    out: dict[str, dict[str, int]] = {}
    for entry in assignment.models if assignment is not None and not assignment.drain else ():
        if entry.key in desired.conflicts:
            continue
        versions = out.setdefault(entry.model, {})
        versions[entry.version] = versions.get(entry.version, 0) + entry.traffic_weight
    return out


def effective_config(base: ModelConfig, entry: DesiredModel) -> ModelConfig:
    """model.yaml's config as the spec entry amends it: the spec's name, version, digest,
    priority, pinning, batching and SLA win; model.yaml gives the signature. The SLA's
    objectives without a ModelConfig field go into `parameters` (max_error_rate,
    min_throughput_rps, sla_window_s: what the SLA monitor reads). `InvalidModel` when the
    two disagree on what the model is (format, task)."""
    for what, spec_value, yaml_value in (
        ("format", entry.format, base.format),
        ("task", entry.task, base.task),
    ):
        if spec_value != yaml_value:
            raise InvalidModel(
                f"{entry.id}: the EdgeNode spec says {what} {spec_value!r} but the model's "
                f"model.yaml says {yaml_value!r}"
            )
    batch = base.max_batch_size
    if entry.max_batch_size is not None:
        # A TensorRT engine's profile caps its batch; a TorchScript model takes any batch.
        batch = min(batch, entry.max_batch_size) if base.format == "tensorrt" else entry.max_batch_size
    return dataclasses.replace(
        base,
        name=entry.model,
        version=entry.version,
        digest=entry.digest,
        priority=entry.priority,
        pinned=entry.pinned,
        max_batch_size=batch,
        max_queue_delay_s=_pick(entry.max_queue_delay_s, base.max_queue_delay_s),
        p95_latency_s=_pick(entry.p95_latency_s, base.p95_latency_s),
        p99_latency_s=_pick(entry.p99_latency_s, base.p99_latency_s),
        memory_estimate_bytes=_pick(base.memory_estimate_bytes, entry.memory_budget_bytes),
        parameters={**base.parameters, **_sla_parameters(entry)},
    )


def _sla_parameters(entry: DesiredModel) -> dict[str, str]:
    extra = {
        "max_error_rate": entry.max_error_rate,
        "min_throughput_rps": entry.min_throughput_rps,
        "sla_window_s": entry.sla_window_s,
    }
    return {k: str(v) for k, v in extra.items() if v is not None}


def _pick(first: Any, second: Any) -> Any:
    return first if first is not None else second


# ---------------------------------------------------------------------------------------------
# desired + runtime -> plan


@dataclass(frozen=True, slots=True)
class ModelView:
    """What the runtime has for one model version."""

    prepared_digest: str | None = None
    """Digest of the artifact verified in the repository for it; None: not prepared."""
    resident: bool = False
    preloaded: bool = False
    """Preloaded since it was (re)assigned; if it is not resident now, it was evicted."""
    failed_digest: str | None = None
    """The digest whose preparation or load failed last; None: no failure on record."""
    failed_at_s: float = 0.0
    measured_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class RuntimeView:
    models: Mapping[ModelId, ModelView]
    free_bytes: int
    """Budget minus used bytes now."""
    device_budget_bytes: int
    """The most the device allows; a spec budget above it is capped."""


@dataclass(frozen=True, slots=True)
class Plan:
    """Actions, in the order the link runs them: weights, unload, budget, prepare, preload."""

    weights: dict[str, dict[str, int]]
    unload: tuple[ModelId, ...]
    """Resident versions no longer assigned, or whose artifact changed."""
    budget_bytes: int
    prepare: tuple[DesiredModel, ...]
    """Versions whose artifact must be resolved into the repository and verified."""
    preload: tuple[ModelId, ...]
    """Versions to load before their first request, most urgent first (after `prepare`)."""
    forget: tuple[ModelId, ...]
    """Versions the runtime tracks that are neither assigned nor resident."""

    @property
    def idle(self) -> bool:
        """Nothing to do but keep the weights and budget."""
        return not (self.unload or self.prepare or self.preload or self.forget)


def plan(
    assignment: Assignment | None, view: RuntimeView, now_s: float, retry_failed_s: float = 30.0
) -> Plan:
    """What to do to make the runtime hold `assignment`. Pure.

    Invariants: a version is never both unloaded and preloaded unless its artifact changed
    (unload, then prepare and preload the new one); a failure is retried only after
    `retry_failed_s` or when the spec's digest changes; an evicted preloaded version is
    preloaded again only when its measured size fits in free memory (a re-preload never
    evicts, so two preloaded versions that do not fit together cannot evict each other
    in turn).
    """
    desired = desired_versions(assignment).versions
    models = view.models
    tracked = sorted(models.items(), key=lambda kv: _id_key(kv[0]))
    unload = [
        m
        for m, mv in tracked
        if mv.resident and (m not in desired or mv.prepared_digest != desired[m].digest)
    ]
    forget = tuple(m for m, mv in tracked if m not in desired and not mv.resident)

    def backing_off(model_id: ModelId, digest: str) -> bool:
        mv = models.get(model_id)
        return mv is not None and mv.failed_digest == digest and now_s - mv.failed_at_s < retry_failed_s

    prepare: list[DesiredModel] = []
    preload: list[DesiredModel] = []
    for model_id, want in sorted(desired.items(), key=lambda kv: _id_key(kv[0])):
        mv = models.get(model_id, ModelView())
        if backing_off(model_id, want.digest):
            continue
        fresh = mv.prepared_digest != want.digest
        if fresh:
            prepare.append(want)
        if not want.preload:
            continue
        fits = mv.measured_bytes is not None and mv.measured_bytes <= view.free_bytes
        if fresh or model_id in unload or (not mv.resident and (not mv.preloaded or fits)):
            preload.append(want)
    preload.sort(key=lambda d: (d.priority, not d.pinned, _id_key(d.id)))
    budget = view.device_budget_bytes
    if assignment is not None and assignment.memory_budget_bytes is not None:
        budget = min(budget, assignment.memory_budget_bytes)
    return Plan(
        weights=traffic_weights(assignment),
        unload=tuple(unload),
        budget_bytes=budget,
        prepare=tuple(prepare),
        preload=tuple(d.id for d in preload),
        forget=forget,
    )


def _id_key(model_id: ModelId) -> tuple[Any, ...]:
    return (model_id.name, version_sort_key(model_id.version))


def servable_weights(
    weights: Mapping[str, Mapping[str, int]], servable: Iterable[ModelId]
) -> dict[str, dict[str, int]]:
    """`weights` restricted to versions that can serve now (prepared, not failed)."""
    ok = {(m.name, m.version) for m in servable}
    out: dict[str, dict[str, int]] = {}
    for model, versions in weights.items():
        kept = {v: w for v, w in versions.items() if (model, v) in ok}
        if kept:
            out[model] = kept
    return out


# ---------------------------------------------------------------------------------------------
# traffic split

_GOLDEN_64 = 0x9E3779B97F4A7C15
"""2**64 / golden ratio: the Weyl sequence n * this (mod 2**64) is spread as evenly as any."""
_MASK_64 = (1 << 64) - 1


class TrafficSplit:
    """Model name -> version, by weight. Deterministic: the n-th choice for a model depends
    only on its weights, the seed and n, so a run can be replayed.

    The n-th choice takes the point frac((n + seed) / golden ratio) of [0, 1) (exact integer
    arithmetic) and returns the version whose cumulative-weight interval holds it. Over any
    run of N consecutive choices each version's share is within a few requests of
    N * weight / total (the golden-ratio Weyl sequence has discrepancy O(log N / N)), and a
    version's requests are spread through the sequence, never bunched (a 10% canary gets
    every 5th, 8th or 13th request). Versions with weight 0 are never chosen; a model whose
    weights are all 0, or that has none, gets None. `choose` may be called from any thread
    (a race can at worst hand two callers the same counter value).
    """

    def __init__(self, weights: Mapping[str, Mapping[str, int]] | None = None, seed: int = 0) -> None:
        self.seed = seed
        self._tables: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
        self._weights: dict[str, dict[str, int]] = {}
        self._counters: dict[str, int] = {}
        self.set_weights(weights or {})

    def set_weights(self, weights: Mapping[str, Mapping[str, int]]) -> None:
        """Replace every model's weights (a model left out gets None). Counters carry on."""
        tables: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
        for model, versions in weights.items():
            for version, weight in versions.items():
                if not isinstance(weight, int) or weight < 0:
                    raise ValueError(f"{model}:{version}: weight must be an integer >= 0, got {weight!r}")
            ordered = sorted((v for v, w in versions.items() if w > 0), key=version_sort_key)
            cumulative, total = [], 0
            for v in ordered:
                total += versions[v]
                cumulative.append(total)
            tables[model] = (tuple(ordered), tuple(cumulative))
        self._weights = {m: dict(v) for m, v in weights.items()}
        self._tables = tables

    @property
    def weights(self) -> dict[str, dict[str, int]]:
        return {m: dict(v) for m, v in self._weights.items()}

    def choose(self, model: str) -> str | None:
        """The version the next request for `model` goes to (None: no weighted version)."""
        n = self._counters.get(model, 0)
        self._counters[model] = n + 1
        return self.pick(model, n)

    def pick(self, model: str, n: int) -> str | None:
        """The n-th choice for `model` (pure; `choose` is this with a counter)."""
        table = self._tables.get(model)
        if not table or not table[0]:
            return None
        versions, cumulative = table
        total = cumulative[-1]
        point = ((((n + self.seed) * _GOLDEN_64) & _MASK_64) * total) >> 64  # in [0, total)
        lo, hi = 0, len(cumulative) - 1
        while lo < hi:  # first interval whose end is beyond `point`
            mid = (lo + hi) // 2
            if cumulative[mid] > point:
                hi = mid
            else:
                lo = mid + 1
        return versions[lo]


# ---------------------------------------------------------------------------------------------
# persistence

PERSISTED_KIND = "PersistedAssignment"
PERSISTED_FORMAT = 1


def encode_persisted(edge_node_obj: Mapping[str, Any], saved_at: str) -> str:
    """The on-disk copy of an EdgeNode's assignment: its name, generation, resourceVersion and
    spec (never its status), as JSON with sorted keys (the same object writes the same bytes)."""
    meta = edge_node_obj.get("metadata") or {}
    if not isinstance(meta.get("name"), str):
        raise InvalidAssignment("cannot persist an EdgeNode without metadata.name")
    doc = {
        "kind": PERSISTED_KIND,
        "format": PERSISTED_FORMAT,
        "savedAt": saved_at,
        "metadata": {
            "name": meta["name"],
            "generation": int(meta.get("generation") or 0),
            "resourceVersion": str(meta.get("resourceVersion") or ""),
        },
        "spec": edge_node_obj.get("spec") or {},
    }
    return json.dumps(doc, sort_keys=True, indent=1) + "\n"


def decode_persisted(text: str, edge_node: str) -> dict[str, Any]:
    """The EdgeNode-shaped object (metadata + spec) of a persisted assignment for `edge_node`.
    `InvalidAssignment` when the text is not one (corrupt, another format, another node)."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise InvalidAssignment(f"persisted assignment is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != PERSISTED_KIND:
        raise InvalidAssignment("not a persisted assignment")
    if doc.get("format") != PERSISTED_FORMAT:
        found = doc.get("format")
        raise InvalidAssignment(f"persisted assignment format {found!r}, expected {PERSISTED_FORMAT}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or meta.get("name") != edge_node:
        name = meta.get("name") if isinstance(meta, dict) else None
        raise InvalidAssignment(f"persisted assignment is for EdgeNode {name!r}, not {edge_node!r}")
    if not isinstance(doc.get("spec"), dict):
        raise InvalidAssignment("persisted assignment has no spec")
    obj = {"metadata": meta, "spec": doc["spec"]}
    parse_edge_node(obj)  # raises InvalidAssignment if it cannot be used
    return obj


# ---------------------------------------------------------------------------------------------
# status


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One model version's state as the runtime reports it."""

    state: str
    digest: str | None = None
    """Digest of the verified artifact (present once prepared)."""
    memory_bytes: int | None = None
    """Measured at load (resident or evicted models)."""
    message: str = ""
    insufficient_memory: bool = False
    """It failed for lack of memory (sets MemoryPressure)."""

    def __post_init__(self) -> None:
        if self.state not in MODEL_STATES:
            raise ValueError(f"unknown model state {self.state!r}; expected one of {MODEL_STATES}")


@dataclass(frozen=True, slots=True)
class GpuReading:
    """The device as the agent measures it (status.gpu); None: not measured."""

    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    temperature_c: float | None = None
    soft_limit_c: float | None = None
    throttled: bool | None = None
    throttle_reasons: tuple[str, ...] = ()
    power_w: float | None = None
    utilization: float | None = None

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "memoryTotalBytes": max(int(self.memory_total_bytes), 0),
            "memoryUsedBytes": max(int(self.memory_used_bytes), 0),
            "memoryFreeBytes": max(int(self.memory_free_bytes), 0),
        }
        optional = (
            ("temperatureC", _round(self.temperature_c, 1)),
            ("softLimitC", _round(self.soft_limit_c, 1)),
            ("throttled", self.throttled),
            ("throttleReasons", list(self.throttle_reasons) if self.throttle_reasons else None),
            ("powerW", _round(self.power_w, 1)),
            ("utilization", _round(self.utilization, 3)),
        )
        out.update((k, v) for k, v in optional if v is not None)
        return out


def _round(value: float | None, digits: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


_SLA_FIELDS = {
    "p50LatencyMs": 3,
    "p95LatencyMs": 3,
    "p99LatencyMs": 3,
    "throughputRps": 3,
    "errorRate": 5,
}


def sla_status(window: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A model's SLA window in the CRD's shape, numbers rounded (a status diff should not
    chase the fifth decimal); unknown keys dropped; None when there is nothing to report."""
    if not window:
        return None
    out: dict[str, Any] = {}
    for key, digits in _SLA_FIELDS.items():
        value = window.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = round(float(value), digits)
    for key in ("requests", "windowSeconds"):
        value = window.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            out[key] = int(value)
    if isinstance(window.get("met"), bool):
        out["met"] = window["met"]
    return out or None


@dataclass(frozen=True, slots=True)
class StatusInputs:
    """Everything `build_status` reads."""

    assignment: Assignment | None
    records: Mapping[ModelId, ModelRecord]
    """Per assigned model version; a version without a record is Pending."""
    gpu: GpuReading
    budget_bytes: int
    used_bytes: int
    loaded_models: int
    observed_generation: int
    now: str
    """RFC 3339, second precision (heartbeatTime, condition transitions)."""
    sla: Mapping[ModelId, Mapping[str, Any]] = field(default_factory=dict)
    leftovers: Sequence[tuple[str, ModelId, ModelRecord]] = ()
    """(service, version, record) of versions no longer assigned but still resident."""
    previous_conditions: Sequence[Mapping[str, Any]] = ()
    endpoint: str | None = None
    agent_version: str | None = None
    memory_pressure_fraction: float = 0.95
    """MemoryPressure is True at or above this share of the budget in use."""


def build_status(inp: StatusInputs) -> dict[str, Any]:
    """EdgeNode.status (all of it) from the runtime's view. Pure; the same inputs give the
    same status, and conditions keep their lastTransitionTime while their status holds."""
    assignment = inp.assignment
    desired = desired_versions(assignment)
    models: list[dict[str, Any]] = []
    for entry in assignment.models if assignment is not None else ():
        if entry.key in desired.conflicts:
            record = ModelRecord("Failed", message=desired.conflicts[entry.key])
        elif assignment is not None and assignment.drain:
            record = inp.records.get(entry.id) or ModelRecord("Unloading", message="draining")
        else:
            record = inp.records.get(entry.id) or ModelRecord("Pending")
        models.append(_model_status(entry.service, entry.id, record, entry.traffic_weight, inp.sla))
    for bad in assignment.invalid if assignment is not None else ():
        models.append(
            {
                "service": bad.service,
                "model": bad.model,
                "version": bad.version,
                "state": "Failed",
                "message": f"invalid spec entry: {bad.message}",
            }
        )
    for service, model_id, record in inp.leftovers:
        models.append(_model_status(service, model_id, record, 0, inp.sla))
    models.sort(key=lambda m: (m["service"], m["model"], m["version"]))

    conditions = _conditions(inp, models)
    ready = conditions[0]
    status: dict[str, Any] = {
        "observedGeneration": max(int(inp.observed_generation), 0),
        "conditions": conditions,
        "heartbeatTime": inp.now,
        "gpu": inp.gpu.to_status(),
        "models": models[:MAX_STATUS_MODELS],
        "loadedModels": max(int(inp.loaded_models), 0),
        "message": "" if ready["status"] == "True" else ready["message"],
    }
    if inp.agent_version:
        status["agentVersion"] = inp.agent_version
    if inp.endpoint:
        status["endpoint"] = inp.endpoint
    return status


def _model_status(
    service: str,
    model_id: ModelId,
    record: ModelRecord,
    weight: int,
    sla: Mapping[ModelId, Mapping[str, Any]],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "service": service,
        "model": model_id.name,
        "version": model_id.version,
        "state": record.state,
        "trafficWeight": weight,
    }
    if record.digest is not None:
        out["digest"] = record.digest
    if record.memory_bytes is not None:
        out["memoryBytes"] = max(int(record.memory_bytes), 0)
    window = sla_status(sla.get(model_id))
    if window is not None:
        out["sla"] = window
    if record.message:
        out["message"] = record.message
    return out


def _conditions(inp: StatusInputs, models: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    gen = max(int(inp.observed_generation), 0)

    def cond(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
        return condition(type_, status, reason, message, gen, inp.previous_conditions, inp.now)

    not_ready = [m for m in models if m["state"] not in ("Ready", "Unloading")]
    failed = [m for m in not_ready if m["state"] == "Failed"]
    if inp.assignment is not None and inp.assignment.drain:
        ready = cond("Ready", "False", "Draining", "the operator asked this node to drain")
    elif inp.assignment is None:
        ready = cond("Ready", "False", "NoAssignment", "no EdgeNode spec seen yet")
    elif failed:
        why = "; ".join(f"{m['model']}:{m['version']}: {m.get('message', 'failed')}" for m in failed[:3])
        ready = cond("Ready", "False", "ModelFailed", why)
    elif not_ready:
        names = ", ".join(f"{m['model']}:{m['version']} {m['state']}" for m in not_ready[:5])
        ready = cond("Ready", "False", "ModelsNotReady", f"{len(not_ready)} model(s) not ready: {names}")
    else:
        count = sum(1 for m in models if m["state"] == "Ready")
        ready = cond("Ready", "True", "AllModelsReady", f"{count} model(s) ready")

    short = [m for m, r in inp.records.items() if r.state == "Failed" and r.insufficient_memory]
    used_share = inp.used_bytes / inp.budget_bytes if inp.budget_bytes > 0 else 0.0
    in_use = f"{inp.used_bytes} of {inp.budget_bytes} bytes in use"
    if short:
        memory = cond("MemoryPressure", "True", "InsufficientMemory", f"{len(short)} model(s) do not fit")
    elif inp.budget_bytes > 0 and used_share >= inp.memory_pressure_fraction:
        memory = cond("MemoryPressure", "True", "NearBudget", in_use)
    else:
        memory = cond("MemoryPressure", "False", "WithinBudget", in_use)

    gpu = inp.gpu
    if gpu.throttled:
        reasons = ", ".join(gpu.throttle_reasons) or "throttled"
        thermal = cond("ThermalThrottling", "True", "Throttled", f"clocks throttled ({reasons})")
    elif _at_or_above(gpu.temperature_c, gpu.soft_limit_c):
        hot = f"{gpu.temperature_c:.1f} C >= soft limit {gpu.soft_limit_c:.1f} C"
        thermal = cond("ThermalThrottling", "True", "AboveSoftLimit", hot)
    elif gpu.temperature_c is None and gpu.throttled is None:
        thermal = cond("ThermalThrottling", "Unknown", "NoReading", "no thermal reading")
    else:
        thermal = cond("ThermalThrottling", "False", "Normal", "")

    missed = [m for m in models if (m.get("sla") or {}).get("met") is False]
    if missed:
        names = ", ".join(f"{m['model']}:{m['version']}" for m in missed[:5])
        sla = cond("SLAViolated", "True", "SLAMissed", f"{names} missed the SLA")
    else:
        sla = cond("SLAViolated", "False", "NoViolation", "")
    return [ready, memory, thermal, sla]


def _at_or_above(temperature_c: float | None, limit_c: float | None) -> bool:
    return temperature_c is not None and limit_c is not None and temperature_c >= limit_c


def condition(
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    previous: Sequence[Mapping[str, Any]],
    now: str,
) -> dict[str, Any]:
    """A metav1.Condition; lastTransitionTime carries over while the status is unchanged."""
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    return {
        "type": type_,
        "status": status,
        "observedGeneration": generation,
        "lastTransitionTime": since or now,
        "reason": reason,
        "message": message,
    }


_GPU_METRICS = frozenset({"memoryUsedBytes", "memoryFreeBytes", "temperatureC", "powerW", "utilization"})


def _structure(status: Mapping[str, Any]) -> dict[str, Any]:
    """The status without its measurements: what a change must be written for soon."""
    out = {k: v for k, v in status.items() if k not in ("heartbeatTime", "gpu", "conditions", "models")}
    out["gpu"] = {k: v for k, v in (status.get("gpu") or {}).items() if k not in _GPU_METRICS}
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []
    ]
    out["models"] = [
        {**m, "sla": {"met": (m.get("sla") or {}).get("met")}} for m in status.get("models") or []
    ]
    return out


def _measurements(status: Mapping[str, Any]) -> dict[str, Any]:
    gpu = status.get("gpu") or {}
    return {
        "gpu": {k: gpu.get(k) for k in _GPU_METRICS},
        "sla": [m.get("sla") for m in status.get("models") or []],
    }


@dataclass
class StatusPacer:
    """When to write EdgeNode.status. Pure (times are passed in; monotonic seconds).

    A change of state (models, conditions, generation: anything but measurements) is written
    at most every `min_interval_s`; a change of measurements only (memory in use,
    temperature, SLA numbers) at most every `metrics_interval_s`; an unchanged status every
    `max_interval_s` (it refreshes heartbeatTime; liveness itself is the Lease). At 1,000
    nodes the defaults bound status writes to at most 500/s during churn and 100/s (usually
    33/s) in steady state.
    """

    min_interval_s: float = 2.0
    metrics_interval_s: float = 10.0
    max_interval_s: float = 30.0
    last_write_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_interval_s <= self.metrics_interval_s <= self.max_interval_s:
            raise ValueError("need 0 <= min_interval_s <= metrics_interval_s <= max_interval_s")

    def due(self, now_s: float, written: Mapping[str, Any] | None, status: Mapping[str, Any]) -> bool:
        """Whether `status` should be written now, given the status the API server holds."""
        if written is None or self.last_write_s is None:
            return True
        since = now_s - self.last_write_s
        if since >= self.max_interval_s:
            return True
        if _structure(written) != _structure(status):
            return since >= self.min_interval_s
        if _measurements(written) != _measurements(status):
            return since >= self.metrics_interval_s
        return False

    def wrote(self, now_s: float) -> None:
        self.last_write_s = now_s
