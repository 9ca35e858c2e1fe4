"""Faults of the link between the API server and its clients: every connection stalling
silently, and the API server stopped for a while (its watch cache then starts later: resumed
watches get 410 Gone).

The parts are real: the module's own control plane (etcd and a kube-apiserver, apart from the
session's shared one, which must not be stopped), two `edgefleet-agent serve --edge-node`
processes serving the example classifier, and `edgefleet-operator run`. Agents and operator
reach the API server through a TCP proxy (watch_outage_support.StallProxy) that can stall
every open connection; the test itself talks to the API server directly.

Invariants: every infer request sent to an agent during the fault gets exactly one answer, a
200 (agents serve their last assignment throughout); no EdgeNode status goes backwards
(heartbeatTime, observedGeneration); an edit of the InferenceService made during the fault
(or right after the API server returns) reaches the EdgeNode specs and is reconciled by the
agents within a bound.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from e2e import cluster
from e2e.operator_proc import AGENT_NAMESPACE, OperatorProcess, ensure_agent_namespace
from e2e.waiting import eventually
from edgefleet_api import names
from faults.watch_outage_support import (
    AgentProcess,
    Load,
    StallProxy,
    StatusWatcher,
    applied,
    create_ready_nodes,
    inference_service,
    own_control_plane,
    proxied_kubeconfig,
    restart_apiserver,
)

pytestmark = pytest.mark.cluster

STALL_BOUND_S = 15.0
"""An edit made while every connection is stalled is applied within this. The agents' part:
a Lease or status call times out (2 s) and the watch is cut and resumed (without the cut the
stalled watch would wait for its read timeout: 30 + 2 s). The operator's part: its pass's call
times out (read timeout 3 s here) and the next resync (1 s) relists (without the timeout the
fleet loop would wait forever)."""
OUTAGE_S = 12.0
"""How long the API server stays stopped: longer than the operator's agent grace here (10 s),
so every Lease is stale when it returns, and the agents renew theirs up to their backoff cap
(16 s here, more than the grace) after the operator's first pass. The operator must not take
that for silent agents (health.HealthTracker: the span it could not observe, and the agents'
backoff allowance after it); before, it took the work off the nodes whose agents had not
renewed yet."""
RECOVERY_BOUND_S = 30.0
"""After the API server is ready again, the edit made then is applied within this."""
OPERATOR_ENV = {"EDGEFLEET_API_READ_TIMEOUT_S": "3", "EDGEFLEET_API_CONNECT_TIMEOUT_S": "2"}


@dataclass
class Fleet:
    state: cluster.ClusterState
    admin: Any
    """An ApiClient straight to the API server (the test's own view)."""
    proxy: StallProxy
    nodes: list[str]
    agents: list[AgentProcess]
    operator: OperatorProcess
    namespace: str
    service: str
    ports: list[int] = field(default_factory=list)
    p95_ms: float = 500.0
    """The service's SLA as last edited: what a settled fleet carries. Loose (the example classifier
    answers in milliseconds): the edits only mark what was applied, and a tight SLA on a loaded
    machine makes the agents shed load (SLA mitigation: 503 Overloaded), which is no fault here."""

    def edit_sla(self, p95_ms: float) -> None:
        from kubernetes import client

        self.p95_ms = p95_ms

        client.CustomObjectsApi(self.admin).patch_namespaced_custom_object(
            names.GROUP,
            names.VERSION,
            self.namespace,
            names.INFERENCE_SERVICE_PLURAL,
            self.service,
            {"spec": {"sla": {"p95LatencyMs": p95_ms, "p99LatencyMs": 2 * p95_ms}}},
        )

    def all_applied(self, p95_ms: float) -> list[dict[str, Any]] | None:
        found = [applied(self.admin, n, p95_ms) for n in self.nodes]
        return found if all(found) else None  # type: ignore[return-value]

    def context(self) -> str:
        parts = [f"operator log:\n{self.operator.tail(3000)}"]
        parts += [f"agent {a.node} log:\n{a.tail(15)}" for a in self.agents]
        return "\n".join(parts)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from kubernetes import client, config

    from node_agent.examples import make_examples
    from node_agent.runtime.model_yaml import parse_model_config

    work = tmp_path_factory.mktemp("watch-outage")
    examples = work / "examples"
    make_examples(examples)
    digest = parse_model_config(examples / "classifier" / "1" / "model.yaml").digest
    with own_control_plane(work / "plane") as state:
        admin = config.new_client_from_config(config_file=str(state.kubeconfig))
        ensure_agent_namespace(admin)
        namespace = "apps"
        client.CoreV1Api(admin).create_namespace({"metadata": {"name": namespace}})
        group = uuid.uuid4().hex[:6]
        nodes = create_ready_nodes(admin, 2, prefix=f"w{group}", group=group)
        proxy = StallProxy(("127.0.0.1", state.apiserver_port))
        kubeconfig = proxied_kubeconfig(state, proxy.port, work / "proxied-kubeconfig")
        operator = OperatorProcess(state, work / "operator.log", KUBECONFIG=str(kubeconfig), **OPERATOR_ENV)
        agents = []
        for node in nodes:
            repo = work / f"repo-{node}"
            shutil.copytree(examples, repo)
            agents.append(AgentProcess(node, kubeconfig, AGENT_NAMESPACE, repo))
        body = inference_service("classify", group, digest, replicas=len(nodes), p95_ms=Fleet.p95_ms)
        client.CustomObjectsApi(admin).create_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, body
        )
        f = Fleet(state, admin, proxy, nodes, agents, operator, namespace, "classify")
        try:
            eventually(
                lambda: f.all_applied(f.p95_ms), 90, "the fleet serving the classifier", context=f.context
            )
            f.ports = [eventually(lambda a=a: a.port, 10, f"agent {a.node}'s port") for a in agents]
            yield f
        finally:
            for agent in agents:
                agent.stop()
            alive = operator.alive()
            operator.stop()
            proxy.close()
            admin.close()
        assert alive, f"the operator died:\n{operator.tail()}"


def heartbeats(watcher: StatusWatcher, node: str) -> list[str]:
    return [hb for hb, _ in watcher.seen[node]]


def test_every_connection_stalling_silently_recovers_and_applies_the_edit_made_meanwhile(
    fleet: Fleet,
) -> None:
    load = Load(fleet.ports)
    watcher = StatusWatcher(fleet.admin, fleet.nodes)
    try:
        restarts_before = sum(len(a.log("resuming on a new connection")) for a in fleet.agents)
        stalled = fleet.proxy.stall()
        assert stalled >= len(fleet.nodes) + 1, "the agents' and the operator's connections"
        t0 = time.monotonic()
        fleet.edit_sla(fleet.p95_ms + 5)
        eventually(
            lambda: fleet.all_applied(fleet.p95_ms), STALL_BOUND_S, "the edit applied", context=fleet.context
        )
        recovered_s = time.monotonic() - t0
        print(f"stall: {stalled} connections stalled; edit applied after {recovered_s:.1f} s")
    finally:
        outcomes = load.stop()
        watcher.stop()
    assert set(outcomes) == {"200"} and load.sent == len(load.outcomes) > 10, outcomes
    assert not watcher.backwards, watcher.backwards
    # the agents' watches were cut by the link, not left to their 32 s read timeout
    restarts = sum(len(a.log("resuming on a new connection")) for a in fleet.agents)
    assert restarts > restarts_before, fleet.context()


def test_the_api_server_stopped_for_a_while(fleet: Fleet) -> None:
    """Stopped for longer than the operator's agent grace, then started on the same port and
    etcd. Agents serve throughout; an edit made right after the API server returns is applied;
    statuses resume without going backwards; the agents' watches resume from their
    resourceVersion, get 410 Gone (the new API server's watch cache starts later) and relist."""
    from kubernetes import client

    load = Load(fleet.ports)
    watcher = StatusWatcher(fleet.admin, fleet.nodes)
    try:
        # a write after every agent's last event: the restarted API server's cache starts past them
        client.CoreV1Api(fleet.admin).create_namespaced_config_map(
            fleet.namespace, {"metadata": {"name": f"mark-{uuid.uuid4().hex[:6]}"}}
        )
        eventually(
            lambda: fleet.all_applied(fleet.p95_ms) and all(n in watcher.last for n in fleet.nodes),
            10,
            "the fleet settled before the outage",
        )
        before = dict(watcher.last)
        unreachable_before = sum(len(a.log("API server unreachable")) for a in fleet.agents)
        t_down = time.monotonic()
        cluster.stop_apiserver(fleet.state, timeout_s=2.0)  # SIGTERM; SIGKILL if not gone in 2 s
        t_stopped = time.monotonic()
        eventually(
            lambda: (
                sum(len(a.log("API server unreachable")) for a in fleet.agents)
                >= unreachable_before + len(fleet.agents)
            ),
            OUTAGE_S,
            "every agent to notice the outage",
        )
        noticed_s = time.monotonic() - t_stopped
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t_down)))  # the outage lasts
        served_during = load.between(t_stopped, time.monotonic())
        ready_s = restart_apiserver(fleet.state)
        fleet.edit_sla(fleet.p95_ms + 5)
        t_edit = time.monotonic()
        eventually(
            lambda: fleet.all_applied(fleet.p95_ms),
            RECOVERY_BOUND_S,
            "the edit applied",
            context=fleet.context,
        )
        applied_s = time.monotonic() - t_edit
        print(
            f"outage {OUTAGE_S:.0f} s (stopping took {t_stopped - t_down:.1f} s, agents noticed in"
            f" {noticed_s:.1f} s, {served_during} requests served meanwhile); API server ready"
            f" {ready_s:.1f} s after its start;"
            f" edit applied {applied_s:.1f} s after"
        )
        eventually(
            lambda: all(watcher.last.get(n, ("", 0))[0] > before[n][0] for n in fleet.nodes),
            10,
            "heartbeats after the outage",
        )
    finally:
        outcomes = load.stop()
        watcher.stop()
    assert set(outcomes) == {"200"} and served_during > 10, (outcomes, served_during)
    assert not watcher.backwards, watcher.backwards
    gone = [a.node for a in fleet.agents if a.log("410 Gone; relisting")]
    assert gone, f"no agent's watch got 410 Gone:\n{fleet.context()}"
