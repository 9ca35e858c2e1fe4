"""`make demo`: a local edge fleet on this machine.

Brings up the real control plane (etcd, kube-apiserver, controller-manager,
scheduler, kwok), registers a handful of simulated edge nodes of different
classes, applies the example InferenceServices, and shows what the cluster sees.
The fleet stays up afterwards; `make cluster-down` removes it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from e2e import cluster as localcluster
from e2e import fleet

REPO = Path(__file__).resolve().parent.parent
DEMO_NAMESPACE = "edgefleet-demo"
NODES = [("orin", "jetson-orin", 2), ("nano", "jetson-nano", 1), ("server", "edge-server", 2)]


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
    localcluster.kubectl(state, "create", "namespace", DEMO_NAMESPACE, check=False)
    out = localcluster.kubectl(
        state, "apply", "-n", DEMO_NAMESPACE, "-f", str(REPO / "manifests" / "examples")
    )
    print(out.stdout, end="")
    for args in (
        ["get", "nodes", "-L", "edgefleet.io/device-class,topology.kubernetes.io/zone"],
        ["get", "inferenceservices", "-n", DEMO_NAMESPACE],
    ):
        print(f"\n$ kubectl {' '.join(args)}")
        print(localcluster.kubectl(state, *args).stdout, end="")
    print(f"""
The fleet is up. Poke at it:
  export KUBECONFIG={state.kubeconfig} PATH={state.bin_dir}:$PATH
  kubectl get nodes,edgenodes
  kubectl get efis -n {DEMO_NAMESPACE} -o wide
  kubectl explain inferenceservice.spec.rollout
Tear it down: make cluster-down""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
