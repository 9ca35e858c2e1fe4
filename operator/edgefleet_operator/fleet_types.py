"""Value types of fleet placement: what services demand, what nodes offer, what was decided.

Placement (`edgefleet_operator.placement`) is a pure function of these. The kopf
handlers build them from InferenceServices, EdgeNode statuses and Nodes; nothing
here talks to the API server. All types are frozen: a decision never mutates its
input. Misuse (inconsistent fields) raises ValueError when a value is built.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from edgefleet_api.inference_service import Spread, Taint, Toleration
from edgefleet_api.types import Priority

__all__ = [
    "Assignment",
    "Health",
    "ModelDemand",
    "NodeState",
    "PlacedModel",
    "PlacementEvent",
    "PlacementResult",
    "PlacementSettings",
    "ServiceDemand",
    "ServicePlacement",
]


class Health(enum.Enum):
    """A node's health as the caller judged it (the caller owns the grace period)."""

    HEALTHY = "Healthy"
    """Ready and its agent reports: may receive new work."""
    SUSPECT = "Suspect"
    """Unhealthy but still within the grace period: keeps its work, receives nothing new."""
    AGENT_SILENT = "AgentSilent"
    """Node Ready, but its agent stopped reporting past the grace period: its work moves."""
    NOT_READY = "NotReady"
    """Node not Ready past the grace period: its work moves."""


@dataclass(frozen=True, slots=True)
class ModelDemand:
    """One model version of a service and the device memory it needs on every node that holds it."""

    name: str
    version: str
    estimate_bytes: int
    """Declared estimate (memoryEstimate); used only until the version has been measured."""
    measured_bytes: tuple[int, ...] = ()
    """Measurements of this version on the nodes that loaded it (any order, any number)."""

    def __post_init__(self) -> None:
        if self.estimate_bytes < 0 or any(b < 0 for b in self.measured_bytes):
            raise ValueError(f"model {self.name}:{self.version}: memory must not be negative")

    @property
    def memory_bytes(self) -> int:
        """The largest measurement if there is one, else the estimate."""
        return max(self.measured_bytes) if self.measured_bytes else self.estimate_bytes


@dataclass(frozen=True, slots=True)
class ServiceDemand:
    """An InferenceService as placement sees it: its models go together onto each chosen node.

    Node count: `replicas` nodes; or ceil(`node_fraction` x eligible nodes), at
    least 1; or, when neither is given, every eligible node (at least 1, so a
    service that fits nowhere is reported). Eligible: matches the selector,
    tolerates the NoSchedule/NoExecute taints, has the spread label (if spread),
    and is Healthy or Suspect.
    """

    name: str
    """namespace/name; unique in one placement call."""
    models: tuple[ModelDemand, ...]
    priority: Priority = Priority.NORMAL
    replicas: int | None = None
    node_fraction: float | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    spread: Spread | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError(f"service {self.name}: needs at least one model")
        ids = [(m.name, m.version) for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"service {self.name}: a model version is listed twice")
        if self.replicas is not None and self.node_fraction is not None:
            raise ValueError(f"service {self.name}: give replicas or node_fraction, not both")
        if self.replicas is not None and self.replicas < 0:
            raise ValueError(f"service {self.name}: replicas must not be negative")
        if self.node_fraction is not None and not 0.0 < self.node_fraction <= 1.0:
            raise ValueError(f"service {self.name}: node_fraction must be in (0, 1]")

    @property
    def memory_bytes(self) -> int:
        """Device memory the service needs on each node that holds it (all its models)."""
        return sum(m.memory_bytes for m in self.models)

    def target_nodes(self, eligible: int) -> int:
        """How many nodes the service should run on, given the number of eligible nodes."""
        if self.replicas is not None:
            return self.replicas
        if self.node_fraction is not None:
            # round() first: 0.1 * 1000 is 100.00000000000001 in binary floating point.
            return max(1, math.ceil(round(self.node_fraction * eligible, 9)))
        return max(1, eligible)


@dataclass(frozen=True, slots=True)
class NodeState:
    """One GPU node (EdgeNode + Node) as measured now.

    The memory available to edgefleet is `memory_total_bytes - memory_reserved_bytes`:
    the caller counts in `memory_reserved_bytes` everything that is not one of our
    assigned models (other processes, the agent, a safety reserve), so the models
    already assigned here never make the node look full of themselves.
    """

    name: str
    memory_total_bytes: int
    memory_reserved_bytes: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    health: Health = Health.HEALTHY
    temperature_c: float | None = None
    soft_limit_c: float | None = None
    """The temperature above which the agent lowers concurrency."""
    throttled: bool = False
    """Clocks are being throttled (thermal or power)."""
    sla_scores: Mapping[tuple[str, str], float] = field(default_factory=dict)
    """(service, model) -> share of recent SLA windows met here, 0 to 1. No entry: no record."""

    def __post_init__(self) -> None:
        if self.memory_total_bytes < 0 or self.memory_reserved_bytes < 0:
            raise ValueError(f"node {self.name}: memory must not be negative")
        if any(not 0.0 <= s <= 1.0 for s in self.sla_scores.values()):
            raise ValueError(f"node {self.name}: SLA scores must be between 0 and 1")

    @property
    def capacity_bytes(self) -> int:
        """Device memory edgefleet's models may use here."""
        return max(0, self.memory_total_bytes - self.memory_reserved_bytes)


@dataclass(frozen=True, slots=True)
class PlacementSettings:
    """Knobs of placement; the defaults suit Jetson-class boxes and small GPU servers."""

    thermal_margin_c: float = 5.0
    """A node within this many degrees of its soft limit gets no new work: a model placed
    there would push it over and the agent would throttle it right away."""
    sla_unknown_score: float = 0.9
    """How a node with no SLA record for a service ranks: below nodes that met at least this
    share of windows, above nodes that met fewer."""
    traffic_weight: int = 100
    """Traffic weight of a placed model version (the rollout sets canary weights)."""
    message_nodes: int = 10
    """Node names listed in an event message before '... and N more'."""

    def __post_init__(self) -> None:
        if self.thermal_margin_c < 0:
            raise ValueError("thermal_margin_c must not be negative")
        if not 0.0 <= self.sla_unknown_score <= 1.0:
            raise ValueError("sla_unknown_score must be between 0 and 1")
        if not 0 <= self.traffic_weight <= 100:
            raise ValueError("traffic_weight must be between 0 and 100")


@dataclass(frozen=True, slots=True, order=True)
class PlacedModel:
    """One model version a node must hold (an entry of EdgeNode.spec.models)."""

    service: str
    model: str
    version: str
    memory_budget_bytes: int
    traffic_weight: int = 100


@dataclass(frozen=True, slots=True)
class Assignment:
    """node -> the model versions it must hold, sorted by (service, model, version).

    Every node of the placement's input appears, idle ones with an empty tuple, so
    the caller can write every EdgeNode's spec from it.
    """

    by_node: Mapping[str, tuple[PlacedModel, ...]] = field(default_factory=dict)

    def pairs(self) -> Iterator[tuple[str, str]]:
        """(service, node) for every service present on a node, each pair once."""
        for node, models in self.by_node.items():
            for service in dict.fromkeys(m.service for m in models):
                yield service, node

    def nodes_of(self, service: str) -> tuple[str, ...]:
        """The nodes holding the service, sorted."""
        return tuple(sorted(n for s, n in self.pairs() if s == service))

    def used_bytes(self, node: str) -> int:
        return sum(m.memory_budget_bytes for m in self.by_node.get(node, ()))


@dataclass(frozen=True, slots=True)
class ServicePlacement:
    """Where one service landed; `message` says why it is short of its target (empty if not)."""

    nodes: tuple[str, ...]
    target: int
    message: str = ""

    @property
    def complete(self) -> bool:
        return len(self.nodes) >= self.target


@dataclass(frozen=True, slots=True)
class PlacementEvent:
    """A decision a user should see, as a Kubernetes Event on the InferenceService.

    reason: Placed (new nodes), Moved (lost nodes and got others instead), Removed
    (lost nodes without replacement), Evicted (displaced by a higher-priority
    service), FailedPlacement (short of its target).
    """

    service: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class PlacementResult:
    assignment: Assignment
    services: Mapping[str, ServicePlacement]
    """Every input service, by name."""
    events: tuple[PlacementEvent, ...]
    """Sorted by service, then reason."""
