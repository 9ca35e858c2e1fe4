"""A real Kubernetes control plane as local processes: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok (simulated nodes).

    python -m e2e.cluster up       # build binaries once (cached), start, install CRDs
    python -m e2e.cluster status
    python -m e2e.cluster down     # stop and remove all state

The binaries come from `scripts/k8s-build.sh` (cached by version under the user's
cache directory). State (PKI, etcd data, logs, kubeconfig, pids) lives in the
state directory, `.cluster/` in the repository unless EDGEFLEET_CLUSTER_DIR says
otherwise. A second `up` reuses a healthy running cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from e2e.pki import Pki, write_pki

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO / "crds"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
SERVICE_CIDR = "10.0.0.0/16"
"""65,534 cluster IPs: bench.fleet_scale makes a Service for each of 2,000 services (a /24 ran out at
254, and the API server refused the rest with 500s)."""
NODE_MONITOR_GRACE_S = 20
"""Controller-manager marks a silent Node NotReady after this (default 40 s; shorter for tests)."""


def state_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_CLUSTER_DIR", REPO / ".cluster")).resolve()


def bin_dir() -> Path:
    """Where scripts/k8s-build.sh puts the binaries (asks the script, so versions live in one place)."""
    out = subprocess.run(
        ["bash", "-c", f'source "{REPO}/scripts/k8s-versions.sh"; echo "$K8S_BIN"'],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def log(msg: str) -> None:
    print(f"[cluster] {msg}", flush=True)


@dataclass
class ClusterState:
    """What `up` started; saved as state.json so `down` and later `up`s find it."""

    dir: str
    bin_dir: str
    etcd_port: int
    etcd_peer_port: int
    apiserver_port: int
    controller_manager_port: int
    scheduler_port: int
    kwok_port: int
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return Path(self.dir) / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    def save(self) -> None:
        (Path(self.dir) / "state.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> ClusterState | None:
        path = directory / "state.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def free_port() -> int:
    """A free port below the ephemeral range, for a process we start to listen on: a port the kernel
    hands out (bind to 0) can be taken by any outgoing connection (watches, API calls) between
    choosing and binding it, which failed an operator's startup."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 30000)
        try:
            for host in ("127.0.0.1", "0.0.0.0"):
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not reaped) is not alive.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def ssl_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return ctx


def healthy(state: ClusterState) -> bool:
    """The apiserver answers /readyz and every component process is alive."""
    if not all(pid_alive(p) for p in state.pids.values()):
        return False
    return readyz(state, timeout_s=2.0)


def readyz(state: ClusterState, timeout_s: float) -> bool:
    ctx = ssl_context(Pki(Path(state.dir) / "pki"))
    try:
        with urllib.request.urlopen(f"{state.server}/readyz", context=ctx, timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False


def write_kubeconfig(path: Path, server: str, pki: Pki, user: str = "edgefleet-admin") -> None:
    """A kubeconfig with the CA and the admin client certificate embedded by path."""
    import yaml

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "edgefleet-local",
                "cluster": {"server": server, "certificate-authority": str(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)},
            }
        ],
        "contexts": [{"name": "edgefleet-local", "context": {"cluster": "edgefleet-local", "user": user}}],
        "current-context": "edgefleet-local",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


def start(name: str, argv: list[str], directory: Path) -> int:
    logf = open(directory / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    logf.close()
    return proc.pid


def wait_for(what: str, check: object, timeout_s: float, state: ClusterState) -> None:
    deadline = time.monotonic() + timeout_s
    assert callable(check)
    while time.monotonic() < deadline:
        if check():
            return
        dead = [n for n, p in state.pids.items() if not pid_alive(p)]
        if dead:
            tail = (Path(state.dir) / "logs" / f"{dead[0]}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{dead[0]} exited while waiting for {what}; its log ends:\n{tail}")
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def ensure_binaries() -> Path:
    bins = bin_dir()
    needed = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok"]
    if not all((bins / b).exists() for b in needed):
        log("building the Kubernetes binaries (first run only; cached afterwards)")
        subprocess.run(["bash", str(REPO / "scripts" / "k8s-build.sh")], check=True)
    return bins


def up(install_crds: bool = True, quiet: bool = False, full: bool = True) -> ClusterState:
    """Start the control plane, or reuse a healthy one. Returns its state. `full=False`: etcd and
    the kube-apiserver only (no controllers, scheduler or kwok: a plane a test may stop)."""
    directory = state_dir()
    existing = ClusterState.load(directory)
    if existing and all(pid_alive(p) for p in existing.pids.values()):
        # Running: a slow /readyz (a loaded machine) is no reason to tear down a cluster that other
        # processes are using; wait for it instead.
        deadline = time.monotonic() + 120
        while not readyz(existing, timeout_s=5.0) and time.monotonic() < deadline:
            time.sleep(1)
    if existing and healthy(existing):
        if not quiet:
            log(f"already running: {existing.server}")
        if install_crds:
            apply_crds(existing)
        return existing
    if existing:
        log("found a stopped or broken cluster; cleaning it up")
        down(quiet=True)

    bins = ensure_binaries()
    t0 = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "logs").mkdir(exist_ok=True)
    pki = write_pki(directory / "pki")
    state = ClusterState(
        dir=str(directory),
        bin_dir=str(bins),
        etcd_port=free_port(),
        etcd_peer_port=free_port(),
        apiserver_port=free_port(),
        controller_manager_port=free_port(),
        scheduler_port=free_port(),
        kwok_port=free_port(),
    )
    write_kubeconfig(state.kubeconfig, state.server, pki)
    b = str(bins)

    etcd_url = f"http://127.0.0.1:{state.etcd_port}"
    peer_url = f"http://127.0.0.1:{state.etcd_peer_port}"
    state.pids["etcd"] = start(
        "etcd",
        [
            f"{b}/etcd",
            "--name=default",
            f"--data-dir={directory}/etcd",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ],
        directory,
    )
    state.save()

    start_apiserver(state)
    wait_for("kube-apiserver /readyz", lambda: readyz(state, 2.0), 120, state)
    log(f"kube-apiserver ready at {state.server} ({time.monotonic() - t0:.1f}s)")
    if not full:
        if install_crds:
            apply_crds(state)
        return state

    kc = str(state.kubeconfig)
    state.pids["kube-controller-manager"] = start(
        "kube-controller-manager",
        [
            f"{b}/kube-controller-manager",
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={state.controller_manager_port}",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            "--use-service-account-credentials=true",
            f"--node-monitor-grace-period={NODE_MONITOR_GRACE_S}s",
            "--node-monitor-period=2s",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--v=1",
        ],
        directory,
    )
    state.pids["kube-scheduler"] = start(
        "kube-scheduler",
        [
            f"{b}/kube-scheduler",
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={state.scheduler_port}",
            "--v=1",
        ],
        directory,
    )
    state.pids["kwok"] = start(
        "kwok",
        [
            f"{b}/kwok",
            f"--kubeconfig={kc}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--server-address=127.0.0.1:{state.kwok_port}",
            "--node-ip=127.0.0.1",
            "--cidr=10.244.0.1/16",
        ],
        directory,
    )
    state.save()
    if install_crds:
        apply_crds(state)
    wait_for(
        "default service account",
        lambda: kubectl(state, "get", "serviceaccount", "default", check=False).returncode == 0,
        60,
        state,
    )
    log(f"control plane up in {time.monotonic() - t0:.1f}s; state in {directory}")
    return state


def apiserver_argv(state: ClusterState) -> list[str]:
    """The kube-apiserver's command line for `state` (its etcd, port and PKI)."""
    directory = Path(state.dir)
    pki = Pki(directory / "pki")
    return [
        f"{state.bin_dir}/kube-apiserver",
        f"--etcd-servers=http://127.0.0.1:{state.etcd_port}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={state.apiserver_port}",
        f"--cert-dir={directory}/pki",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        "--authorization-mode=Node,RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allow-privileged=true",
        "--profiling=false",
        "--v=1",
    ]


def start_apiserver(state: ClusterState) -> None:
    """Start the kube-apiserver of `state` (same port, same etcd) and record its pid; returns
    without waiting for /readyz."""
    state.pids["kube-apiserver"] = start("kube-apiserver", apiserver_argv(state), Path(state.dir))
    state.save()


def stop_apiserver(state: ClusterState, timeout_s: float = 15.0) -> None:
    """Stop only the kube-apiserver (SIGTERM, then SIGKILL): etcd and the rest keep running, as
    when the API server is restarted or its host fails. `start_apiserver` brings it back."""
    pid = state.pids.pop("kube-apiserver", None)
    state.save()
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def kubectl(
    state: ClusterState,
    *args: str,
    check: bool = True,
    input_: str | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = [f"{state.bin_dir}/kubectl", f"--kubeconfig={state.kubeconfig}", *args]
    out = subprocess.run(argv, capture_output=True, text=True, input=input_)
    if check and out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed ({out.returncode}):\n{out.stderr.strip()}")
    return out


def apply_crds(state: ClusterState) -> None:
    kubectl(state, "apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    crds = (
        "crd/inferenceservices.edgefleet.io",
        "crd/edgenodes.edgefleet.io",
    )
    # A CRD just created has no status yet and kubectl's wait fails at once on it ('.status.conditions
    # accessor error: <nil>'; seen twice in ~15 starts): try again.
    for attempt in range(3):
        out = kubectl(
            state, "wait", "--for=condition=Established", "--timeout=60s", *crds, check=attempt == 2
        )
        if out.returncode == 0:
            return
        log(f"waiting for the CRDs failed ({out.stderr.strip()}); again")
        time.sleep(1)


def down(quiet: bool = False) -> None:
    """Stop every component and remove the state directory."""
    directory = state_dir()
    state = ClusterState.load(directory)
    if state:
        # Reverse start order: kwok and controllers first, etcd last.
        for name in reversed(list(state.pids)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(state.pids[name], signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(pid_alive(p) for p in state.pids.values()):
            time.sleep(0.1)
        for pid in state.pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
    if not quiet:
        log("stopped; state removed" if state else "no cluster was running")


def status() -> int:
    state = ClusterState.load(state_dir())
    if not state:
        print("not running")
        return 1
    for name, pid in state.pids.items():
        print(f"{name:26s} pid {pid:<8d} {'running' if pid_alive(pid) else 'DEAD'}")
    ok = healthy(state)
    print(f"apiserver {state.server}: {'ready' if ok else 'NOT ready'}")
    print(f"export KUBECONFIG={state.kubeconfig}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="build (once) and start the control plane, install CRDs")
    sub.add_parser("down", help="stop it and remove its state")
    sub.add_parser("status", help="show component health")
    sub.add_parser("kubeconfig", help="print the kubeconfig path")
    args = parser.parse_args(argv)
    if args.cmd == "up":
        state = up()
        print(
            f"\nUse it:\n  export KUBECONFIG={state.kubeconfig}\n  export PATH={state.bin_dir}:$PATH\n"
            "  kubectl get nodes,edgenodes,inferenceservices -A\nStop it: make cluster-down"
        )
        return 0
    if args.cmd == "down":
        down()
        return 0
    if args.cmd == "kubeconfig":
        print(state_dir() / "kubeconfig")
        return 0
    return status()


if __name__ == "__main__":
    sys.exit(main())
