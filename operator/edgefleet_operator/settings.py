"""Operator settings: grouped dataclasses with reasoned defaults, read once from the
environment (the Helm chart sets them) and validated there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from edgefleet_api import names


@dataclass(frozen=True)
class FleetSettings:
    """Which Nodes are edge nodes, and how their health is judged."""

    node_selector: dict[str, str] = field(default_factory=lambda: {names.LABEL_FLEET: "true"})
    """Labels a Node must carry to join the fleet."""
    agent_grace_s: float = 45.0
    """An agent silent (no Lease renewal) this long while its Node is Ready is AgentSilent: its work
    moves. 45 s is three missed renewals at the agents' default 15 s (`AgentPodSettings.lease_renew_s`,
    which must be at most a third of it), long enough to ride out an API server blip."""
    agent_backoff_max_s: float = 30.0
    """The longest an agent waits between retries while its API server is out of reach (the agent's
    EDGEFLEET_LINK_BACKOFF_MAX_S, 30 s by default). After a span the operator could not observe, an
    agent may renew its Lease this long after the API server is back: its silence counts only after
    that (`health.HealthTracker`)."""
    reconnect_wait_max_s: float = 900.0
    """After a span the operator could not observe, it waits while the agents are still coming back
    (a reconnect storm: thousands of agents at once through a just-restarted API server) before any
    agent's silence counts again; at most this long (`health.HealthTracker`, the recovery rule)."""
    not_ready_grace_s: float = 30.0
    """A NotReady Node keeps its work this long before it moves (edge links flap)."""
    flap_damping_s: float = 120.0
    """A node that lost its work must stay healthy this long before it gets new work, so a flapping
    node does not make models bounce."""
    memory_reserve_fraction: float = 0.10
    """Share of a GPU's memory kept free of models (allocator slack, CUDA context, other tenants)."""


@dataclass(frozen=True)
class AgentPodSettings:
    """The node-agent Pod the operator runs on every node with work."""

    image: str = "ghcr.io/edgefleet/agent:0.1.0"
    namespace: str = "edgefleet-system"
    service_account: str = "edgefleet-agent"
    gpu_resource: str = names.GPU_RESOURCE
    port: int = 8000
    cpu_request: str = "250m"
    memory_request: str = "512Mi"
    memory_limit: str = "4Gi"
    tolerations: tuple[dict[str, str], ...] = (
        {"key": "node-role.kubernetes.io/edge", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"},
    )
    runtime_class: str | None = None
    """RuntimeClass of the agent Pod (e.g. 'nvidia' on k3s with the NVIDIA container runtime)."""
    thermal_soft_limit_c: float | None = None
    """Where agents start lowering concurrency (None: below the hardware slowdown by the margin)."""
    thermal_soft_margin_c: float | None = None
    """Degrees below the hardware slowdown temperature (None: the agent's default, 8)."""
    lease_renew_s: float | None = None
    """How often agents renew their Lease (EDGEFLEET_LINK_LEASE_RENEW_S in their Pods); None: the
    agents' default (15 s). Scale it with the fleet (the agents' steady cost to the API server is
    about one small PATCH per node per interval: docs/benchmarks.md, "Fleet scale") and keep
    `agent_grace_s` at least `GRACE_RENEWALS` times it."""
    workers: int | None = None
    """Stream pool workers per agent (None: the agent's default, 1 on CPU and 2 on a GPU)."""
    urgent_workers: int | None = None
    """Workers that run only critical and high-priority batches (None: the agent's default, 1)."""
    host_path: str = "/var/lib/edgefleet"
    """The node's disk for its agents: each agent Pod mounts `<host_path>/<agent name>` (a hostPath)
    for its model repository, node cache and persisted assignment, so they outlive the Pod. Needs the
    agents' namespace at Pod Security `privileged` (baseline and restricted forbid hostPath). Empty:
    an emptyDir, as before (the cache and the assignment go with the Pod)."""
    cache_budget: str = "10Gi"
    """The agents' node cache budget (`--cache-budget`)."""
    grpc_port: int = 0
    """The agents' KServe v2 gRPC port (`--grpc-port`, a containerPort named grpc); 0: HTTP only."""
    download_bandwidth: str = ""
    """Each agent's limit on artifact bytes per second from origins, e.g. 5Mi (`--download-bandwidth`;
    site peers are not paced). Empty: no limit."""
    unreachable_toleration_s: int | None = None
    """How long agent Pods stay bound to a node that is unreachable or not ready (NoExecute
    tolerations of node.kubernetes.io/unreachable and not-ready). None: for as long as it takes (an
    edge node cut off for hours keeps its Pod, and its cache, instead of Kubernetes' default 300 s)."""
    external: bool = False
    """Agents run outside the operator on every node (systemd units or static Pods,
    `edgefleet-agent install`): it creates no agent Pods. A node labelled
    `edgefleet.io/agent-managed-by=<anything but operator>` is such a node on its own."""


@dataclass(frozen=True)
class OwnershipSettings:
    """Which replica writes for which shard (`ownership`): Lease timings, and where the Leases live."""

    lease_duration_s: float = 15.0
    """A shard Lease not renewed for this long is taken over; with `renew_interval_s`, it bounds
    failover (`ownership.failover_bound_s`: 25 s by default). 15 s is client-go's default: a holder
    stuck for a GC pause or an API-server blip of a few seconds keeps its shards."""
    renew_interval_s: float = 5.0
    """How often a replica lists the Leases, renews its own and decides (three renewals per lease
    duration: one failed renew is no failover)."""
    margin_s: float = 3.0
    """A holder stops writing this long before its hold could expire for the others: covers a write
    in flight and a clock that runs a little slow."""
    namespace: str = ""
    """Namespace of the operator's Leases: the operator's own (the chart sets it from the Pod);
    empty: the agent namespace."""
    site_shards: int = 0
    """Site shards besides the fleet's (`ownership.site_shard`): each node's per-node work (its
    health from its Lease, its agent Pod) belongs to the shard its site hashes to, so N replicas
    each carry about 1/N of it. 0: the fleet shard's holder does everything (one writer)."""
    site_label: str = "edgefleet.io/site"
    """The Node label naming a node's site (nodes without it form one site of their own)."""

    def __post_init__(self) -> None:
        if self.site_shards < 0:
            raise ValueError(f"site shards must be >= 0, got {self.site_shards}")
        if self.lease_duration_s < 1:
            raise ValueError(f"lease duration must be >= 1 s, got {self.lease_duration_s}")
        if not 0 < self.renew_interval_s < self.lease_duration_s - self.margin_s:
            raise ValueError(
                f"lease renew interval ({self.renew_interval_s} s) must be > 0 and shorter than the "
                f"lease duration less the margin ({self.lease_duration_s} - {self.margin_s} s)"
            )
        if self.margin_s < 0:
            raise ValueError(f"lease margin must be >= 0 s, got {self.margin_s}")


@dataclass(frozen=True)
class OperatorSettings:
    fleet: FleetSettings = field(default_factory=FleetSettings)
    agent: AgentPodSettings = field(default_factory=AgentPodSettings)
    ownership: OwnershipSettings = field(default_factory=OwnershipSettings)
    reconcile_debounce_s: float = 0.5
    """Events within this window are folded into one fleet reconcile (a burst of 200 applies costs
    a handful of placements, not 200)."""
    resync_interval_s: float = 10.0
    """A pass even without events: it ages node health (Lease renewals update the cache but ask for
    no pass: at 10,000 agents they would be hundreds a second). It reads the in-memory fleet."""
    metrics_port: int = 8080
    api_backoff_base_s: float = 1.0
    """After a failed pass (the API server said no, or went away) the next waits up to this long,
    doubling with every failure in a row (full jitter: a random share of it), back to this after a
    success."""
    api_backoff_cap_s: float = 30.0
    """The longest wait between failed passes: an API server coming back is not stormed by every
    operator and is retried within half a minute."""

    @property
    def lease_namespace(self) -> str:
        return self.ownership.namespace or self.agent.namespace


def _selector(text: str) -> dict[str, str]:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'}; a bare key means value 'true'."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if not key:
            raise ValueError(f"bad fleet selector {text!r}: empty label key")
        out[key] = value or "true"
    return out


def _number(e: dict[str, str], name: str, default: Any, kind: type = float) -> Any:
    """EDGEFLEET_<name> as `kind`, `default` when unset or empty; ValueError naming it."""
    raw = e.get(f"EDGEFLEET_{name}", "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"EDGEFLEET_{name} must be {what}, got {raw!r}") from None


def _tolerations(raw: str) -> tuple[dict[str, str], ...]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"EDGEFLEET_AGENT_TOLERATIONS is not JSON: {e}") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError("EDGEFLEET_AGENT_TOLERATIONS must be a JSON list of toleration objects")
    return tuple(value)


GRACE_RENEWALS = 3
"""The agent grace must span at least this many Lease renewals: one lost or late renewal (a jitter,
a slow API server) never makes an agent silent."""


def from_env(env: dict[str, str] | None = None) -> OperatorSettings:
    """Settings from EDGEFLEET_* variables (the chart's operator Deployment sets them); unset
    or empty ones keep their defaults; a malformed one is a ValueError naming it."""
    e = dict(os.environ if env is None else env)
    fleet = FleetSettings(
        node_selector=_selector(e["EDGEFLEET_FLEET_SELECTOR"])
        if "EDGEFLEET_FLEET_SELECTOR" in e
        else FleetSettings().node_selector,
        agent_grace_s=_number(e, "AGENT_GRACE_S", FleetSettings.agent_grace_s),
        agent_backoff_max_s=_number(e, "AGENT_BACKOFF_MAX_S", FleetSettings.agent_backoff_max_s),
        reconnect_wait_max_s=_number(e, "RECONNECT_WAIT_MAX_S", FleetSettings.reconnect_wait_max_s),
        not_ready_grace_s=_number(e, "NOT_READY_GRACE_S", FleetSettings.not_ready_grace_s),
        flap_damping_s=_number(e, "FLAP_DAMPING_S", FleetSettings.flap_damping_s),
        memory_reserve_fraction=_number(e, "MEMORY_RESERVE_FRACTION", FleetSettings.memory_reserve_fraction),
    )
    d = AgentPodSettings
    raw_tolerations = e.get("EDGEFLEET_AGENT_TOLERATIONS", "").strip()
    agent = AgentPodSettings(
        image=e.get("EDGEFLEET_AGENT_IMAGE") or d.image,
        namespace=e.get("EDGEFLEET_AGENT_NAMESPACE") or d.namespace,
        gpu_resource=e.get("EDGEFLEET_GPU_RESOURCE") or d.gpu_resource,
        cpu_request=e.get("EDGEFLEET_AGENT_CPU_REQUEST") or d.cpu_request,
        memory_request=e.get("EDGEFLEET_AGENT_MEMORY_REQUEST") or d.memory_request,
        memory_limit=e.get("EDGEFLEET_AGENT_MEMORY_LIMIT") or d.memory_limit,
        tolerations=_tolerations(raw_tolerations) if raw_tolerations else d.tolerations,
        runtime_class=e.get("EDGEFLEET_AGENT_RUNTIME_CLASS") or None,
        thermal_soft_limit_c=_number(e, "AGENT_THERMAL_SOFT_LIMIT_C", None),
        thermal_soft_margin_c=_number(e, "AGENT_THERMAL_SOFT_MARGIN_C", None),
        lease_renew_s=_number(e, "AGENT_LEASE_RENEW_S", None),
        workers=_number(e, "AGENT_WORKERS", None, int),
        urgent_workers=_number(e, "AGENT_URGENT_WORKERS", None, int),
        host_path=e.get("EDGEFLEET_AGENT_HOST_PATH", d.host_path).strip(),
        cache_budget=e.get("EDGEFLEET_AGENT_CACHE_BUDGET") or d.cache_budget,
        download_bandwidth=e.get("EDGEFLEET_AGENT_DOWNLOAD_BANDWIDTH", "").strip(),
        grpc_port=_number(e, "AGENT_GRPC_PORT", 0, int),
        unreachable_toleration_s=_number(e, "AGENT_UNREACHABLE_TOLERATION_S", None, int),
        external=e.get("EDGEFLEET_AGENTS_EXTERNAL", "").strip().lower() in ("1", "true", "yes"),
    )
    if agent.unreachable_toleration_s is not None and agent.unreachable_toleration_s < 0:
        bound = agent.unreachable_toleration_s
        raise ValueError(f"EDGEFLEET_AGENT_UNREACHABLE_TOLERATION_S must be >= 0, got {bound}")
    if agent.host_path and not agent.host_path.startswith("/"):
        raise ValueError(f"EDGEFLEET_AGENT_HOST_PATH must be an absolute path, got {agent.host_path!r}")
    renew = agent.lease_renew_s
    if renew is not None and not 0 < renew * GRACE_RENEWALS <= fleet.agent_grace_s:
        raise ValueError(
            f"EDGEFLEET_AGENT_LEASE_RENEW_S must be > 0 and at most the agent grace / {GRACE_RENEWALS} "
            f"({fleet.agent_grace_s} s / {GRACE_RENEWALS}), got {renew}"
        )
    if agent.workers is not None and agent.workers < 1:
        raise ValueError(f"EDGEFLEET_AGENT_WORKERS must be >= 1, got {agent.workers}")
    if agent.urgent_workers is not None and agent.urgent_workers < 0:
        raise ValueError(f"EDGEFLEET_AGENT_URGENT_WORKERS must be >= 0, got {agent.urgent_workers}")
    for name, value in (
        ("agent grace", fleet.agent_grace_s),
        ("agent backoff max", fleet.agent_backoff_max_s),
        ("reconnect wait max", fleet.reconnect_wait_max_s),
        ("not-ready grace", fleet.not_ready_grace_s),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 seconds, got {value}")
    if not 0 <= fleet.memory_reserve_fraction < 1:
        got = fleet.memory_reserve_fraction
        raise ValueError(f"EDGEFLEET_MEMORY_RESERVE_FRACTION must be in [0, 1), got {got}")
    o = OwnershipSettings
    ownership = OwnershipSettings(
        lease_duration_s=_number(e, "LEASE_DURATION_S", o.lease_duration_s),
        renew_interval_s=_number(e, "LEASE_RENEW_S", o.renew_interval_s),
        margin_s=_number(e, "LEASE_MARGIN_S", o.margin_s),
        namespace=e.get("EDGEFLEET_LEASE_NAMESPACE", "").strip(),
        site_shards=int(_number(e, "SITE_SHARDS", o.site_shards)),
        site_label=e.get("EDGEFLEET_SITE_LABEL", "").strip() or o.site_label,
    )
    backoff = (
        _number(e, "API_BACKOFF_BASE_S", OperatorSettings.api_backoff_base_s),
        _number(e, "API_BACKOFF_CAP_S", OperatorSettings.api_backoff_cap_s),
    )
    if not 0 < backoff[0] <= backoff[1]:
        raise ValueError(f"API backoff must have 0 < base <= cap, got base {backoff[0]}, cap {backoff[1]}")
    return OperatorSettings(
        fleet=fleet,
        agent=agent,
        ownership=ownership,
        api_backoff_base_s=backoff[0],
        api_backoff_cap_s=backoff[1],
        reconcile_debounce_s=_number(e, "DEBOUNCE_S", OperatorSettings.reconcile_debounce_s),
        resync_interval_s=_number(e, "RESYNC_S", OperatorSettings.resync_interval_s),
        metrics_port=_number(e, "METRICS_PORT", OperatorSettings.metrics_port, int),
    )
