"""The agent's EdgeNode mode (`edgefleet-agent serve --edge-node`): an agent extension that
runs an `OperatorLink` on the agent's repository and scheduler. The engine reads configs from
`AssignedConfigs` and the scheduler loads through its `loader`: only assigned, verified
versions are served, with the spec's priority, pinning, batching and SLA; a request that
names no version gets one from `TrafficSplit`.

The agent is seen through `AgentCore`, a protocol of what the mode reads of it (the link
layer sits below `node_agent.agent` and never imports it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgefleet_api.edge_node import ModelCounters
from edgefleet_api.sla import SlaWindow
from edgefleet_api.types import ModelId
from node_agent.link.assigned_configs import AssignedConfigs
from node_agent.link.download import Delivery
from node_agent.link.operator_link import OperatorLink
from node_agent.link.settings import LinkSettings, api_client

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from node_agent.control.sla_monitor import SlaMonitor
    from node_agent.control.thermal import ThermalMonitor
    from node_agent.runtime.repository import ModelRepository
    from node_agent.runtime.scheduler import ModelScheduler

log = logging.getLogger(__name__)


class DeviceSettings(Protocol):
    """The part of the agent's settings the mode reads."""

    @property
    def device(self) -> str:
        """'cpu' or 'cuda[:n]'."""
        ...


class AgentCore(Protocol):
    """What `EdgeNodeMode.start` reads of a started agent (`node_agent.agent.Agent` is one):
    its repository and scheduler (set once started), its device, and its thermal and SLA
    monitors (None when it runs none)."""

    @property
    def repository(self) -> ModelRepository | None: ...

    @property
    def scheduler(self) -> ModelScheduler | None: ...

    @property
    def settings(self) -> DeviceSettings: ...

    @property
    def thermal(self) -> ThermalMonitor | None: ...

    @property
    def sla(self) -> SlaMonitor | None: ...

    def serve_artifacts(self, lookup: Callable[[str], Path | None]) -> None:
        """Serve peers the artifacts `lookup` finds ('sha256:<hex>' -> a verified file)."""
        ...


def thermal_fields(monitor: ThermalMonitor) -> Callable[[], Mapping[str, Any] | None]:
    """`OperatorLink(thermal=...)` from a `ThermalMonitor`: its last reading as `GpuStatus` fields."""

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


def sla_windows(monitor: SlaMonitor) -> Callable[[ModelId], SlaWindow | None]:
    """`OperatorLink(sla=...)` from an `SlaMonitor`: a model version's last window, or None."""

    def read(model_id: ModelId) -> SlaWindow | None:
        try:
            return monitor.status(model_id)
        except KeyError:  # not tracked (no request yet)
            return None

    return read


def model_counters(monitor: SlaMonitor) -> Callable[[ModelId], ModelCounters | None]:
    """`OperatorLink(counters=...)` from an `SlaMonitor`: a model version's cumulative counts."""

    def read(model_id: ModelId) -> ModelCounters | None:
        try:
            return monitor.counters(model_id)
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
        sla: Callable[[ModelId], SlaWindow | None] | None = None,
        delivery: Delivery | None = None,
    ) -> None:
        self.settings = settings
        self.delivery = delivery
        self.kubeconfig = kubeconfig
        self.ready_timeout_s = ready_timeout_s
        self.thermal, self.sla = thermal, sla
        self.configs = AssignedConfigs()
        self.link: OperatorLink | None = None
        self._client: ApiClient | None = None

    async def start(self, agent: AgentCore) -> None:
        """`agent`: a started core (its repository and scheduler set)."""
        assert agent.repository is not None and agent.scheduler is not None
        thermal, sla = self.thermal, self.sla
        if thermal is None and agent.thermal is not None:
            thermal = thermal_fields(agent.thermal)
        if sla is None and agent.sla is not None:
            sla = sla_windows(agent.sla)
        counters = model_counters(agent.sla) if agent.sla is not None else None
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
            counters=counters,
            delivery=self.delivery,
        )
        agent.serve_artifacts(self.link.verified_artifact)
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
