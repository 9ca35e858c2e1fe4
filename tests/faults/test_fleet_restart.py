"""A reconnect storm (issue 22): 200 simulated agents (`e2e.sim_fleet`: one process, each agent
with the real link's Lease renewals, watch of its own EdgeNode and jittered exponential backoff)
and the real operator process, on the module's own control plane (etcd and a kube-apiserver, apart
from the session's shared one, which must not be stopped); the API server is stopped for longer
than twice the operator's agent grace, then started again on the same port and etcd.

Invariants: no model moved (every EdgeNode spec's models as before), no agent Pod rebuilt (every
uid as before), no node ever judged anything but Healthy after the restart (the operator knows the
outage was its own blindness, not the agents' silence: `health.HealthTracker.lost_sight`), and the
fleet converges within a bound: every agent renewed its Lease and watches its EdgeNode again, every
node Healthy, two passes done.
"""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from e2e import cluster, fleet
from e2e.operator_proc import AGENT_NAMESPACE, OperatorProcess, ensure_agent_namespace
from e2e.sim_fleet import SimFleetProcess
from e2e.waiting import eventually
from edgefleet_api import names
from faults.watch_outage_support import inference_service, own_control_plane, restart_apiserver

pytestmark = pytest.mark.cluster

NODES = 200
OUTAGE_S = 25.0
"""Longer than twice the operator's agent grace here (10 s): every Lease is stale when the API
server returns, and the agents come back over their backoff (cap 4 s here)."""
SETUP_BOUND_S = 420.0
"""The operator's first placement of 200 nodes (a few passes; long on a loaded 2-core machine)."""
CONVERGED_BOUND_S = 45.0
STORM_PER_S = 5.0
"""From the API server ready to the fleet converged (measured: see the printed figure)."""
AGENT_ENV = {
    "EDGEFLEET_LINK_LEASE_RENEW_S": "2",
    "EDGEFLEET_LINK_BACKOFF_MAX_S": "4",
    "EDGEFLEET_LINK_WATCH_TIMEOUT_S": "30",
}
OPERATOR_ENV = {
    "EDGEFLEET_AGENT_BACKOFF_MAX_S": "4",
    "EDGEFLEET_AGENT_LEASE_RENEW_S": "2",
    "EDGEFLEET_API_READ_TIMEOUT_S": "10",
    "EDGEFLEET_API_CONNECT_TIMEOUT_S": "2",
    "EDGEFLEET_LEASE_DURATION_S": "60",
    "EDGEFLEET_LEASE_RENEW_S": "20",
    "EDGEFLEET_LEASE_MARGIN_S": "10",
}
"""The tests' short grace periods (e2e.operator_proc), but a long shard Lease: a pass over 200 nodes
on a loaded machine outlasts the tests' 3 s Lease (and even the chart's 15 s one), and a pass that
finds its shard lost stops before its writes."""


def health(port: int) -> dict[str, float]:
    """The operator's fleet nodes by health (its /metrics), the healths no node has left out."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.findall(r'^edgefleet_operator_fleet_nodes\{health="([^"]+)"\} (\S+)$', text, re.M)
    return {k: float(v) for k, v in found if float(v)}


def passes(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        float(v)
        for v in re.findall(r'^edgefleet_operator_reconciles_total\{result="ok"\} (\S+)$', text, re.M)
    )


@dataclass
class Fleet:
    state: cluster.ClusterState
    admin: Any
    nodes: list[str]
    sim: SimFleetProcess
    operator: OperatorProcess
    namespace: str

    def edge_nodes(self) -> dict[str, dict[str, Any]]:
        from kubernetes import client

        items = client.CustomObjectsApi(self.admin).list_cluster_custom_object(
            names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, _request_timeout=(2, 10)
        )["items"]
        return {e["metadata"]["name"]: e for e in items}

    def specs(self) -> dict[str, Any]:
        return {n: e["spec"].get("models") for n, e in self.edge_nodes().items()}

    def pods(self) -> dict[str, str]:
        from kubernetes import client

        label = f"app.kubernetes.io/name={names.AGENT_APP}"
        items = client.CoreV1Api(self.admin).list_namespaced_pod(AGENT_NAMESPACE, label_selector=label).items
        return {p.metadata.name: p.metadata.uid for p in items}

    def serving(self) -> bool:
        """Every node's spec holds the model and its agent reports it Ready."""
        found = self.edge_nodes()
        if set(found) != set(self.nodes):
            return False
        for e in found.values():
            wanted = {(m["model"], m["version"]) for m in e["spec"].get("models") or []}
            ready = {
                (m["model"], m["version"])
                for m in (e.get("status") or {}).get("models") or []
                if m["state"] == "Ready"
            }
            if not wanted or not wanted <= ready:
                return False
        return True

    def context(self) -> str:
        port = self.operator.metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        ours = "\n".join(line for line in text.splitlines() if line.startswith("edgefleet_operator_re"))
        return f"operator log:\n{self.operator.tail(3000)}\n{ours}\nsimulator: {self.sim.stats()}"


@pytest.fixture(scope="module")
def storm_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from kubernetes import client, config

    work = tmp_path_factory.mktemp("fleet-restart")
    with own_control_plane(work / "plane") as state:
        admin = config.new_client_from_config(config_file=str(state.kubeconfig))
        ensure_agent_namespace(admin)
        namespace = "apps"
        core = client.CoreV1Api(admin)
        core.create_namespace({"metadata": {"name": namespace}})
        group = uuid.uuid4().hex[:6]
        nodes = ready_nodes(core, NODES, f"r{group}", group)
        sim = SimFleetProcess(state.kubeconfig, nodes, work / "sim", AGENT_NAMESPACE, **AGENT_ENV)
        operator = OperatorProcess(state, work / "operator.log", **OPERATOR_ENV)
        digest = "sha256:" + "ab" * 32
        body = inference_service("classify", group, digest, replicas=NODES, p95_ms=500.0)
        client.CustomObjectsApi(admin).create_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, body
        )
        f = Fleet(state, admin, nodes, sim, operator, namespace)
        try:
            eventually(f.serving, SETUP_BOUND_S, "every node serving the classifier", context=f.context)
            eventually(
                lambda: health(operator.metrics_port) == {"Healthy": NODES} or None,
                60,
                "every node Healthy",
                context=f.context,
            )
            eventually(lambda: len(f.pods()) == NODES, 120, "an agent Pod on every node", context=f.context)
            yield f
        finally:
            sim.stop()
            alive = operator.alive()
            operator.stop()
            admin.close()
        assert alive, f"the operator died:\n{operator.tail()}"


def ready_nodes(core: Any, count: int, prefix: str, group: str) -> list[str]:
    """`count` fleet Nodes with a Ready condition (no kubelet or kwok here: nothing changes it),
    created from a few threads."""
    chunks = [(i, min(50, count - 50 * i)) for i in range(-(-count // 50))]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}

    def make(chunk: tuple[int, int]) -> list[str]:
        made = fleet.create_nodes(
            core,
            chunk[1],
            device_class="edge-server",
            prefix=f"{prefix}-{chunk[0]}",
            labels={"test-group": group},
        )
        for node in made:
            condition = {**ready, "lastHeartbeatTime": now, "lastTransitionTime": now}
            core.patch_node_status(node, {"status": {"conditions": [condition]}})
        return made

    with ThreadPoolExecutor(4) as pool:
        return sorted(n for chunk in pool.map(make, chunks) for n in chunk)


def test_the_api_server_restarted_under_200_agents_moves_nothing(storm_fleet: Fleet) -> None:
    restart_and_converge(storm_fleet, CONVERGED_BOUND_S)


def test_a_reconnect_storm_longer_than_the_allowance_and_grace_moves_nothing(storm_fleet: Fleet) -> None:
    """The agents get back in at 5 per second (`reconnect_per_s`: as an API server's admission
    limits let a large fleet's storm in): the last renews 40 s after the API server is ready, far
    past the backoff allowance + grace (4 + 10 s) after which the operator used to judge them
    silent. The operator waits while agents are still coming back (`HealthTracker.begin_pass`)."""
    storm_s = NODES / STORM_PER_S
    try:
        restart_and_converge(storm_fleet, storm_s + CONVERGED_BOUND_S, reconnect_per_s=STORM_PER_S)
    finally:
        storm_fleet.sim.control(reconnect_per_s=0)


def restart_and_converge(f: Fleet, bound_s: float, reconnect_per_s: float = 0.0) -> None:
    """Stops the API server for OUTAGE_S, starts it again, and checks the invariants (module
    docstring) until the fleet has converged; with `reconnect_per_s`, agents retrying their Lease
    get through at that rate (set before the outage: the simulator reads it each second)."""
    port = f.operator.metrics_port
    specs, pods = f.specs(), f.pods()
    assert len(specs) == NODES and len(pods) == NODES, (len(specs), len(pods))
    if reconnect_per_s:
        f.sim.control(reconnect_per_s=reconnect_per_s)
    cluster.stop_apiserver(f.state, timeout_s=2.0)
    time.sleep(OUTAGE_S)  # the outage lasts
    ready_s = restart_apiserver(f.state)
    t_ready = time.time()
    passes_then = passes(port)
    judged: list[dict[str, float]] = []

    def converged() -> bool:
        seen = health(port)
        judged.append(seen)
        s = f.sim.stats()
        return (
            s.get("oldest_renewal", 0) > t_ready
            and s.get("watching", 0) >= NODES
            and seen == {"Healthy": NODES}
            and passes(port) >= passes_then + 2
        )

    eventually(converged, bound_s, "the fleet converged after the restart", context=f.context)
    converged_s = time.time() - t_ready
    if reconnect_per_s:  # the storm was as long as it was meant to be
        assert converged_s > 0.5 * NODES / reconnect_per_s, converged_s
    print(
        f"{NODES} agents, API server stopped {OUTAGE_S:.0f} s, ready {ready_s:.1f} s after its start, "
        f"agents let back in at {reconnect_per_s or 'any'} per s; "
        f"converged {converged_s:.1f} s after ready ({len(judged)} health readings)"
    )
    unhealthy = [h for h in judged if any(v for k, v in h.items() if k != "Healthy")]
    assert not unhealthy, f"nodes judged unhealthy after the restart: {unhealthy[:3]}\n{f.context()}"
    assert f.specs() == specs, "a model moved"
    assert f.pods() == pods, f"an agent Pod was rebuilt\n{f.context()}"
    assert f.serving(), "every agent reports its model Ready"
