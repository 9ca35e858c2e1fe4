"""How the link talks to the API server: `LinkSettings` (each number also settable as
`EDGEFLEET_LINK_<FIELD>`, `LinkSettings.from_env`), the `Backoff` between failed calls, the
kubernetes `api_client`, and the time format the link writes (`rfc3339`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from node_agent import __version__
from node_agent.link.node_status import StatusPacer

if TYPE_CHECKING:
    from kubernetes.client import ApiClient


BOOKMARK_S = 60.0
"""How often the API server sends a bookmark on an idle watch that allows them (its watch cache's
bookmark frequency, one minute; measured on the local control plane: 59.7 s)."""


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
    watch_timeout_s: int = 300
    """Server-side length of one watch request (`timeoutSeconds`); it is then resumed from its
    resourceVersion. 300 s costs one cheap request per 5 minutes per agent (at 60 s the re-watches
    were a sixth of an idle agent's upstream bytes). The API server sends a bookmark on an idle
    watch every `BOOKMARK_S` (60 s), so the client gives up on a watch that sends nothing for
    min(`watch_timeout_s`, `BOOKMARK_S`) + `request_timeout_s` (its read timeout): a watch stalled
    on its own (an edge link's NAT or middlebox dropped the flow and the socket stays open) is
    restarted within 70 s; one stalled with the rest of the link is cut as soon as another call
    fails (see `EdgeNodeWatch.restart`)."""
    resync_s: float = 300.0
    """A full relist this often, whatever the watch says (guards against a missed event): one
    read of the agent's own EdgeNode."""
    request_timeout_s: float = 10.0
    """Client-side limit on every call other than the watch; an API server behind a dead
    link is noticed within it."""
    lease_renew_s: float = 15.0
    """The Lease is renewed every `lease_renew_s`, less up to `lease_jitter` of it (drawn per
    renewal), so renewals never come later than this and a fleet that started together spreads
    out. It is an idle agent's main cost to the API server (one merge patch of renewTime: about
    330 bytes up and 1.2 kB down, the whole Lease, per renewal); at 15 s an idle agent sends
    under KubeEdge's 0.25 kbit/s per node (bench.fleet_scale). Scale it with the fleet (the
    chart's `fleet.agentLeaseRenewSeconds`); the operator's agent grace must be at least 3
    renewals (`agent_grace_s`, 45 s by default; it checks)."""
    lease_jitter: float = 0.2
    """Share of `lease_renew_s` each wait is shortened by, at most (uniform draw; 0: none)."""
    lease_duration_s: int = 0
    """The Lease's leaseDurationSeconds (informational: the operator judges silence by its own
    `agent_grace_s`); 0: 3 renewals (45 s at the default interval), so one lost renewal never
    makes a reader think the agent is gone."""
    status_tick_s: float = 1.0
    """How often the status is built and the pacer asked whether to write it."""
    status_min_interval_s: float = 2.0
    status_metrics_interval_s: float = 10.0
    status_settle_s: float = 600.0
    """After a change of state is written, the status is written again every
    `status_metrics_interval_s` for this long, changed or not (the operator judges a canary wave
    on reports written within its window; `StatusPacer`)."""
    status_max_interval_s: float = 0.0
    """0: the status is written only on change (`StatusPacer`); liveness is the Lease. Positive:
    an unchanged status is written again this often (a heartbeatTime refresh)."""
    reconcile_interval_s: float = 2.0
    """A reconcile pass at least this often, to retry what the last one could not do."""
    retry_failed_s: float = 30.0
    """A failed version (digest mismatch, load error, no memory) is retried after this."""
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    """After a failed call the next waits `Backoff`: 0.5 s doubling to 30 s, each delay drawn
    from [d/2, d], so a fleet that lost its API server together does not come back in step."""
    startup_timeout_s: float = 10.0
    """`start()` waits this long for the first answer of the API server; without one it
    serves the persisted assignment."""
    memory_pressure_fraction: float = 0.95
    download_bandwidth_bytes_per_s: int = 0
    """This node's limit on bytes per second downloaded from artifact origins (the uplink), all
    downloads together (a token bucket, `download.TokenBucket`; site peers are not paced); 0:
    none."""
    download_attempts: int = 3
    """Transfers from the origin per artifact at most (each resumes where the last stopped)."""
    download_backoff_initial_s: float = 1.0
    download_backoff_max_s: float = 30.0
    """Between download attempts: initial, x2 per failure, at most max, drawn from [d/2, d]."""
    download_total_s: float = 900.0
    """No download retry starts after this long (15 min: 200 MB over 2 Mbit/s takes ~14)."""
    download_peer_wait_s: float = 300.0
    """How long a node waits for a site peer to hold an artifact before the origin
    (`download.Delivery.is_seeder` picks the one node of a site that does not wait)."""
    cache_dir: Path | None = None
    """The node cache (`node_cache.NodeCache`): verified artifacts by digest, on the node's disk
    (a hostPath), so a restarted or replaced agent serves without fetching again; None: none."""
    cache_budget_bytes: int = 10 * 2**30
    """The node cache's size budget (least recently used blobs not in use go first)."""

    def __post_init__(self) -> None:
        if not self.edge_node or not self.namespace:
            raise ValueError("edge_node and namespace must be non-empty")
        positive = (
            "watch_timeout_s", "resync_s", "request_timeout_s", "lease_renew_s",
            "status_tick_s", "reconcile_interval_s", "backoff_initial_s", "backoff_max_s",
            "download_attempts", "download_backoff_initial_s", "download_backoff_max_s", "download_total_s",
        )  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.lease_duration_s == 0:
            object.__setattr__(self, "lease_duration_s", math.ceil(3 * self.lease_renew_s))
        if self.lease_duration_s <= self.lease_renew_s:
            raise ValueError("lease_duration_s must exceed lease_renew_s")
        if not 0 <= self.lease_jitter < 1:
            raise ValueError(f"lease_jitter must be in [0, 1), got {self.lease_jitter}")
        if self.cache_budget_bytes < 0:
            raise ValueError(f"cache_budget_bytes must be >= 0, got {self.cache_budget_bytes}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        if self.download_backoff_max_s < self.download_backoff_initial_s:
            raise ValueError("download_backoff_max_s must be >= download_backoff_initial_s")
        if self.download_bandwidth_bytes_per_s < 0 or self.download_peer_wait_s < 0:
            raise ValueError("download_bandwidth_bytes_per_s and download_peer_wait_s must be >= 0")
        StatusPacer(
            self.status_min_interval_s,
            self.status_metrics_interval_s,
            self.status_max_interval_s,
            settle_s=self.status_settle_s,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **fields: object) -> LinkSettings:
        """Settings from `fields`, with every number not given there read from the environment
        as `EDGEFLEET_LINK_<FIELD>` (e.g. EDGEFLEET_LINK_WATCH_TIMEOUT_S=30); unset: the default.
        `ValueError` names a malformed one."""
        env = os.environ if env is None else env
        values = dict(fields)
        for f in dataclasses.fields(cls):
            raw = env.get(f"EDGEFLEET_LINK_{f.name.upper()}", "").strip()
            if f.name in values or not raw or f.type not in ("int", "float"):
                continue
            try:
                values[f.name] = int(raw) if f.type == "int" else float(raw)
            except ValueError:
                raise ValueError(f"EDGEFLEET_LINK_{f.name.upper()} is not a number: {raw!r}") from None
        return cls(**values)  # type: ignore[arg-type]

    @property
    def state_file(self) -> Path:
        return Path(self.state_dir) / f"assignment-{self.edge_node}.json"


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
