"""The agent's side of the EdgeNode contract: EdgeNode.spec -> `Assignment`, as pure functions
and small value types (no API server, no disk, no model).

EdgeNode.spec (the operator's) -> `Assignment` (what this node must hold) -> `plan.Plan` (what
to do about it, given what the runtime has) -> EdgeNode.status (`node_status`: what the node
has). `operator_link` does the I/O and calls these.

- `parse_edge_node(obj)`: an EdgeNode (API JSON, or the agent's persisted copy) -> `Assignment`.
- `desired_versions(assignment)`: one `DesiredModel` per model version. Entries of several
  services naming one version share the loaded model: pinned and preload if any entry says
  so, the most urgent priority. Entries that name it with another artifact or digest are
  conflicts (reported Failed); the first by service name wins.
- `traffic_weights(assignment)`: model name -> version -> weight (what `traffic.TrafficSplit` takes).
- `effective_config(base, entry)`: a model.yaml's config as the spec entry amends it.

Artifact URIs (`parse_artifact_uri`): `repo://<model>/<version>/<file>` lies inside the
agent's model repository; `file:///<absolute path>` is copied into it; `https://` (or
`http://`) is downloaded into it, with the model.yaml beside the artifact's URL (a model
repository served over HTTP: a web server, an object store's static site). Any other scheme
(s3, gs, oci, pvc) is `UnsupportedArtifact`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote

from edgefleet_api.types import ModelId, Priority
from node_agent.errors import InvalidModel
from node_agent.types import ModelConfig

SUPPORTED_SCHEMES = ("repo", "file", "https", "http")
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.DOTALL)


class InvalidAssignment(ValueError):
    """An EdgeNode object (or its persisted copy) is malformed as a whole."""


class UnsupportedArtifact(InvalidModel):
    """An artifact URI with a scheme this agent cannot fetch from."""


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
