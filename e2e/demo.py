"""`make demo`: a local edge fleet on this machine.

Brings up the real control plane (etcd, kube-apiserver, controller-manager,
scheduler, kwok), registers a handful of simulated edge nodes of different
classes, starts the operator (in the background, log in .cluster/logs/operator.log),
applies the example InferenceServices, and shows the fleet as the operator placed it.
The fleet stays up afterwards; `make cluster-down` removes it (and the operator).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from e2e import cluster as localcluster
from e2e import fleet
from e2e.operator_proc import AGENT_NAMESPACE, ensure_agent_namespace

REPO = Path(__file__).resolve().parent.parent
DEMO_NAMESPACE = "edgefleet-demo"
NODES = [("orin", "jetson-orin", 2), ("nano", "jetson-nano", 1), ("server", "edge-server", 2)]


def start_operator(state: localcluster.ClusterState, api_client: object) -> None:
    """`edgefleet-operator run` detached from this process, unless one already runs for this cluster."""
    pid_file = Path(state.dir) / "operator.pid"
    if pid_file.exists() and localcluster.pid_alive(int(pid_file.read_text())):
        return
    ensure_agent_namespace(api_client)
    log = open(Path(state.dir) / "logs" / "operator.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet_operator.cli", "run", "--liveness", ""],
        env={**os.environ, "KUBECONFIG": str(state.kubeconfig), "EDGEFLEET_METRICS_PORT": "0"},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=REPO,
    )
    log.close()
    pid_file.write_text(str(proc.pid))
    state.pids["operator"] = proc.pid
    state.save()
    print(f"[demo] operator started (pid {proc.pid})")


def main() -> int:
    state = localcluster.up()
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(state.kubeconfig))
    core = client.CoreV1Api(api_client)
    names: list[str] = []
    for prefix, device_class, count in NODES:
        names += fleet.create_nodes(core, count, device_class=device_class, prefix=prefix)
    print(f"[demo] {len(names)} simulated edge nodes: {', '.join(names)}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = [
            n.metadata.name
            for n in core.list_node().items
            if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
        ]
        if set(names) <= set(ready):
            break
        time.sleep(1)
    start_operator(state, api_client)
    localcluster.kubectl(state, "create", "namespace", DEMO_NAMESPACE, check=False)
    out = localcluster.kubectl(
        state, "apply", "-n", DEMO_NAMESPACE, "-f", str(REPO / "manifests" / "examples")
    )
    print(out.stdout, end="")
    time.sleep(5)  # a few reconcile passes
    for args in (
        ["get", "nodes", "-L", "edgefleet.io/device-class,topology.kubernetes.io/zone"],
        ["get", "edgenodes"],
        ["get", "inferenceservices", "-n", DEMO_NAMESPACE],
        ["get", "pods", "-n", AGENT_NAMESPACE, "-o", "wide"],
    ):
        print(f"\n$ kubectl {' '.join(args)}")
        print(localcluster.kubectl(state, *args).stdout, end="")
    print(f"""
The fleet is up. Poke at it:
  export KUBECONFIG={state.kubeconfig} PATH={state.bin_dir}:$PATH
  kubectl get nodes,edgenodes
  kubectl get efis -n {DEMO_NAMESPACE} -o wide
  kubectl explain inferenceservice.spec.rollout
  .venv/bin/edgefleet-operator fleet --watch 2     # the fleet view
The operator runs in the background (log: {state.dir}/logs/operator.log). Node agents are not
started here yet: agent Pods stay simulated by kwok, so services show 0 ready nodes.
Tear it down: make cluster-down""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
