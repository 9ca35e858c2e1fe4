"""The Lease I/O of shard ownership (`ownership` decides; this only reads and writes Leases).

Each round (`ShardLeases.round`, every renew interval, from `fleet_loop`): one list of the operator's
Leases in its namespace; this replica's member Lease renewed (created the first time); then, per
shard, the step `ownership.shard_step` decides, applied as a write conditional on the Lease's
resourceVersion as listed (a PUT carrying metadata.resourceVersion, or a create that fails with 409
when another replica created it first). A conflict means another replica wrote the Lease since the
list: this replica's hold is dropped at once and the next round decides again. So two replicas
never both hold a shard: the API server lets one conditional write through per resourceVersion.

Synchronous (the kubernetes client is); `fleet_loop` runs it in a thread, on its own ApiClient, so a
long pass never delays a renewal.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from edgefleet_api import names, wire
from edgefleet_operator.ownership import Hold, LeaseView, Step, live_members, shard_step
from edgefleet_operator.settings import OwnershipSettings

log = logging.getLogger(__name__)
Obj = dict[str, Any]
LABEL_ROLE = "edgefleet.io/operator-lease"
"""Label of the operator's Leases: `member` (one per replica) or `shard` (one per shard)."""
PREFIX = "edgefleet-operator"
DEPARTED_AFTER = 4
"""A member Lease unrenewed for this many lease durations is deleted (its replica is gone)."""


def shard_lease_name(shard: str) -> str:
    return f"{PREFIX}-shard-{_slug(shard)}"


def member_lease_name(identity: str) -> str:
    return f"{PREFIX}-member-{_slug(identity)}"


def _slug(text: str) -> str:
    """A DNS-subdomain-safe part of a Lease name ('pod-abc/17' -> 'pod-abc-17')."""
    slug = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return slug[:200] or "x"


@dataclass
class RoundResult:
    """What one round changed, for logs, metrics and the fleet loop (which passes on an acquire)."""

    acquired: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    """Held before, not any more: released, taken over, or a renew that conflicted or failed."""
    members: tuple[str, ...] = ()


class ShardLeases:
    """This replica's member Lease and its holds on shard Leases. `holds` is safe to call from any
    thread (a pass's writer threads call it before every write)."""

    def __init__(
        self,
        coordination: Any,
        namespace: str,
        identity: str,
        shards: Sequence[str],
        settings: OwnershipSettings,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.api, self.namespace, self.identity = coordination, namespace, identity
        self.shards = tuple(shards)
        self.settings = settings
        self.clock, self.wall = clock, wall
        self._holds: dict[str, Hold] = {}
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[str, float]] = {}
        """Lease name -> (resourceVersion, when this replica first saw it): the expiry clock."""
        self.last_round_s: float | None = None
        """Monotonic time of the last round that reached the API server."""

    # --- what the fleet loop asks ----------------------------------------------------------------

    def holds(self, shard: str) -> bool:
        """Whether this replica may write for `shard` now (its hold is valid with the margin)."""
        with self._lock:
            hold = self._holds.get(shard)
        return hold is not None and hold.valid(self.settings.margin_s, self.clock())

    def held(self) -> list[str]:
        return [s for s in self.shards if self.holds(s)]

    # --- one round ---------------------------------------------------------------------------------

    def round(self) -> RoundResult:
        """List, renew this replica's membership, decide and apply a step per shard. An API error
        on the list raises (the holds then lapse by themselves at their validity's end)."""
        before = set(self.held())
        leases = self._list()
        now = self.clock()
        self.last_round_s = now
        self._seen = {n: seen for n, seen in self._seen.items() if n in leases}  # forget deleted ones
        self._renew_member(leases.get(member_lease_name(self.identity)))
        views = {name: self._view(obj, now) for name, obj in leases.items()}
        members = live_members(
            (v for n, v in views.items() if _role(leases[n]) == "member"), self.identity, now
        )
        self._forget_departed(leases, views, now)
        for shard in self.shards:
            name = shard_lease_name(shard)
            step = shard_step(shard, self.identity, views.get(name), members, now)
            try:
                self._apply(shard, step, leases.get(name))
            except ApiException as e:
                self._drop(shard)
                log.warning("shard %s: %s failed (%s %s)", shard, step.value, e.status, e.reason)
        after = set(self.held())
        return RoundResult(sorted(after - before), sorted(before - after), members)

    def release_all(self) -> None:
        """On a clean shutdown: stop writing, free the shards held and remove the member Lease, so
        another replica takes over at its next round instead of after a lease duration."""
        leases = self._list()
        for shard in self.shards:
            if self._drop(shard):
                obj = leases.get(shard_lease_name(shard))
                if obj is not None and (obj.get("spec") or {}).get("holderIdentity") == self.identity:
                    try:
                        self._release(obj)
                    except ApiException as e:
                        log.warning("shard %s: release failed (%s %s)", shard, e.status, e.reason)
        try:
            self.api.delete_namespaced_lease(member_lease_name(self.identity), self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise

    # --- the I/O -----------------------------------------------------------------------------------

    def _list(self) -> dict[str, Obj]:
        found = self.api.list_namespaced_lease(
            self.namespace, label_selector=LABEL_ROLE, _preload_content=False
        )
        return {o["metadata"]["name"]: o for o in json.loads(found.data).get("items") or []}

    def _forget_departed(self, leases: dict[str, Obj], views: dict[str, LeaseView], now: float) -> None:
        """Delete member Leases of replicas gone for a while (each Pod has a new name), conditional on
        the version seen, so a replica that came back meanwhile keeps its own."""
        for name, view in views.items():
            if _role(leases[name]) != "member" or view.holder == self.identity:
                continue
            if now - view.seen_s < DEPARTED_AFTER * max(view.duration_s, 1.0):
                continue
            try:
                self.api.delete_namespaced_lease(
                    name, self.namespace, body={"preconditions": {"resourceVersion": view.version}}
                )
                log.info("member lease %s removed: its replica is gone", name)
            except ApiException as e:
                if e.status not in (404, 409):
                    raise

    def _view(self, obj: Obj, now: float) -> LeaseView:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        name, version = meta["name"], meta["resourceVersion"]
        seen = self._seen.get(name)
        if seen is None or seen[0] != version:
            seen = self._seen[name] = (version, now)
        duration = float(spec.get("leaseDurationSeconds") or 0)
        return LeaseView(name, spec.get("holderIdentity") or "", duration, version, seen[1])

    def _body(self, name: str, role: str, holder: str, acquired: bool, previous: Obj | None) -> Obj:
        stamp = wire.rfc3339_micro(self.wall())
        spec: Obj = dict((previous or {}).get("spec") or {})
        spec.update(
            holderIdentity=holder,
            leaseDurationSeconds=math.ceil(self.settings.lease_duration_s),
            renewTime=stamp,
        )
        if acquired:
            spec["acquireTime"] = stamp
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if previous else 0)
        meta: Obj = {
            "name": name,
            "namespace": self.namespace,
            "labels": {LABEL_ROLE: role, "app.kubernetes.io/managed-by": names.MANAGED_BY},
        }
        if previous is not None:
            meta["resourceVersion"] = previous["metadata"]["resourceVersion"]
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    def _write(self, body: Obj, create: bool) -> Obj:
        name = body["metadata"]["name"]
        if create:
            out = self.api.create_namespaced_lease(self.namespace, body, _preload_content=False)
        else:  # a PUT with metadata.resourceVersion: 409 if anyone wrote it since
            out = self.api.replace_namespaced_lease(name, self.namespace, body, _preload_content=False)
        written: Obj = json.loads(out.data)
        self._seen[name] = (written["metadata"]["resourceVersion"], self.clock())
        return written

    def _renew_member(self, current: Obj | None) -> None:
        name = member_lease_name(self.identity)
        try:
            self._write(self._body(name, "member", self.identity, current is None, current), current is None)
        except ApiException as e:  # not fatal: the shard Leases carry the safety, members only liveness
            log.warning("member lease %s not renewed (%s %s)", name, e.status, e.reason)

    def _apply(self, shard: str, step: Step, current: Obj | None) -> None:
        name = shard_lease_name(shard)
        if step is Step.STANDBY:
            self._drop(shard)
            return
        if step is Step.RELEASE:
            self._drop(shard)  # stop writing first
            if current is not None:
                self._release(current)
            log.info("shard %s released: another replica is its owner now", shard)
            return
        sent = self.clock()  # before the request: the hold counts from here (see `ownership`)
        body = self._body(name, "shard", self.identity, step is Step.ACQUIRE, current)
        try:
            self._write(body, current is None)
        except ApiException as e:
            if e.status in (404, 409):  # another replica wrote (or deleted) it since the list
                self._drop(shard)
                log.info("shard %s: %s lost a race (%s); next round decides", shard, step.value, e.status)
                return
            raise
        with self._lock:
            self._holds[shard] = Hold(shard, sent, self.settings.lease_duration_s)
        if step is Step.ACQUIRE:
            log.info("shard %s acquired by %s", shard, self.identity)

    def _release(self, current: Obj) -> None:
        body = self._body(current["metadata"]["name"], "shard", "", False, current)
        body["spec"]["leaseDurationSeconds"] = 1
        try:
            self._write(body, False)
        except ApiException as e:
            if e.status not in (404, 409):  # gone, or someone took it: free of us either way
                raise

    def _drop(self, shard: str) -> bool:
        with self._lock:
            return self._holds.pop(shard, None) is not None


def _role(obj: Obj) -> str:
    return str((obj["metadata"].get("labels") or {}).get(LABEL_ROLE, ""))
