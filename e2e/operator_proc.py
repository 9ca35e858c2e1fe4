"""Run the real operator (`edgefleet-operator run`) as a process against the local cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from e2e.children import stop_child
from e2e.cluster import ClusterState, free_port

REPO = Path(__file__).resolve().parent.parent
AGENT_NAMESPACE = "edgefleet-system"
FAST_SETTINGS = {
    "EDGEFLEET_AGENT_GRACE_S": "10",
    "EDGEFLEET_NOT_READY_GRACE_S": "2",
    "EDGEFLEET_FLAP_DAMPING_S": "30",
    "EDGEFLEET_RESYNC_S": "1",
    "EDGEFLEET_DEBOUNCE_S": "0.2",
    "EDGEFLEET_LEASE_DURATION_S": "3",
    "EDGEFLEET_LEASE_RENEW_S": "1",
    "EDGEFLEET_LEASE_MARGIN_S": "1",
}
"""Grace periods shortened so tests see health changes in seconds; short Leases, so an operator that
follows a killed one takes over in seconds (`ownership.failover_bound_s`: 5 s)."""


def ensure_agent_namespace(api_client: Any, namespace: str = AGENT_NAMESPACE) -> None:
    """The namespace and ServiceAccount the agent Pods use (the Helm chart creates them)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)
    for create in (
        lambda: core.create_namespace({"metadata": {"name": namespace}}),
        lambda: core.create_namespaced_service_account(namespace, {"metadata": {"name": "edgefleet-agent"}}),
    ):
        try:
            create()
        except ApiException as e:
            if e.status != 409:
                raise


class OperatorProcess:
    """`edgefleet-operator run` in its own process; stop() or kill() it."""

    def __init__(self, state: ClusterState, log_path: Path, **env: str) -> None:
        self.metrics_port = free_port()
        self.log_path = log_path
        full_env = {
            **os.environ,
            "KUBECONFIG": str(state.kubeconfig),
            **FAST_SETTINGS,
            "EDGEFLEET_METRICS_PORT": str(self.metrics_port),
            **env,
        }
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet_operator.cli", "run", "--liveness", ""],
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies under the operator."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> None:
        stop_child(self.proc)
        self.log.close()

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]
