"""The agent's side of the EdgeNode contract: EdgeNode.spec -> `Assignment`, as pure functions
and small value types (no API server, no disk, no model).

EdgeNode.spec (the operator's) -> `Assignment` (what this node must hold) -> `plan.Plan` (what
to do about it, given what the runtime has) -> EdgeNode.status (`node_status`: what the node
has). `operator_link` does the I/O and calls these.

- `parse_edge_node(obj)`: an EdgeNode (API JSON, or the agent's persisted copy) -> `Assignment`.
- `desired_versions(assignment)`: one (merged) `ModelAssignment` per model version. Entries of several
  services naming one version share the loaded model: pinned and preload if any entry says
  so, the most urgent priority. Entries that name it with another artifact or digest are
  conflicts (reported Failed); the first by service name wins.
- `traffic_weights(assignment)`: model name -> version -> weight (what `traffic.TrafficSplit` takes).
- `effective_config(base, entry)`: a model.yaml's config as the spec entry amends it.

Artifact URIs (`parse_artifact_uri`): `repo://<model>/<version>/<file>` lies inside the
agent's model repository; `file:///<absolute path>` is copied into it; `https://` (or
`http://`) is downloaded into it, with the model.yaml beside the artifact's URL (a model
repository served over HTTP: a web server, an object store's static site); `oci://<registry>/
<repository>@sha256:<manifest digest>` is pulled from an OCI registry (`link.oci`). Any other
scheme (s3, gs, pvc) is `UnsupportedArtifact`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote

from edgefleet_api.edge_node import EdgeNodeSpec, InvalidEntry, ModelAssignment
from edgefleet_api.sla import SlaObjectives
from edgefleet_api.types import ModelId
from node_agent.errors import InvalidModel
from node_agent.types import (
    KV_BLOCK_SIZE_PARAMETER,
    MAX_SEQUENCES_PARAMETER,
    MAX_TOKENS_PARAMETER,
    ModelConfig,
)

SUPPORTED_SCHEMES = ("repo", "file", "https", "http", "oci")
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
            "in its model repository), file:// (a local path), https:// or http:// (a download) and "
            "oci:// (a registry)"
        )
    if "\\" in rest or "\x00" in rest:
        raise InvalidModel(f"artifact URI {uri!r}: backslashes and NUL are not allowed")
    if scheme in ("https", "http"):
        host, _, path = m.group(2).partition("/")
        if not host or not path or path.endswith("/") or any(c.isspace() for c in uri):
            raise InvalidModel(f"artifact URI {uri!r}: expected {scheme}://<host>/<path of the artifact>")
        return ArtifactLocation(scheme, uri)
    if scheme == "oci":
        return ArtifactLocation("oci", uri)  # checked by `oci.parse_oci` where it is pulled
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
class Assignment:
    """What the operator wants this node to hold: EdgeNode `edge_node`'s spec (the contract's typed
    `EdgeNodeSpec`: entries sorted by key, unreadable ones in `invalid`) at `generation`."""

    edge_node: str
    generation: int
    spec: EdgeNodeSpec

    @property
    def models(self) -> tuple[ModelAssignment, ...]:
        return self.spec.models

    @property
    def invalid(self) -> tuple[InvalidEntry, ...]:
        return self.spec.invalid

    @property
    def drain(self) -> bool:
        return self.spec.drain

    @property
    def memory_budget_bytes(self) -> int | None:
        return self.spec.memory_budget_bytes

    @property
    def node_name(self) -> str:
        return self.spec.node_name


def parse_edge_node(obj: Mapping[str, Any]) -> Assignment:
    """EdgeNode JSON -> Assignment. A malformed entry becomes an `InvalidEntry`; a malformed
    object (no name, spec not a mapping) raises `InvalidAssignment`."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise InvalidAssignment("EdgeNode without metadata.name")
    try:
        spec = EdgeNodeSpec.from_obj(obj.get("spec") or {}, meta["name"])
    except (TypeError, ValueError) as e:
        raise InvalidAssignment(str(e)) from None
    return Assignment(edge_node=meta["name"], generation=int(meta.get("generation") or 0), spec=spec)


@dataclass(frozen=True, slots=True)
class Desired:
    """`desired_versions`' result: model version -> merged entry, and conflicting entries."""

    versions: dict[ModelId, ModelAssignment]
    conflicts: dict[tuple[str, str, str], str] = field(default_factory=dict)
    """Entry key -> why it cannot be served (another entry names the version differently)."""


def desired_versions(assignment: Assignment | None) -> Desired:
    """One merged `ModelAssignment` per model version (see the module docstring); none when
    there is no assignment or the node is draining."""
    if assignment is None or assignment.drain:
        return Desired({})
    versions: dict[ModelId, ModelAssignment] = {}
    conflicts: dict[tuple[str, str, str], str] = {}
    for entry in assignment.models:  # sorted by (service, model, version)
        first = versions.get(entry.id)
        if first is None:
            versions[entry.id] = entry
        elif _artifact_of(first) != _artifact_of(entry):
            conflicts[entry.key] = (
                f"{entry.id} is also assigned by service {first.service} with artifact "
                f"{first.artifact.uri} ({first.artifact.digest}); one node holds one artifact per version"
            )
        else:
            versions[entry.id] = dataclasses.replace(
                first,
                pinned=first.pinned or entry.pinned,
                preload=first.preload or entry.preload,
                priority=min(first.priority, entry.priority),
            )
    return Desired(versions, conflicts)


def _artifact_of(entry: ModelAssignment) -> tuple[str, str, str]:
    return (entry.artifact.uri, entry.artifact.digest, entry.format)


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


def effective_config(base: ModelConfig, entry: ModelAssignment) -> ModelConfig:
    """model.yaml's config as the spec entry amends it: the spec's name, version, digest,
    priority, pinning, batching and SLA objectives win (an objective the spec leaves out keeps
    model.yaml's); model.yaml gives the signature. `InvalidModel` when the two disagree on what
    the model is (format, task)."""
    for what, spec_value, yaml_value in (
        ("format", entry.format, base.format),
        ("task", entry.task, base.task),
    ):
        if spec_value != yaml_value:
            raise InvalidModel(
                f"{entry.id}: the EdgeNode spec says {what} {spec_value!r} but the model's "
                f"model.yaml says {yaml_value!r}"
            )
    batch, delay_s = base.max_batch_size, base.max_queue_delay_s
    if entry.batching is not None:
        # A TensorRT engine's profile caps its batch; a TorchScript model takes any batch.
        spec_batch = entry.batching.max_batch_size
        batch = min(batch, spec_batch) if base.format == "tensorrt" else spec_batch
        delay_s = entry.batching.max_queue_delay_s
    parameters = base.parameters
    if entry.generation is not None:  # the service's generation settings win over model.yaml's
        g = entry.generation
        parameters = {
            **parameters,
            KV_BLOCK_SIZE_PARAMETER: str(g.kv_block_tokens),
            MAX_SEQUENCES_PARAMETER: str(g.max_sequences),
            MAX_TOKENS_PARAMETER: str(g.max_tokens),
        }
    return dataclasses.replace(
        base,
        name=entry.model,
        version=entry.version,
        parameters=parameters,
        digest=entry.artifact.digest,
        priority=entry.priority,
        pinned=entry.pinned,
        max_batch_size=batch,
        max_queue_delay_s=delay_s,
        sla=_merged_sla(entry.sla, base.sla),
        memory_estimate_bytes=_pick(base.memory_estimate_bytes, entry.memory_budget_bytes or None),
    )


def _merged_sla(spec: SlaObjectives | None, base: SlaObjectives) -> SlaObjectives:
    """The spec's objectives, each one it leaves out taken from model.yaml's."""
    if spec is None:
        return base
    return SlaObjectives(
        p95_latency_s=_pick(spec.p95_latency_s, base.p95_latency_s),
        p99_latency_s=_pick(spec.p99_latency_s, base.p99_latency_s),
        max_error_rate=_pick(spec.max_error_rate, base.max_error_rate),
        min_throughput_rps=_pick(spec.min_throughput_rps, base.min_throughput_rps),
        window_s=spec.window_s,
    )


def _pick(first: Any, second: Any) -> Any:
    return first if first is not None else second
