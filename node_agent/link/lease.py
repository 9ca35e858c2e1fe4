"""The agent's liveness signal to the operator: the coordination.k8s.io Lease
`edgefleet-agent-<node>` in `namespace`, renewed every `lease_renew_s` less a jitter of up to
`lease_jitter` of it (created when missing), held for `lease_duration_s`. A renewal is one merge
patch of `renewTime` alone (about 60 bytes of body); holder and duration are written when the
Lease is created, and again once per life of the agent (they may have changed with its settings).
The answer is asked for in protobuf and not decoded (a renewal's bytes are an idle agent's main
cost to the API server)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgefleet_api import names
from node_agent.link.connection import ApiConnection, LinkStats, wait_event
from node_agent.link.settings import LinkSettings, rfc3339

if TYPE_CHECKING:
    from kubernetes.client import CoordinationV1Api


PROTOBUF = "application/vnd.kubernetes.protobuf"
"""Built-in kinds (a Lease) answer in protobuf when asked: 390 bytes where JSON takes 740."""


def renewal_wait_s(settings: LinkSettings, draw: float, busy_s: float = 0.0) -> float:
    """Seconds from now to the next renewal: `lease_renew_s` less `draw` (uniform in [0, 1)) times
    `lease_jitter` of it, counted from the start of the renewal that took `busy_s` (0 when none was
    made). A renewal written at its start lands when the API server answers; an API server slow to
    answer does not stretch the period, so renewals start at most `lease_renew_s` apart while each
    is answered within it (the operator's grace counts on that); before, they came the period + the
    answer's time apart. The simulated agents (`e2e.sim_fleet`) wait the same."""
    period = settings.lease_renew_s * (1.0 - settings.lease_jitter * draw)
    return max(0.0, period - busy_s)


class LeaseRenewer:
    """Renews the Lease of the node `node_name()` names, while the connection may call."""

    def __init__(
        self,
        settings: LinkSettings,
        coordination: CoordinationV1Api,
        connection: ApiConnection,
        stats: LinkStats,
        node_name: Callable[[], str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._coordination = coordination
        self._connection = connection
        self._stats = stats
        self._node_name = node_name
        self._clock = clock
        self._kick = asyncio.Event()
        self._rng = random.Random()
        self._full = True
        """The next renewal writes holder and duration too (the first of this life)."""

    def next_wait_s(self, busy_s: float = 0.0) -> float:
        """Seconds from now to the next renewal (`renewal_wait_s`, with a fresh draw)."""
        return renewal_wait_s(self.settings, self._rng.random(), busy_s)

    def kick(self) -> None:
        """Renew now, not at the next period."""
        self._kick.set()

    async def run(self) -> None:
        """Renew every `lease_renew_s` (or when kicked), until cancelled."""
        while True:
            started = self._clock()
            if self._connection.may_call():
                try:
                    await self._connection.run(self.renew, self._node_name())
                except Exception as e:
                    self._connection.failed("lease", e)
                else:
                    self._connection.online()
                    self._stats.lease_renewals += 1
            await wait_event(self._kick, self.next_wait_s(self._clock() - started))
            self._kick.clear()

    def renew(self, node_name: str) -> None:
        """One renewal of `node_name`'s Lease (merge patch; create on 404). Blocking."""
        from kubernetes.client.exceptions import ApiException

        s = self.settings
        name = names.agent_name(node_name)
        now = rfc3339(seconds=False)
        spec = {
            "holderIdentity": s.holder_identity or name,
            "leaseDurationSeconds": s.lease_duration_s,
            "renewTime": now,
        }
        timeout = (s.request_timeout_s, s.request_timeout_s)
        try:
            answer: Any = self._coordination.patch_namespaced_lease(
                name,
                s.namespace,
                {"spec": spec if self._full else {"renewTime": now}},
                _content_type="application/merge-patch+json",
                _request_timeout=timeout,
                _preload_content=False,  # the answer (the whole Lease) is not decoded: it is asked for
                _headers={"Accept": PROTOBUF},  # in protobuf, half the bytes of its JSON
            )
            answer.read()
            answer.release_conn()
            self._full = False
        except ApiException as e:
            if e.status != 404:
                raise
            labels = {"app.kubernetes.io/name": names.AGENT_APP, names.LABEL_NODE: node_name}
            body: Any = {"metadata": {"name": name, "labels": labels}, "spec": {**spec, "acquireTime": now}}
            try:
                self._coordination.create_namespaced_lease(s.namespace, body, _request_timeout=timeout)
            except ApiException as e:
                if e.status != 409:  # 409: created meanwhile; the next renewal patches it
                    raise
