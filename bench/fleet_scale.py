"""Fleet scale (issue 22): N kwok nodes with simulated agents on the local control plane, one
operator process, and what the fleet costs and how fast it reacts as N grows.

Per N: the fleet comes up (kwok Nodes; `e2e.sim_fleet`, one process of asyncio agents with the
real link's settings: Lease renewals, a watch of each agent's own EdgeNode, status on change);
one service on every node; then
1. steady state, idle and serving: API requests/s and bytes/s per node, agents (counted in the
   simulator, HTTP bytes) and operator (wire bytes through a counting TCP proxy; requests: the API
   server's `apiserver_request_total` less the agents' and the rest of the control plane's,
   measured before the operator started) apart; CPU per process (from /proc); operator RSS;
2. operator passes while one Node changes every few seconds: pass time p50/p99 (from the
   operator's pass histogram) and CPU per pass;
3. a canary that passes (4 waves) and one that fails at its first wave: failed check -> every
   EdgeNode spec back on stable, -> every agent reports stable;
4. placement of S new services (1,000, or N when smaller), create -> all placed, against
   kube-scheduler binding S Pods to the same nodes (`bench.fleet_e2e.one_round`);
5. the API server stopped for `--outage-s` and started again: time to converged (every agent
   renewed and watching, every node Healthy, a pass done), models moved, agent Pods rebuilt.

    python -m bench.fleet_scale --nodes 1000
    BENCH_QUICK=1 python -m bench.fleet_scale      # 30 nodes, short phases, writes nothing

Results per N are kept in bench/fleet_scale_runs.json (a rerun at N replaces its row) and the
section "Fleet scale (issue 22)" of docs/benchmarks.md shows every N recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.fleet_e2e import metric, one_round, services_gone
from bench.fleet_meter import (
    CountingProxy,
    agents_like,
    apiserver_requests,
    cpu_s,
    histogram_quantiles,
    operator_like,
    pass_histogram,
    rss_bytes,
)
from bench.fleet_scale_tables import busiest, render, render_agents
from bench.report import machine, recorded
from bench.rollout_fleet import pass_stats, spec, writes_by_kind
from e2e import cluster as localcluster
from e2e import fleet
from e2e.operator_proc import AGENT_NAMESPACE, OperatorProcess, ensure_agent_namespace
from e2e.sim_fleet import SimFleetProcess
from edgefleet_api import names, wire

QUICK = os.environ.get("BENCH_QUICK") == "1"
RUNS = Path(__file__).resolve().parent / "fleet_scale_runs.json"
AGENT_RUNS = Path(__file__).resolve().parent / "fleet_scale_agents.json"
INTERVAL_S = 10
"""The canaries' analysis interval: one SLA window roll of the agents (status_metrics_interval_s)."""
WINDOW_S = 10 if QUICK else 30
AGENTS_WINDOW_S = 20 if QUICK else 60
"""Length of each steady-state measurement."""
POLL_S = 2.0
PRODUCTION = {
    "EDGEFLEET_AGENT_GRACE_S": "45",
    "EDGEFLEET_NOT_READY_GRACE_S": "30",
    "EDGEFLEET_FLAP_DAMPING_S": "120",
    "EDGEFLEET_RESYNC_S": "10",
    "EDGEFLEET_DEBOUNCE_S": "0.5",
    "EDGEFLEET_LEASE_DURATION_S": "120",
    "EDGEFLEET_LEASE_RENEW_S": "20",
    "EDGEFLEET_LEASE_MARGIN_S": "10",
}
"""The chart's defaults (e2e.operator_proc's are shortened for tests), but for the operator's shard
Lease: a pass that lists a fleet of 1,000 nodes on this machine outlasts the chart's 15 s Lease
(the pass keeps the loop from renewing it), and a pass that finds its shard lost writes nothing."""
BAD = {"errorRate": 0.5, "p99LatencyMs": 90.0, "met": False}
COMPONENTS = ("etcd", "kube-apiserver", "kwok", "kube-controller-manager", "kube-scheduler")


def log(msg: str) -> None:
    print(f"[fleet_scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Meter:
    """Snapshots of everything a phase is charged with: CPU per process, agents' traffic, the
    operator's wire bytes and passes, the API server's requests."""

    def __init__(self, run: Run) -> None:
        assert run.sim is not None and run.op is not None
        self.run = run
        self.t = time.monotonic()
        self.cpu = run.cpu()
        self.sim = run.sim.stats().get("traffic", {})
        self.proxy = (run.proxy.up, run.proxy.down)
        self.passes = pass_stats(run.op.metrics_port)
        self.hist = pass_histogram(run.op.metrics_port)
        self.requests = apiserver_requests(run.kube, run.state.server)

    def since(self, start: Meter) -> dict[str, Any]:
        s = self.t - start.t
        n = self.run.n
        agents = {
            k: {f: (v[f] - start.sim.get(k, {}).get(f, 0)) for f in ("requests", "up", "down", "errors")}
            for k, v in self.sim.items()
        }
        agent_requests = sum(v["requests"] for v in agents.values())
        all_requests = sum(self.requests.values()) - sum(start.requests.values())
        operator = operator_like(self.requests) - operator_like(start.requests)
        operator -= agents_like(agents) + self.run.others_per_s * s
        passes = self.passes[0] - start.passes[0]
        op_cpu = self.cpu["operator"] - start.cpu["operator"]
        return {
            "seconds": s,
            "cpu_cores": {k: (self.cpu[k] - start.cpu.get(k, 0.0)) / s for k in self.cpu},
            "agents": agents,
            "agent_per_node": {
                "requests_per_s": agent_requests / n / s,
                "up_bytes_per_s": sum(v["up"] for v in agents.values()) / n / s,
                "down_bytes_per_s": sum(v["down"] for v in agents.values()) / n / s,
            },
            "operator_per_node": {
                "requests_per_s": max(0.0, operator) / n / s,
                "up_bytes_per_s": (self.proxy[0] - start.proxy[0]) / n / s,
                "down_bytes_per_s": (self.proxy[1] - start.proxy[1]) / n / s,
            },
            "apiserver_requests_per_s": all_requests / s,
            "passes": passes,
            "pass_s_mean": (self.passes[1] - start.passes[1]) / passes if passes else float("nan"),
            "pass_p50_p99_s": histogram_quantiles(start.hist, self.hist, (0.5, 0.99)),
            "cpu_s_per_pass": op_cpu / passes if passes else float("nan"),
        }


# --- one size ---------------------------------------------------------------------------------------


class Run:
    """The fleet of one size and the processes measured."""

    def __init__(self, n: int, services: int, outage_s: float) -> None:
        from kubernetes import client, config

        self.n, self.services, self.outage_s = n, services, outage_s
        self.state = localcluster.up(quiet=True)
        self.kube = config.new_client_from_config(config_file=str(self.state.kubeconfig))
        self.core: Any = client.CoreV1Api(self.kube)
        self.custom: Any = client.CustomObjectsApi(self.kube)
        self.group = uuid.uuid4().hex[:6]
        self.ns = f"bench-scale-{self.group}"
        self.dir = Path(tempfile.mkdtemp(prefix="edgefleet-scale-"))
        self.pool = ThreadPoolExecutor(8)
        self.nodes: list[str] = []
        self.others_per_s = 0.0
        self.results: dict[str, Any] = {"nodes": n}
        self.op: OperatorProcess | None = None
        self.sim: SimFleetProcess | None = None
        self.proxy = CountingProxy(("127.0.0.1", self.state.apiserver_port))

    def cpu(self) -> dict[str, float]:
        pids = {k: self.state.pids[k] for k in COMPONENTS if k in self.state.pids}
        pids["operator"] = self.op.proc.pid if self.op else 0
        pids["simulator"] = self.sim.pid if self.sim else 0
        return {k: cpu_s(p) for k, p in pids.items()}

    def wait(self, check: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll `check` every POLL_S until true; the wall-clock time (epoch s) it was seen true."""
        t0 = time.monotonic()
        while not check():
            if time.monotonic() - t0 > timeout_s:
                tail = self.op.tail() if self.op else ""
                raise TimeoutError(f"{what}: not after {timeout_s:.0f} s\n{tail}")
            if self.sim is not None:
                self.sim.stats()  # raises when the simulator died
            time.sleep(POLL_S)
        return time.time()

    def edge_nodes(self) -> list[dict[str, Any]]:
        items = self.custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL)[
            "items"
        ]
        ours = set(self.nodes)
        return [e for e in items if e["metadata"]["name"] in ours]

    def versions(self) -> tuple[set[str], set[str]]:
        """(versions in our EdgeNode specs, versions our agents report) for the canary service."""
        svc = f"{self.ns}/svc"
        items = self.edge_nodes()
        spec_v = {
            str(m["version"]) for e in items for m in e["spec"].get("models") or [] if m["service"] == svc
        }
        seen = {
            str(m["version"])
            for e in items
            for m in (e.get("status") or {}).get("models") or []
            if m["service"] == svc
        }
        if len(items) < self.n or any(
            not [m for m in e["spec"].get("models") or [] if m["service"] == svc] for e in items
        ):
            spec_v.add("?")
        return spec_v, seen

    def rollout(self) -> dict[str, Any]:
        obj = self.custom.get_namespaced_custom_object(
            names.GROUP, names.VERSION, self.ns, names.INFERENCE_SERVICE_PLURAL, "svc"
        )
        return dict((obj.get("status") or {}).get("rollout") or {})

    def healthy(self) -> float:
        assert self.op is not None
        return metric(self.op.metrics_port, r'edgefleet_operator_fleet_nodes\{health="Healthy"\}')

    def set_version(self, version: str) -> float:
        body = {"spec": spec(version, self.group)}
        body["spec"]["rollout"]["analysis"]["intervalSeconds"] = INTERVAL_S
        self.custom.patch_namespaced_custom_object(
            names.GROUP, names.VERSION, self.ns, names.INFERENCE_SERVICE_PLURAL, "svc", body
        )
        return time.time()

    # --- phases ---------------------------------------------------------------------------

    def create_nodes(self) -> None:
        """N kwok edge-server Nodes of this run's group, made 100 at a time on the pool."""
        chunks = [(i, min(100, self.n - 100 * i)) for i in range(-(-self.n // 100))]
        made = self.pool.map(
            lambda c: fleet.create_nodes(
                self.core,
                c[1],
                device_class="edge-server",
                prefix=f"s{self.group}-{c[0]:03d}",
                labels={"bench-group": self.group},
            ),
            chunks,
        )
        self.nodes = sorted(n for chunk in made for n in chunk)

    def bring_up(self) -> None:
        ensure_agent_namespace(self.kube)
        self.core.create_namespace({"metadata": {"name": self.ns}})
        t0 = time.time()
        log(f"creating {self.n} kwok nodes")
        self.create_nodes()
        log(f"{self.n} nodes in {time.time() - t0:.0f} s; starting the simulated agents")
        self.sim = SimFleetProcess(self.state.kubeconfig, self.nodes, self.dir / "sim", AGENT_NAMESPACE)
        self.wait(
            lambda: self.sim is not None and self.sim.stats().get("leased", 0) >= self.n, 600, "every Lease"
        )
        # the rest of the control plane and the agents, without the operator: what is not its
        m0 = time.monotonic(), apiserver_requests(self.kube, self.state.server), self.sim.stats()["traffic"]
        time.sleep(WINDOW_S / 2)
        m1 = time.monotonic(), apiserver_requests(self.kube, self.state.server), self.sim.stats()["traffic"]
        agents = {k: {"requests": v["requests"] - m0[2][k]["requests"]} for k, v in m1[2].items()}
        others = operator_like(m1[1]) - operator_like(m0[1]) - agents_like(agents)
        self.others_per_s = max(0.0, others / (m1[0] - m0[0]))
        log(f"control plane without the operator: {self.others_per_s:.2f} requests/s of the operator's kinds")
        kubeconfig = self.proxy.kubeconfig(self.state.kubeconfig, self.dir / "operator.kubeconfig")
        self.op = OperatorProcess(
            self.state, self.dir / "operator.log", **PRODUCTION, KUBECONFIG=str(kubeconfig)
        )
        t_op = time.time()
        self.custom.create_namespaced_custom_object(
            names.GROUP,
            names.VERSION,
            self.ns,
            names.INFERENCE_SERVICE_PLURAL,
            {
                "apiVersion": names.API_VERSION,
                "kind": names.INFERENCE_SERVICE_KIND,
                "metadata": {"name": "svc"},
                "spec": spec("1", self.group),
            },
        )
        self.set_version("1")
        t_v1 = self.wait(lambda: self.versions() == ({"1"}, {"1"}), 1800, "v1 on every node")
        self.wait(lambda: self.healthy() >= self.n, 600, "every node Healthy")
        self.results["deploy_s"] = t_v1 - t_op
        log(f"v1 reported by every agent {t_v1 - t_op:.0f} s after the operator started")
        assert self.op is not None
        mark = [
            writes_by_kind(self.op.metrics_port).get("edgenode.patch", 0.0),
            pass_stats(self.op.metrics_port)[0],
        ]

        def settled() -> bool:
            assert self.op is not None
            patches, passes = (
                writes_by_kind(self.op.metrics_port).get("edgenode.patch", 0.0),
                pass_stats(self.op.metrics_port)[0],
            )
            if patches != mark[0]:
                mark[:] = [patches, passes]
            return passes >= mark[1] + 2

        self.wait(settled, 900, "a settled fleet")
        self.results["bring_up_cpu_s"] = self.cpu()

    def steady(self, serving: bool) -> dict[str, Any]:
        assert self.sim is not None and self.op is not None
        self.sim.control(traffic=serving)
        time.sleep(2 * POLL_S if QUICK else 15)  # the rolls spread over their interval first
        start = Meter(self)
        time.sleep(WINDOW_S)
        out = Meter(self).since(start)
        out["operator_rss_bytes"] = rss_bytes(self.op.proc.pid)
        log(f"steady ({'serving' if serving else 'idle'}): {json.dumps(out['agent_per_node'])} per node")
        return out

    def one_node_passes(self, changes: int) -> dict[str, Any]:
        """`changes` times, one Node's label changes and the next pass is awaited."""
        assert self.op is not None
        port = self.op.metrics_port
        start = Meter(self)
        for i in range(changes):
            passes = pass_stats(port)[0]
            self.core.patch_node(
                self.nodes[i % len(self.nodes)], {"metadata": {"labels": {"bench-tick": str(i)}}}
            )
            self.wait(lambda p=passes: bool(pass_stats(port)[0] > p), 300, "a pass")  # type: ignore[misc]
        out = Meter(self).since(start)
        log(
            f"one changed node: pass p50/p99 {out['pass_p50_p99_s']}, "
            f"{out['cpu_s_per_pass']:.3f} CPU s per pass"
        )
        return out

    def canaries(self) -> dict[str, Any]:
        assert self.sim is not None
        self.sim.control(traffic=True, bad={"3": BAD})
        t0 = self.set_version("2")
        t_promoted = self.wait(lambda: self.rollout().get("phase") == "Promoted", 1800, "v2 promoted")
        t_all2 = self.wait(lambda: self.versions() == ({"2"}, {"2"}), 900, "v2 everywhere")
        log(f"v2 promoted after {t_promoted - t0:.0f} s, reported everywhere after {t_all2 - t0:.0f} s")
        self.set_version("3")
        self.wait(lambda: self.rollout().get("phase") == "RolledBack", 1800, "v3 rolled back")
        t_specs = self.wait(lambda: self.versions()[0] == {"2"}, 900, "v2 back in every spec")
        t_back = self.wait(lambda: self.versions() == ({"2"}, {"2"}), 900, "v2 reported everywhere")
        failed = next(a for a in self.rollout()["analysis"] if a["result"] == "Failed")
        t_fail = wire.parse_time(failed["time"]) or 0.0
        log(f"rolled back: every spec on stable {t_specs - t_fail:.1f} s after the failed check")
        return {
            "promoted_s": t_promoted - t0,
            "everywhere_s": t_all2 - t0,
            "failed_to_specs_s": t_specs - t_fail,
            "failed_to_reported_s": t_back - t_fail,
        }

    def placement(self) -> dict[str, Any]:
        assert self.op is not None
        log(f"placing {self.services} services, then binding {self.services} Pods")
        r = one_round(self.core, self.custom, self.op, self.pool, self.group, 0, self.services, POLL_S)
        return {
            "services_s": r.ops_s,
            "pods_s": r.sched_s,
            "ratio": r.ratio,
            "writes_per_placement": r.writes_per_placement,
        }

    def restart(self) -> dict[str, Any]:
        assert self.op is not None and self.sim is not None
        agents = f"app.kubernetes.io/name={names.AGENT_APP}"

        def pods() -> dict[str, str]:
            """Every agent Pod of the fleet's nodes, bound or still pending (by its node label)."""
            items = self.core.list_namespaced_pod(AGENT_NAMESPACE, label_selector=agents).items
            ours = set(self.nodes)
            return {
                p.metadata.name: p.metadata.uid
                for p in items
                if (p.metadata.labels or {}).get(names.LABEL_NODE) in ours
            }

        def specs() -> dict[str, Any]:
            return {e["metadata"]["name"]: e["spec"].get("models") for e in self.edge_nodes()}

        pods0, specs0 = pods(), specs()
        ok = r'edgefleet_operator_reconciles_total\{result="ok"\}'
        log(f"stopping the API server for {self.outage_s:.0f} s")
        localcluster.stop_apiserver(self.state)
        time.sleep(self.outage_s)
        localcluster.start_apiserver(self.state)
        localcluster.wait_for(
            "kube-apiserver /readyz", lambda: localcluster.readyz(self.state, 2.0), 300, self.state
        )
        t_ready = time.time()
        passes = metric(self.op.metrics_port, ok)
        log("API server ready; waiting for the fleet to converge")

        def converged() -> bool:
            assert self.sim is not None and self.op is not None
            s = self.sim.stats()
            return (
                s.get("oldest_renewal", 0) > t_ready
                and s.get("watching", 0) >= self.n
                and self.healthy() >= self.n
                and metric(self.op.metrics_port, ok) >= passes + 2
            )

        t_conv = self.wait(converged, 900, "the fleet converged after the restart")
        specs1, pods1 = specs(), pods()
        moved = sum(1 for k, v in specs0.items() if specs1.get(k) != v)
        rebuilt = sum(1 for k, v in pods0.items() if pods1.get(k) != v)
        log(
            f"converged {t_conv - t_ready:.0f} s after the API server was ready; "
            f"{moved} specs changed, {rebuilt} Pods rebuilt"
        )
        return {
            "converged_s": t_conv - t_ready,
            "specs_changed": moved,
            "pods_rebuilt": rebuilt,
            "pods": len(pods0),
        }

    def cleanup(self) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        if self.sim is not None:
            self.sim.stop()
            self.sim = None
        with contextlib.suppress(ApiException):
            self.core.delete_namespace(self.ns)
        try:
            self.wait(lambda: services_gone(self.custom, self.ns), 180, "the services' deletion")
        except (TimeoutError, RuntimeError) as e:
            log(f"cleanup: {str(e)[:200]}; removing the finalizers")
            for isvc in self.custom.list_namespaced_custom_object(
                names.GROUP, names.VERSION, self.ns, names.INFERENCE_SERVICE_PLURAL
            )["items"]:
                with contextlib.suppress(ApiException):
                    self.custom.patch_namespaced_custom_object(
                        names.GROUP,
                        names.VERSION,
                        self.ns,
                        names.INFERENCE_SERVICE_PLURAL,
                        isvc["metadata"]["name"],
                        {"metadata": {"finalizers": None}},
                    )
        if self.op is not None:
            self.op.stop()
        self.proxy.stop()
        list(self.pool.map(lambda n: fleet.delete_nodes(self.core, [n]), self.nodes))
        with contextlib.suppress(ApiException):
            client.CoordinationV1Api(self.kube).delete_collection_namespaced_lease(
                AGENT_NAMESPACE, label_selector=f"app.kubernetes.io/name={names.AGENT_APP}"
            )
        self.pool.shutdown()


PHASES = ("idle", "passes", "serving", "canaries", "placement", "restart")


def run_size(n: int, services: int, outage_s: float, only: Collection[str] = PHASES) -> dict[str, Any]:
    """Brings up N nodes and runs the phases in `only` (all by default); a run of some phases
    keeps the other phases' results recorded for N."""
    r = Run(n, services, outage_s)
    r.results |= {"machine": machine(), "outage_s": outage_s}
    phases: dict[str, Callable[[], Any]] = {
        "idle": lambda: r.steady(serving=False),
        "passes": lambda: r.one_node_passes(3 if QUICK else 10),
        "serving": lambda: r.steady(serving=True),
        "canaries": r.canaries,
        "placement": r.placement,
        "restart": r.restart,
    }
    try:
        r.bring_up()
        for name in PHASES:
            if name not in only:
                continue
            r.results[name] = phases[name]()
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            r.results["when" if len(only) == len(PHASES) else f"{name}_when"] = when
            save(n, r.results)  # a run cut short keeps what it measured
    finally:
        r.cleanup()
    return r.results


def agents_only(n: int) -> dict[str, Any]:
    """The agents' steady cost alone at N: EdgeNodes written as the operator would (one model each),
    no operator; each agent has written its status once; then a window of `AGENTS_WINDOW_S`."""
    r = Run(n, 0, 0.0)
    edge_nodes: list[str] = []
    try:
        ensure_agent_namespace(r.kube)
        t0 = time.time()
        r.create_nodes()
        model = spec("1", r.group)["models"][0]
        entry = {
            "service": "bench/svc",
            "model": model["name"],
            "version": model["version"],
            "artifact": model["artifact"],
            "format": "torchscript",
            "memoryBudgetBytes": 128 << 20,
        }

        def create(node: str) -> None:
            body = {
                "apiVersion": names.API_VERSION,
                "kind": "EdgeNode",
                "metadata": {"name": node},
                "spec": {"nodeName": node, "models": [entry]},
            }
            r.custom.create_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, body)
            edge_nodes.append(node)

        list(r.pool.map(create, r.nodes))
        log(f"{n} nodes and EdgeNodes in {time.time() - t0:.0f} s; starting the simulated agents")
        r.sim = SimFleetProcess(r.state.kubeconfig, r.nodes, r.dir / "sim", AGENT_NAMESPACE)
        sim = r.sim

        def up() -> bool:
            st = sim.stats()
            return bool(
                st.get("leased", 0) >= n
                and st.get("watching", 0) >= n
                and st["traffic"]["status"]["requests"] >= n
            )

        t_up = r.wait(up, 1800, "every agent leased, watching, reported")
        log(f"every agent up {t_up - t0:.0f} s after the first node; measuring {AGENTS_WINDOW_S} s")
        time.sleep(20)
        c0, s0, t_a = r.cpu(), sim.stats(), time.monotonic()
        time.sleep(AGENTS_WINDOW_S)
        c1, s1, t_b = r.cpu(), sim.stats(), time.monotonic()
        secs = t_b - t_a
        agents = {
            k: {f: v[f] - s0["traffic"][k][f] for f in ("requests", "up", "down", "errors")}
            for k, v in s1["traffic"].items()
        }
        out: dict[str, Any] = {
            "nodes": n,
            "seconds": secs,
            "agents": agents,
            "agent_per_node": {
                "requests_per_s": sum(v["requests"] for v in agents.values()) / n / secs,
                "up_bytes_per_s": sum(v["up"] for v in agents.values()) / n / secs,
                "down_bytes_per_s": sum(v["down"] for v in agents.values()) / n / secs,
            },
            "cpu_cores": {k: (c1[k] - c0.get(k, 0.0)) / secs for k in c1},
            "apiserver_rss_bytes": rss_bytes(r.state.pids["kube-apiserver"]),
            "etcd_rss_bytes": rss_bytes(r.state.pids["etcd"]),
            "simulator_rss_bytes": rss_bytes(sim.pid),
            "up_s": t_up - t0,
            "machine": machine(),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        log(f"agents at {n}: {json.dumps(out['agent_per_node'])} per node; CPU {busiest(out['cpu_cores'])}")
        return out
    finally:
        if r.sim is not None:
            r.sim.stop()
            r.sim = None

        def delete(name: str) -> None:
            with contextlib.suppress(Exception):
                r.custom.delete_cluster_custom_object(
                    names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name
                )

        list(r.pool.map(delete, edge_nodes))
        r.cleanup()


def save(n: int, result: dict[str, Any]) -> None:
    """Keep `result` in the row of N in RUNS, over what it had (not in a quick run)."""
    if QUICK:
        return
    runs = json.loads(RUNS.read_text()) if RUNS.exists() else {}
    runs[str(n)] = {**runs.get(str(n), {}), **result}
    RUNS.write_text(json.dumps(runs, indent=1, sort_keys=True))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fleet scale (issue 22)")
    p.add_argument("--nodes", default="30" if QUICK else "1000", help="N, or several: 1000,2000")
    p.add_argument("--services", type=int, default=20 if QUICK else 1000)
    p.add_argument("--outage-s", type=float, default=10 if QUICK else 120)
    p.add_argument("--agents-only", action="store_true", help="only the agents' steady cost (no operator)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"some of {','.join(PHASES)}")
    p.add_argument("--render", action="store_true", help="only rewrite the section from the recorded runs")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run cleans up (finally)
    runs: dict[str, dict[str, Any]] = {}
    if args.agents_only:
        for n in (int(x) for x in str(args.nodes).split(",")):
            result = agents_only(n)
            if not QUICK:
                agents = json.loads(AGENT_RUNS.read_text()) if AGENT_RUNS.exists() else {}
                agents[str(n)] = result
                AGENT_RUNS.write_text(json.dumps(agents, indent=1, sort_keys=True))
        return
    only = [x for x in args.phases.split(",") if x]
    if unknown := set(only) - set(PHASES):
        p.error(f"--phases: unknown {sorted(unknown)}; phases are {','.join(PHASES)}")
    for n in () if args.render else (int(x) for x in str(args.nodes).split(",")):
        log(f"N = {n}")
        runs[str(n)] = run_size(n, min(args.services, n), args.outage_s, only)
    if RUNS.exists() and not QUICK:
        runs = json.loads(RUNS.read_text())
    intro = (
        f"`python -m bench.fleet_scale --nodes N` on one machine: {machine()}, 24 GiB, every "
        "process of the control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, "
        "kwok), the operator and the simulated agents (one asyncio process: `e2e.sim_fleet`, the "
        "agents' link settings) sharing its 2 cores with whatever else runs on it. kwok edge-server "
        f"nodes; one canary service on every node; analysis interval {INTERVAL_S} s; operator at the "
        "chart's defaults (agent grace 45 s, resync 10 s); agents at theirs (Lease every 15 s less up "
        "to 20%, watch of their own EdgeNode resumed every 300 s, relisted every 300 s, status on "
        f"change only). Steady-state windows {WINDOW_S} s. Agents' bytes: HTTP, counted in the "
        "simulator; the operator's: on the wire (TLS) through a counting proxy; the operator's "
        "requests: the API server's apiserver_request_total less the agents' and less the rest of "
        "the control plane's rate measured before the operator started. Pass quantiles: from the "
        "operator's pass histogram (linear within its buckets). KubeEdge's published figure for "
        "comparison: 0.25 kbit/s per node."
    )
    with recorded("fleet_scale", "Fleet scale (issue 22)", intro):
        print(render(runs))
        if AGENT_RUNS.exists():
            print(render_agents(json.loads(AGENT_RUNS.read_text())))


if __name__ == "__main__":
    main()
