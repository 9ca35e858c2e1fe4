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
from pathlib import Path
from typing import Any

from bench.report import table, write_section
from e2e import cluster as localcluster
from e2e import fleet
from e2e.operator_proc import OperatorProcess, ensure_agent_namespace
from edgefleet_operator import api

QUICK = os.environ.get("BENCH_QUICK") == "1"
N = 20 if QUICK else 200
DIGEST = "sha256:" + "ef" * 32


def wait(check: Any, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what} not done after {timeout_s}s")
        time.sleep(0.05)
    return time.monotonic()


def metric(port: int, pattern: str) -> float:
    """Sum of the samples whose name and labels match `pattern` on the operator's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{pattern} (\S+)$", text, re.M))


def services_gone(custom: Any, namespace: str) -> bool:
    """No InferenceService left in `namespace` (the operator released their finalizers)."""
    return not custom.list_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.INFERENCE_SERVICE_PLURAL
    )["items"]


def writes(port: int) -> float:
    return metric(port, r"edgefleet_operator_api_writes_total\{[^}]*\}")


def service(name: str, group: str) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.INFERENCE_SERVICE_KIND,
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


def main() -> None:
    from kubernetes import client, config

    state = localcluster.up(quiet=True)
    kube = config.new_client_from_config(config_file=str(state.kubeconfig))
    core, custom = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    ensure_agent_namespace(kube)
    group = uuid.uuid4().hex[:6]
    ns_ops, ns_pods = f"bench-ops-{group}", f"bench-pods-{group}"
    for ns in (ns_ops, ns_pods):
        core.create_namespace({"metadata": {"name": ns}})
    nodes = fleet.create_nodes(
        core, N, device_class="edge-server", prefix=f"b{group}", labels={"bench-group": group}
    )
    log_dir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    op = OperatorProcess(state, log_dir / "operator.log", EDGEFLEET_RESYNC_S="5")
    pool = ThreadPoolExecutor(8)
    try:
        edge_names = lambda: {  # noqa: E731
            e["metadata"]["name"]
            for e in custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.EDGE_NODE_PLURAL)["items"]
        }
        print(f"[bench] {N} nodes created; waiting for the operator's EdgeNodes", flush=True)
        wait(lambda: set(nodes) <= edge_names(), 300, "EdgeNodes for every node")
        time.sleep(2)  # let the startup passes settle
        writes_before = writes(op.metrics_port)

        def placed() -> int:
            items = custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.EDGE_NODE_PLURAL)["items"]
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
                    api.GROUP, api.VERSION, ns_ops, api.INFERENCE_SERVICE_PLURAL, service(f"s{i:03d}", group)
                ),
                range(N),
            )
        )
        t_applied = time.monotonic()
        print(f"[bench] {N} services applied in {t_applied - t0:.1f}s; waiting for placement", flush=True)
        t_placed = wait(lambda: placed() >= N, 300, "all services placed")
        print(f"[bench] placed after {t_placed - t0:.1f}s", flush=True)
        ops_s = t_placed - t0
        # The pass that wrote the last spec goes on to create Pods, Services, statuses: count them all,
        # once two more passes have completed after it.
        passes = metric(op.metrics_port, r'edgefleet_operator_reconciles_total\{result="ok"\}')
        wait(
            lambda: (
                metric(op.metrics_port, r'edgefleet_operator_reconciles_total\{result="ok"\}') >= passes + 2
            ),
            120,
            "two more passes",
        )
        writes_after = writes(op.metrics_port)
        per_placement = (writes_after - writes_before) / N

        def bound() -> int:
            return sum(1 for p in core.list_namespaced_pod(ns_pods).items if p.spec.node_name)

        t1 = time.monotonic()
        list(pool.map(lambda i: core.create_namespaced_pod(ns_pods, pod(f"p{i:03d}", group)), range(N)))
        t_created = time.monotonic()
        t_bound = wait(lambda: bound() >= N, 300, "all pods bound")
        sched_s = t_bound - t1
    finally:
        # Delete the services while the operator still runs: it releases their finalizers.
        for ns in (ns_ops, ns_pods):
            core.delete_namespace(ns)
        try:
            wait(lambda: services_gone(custom, ns_ops), 300, "the services' deletion")
        except TimeoutError as e:
            print(f"cleanup: {e}")
        finally:
            op.stop()
            pool.shutdown()
            fleet.delete_nodes(core, nodes)

    rows = [
        ["edgefleet operator: InferenceServices placed (EdgeNode specs written)", N, t_applied - t0, ops_s],
        ["kube-scheduler: Pods bound", N, t_created - t1, sched_s],
    ]
    body = (
        f"{N} kwok nodes (edge-server class), {N} objects created from 8 client threads, then polled until "
        f"every one is placed/bound. The same nodes serve both; the operator and the scheduler run side "
        f"by side on the same control plane.\n\n"
        + table(["what", "objects", "create s", "create-to-all-placed s"], rows)
        + f"\n\n**Operator / kube-scheduler time: {ops_s / sched_s:.2f}x** (goal: <= 1.0, no slower). "
        f"API writes per placement: **{per_placement:.1f}**, all counted (EdgeNode "
        f"spec patch, agent Pod create, the service's finalizer, status, Service, EndpointSlice and events, "
        f"over {N} placements; kopf writes nothing to the services). A pass writes EdgeNode specs first and "
        f"leaves Pods and the services' bookkeeping to the next pass while new services keep arriving."
    )
    print(body)
    if not QUICK:
        write_section("fleet_e2e", "Fleet placement end to end vs kube-scheduler", body)


if __name__ == "__main__":
    main()
