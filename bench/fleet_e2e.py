"""End to end on the local control plane: time from applying N InferenceServices to all placed
(EdgeNode specs written by the operator), side by side with kube-scheduler binding N plain Pods
to the same N kwok nodes, in the same run. Counts the operator's API writes per placement.

    python -m bench.fleet_e2e          # 200 nodes, 200 services
    BENCH_QUICK=1 python -m bench.fleet_e2e
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import table, write_section
from e2e import cluster as localcluster
from e2e import fleet
from e2e.operator_proc import AGENT_NAMESPACE, OperatorProcess, ensure_agent_namespace
from edgefleet_api import names

QUICK = os.environ.get("BENCH_QUICK") == "1"
N = 20 if QUICK else 200
DIGEST = "sha256:" + "ef" * 32


def wait(check: Any, timeout_s: float, what: str, poll_s: float = 0.05) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what} not done after {timeout_s}s")
        time.sleep(poll_s)
    return time.monotonic()


def metric(port: int, pattern: str) -> float:
    """Sum of the samples whose name and labels match `pattern` on the operator's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{pattern} (\S+)$", text, re.M))


def services_gone(custom: Any, namespace: str) -> bool:
    """No InferenceService left in `namespace` (the operator released their finalizers)."""
    return not custom.list_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL
    )["items"]


def writes_by_kind(port: int) -> dict[str, float]:
    """The operator's API writes so far, by what it wrote."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = re.findall(r'^edgefleet_operator_api_writes_total\{what="([^"]+)"\} (\S+)$', text, re.M)
    return {k: float(v) for k, v in found}


def writes(port: int) -> float:
    return metric(port, r"edgefleet_operator_api_writes_total\{[^}]*\}")


def service(name: str, group: str) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.INFERENCE_SERVICE_KIND,
        "metadata": {"name": name},
        "spec": {
            "models": [
                {
                    "name": "classifier",
                    "version": "1",
                    "memoryEstimate": "256Mi",
                    "artifact": {"uri": "repo://classifier/1/model.pt", "digest": DIGEST},
                }
            ],
            "placement": {"replicas": 1, "nodeSelector": {"bench-group": group}},
        },
    }


def pod(name: str, group: str) -> dict[str, Any]:
    """A plain Pod (no GPU request: the operator's agent Pods hold the nodes' GPUs)."""
    return {
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"bench-group": group},
            "containers": [{"name": "c", "image": "example.invalid/x:0"}],
        },
    }


ROUNDS = 1 if QUICK else 3


@dataclass
class Round:
    ops_create_s: float
    ops_s: float
    writes_per_placement: float
    sched_create_s: float
    sched_s: float
    writes_by_kind: dict[str, float] = field(default_factory=dict)
    """The operator's writes per placement, by what it wrote."""

    @property
    def ratio(self) -> float:
        return self.ops_s / self.sched_s


def one_round(
    core: Any,
    custom: Any,
    op: OperatorProcess,
    pool: ThreadPoolExecutor,
    group: str,
    k: int,
    count: int = N,
    poll_s: float = 0.05,
) -> Round:
    """Apply `count` services and time them to all placed; then create `count` Pods and time them
    to all bound (each polled every `poll_s`: a fleet of thousands wants a slower poll, each is a
    list of every EdgeNode); then delete both namespaces (the operator releases the services'
    finalizers). bench.fleet_scale runs it at fleet scale."""
    ns_ops, ns_pods = f"bench-ops-{group}-{k}", f"bench-pods-{group}-{k}"
    for ns in (ns_ops, ns_pods):
        core.create_namespace({"metadata": {"name": ns}})
    try:
        time.sleep(2)  # let earlier passes settle
        writes_before, kinds_before = writes(op.metrics_port), writes_by_kind(op.metrics_port)

        def placed() -> int:
            items = custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL)[
                "items"
            ]
            return sum(
                1
                for e in items
                for m in e.get("spec", {}).get("models") or []
                if m["service"].startswith(ns_ops + "/")
            )

        t0 = time.monotonic()
        list(
            pool.map(
                lambda i: custom.create_namespaced_custom_object(
                    names.GROUP,
                    names.VERSION,
                    ns_ops,
                    names.INFERENCE_SERVICE_PLURAL,
                    service(f"s{i:04d}", group),
                ),
                range(count),
            )
        )
        t_applied = time.monotonic()
        t_placed = wait(lambda: placed() >= count, 600, "all services placed", poll_s)
        # The operator goes on to create Pods, Services, statuses: count them all, once two more
        # passes have completed after the last placement.
        ok = r'edgefleet_operator_reconciles_total\{result="ok"\}'
        passes = metric(op.metrics_port, ok)
        wait(lambda: metric(op.metrics_port, ok) >= passes + 2, 300, "two more passes", poll_s)
        per_placement = (writes(op.metrics_port) - writes_before) / count
        kinds = {
            kind: round((n - kinds_before.get(kind, 0.0)) / count, 2)
            for kind, n in sorted(writes_by_kind(op.metrics_port).items())
            if n > kinds_before.get(kind, 0.0)
        }

        def bound() -> int:
            return sum(1 for p in core.list_namespaced_pod(ns_pods).items if p.spec.node_name)

        t1 = time.monotonic()
        list(pool.map(lambda i: core.create_namespaced_pod(ns_pods, pod(f"p{i:04d}", group)), range(count)))
        t_created = time.monotonic()
        t_bound = wait(lambda: bound() >= count, 600, "all pods bound", poll_s)
        r = Round(t_applied - t0, t_placed - t0, per_placement, t_created - t1, t_bound - t1, kinds)
        print(
            f"[bench] round {k + 1}: operator {r.ops_s:.2f} s, kube-scheduler {r.sched_s:.2f} s, "
            f"writes per placement {per_placement:.2f}: {kinds}",
            flush=True,
        )
        return r
    finally:
        # Delete the services while the operator still runs: it releases their finalizers.
        for ns in (ns_ops, ns_pods):
            core.delete_namespace(ns)
        try:
            wait(lambda: services_gone(custom, ns_ops), 300, "the services' deletion")
            # The next round starts on a quiet fleet: every agent Pod of this round gone.
            agents = f"app.kubernetes.io/name={names.AGENT_APP}"
            wait(
                lambda: (
                    not [
                        p
                        for p in core.list_namespaced_pod(AGENT_NAMESPACE, label_selector=agents).items
                        if (p.metadata.labels or {}).get(names.LABEL_NODE, "").startswith(f"b{group}")
                    ]
                ),
                300,
                "the agent Pods' deletion",
            )
        except TimeoutError as e:
            print(f"cleanup: {e}")


def main() -> None:
    from kubernetes import client, config

    state = localcluster.up(quiet=True)
    kube = config.new_client_from_config(config_file=str(state.kubeconfig))
    core, custom = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    ensure_agent_namespace(kube)
    group = uuid.uuid4().hex[:6]
    nodes = fleet.create_nodes(
        core, N, device_class="edge-server", prefix=f"b{group}", labels={"bench-group": group}
    )
    log_dir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    op = OperatorProcess(state, log_dir / "operator.log", EDGEFLEET_RESYNC_S="5")
    pool = ThreadPoolExecutor(8)
    try:
        edge_names = lambda: {  # noqa: E731
            e["metadata"]["name"]
            for e in custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL)[
                "items"
            ]
        }
        print(f"[bench] {N} nodes created; waiting for the operator's EdgeNodes", flush=True)
        wait(lambda: set(nodes) <= edge_names(), 300, "EdgeNodes for every node")
        rounds = [one_round(core, custom, op, pool, group, k) for k in range(ROUNDS)]
    finally:
        op.stop()
        pool.shutdown()
        fleet.delete_nodes(core, nodes)

    mid = sorted(rounds, key=lambda r: r.ratio)[len(rounds) // 2]
    rows = [
        [
            k + 1,
            f"{r.ops_create_s:.2f}",
            f"{r.ops_s:.2f}",
            f"{r.sched_create_s:.2f}",
            f"{r.sched_s:.2f}",
            f"{r.ratio:.2f}",
            f"{r.writes_per_placement:.1f}",
        ]
        for k, r in enumerate(rounds)
    ]
    body = (
        f"{N} kwok nodes (edge-server class). Each round: {N} InferenceServices created from 8 client "
        f"threads and polled until every one is placed (its EdgeNode spec written by the operator); then "
        f"{N} plain Pods created the same way and polled until kube-scheduler has bound every one to the "
        f"same nodes; both namespaces deleted. {len(rounds)} rounds, one operator process throughout.\n\n"
        + table(
            [
                "round",
                "services create s",
                "create-to-all-placed s",
                "pods create s",
                "create-to-all-bound s",
                "operator / scheduler",
                "writes per placement",
            ],
            rows,
        )
        + f"\n\n**Operator / kube-scheduler time: {mid.ratio:.2f}x** (median round; goal: <= 1.0, no slower; "
        f"every round: {', '.join(f'{r.ratio:.2f}x' for r in rounds)}). API writes per placement: "
        f"**{mid.writes_per_placement:.1f}**, all counted (EdgeNode spec patch, agent Pod create, the "
        f"service's finalizer, status, Service, EndpointSlice and events; kopf writes nothing to the "
        f"services). A pass writes EdgeNode specs first and leaves Pods and the services' bookkeeping to "
        f"the next pass while new services keep arriving."
    )
    print(body)
    if not QUICK:
        write_section("fleet_e2e", "Fleet placement end to end vs kube-scheduler", body)


if __name__ == "__main__":
    main()
