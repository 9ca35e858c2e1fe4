"""Canary rollout at fleet scale on the local control plane: N kwok nodes with simulated agents.

1. Time from a spec change to Promoted for a 4-wave rollout (5%, 25%, 50%, 100%) whose analysis
   windows are shortened to a few seconds.
2. Time from the failing check (the Failed analysis, which rolls back at failureLimit 1) to every
   node back on stable, and from the canary's window start (its nodes confirmed the bad version).
Goal (issue 6): rollback complete within one analysis interval + 10 s at 500 nodes.

The simulated agents are one thread (e2e.sim_agent.SimulatedAgents.step_bulk): one LIST of
EdgeNodes a round, a status write only where a node's assignment changed, Lease renewals every
10 s as real agents do, writes from a small thread pool. The operator runs as its own process with
its default health timings (agent grace 30 s).

    python -m bench.rollout_fleet            # N=500 (EDGEFLEET_BENCH_NODES to change)
    BENCH_QUICK=1 python -m bench.rollout_fleet
    BENCH_PROFILE=1 python -m bench.rollout_fleet   # also cProfile 3 steady-state passes at N
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.fleet_e2e import metric, services_gone, writes_by_kind
from bench.report import table, write_section
from e2e import cluster as localcluster
from e2e import fleet
from e2e.operator_proc import AGENT_NAMESPACE, OperatorProcess, ensure_agent_namespace
from e2e.sim_agent import SimNode, SimulatedAgents
from edgefleet_api import names, wire
from edgefleet_api.inference_service import WaveSpec
from edgefleet_operator import rollout

QUICK = os.environ.get("BENCH_QUICK") == "1"
N = 20 if QUICK else int(os.environ.get("EDGEFLEET_BENCH_NODES", "500"))
INTERVAL_S = 3
ROUND_S = 1.0
"""Simulated agents' round: each reports a changed assignment within about a second."""
POLL_S = 0.5
PRODUCTION_HEALTH = {
    "EDGEFLEET_AGENT_GRACE_S": "30",
    "EDGEFLEET_NOT_READY_GRACE_S": "30",
    "EDGEFLEET_FLAP_DAMPING_S": "120",
    "EDGEFLEET_RESYNC_S": "2",
}
"""The operator's default grace periods (the tests' shortened ones move work off a node whose kwok
heartbeat or Lease is a few seconds late, which a loaded 2-core machine makes common at 500 nodes)."""


def digest(version: str) -> str:
    return "sha256:" + (version * 64)[:64]


def spec(version: str, group: str) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "classifier",
                "version": version,
                "memoryEstimate": "128Mi",
                "artifact": {"uri": f"repo://classifier/{version}/model.pt", "digest": digest(version)},
            }
        ],
        "sla": {"p95LatencyMs": 20, "p99LatencyMs": 40, "maxErrorRate": 0.05},
        "placement": {"nodeSelector": {"bench-group": group}},
        "rollout": {
            "waves": [{"percent": 5}, {"percent": 25}, {"percent": 50}, {"percent": 100}],
            "analysis": {"intervalSeconds": INTERVAL_S, "minSamples": 10},
        },
    }


class Heartbeat:
    """Runs the simulated agents' rounds on one thread (writes on a pool of 8) until stopped."""

    def __init__(self, agents: SimulatedAgents) -> None:
        self.agents = agents
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="sim-agent")
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.rounds = 0
        self.writes = 0
        self.longest_s = 0.0
        self.error: Exception | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                self.writes += self.agents.step_bulk(self.pool)
                self.rounds += 1
                self.longest_s = max(self.longest_s, time.monotonic() - t0)
            except Exception as e:  # a benchmark reports it; the agents keep beating
                self.error = e
            self.stop.wait(max(0.0, ROUND_S - (time.monotonic() - t0)))


def pass_stats(port: int) -> tuple[float, float]:
    """(passes, seconds spent in passes) so far."""
    return (
        metric(port, r"edgefleet_operator_reconcile_duration_seconds_count"),
        metric(port, r"edgefleet_operator_reconcile_duration_seconds_sum"),
    )


def profile_passes(kube: Any, passes: int = 3) -> str:
    """cProfile of `passes` in-process reconcile passes over the settled fleet: top by own time."""
    from edgefleet_operator import settings as settings_mod
    from edgefleet_operator.metrics import OperatorMetrics
    from edgefleet_operator.reconciler import FleetReconciler

    rec = FleetReconciler(kube, settings_mod.from_env({"EDGEFLEET_AGENT_GRACE_S": "30"}), OperatorMetrics())
    rec.reconcile_once()  # warm
    prof = cProfile.Profile()
    t0 = time.monotonic()
    prof.enable()
    for _ in range(passes):
        rec.reconcile_once()
    prof.disable()
    took = (time.monotonic() - t0) / passes
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    return f"in-process pass: {took:.2f} s each\n{out.getvalue()}"


def main() -> None:
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    state = localcluster.up(quiet=True)
    kube = config.new_client_from_config(config_file=str(state.kubeconfig))
    # Typed Any: the client takes and returns plain dicts (the API's JSON) where its stubs name models.
    core: Any = client.CoreV1Api(kube)
    custom: Any = client.CustomObjectsApi(kube)
    coordination: Any = client.CoordinationV1Api(kube)
    ensure_agent_namespace(kube)
    group = uuid.uuid4().hex[:6]
    ns = f"bench-roll-{group}"
    core.create_namespace({"metadata": {"name": ns}})
    print(f"[bench] creating {N} kwok nodes", flush=True)
    chunks = [(i, min(50, N - 50 * i)) for i in range(-(-N // 50))]
    with ThreadPoolExecutor(8) as creator:
        made = creator.map(
            lambda c: fleet.create_nodes(
                core,
                c[1],
                device_class="edge-server",
                prefix=f"r{group}-{c[0]:02d}",
                labels={"bench-group": group},
            ),
            chunks,
        )
        nodes = sorted(n for group in made for n in group)
    agents = SimulatedAgents(kube, AGENT_NAMESPACE)
    bad = {"errorRate": 0.5, "p99LatencyMs": 90.0, "met": False}
    for n in nodes:
        agents.add(SimNode(n, "edge-server", sla_by_version={"3": bad}))
    op = OperatorProcess(state, Path(tempfile.mkdtemp()) / "operator.log", **PRODUCTION_HEALTH)
    beat = Heartbeat(agents)
    beat.thread.start()
    node_set = set(nodes)

    def status() -> dict[str, Any]:
        obj = custom.get_namespaced_custom_object(
            names.GROUP, names.VERSION, ns, names.INFERENCE_SERVICE_PLURAL, "svc"
        )
        return (obj.get("status") or {}).get("rollout") or {}

    def fleet_versions() -> tuple[set[str], set[str]]:
        """(versions in the EdgeNode specs, versions the agents report Ready) over our nodes."""
        items = custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL)["items"]
        ours = [e for e in items if e["metadata"]["name"] in node_set]
        spec_v = {str(m["version"]) for e in ours for m in e.get("spec", {}).get("models") or []}
        seen = {str(m["version"]) for e in ours for m in (e.get("status") or {}).get("models") or []}
        if len(ours) < len(nodes):
            spec_v.add("?")
        return spec_v, seen

    def wait(check: Any, timeout_s: float, what: str) -> float:
        """Poll until `check()`; returns the wall-clock time (epoch s) it was first seen true."""
        t0 = time.monotonic()
        while not check():
            if beat.error:
                raise RuntimeError(f"simulated agents failed: {beat.error}")
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{what} after {timeout_s}s\n{op.tail()}")
            time.sleep(POLL_S)
        return time.time()

    def patch_version(version: str) -> float:
        custom.patch_namespaced_custom_object(
            names.GROUP,
            names.VERSION,
            ns,
            names.INFERENCE_SERVICE_PLURAL,
            "svc",
            {"spec": spec(version, group)},
        )
        return time.time()

    profile = ""
    try:
        body = {
            "apiVersion": names.API_VERSION,
            "kind": names.INFERENCE_SERVICE_KIND,
            "metadata": {"name": "svc"},
        }
        t_apply = time.time()
        custom.create_namespaced_custom_object(
            names.GROUP, names.VERSION, ns, names.INFERENCE_SERVICE_PLURAL, {**body, "spec": spec("1", group)}
        )
        print(f"[bench] {N} nodes; deploying v1", flush=True)
        t_v1 = wait(
            lambda: status().get("stableVersion") == "1" and fleet_versions() == ({"1"}, {"1"}), 900, "v1"
        )
        deploy_s = t_v1 - t_apply
        print(f"[bench] v1 on every node after {deploy_s:.1f}s", flush=True)
        healthy = r'edgefleet_operator_fleet_nodes\{health="Healthy"\}'
        wait(lambda: metric(op.metrics_port, healthy) >= N, 300, "every node Healthy")
        # Settled: v1's measured size has replaced its estimate in every budget (one more write per
        # node), and two whole passes have written no EdgeNode since.
        mark = [writes_by_kind(op.metrics_port).get("edgenode.patch", 0.0), pass_stats(op.metrics_port)[0]]

        def settled() -> bool:
            patches, passes = (
                writes_by_kind(op.metrics_port).get("edgenode.patch", 0.0),
                pass_stats(op.metrics_port)[0],
            )
            if patches != mark[0]:
                mark[:] = [patches, passes]
            return passes >= mark[1] + 2

        wait(settled, 300, "a settled fleet")
        passes0, busy0 = pass_stats(op.metrics_port)
        writes0, sim_writes0 = writes_by_kind(op.metrics_port), beat.writes

        t0 = patch_version("2")
        t_promoted = wait(lambda: status().get("phase") == "Promoted", 900, "v2 promoted")
        t_specs2 = wait(lambda: fleet_versions()[0] == {"2"}, 300, "v2 in every spec")
        t_all2 = wait(lambda: fleet_versions() == ({"2"}, {"2"}), 300, "v2 reported everywhere")
        promoted = status()
        passes1, busy1 = pass_stats(op.metrics_port)
        writes1, sim_writes1 = writes_by_kind(op.metrics_port), beat.writes
        waves = [
            (a["wave"], wire.parse_time(a["time"]) or 0)
            for a in promoted["analysis"]
            if a["result"] == "Passed"
        ]
        print(
            f"[bench] v2 promoted after {t_promoted - t0:.1f}s, everywhere after {t_all2 - t0:.1f}s",
            flush=True,
        )

        patch_version("3")
        window: list[str] = []

        def rolled_back() -> bool:
            r = status()
            if r.get("waveStartTime") and r.get("canaryVersion") == "3" and not window:
                window.append(r["waveStartTime"])  # the bad canaries all confirmed: judged from here
            return r.get("phase") == "RolledBack"

        t_failed_seen = wait(rolled_back, 600, "v3 rolled back")
        t_back_specs = wait(lambda: fleet_versions()[0] == {"2"}, 300, "v2 back in every spec")
        t_back = wait(lambda: fleet_versions() == ({"2"}, {"2"}), 300, "v2 reported everywhere")
        failed = status()
        fail = next(a for a in failed["analysis"] if a["result"] == "Failed")
        t_fail = wire.parse_time(fail["time"]) or 0
        t_window = wire.parse_time(window[0]) if window else None
        canaries = rollout.wave_nodes(WaveSpec(percent=5), N)
        print(f"[bench] rolled back: {fail['message']}", flush=True)
        if os.environ.get("BENCH_PROFILE") == "1":
            profile = profile_passes(kube)
            print(profile, flush=True)
    finally:
        beat.stop.set()
        core.delete_namespace(ns)
        try:
            wait(lambda: services_gone(custom, ns), 300, "the service's deletion")
        except (TimeoutError, RuntimeError) as e:
            print(f"cleanup: {e}")
        op.stop()
        fleet.delete_nodes(core, nodes)
        for n in nodes:
            with contextlib.suppress(ApiException):
                coordination.delete_namespaced_lease(names.agent_name(n), AGENT_NAMESPACE)

    passes, busy = passes1 - passes0, busy1 - busy0
    op_writes = {k: v - writes0.get(k, 0) for k, v in writes1.items() if v - writes0.get(k, 0)}
    writes_text = ", ".join(f"{k} {v:.0f}" for k, v in sorted(op_writes.items()))
    wave_rows: list[list[object]] = [
        [f"spec change -> wave {w + 1} passed", f"{t - t0:.1f}"] for w, t in waves
    ]
    rows: list[list[object]] = [
        ["spec change -> status Promoted (4 waves)", f"{t_promoted - t0:.1f}"],
        ["spec change -> every EdgeNode spec on v2", f"{t_specs2 - t0:.1f}"],
        ["spec change -> every agent reports only v2", f"{t_all2 - t0:.1f}"],
        *wave_rows,
        ["failed check -> every EdgeNode spec back on stable", f"{t_back_specs - t_fail:.1f}"],
        ["failed check -> every agent reports only stable", f"{t_back - t_fail:.1f}"],
    ]
    if t_window is not None:
        rows.append(
            ["bad canaries' window start -> every agent reports only stable", f"{t_back - t_window:.1f}"]
        )
    goal = INTERVAL_S + 10
    within = t_back - (t_window if t_window is not None else t_fail - INTERVAL_S)
    body_md = (
        f"{N} kwok nodes (edge-server) with simulated agents (one thread: a LIST of EdgeNodes per "
        f"{ROUND_S:g} s round, status written only on change, Lease every 10 s, writes from 8 threads), "
        f"one service on every node, 4 waves (5/25/50/100%), analysis interval {INTERVAL_S} s, min 10 "
        f"samples; the operator process with its default grace periods, resync 2 s, debounce 0.2 s. "
        f"v1 reached every node "
        f"{deploy_s:.1f} s after apply. The failing version (error rate 0.5, p99 90 ms) failed at wave 1 "
        f"({canaries} canary nodes).\n\n"
        + table(["what", "seconds"], rows)
        + f"\n\nDuring the v2 rollout the operator ran {passes:.0f} passes, "
        f"{busy / max(passes, 1):.2f} s each "
        f"on average ({busy / max(t_promoted - t0, 1e-9) * 100:.0f}% of the time busy) and wrote: "
        f"{writes_text}; the simulated agents wrote {sim_writes1 - sim_writes0} statuses and Leases. "
        f"Status times "
        f"are whole seconds (up to 1 s early); fleet state is polled every {POLL_S:g} s.\n\n"
        f"Rollback goal: the bad version's analysis window ({INTERVAL_S} s) + 10 s = {goal} s from its "
        f"canaries serving to every node back on stable: "
        + ("**met**" if within <= goal else "**not met**")
        + f" ({within:.1f} s; {t_back - t_fail:.1f} s after the failed check was recorded)."
    )
    print(body_md)
    print(
        f"[bench] sim agents: {beat.rounds} rounds (longest {beat.longest_s:.1f}s), {beat.writes} writes; "
        f"status seen RolledBack at "
        f"+{t_failed_seen - t_fail:.1f}s"
    )
    if not QUICK:
        write_section("rollout_fleet", f"Canary rollout at {N} nodes", body_md)


if __name__ == "__main__":
    main()
