"""EdgeNode.status, out: every `status_tick_s` the link's full status is built, `StatusPacer`
decides whether it is worth a write (only a change the operator acts on: no heartbeat-only
writes, liveness is the Lease), and a write is a JSON merge patch against what the API server
holds (`server_status`), so an unchanged status sends nothing. Every write carries a new reportSequence
(`node_status.next_report_sequence`), so a reader can tell a replayed report from a fresh one.
A write is conditional on the resourceVersion the patch was computed against: a status written
meanwhile by someone else (a replay) answers 409, the EdgeNode is read again and the whole
difference written, so a diff never lands on a status it was not computed for (that would give
a replayed report's models a fresh sequence). A status seen on the watch that is not this agent's
last write (`observed`) becomes what the next patch is computed against, and is overwritten at
the pacer's next chance. `GpuProbe` is the status's device reading.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from edgefleet_api import names
from edgefleet_api.edge_node import EdgeNodeStatus, GpuStatus
from edgefleet_api.patch import merge_patch
from node_agent.link.connection import ApiConnection, LinkStats, wait_event
from node_agent.link.node_status import StatusPacer, next_report_sequence
from node_agent.link.settings import LinkSettings
from node_agent.runtime.scheduler import ModelScheduler

if TYPE_CHECKING:
    from kubernetes.client import CustomObjectsApi

log = logging.getLogger(__name__)

_GPU_FIELDS = frozenset(f.name for f in dataclasses.fields(GpuStatus))


class StatusWriter:
    """Writes the status `build()` returns, paced, while `active()` (an assignment is held
    and the EdgeNode exists) and the connection may call. `server_status` is the status the
    API server holds as last seen (None: unknown); the link updates it from what the watch
    delivers. A 404 calls `on_absent`."""

    def __init__(
        self,
        settings: LinkSettings,
        custom: CustomObjectsApi,
        connection: ApiConnection,
        stats: LinkStats,
        clock: Callable[[], float],
        *,
        build: Callable[[], EdgeNodeStatus],
        active: Callable[[], bool],
        on_absent: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.server_status: dict[str, Any] | None = None
        self._custom = custom
        self._connection = connection
        self._stats = stats
        self._clock = clock
        self._build, self._active, self._on_absent = build, active, on_absent
        self._pacer = StatusPacer(
            settings.status_min_interval_s,
            settings.status_metrics_interval_s,
            settings.status_max_interval_s,
            settle_s=settings.status_settle_s,
        )
        self._kick = asyncio.Event()
        self.sequence = 0
        """The reportSequence of this agent's last write (0: none yet)."""
        self.server_version: str | None = None
        """resourceVersion of the EdgeNode `server_status` was read from (None: unknown; the
        write is then unconditional)."""

    def adopt(self, obj: Mapping[str, Any]) -> None:
        """The EdgeNode as the API server holds it: the next patch is computed against its
        status, conditional on its resourceVersion."""
        self.server_status = dict(obj.get("status") or {})
        self.server_version = (obj.get("metadata") or {}).get("resourceVersion")

    def observed(self, obj: Mapping[str, Any]) -> None:
        """An EdgeNode the watch delivered: when its status is not this agent's last write (a
        replayed or foreign one), the next patch is computed against it, and offered at once."""
        status = obj.get("status") or {}
        if self.sequence and int(status.get("reportSequence") or 0) == self.sequence:
            self.server_version = (obj.get("metadata") or {}).get("resourceVersion")
            return  # a spec change, or the echo of this agent's own write
        self.adopt(obj)
        self.kick()

    def written(self) -> EdgeNodeStatus | None:
        """The status the API server holds, typed; None when unknown or unreadable (then the
        whole status is written)."""
        if self.server_status is None:
            return None
        try:
            return EdgeNodeStatus.from_obj(self.server_status)
        except (KeyError, TypeError, ValueError) as e:
            log.warning(
                "EdgeNode %s: the status the API server holds is unreadable (%s)", self.settings.edge_node, e
            )
            return None

    def kick(self) -> None:
        """Build and offer the status now, not at the next tick."""
        self._kick.set()

    async def run(self) -> None:
        """Every `status_tick_s` (or when kicked), until cancelled."""
        while True:
            await wait_event(self._kick, self.settings.status_tick_s)
            self._kick.clear()
            if not self._active() or not self._connection.may_call():
                continue
            try:
                await self.report()
            except Exception:
                log.exception("building the status of EdgeNode %s failed", self.settings.edge_node)

    async def report(self) -> None:
        """Build the status and write it if the pacer and the diff say so."""
        from kubernetes.client.exceptions import ApiException

        status = self._build().to_obj()
        now = self._clock()
        if not self._pacer.due(now, self.written(), EdgeNodeStatus.from_obj(status)):
            self._stats.status_skipped += 1
            return
        held = self.server_status or {}
        status["reportSequence"] = held.get("reportSequence", 0)
        if not merge_patch(held, status):
            self._stats.status_skipped += 1
            return
        sequence = next_report_sequence(self.sequence, int(held.get("reportSequence") or 0), time.time())
        status["reportSequence"] = sequence
        patch = merge_patch(held, status)
        t = self.settings.request_timeout_s
        body: dict[str, Any] = {"status": patch}
        if self.server_version is not None:
            body["metadata"] = {"resourceVersion": self.server_version}
        try:
            obj: Any = await self._connection.run(
                self._custom.patch_cluster_custom_object_status,
                names.GROUP,
                names.VERSION,
                names.EDGE_NODE_PLURAL,
                self.settings.edge_node,
                body,
                _request_timeout=(t, t),
            )
        except Exception as e:
            if isinstance(e, ApiException) and e.status == 404:
                self._on_absent()
            elif isinstance(e, ApiException) and e.status == 409:
                await self._refresh()  # written meanwhile: diff against what is there, at once
            elif self._connection.failed("status", e):
                self._pacer.wrote(now)  # refused: retry at the pacer's pace, not every tick
            return
        self._connection.online()
        self.sequence = sequence
        self.adopt(obj)
        self._pacer.wrote(now)
        self._stats.status_writes += 1

    async def _refresh(self) -> None:
        """Read the EdgeNode again (after a conflict) and offer the status at once."""
        t = self.settings.request_timeout_s
        try:
            obj: Any = await self._connection.run(
                self._custom.get_cluster_custom_object,
                names.GROUP,
                names.VERSION,
                names.EDGE_NODE_PLURAL,
                self.settings.edge_node,
                _request_timeout=(t, t),
            )
        except Exception as e:
            self.server_version = None  # the next write is unconditional, against what we know
            self._connection.failed("status", e)
            return
        self.adopt(obj)
        self.kick()


class GpuProbe:
    """status.gpu: `gpu()` if given, else CUDA memory info (or, on CPU, the device budget and
    the scheduler's use); `thermal()`'s `GpuStatus` fields (temperature_c, soft_limit_c,
    throttled, ...; never memory) merged into it."""

    def __init__(
        self,
        device: str,
        device_budget_bytes: int,
        scheduler: ModelScheduler,
        gpu: Callable[[], GpuStatus] | None = None,
        thermal: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> None:
        self.device = device
        self.device_budget_bytes = device_budget_bytes
        self._scheduler = scheduler
        self._gpu = gpu
        self._thermal = thermal

    def read(self) -> GpuStatus:
        reading = self._gpu() if self._gpu is not None else self._default()
        if self._thermal is not None:
            extra = self._thermal() or {}
            updates = {k: v for k, v in extra.items() if k in _GPU_FIELDS and not k.startswith("memory_")}
            if "throttle_reasons" in updates:
                updates["throttle_reasons"] = tuple(updates["throttle_reasons"] or ())
            reading = dataclasses.replace(reading, **updates)
        return reading

    def _default(self) -> GpuStatus:
        if self.device.startswith("cuda"):
            import torch

            device = torch.device(self.device)
            free, total = torch.cuda.mem_get_info(device)
            return GpuStatus(torch.cuda.get_device_name(device), int(total), int(total - free), int(free))
        # The device's budget, not the scheduler's (capped by the spec's memoryBudgetBytes): the operator
        # grants from memoryTotalBytes, and a total that echoed its grant would shrink every pass.
        budget, used = self.device_budget_bytes, self._scheduler.used_bytes
        return GpuStatus("cpu", budget, used, max(budget - used, 0))
