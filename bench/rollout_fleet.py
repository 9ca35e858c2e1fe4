"""Canary rollout at fleet scale on the local control plane: N kwok nodes with simulated agents.

1. Time from a spec change to Promoted for a 4-wave rollout (5%, 25%, 50%, 100%) whose analysis
   windows are shortened to a few seconds.
2. Time from the failing check (the AnalysisFailed decision) to every node back on stable.
Goal (issue): rollback complete within one analysis interval + 10 s at 500 nodes.

    python -m bench.rollout_fleet            # N=500 (EDGEFLEET_BENCH_NODES to change)
    BENCH_QUICK=1 python -m bench.rollout_fleet
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.report import table, write_section
from e2e import cluster as localcluster
from e2e import fleet
from e2e.operator_proc import AGENT_NAMESPACE, OperatorProcess, ensure_agent_namespace
from e2e.sim_agent import SimNode, SimulatedAgents
from edgefleet_operator import api

QUICK = os.environ.get("BENCH_QUICK") == "1"
N = 20 if QUICK else int(os.environ.get("EDGEFLEET_BENCH_NODES", "500"))
INTERVAL_S = 3


def digest(version: str) -> str:
    return "sha256:" + (version * 64)[:64]


def spec(version: str, group: str) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "classifier",
                "version": version,
                "memoryEstimate": "128Mi",
                "artifact": {"uri": "repo://classifier/1/model.pt", "digest": digest(version)},
            }
        ],
        "placement": {"nodeSelector": {"bench-group": group}},
        "rollout": {
            "waves": [{"percent": 5}, {"percent": 25}, {"percent": 50}, {"percent": 100}],
            "analysis": {"intervalSeconds": INTERVAL_S, "minSamples": 10, "maxErrorRate": 0.05},
        },
    }


class Heartbeat:
    """Steps every simulated agent continuously on a thread pool, as a fleet of agents would."""

    def __init__(self, agents: SimulatedAgents) -> None:
        self.agents = agents
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(8)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            list(self.pool.map(self.agents.report, list(self.agents.nodes.values())))


def main() -> None:
    from kubernetes import client, config

    state = localcluster.up(quiet=True)
    kube = config.new_client_from_config(config_file=str(state.kubeconfig))
    core, custom = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    ensure_agent_namespace(kube)
    group = uuid.uuid4().hex[:6]
    ns = f"bench-roll-{group}"
    core.create_namespace({"metadata": {"name": ns}})
    nodes = fleet.create_nodes(
        core, N, device_class="edge-server", prefix=f"r{group}", labels={"bench-group": group}
    )
    agents = SimulatedAgents(kube, AGENT_NAMESPACE)
    for n in nodes:
        agents.add(SimNode(n, "edge-server", sla_by_version={"3": {"errorRate": 0.5, "met": False}}))
    op = OperatorProcess(state, Path(tempfile.mkdtemp()) / "operator.log", EDGEFLEET_RESYNC_S="2")
    beat = Heartbeat(agents)
    beat.thread.start()

    def rollout() -> dict[str, Any]:
        obj = custom.get_namespaced_custom_object(
            api.GROUP, api.VERSION, ns, api.INFERENCE_SERVICE_PLURAL, "svc"
        )
        return (obj.get("status") or {}).get("rollout") or {}

    def versions() -> set[str]:
        items = custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.EDGE_NODE_PLURAL)["items"]
        return {
            m["version"]
            for e in items
            if e["metadata"]["name"] in set(nodes)
            for m in e.get("spec", {}).get("models") or []
        }

    def wait(check: Any, timeout_s: float, what: str) -> float:
        t0 = time.monotonic()
        while not check():
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{what} after {timeout_s}s")
            time.sleep(0.2)
        return time.monotonic()

    def patch_version(version: str) -> None:
        custom.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, ns, api.INFERENCE_SERVICE_PLURAL, "svc", {"spec": spec(version, group)}
        )

    try:
        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.INFERENCE_SERVICE_KIND,
            "metadata": {"name": "svc"},
        }
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, ns, api.INFERENCE_SERVICE_PLURAL, {**body, "spec": spec("1", group)}
        )
        print(f"[bench] {N} nodes; deploying v1", flush=True)
        wait(lambda: rollout().get("stableVersion") == "1" and versions() == {"1"}, 600, "v1 stable")
        t0 = time.monotonic()
        patch_version("2")
        t_promoted = wait(lambda: rollout().get("phase") == "Promoted", 900, "v2 promoted")
        t_all2 = wait(lambda: versions() == {"2"}, 300, "v2 everywhere")
        promote_s = t_all2 - t0
        print(f"[bench] v2 promoted everywhere after {promote_s:.1f}s", flush=True)

        patch_version("3")
        wait(
            lambda: bool(rollout().get("failedChecks")) or rollout().get("phase") == "RolledBack", 600, "fail"
        )
        t_fail = time.monotonic()
        t_back = wait(lambda: versions() == {"2"} and rollout().get("phase") == "RolledBack", 300, "rollback")
        rollback_s = t_back - t_fail
        print(f"[bench] rolled back to v2 everywhere {rollback_s:.1f}s after the failed check", flush=True)
    finally:
        beat.stop.set()
        core.delete_namespace(ns)
        time.sleep(3)
        op.stop()
        fleet.delete_nodes(core, nodes)

    rows = [
        ["spec change -> v2 promoted on every node (4 waves)", f"{promote_s:.1f}", f"{t_promoted - t0:.1f}"],
        ["failed check -> every node back on stable", f"{rollback_s:.1f}", "-"],
    ]
    body_md = (
        f"{N} kwok nodes with simulated agents (status + Lease heartbeats from 8 threads), one service on "
        f"every node, 4 waves (5/25/50/100%), analysis interval {INTERVAL_S} s, min 10 samples.\n\n"
        + table(["what", "seconds", "phase Promoted at s"], rows)
        + f"\n\nRollback goal: within one analysis interval + 10 s = {INTERVAL_S + 10} s: "
        + ("**met**" if rollback_s <= INTERVAL_S + 10 else "**not met**")
        + f" ({rollback_s:.1f} s)."
    )
    print(body_md)
    if not QUICK:
        write_section("rollout_fleet", f"Canary rollout at {N} nodes", body_md)


if __name__ == "__main__":
    main()
