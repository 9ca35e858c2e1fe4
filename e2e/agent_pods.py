"""Run the agent Pods the operator creates on kwok nodes as real local agent processes.

kwok nodes have no kubelet: a Pod bound to one is reported Running, but nothing runs. `AgentPods`
follows the agent Pods of one namespace and runs each as the Pod's own command,
`edgefleet-agent serve --edge-node NODE ...`, on this machine, as a kubelet would run its container:

- per Pod (by uid): a port of its own, a model repository and a state folder of its own (fresh for
  a new Pod, kept across restarts of the same Pod, like emptyDirs), stdout and stderr to
  `<dir>/<pod>-<uid>/agent.log`;
- credentials as in a cluster: a ServiceAccount token bound to the Pod (TokenRequest), so RBAC and
  the chart's admission policy judge the agent by its Pod's node;
- a Pod that goes (deleted, or being deleted) stops its process (SIGTERM, SIGKILL after
  `STOP_GRACE_S`); a process that exits while its Pod stays is restarted after a back-off
  (1 s, doubling, at most 30 s), as the kubelet restarts a container;
- where each agent listens: `url(node)`, and `<dir>/agents.json` (node -> url, pod, pid, log),
  rewritten on every change.

The decisions are pure (`decide`, `agent_command`); `AgentPods.sync` runs one pass (list the Pods,
apply the decisions) and `start()` repeats it every `interval_s` on a thread.

    python -m e2e.agent_pods --kubeconfig K --namespace NS --dir D   # until SIGTERM or Ctrl-C
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster import free_port
from edgefleet_api import names

log = logging.getLogger("e2e.agent_pods")

AGENT_SELECTOR = f"app.kubernetes.io/name={names.AGENT_APP}"
AGENT_CONTAINER = "agent"
TOKEN_SECONDS = 24 * 3600
"""Lifetime of an agent's token: the agent reads its kubeconfig once, and a demo fleet stays up."""
STOP_GRACE_S = 25.0
"""SIGTERM to SIGKILL: the agent drains for at most 20 s (its --drain-timeout default)."""
MAX_BACKOFF_S = 30.0
AGENT_EXE = Path(sys.executable).with_name("edgefleet-agent")


# --- pure decisions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodView:
    """What the harness needs of one agent Pod."""

    name: str
    uid: str
    namespace: str
    node: str | None
    """spec.nodeName: None until the scheduler binds it."""
    deleting: bool
    phase: str

    @classmethod
    def of(cls, pod: Mapping[str, Any]) -> PodView:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        return cls(
            name=meta["name"],
            uid=meta["uid"],
            namespace=meta["namespace"],
            node=spec.get("nodeName"),
            deleting=bool(meta.get("deletionTimestamp")),
            phase=(pod.get("status") or {}).get("phase") or "Pending",
        )

    @property
    def runnable(self) -> bool:
        """Bound to a node, not being deleted, not finished."""
        return self.node is not None and not self.deleting and self.phase not in ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class ProcessView:
    """What the harness runs for one Pod."""

    uid: str
    running: bool
    exited_at_s: float | None = None
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    start: tuple[PodView, ...] = ()
    """Pods to start a process for (new, or restarting after their back-off)."""
    stop: tuple[str, ...] = ()
    """Pod names whose process must stop (the Pod went, or was replaced by a new uid)."""


def backoff_s(restarts: int) -> float:
    """Wait before restart number `restarts` + 1: 1 s, doubling, at most MAX_BACKOFF_S."""
    return min(MAX_BACKOFF_S, 2.0 ** min(restarts, 10))


def decide(pods: Sequence[PodView], processes: Mapping[str, ProcessView], now_s: float) -> Decision:
    """One pass. Invariants: at most one process per Pod name, always for the Pod's current uid; a
    Pod that is not runnable has no process; an exited process of a runnable Pod is started again
    once `backoff_s(restarts)` has passed since it exited."""
    runnable = {p.name: p for p in pods if p.runnable}
    stop = tuple(
        sorted(
            name for name, proc in processes.items() if name not in runnable or runnable[name].uid != proc.uid
        )
    )

    def due(name: str) -> bool:
        proc = processes.get(name)
        if proc is None or name in stop:
            return True
        exited = proc.exited_at_s
        return not proc.running and exited is not None and now_s - exited >= backoff_s(proc.restarts)

    start = [pod for name, pod in sorted(runnable.items()) if due(name)]
    return Decision(tuple(start), stop)


def agent_command(
    pod: Mapping[str, Any], port: int, workdir: Path, kubeconfig: Path, exe: Path = AGENT_EXE
) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that run the Pod's agent container here.

    The container's args, with what only makes sense in a container replaced: `--port` (a free
    local one), `--model-repository` (a folder of its own); and what the Pod gets from its
    environment given explicitly: `--host 127.0.0.1`, `--kubeconfig` (a token bound to the Pod),
    `--namespace` (the Pod's), `--state-dir`, `--endpoint` (the URL this process answers on).
    Environment values come from the container's `env` (fieldRefs resolved against the Pod)."""
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    if AGENT_CONTAINER not in containers:
        raise ValueError(f"pod {pod['metadata']['name']} has no container {AGENT_CONTAINER!r}")
    container = containers[AGENT_CONTAINER]
    args = list(container.get("args") or [])
    if not args or args[0] != "serve" or "--edge-node" not in args:
        raise ValueError(f"pod {pod['metadata']['name']}: args {args} are not 'serve --edge-node NODE ...'")
    replaced = {"--port", "--model-repository", "--host", "--kubeconfig", "--namespace", "--state-dir",
                "--endpoint"}  # fmt: skip
    kept: list[str] = []
    it = iter(args)
    for arg in it:
        flag = arg.split("=", 1)[0]
        if flag in replaced:
            if "=" not in arg:
                next(it, None)
            continue
        kept.append(arg)
    namespace = pod["metadata"]["namespace"]
    argv = [
        str(exe),
        *kept,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--model-repository", str(workdir / "models"),
        "--state-dir", str(workdir / "state"),
        "--kubeconfig", str(kubeconfig),
        "--namespace", namespace,
        "--endpoint", f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    fields = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": namespace,
        "spec.nodeName": pod["spec"].get("nodeName") or "",
        "status.podIP": "127.0.0.1",
    }
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "fieldRef" in (var.get("valueFrom") or {}):
            env[var["name"]] = fields.get(var["valueFrom"]["fieldRef"]["fieldPath"], "")
    return argv, env


def token_kubeconfig(base: Path, token: str, path: Path) -> Path:
    """`base` (its current context's cluster: server and CA) with a bearer token as the user."""
    config = yaml.safe_load(base.read_text())
    context_name = config.get("current-context")
    context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
    cluster = next(c for c in config["clusters"] if c["name"] == context["cluster"])
    out = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": "token", "context": {"cluster": cluster["name"], "user": "token"}}],
        "current-context": "token",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(out))
    path.chmod(0o600)
    return path


# --- the harness ---------------------------------------------------------------------------------


@dataclass
class AgentProcess:
    """One Pod's agent process (and its restarts)."""

    pod: PodView
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    exited_at_s: float | None = None
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def view(self) -> ProcessView:
        running = self.proc is not None and self.proc.poll() is None
        return ProcessView(self.pod.uid, running, self.exited_at_s, self.restarts)


class AgentPods:
    """Runs every agent Pod of `namespace` that is bound to a node as a local agent process."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        kubeconfig: Path,
        directory: Path,
        interval_s: float = 1.0,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        from kubernetes import client

        if not AGENT_EXE.is_file():
            raise FileNotFoundError(
                f"{AGENT_EXE} not found: install the project into this Python (make venv)"
            )
        self.core: Any = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.kubeconfig = Path(kubeconfig)
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.interval_s = interval_s
        self.extra_env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        """OMP_NUM_THREADS=1: each agent stands for a Pod with a small CPU request on a shared machine."""
        self.agents: dict[str, AgentProcess] = {}
        """Pod name -> its process."""
        self._stopping: list[tuple[subprocess.Popen[bytes], float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what tests and the demo ask

    def url(self, node: str) -> str | None:
        """Base URL of the agent running for `node`'s Pod, None if none runs."""
        with self._lock:
            for agent in self.agents.values():
                if agent.pod.node == node and agent.proc is not None and agent.proc.poll() is None:
                    return agent.url
        return None

    def running(self) -> dict[str, str]:
        """Node -> URL of every agent process alive now."""
        with self._lock:
            return {
                a.pod.node: a.url
                for a in self.agents.values()
                if a.pod.node and a.proc is not None and a.proc.poll() is None
            }

    def log_tail(self, node: str, chars: int = 3000) -> str:
        with self._lock:
            paths = [a.log_path for a in self.agents.values() if a.pod.node == node]
        return "".join(p.read_text(errors="replace")[-chars:] for p in paths if p.exists())

    # -- one pass

    def sync(self, now_s: float | None = None) -> Decision:
        """List the Pods, stop and start processes as `decide` says, reap stopped ones."""
        now_s = time.monotonic() if now_s is None else now_s
        items = self.core.list_namespaced_pod(self.namespace, label_selector=AGENT_SELECTOR).items
        pods = {p.metadata.name: self.core.api_client.sanitize_for_serialization(p) for p in items}
        with self._lock:
            for agent in self.agents.values():
                if agent.proc is not None and agent.exited_at_s is None and agent.proc.poll() is not None:
                    agent.exited_at_s = now_s
                    agent.exit_codes.append(agent.proc.returncode)
                    log.warning("agent %s exited with %s", agent.pod.name, agent.proc.returncode)
            decision = decide(
                [PodView.of(p) for p in pods.values()], {n: a.view() for n, a in self.agents.items()}, now_s
            )
            for name in decision.stop:
                self._terminate(self.agents.pop(name), now_s)
            for pod in decision.start:
                self._start(pods[pod.name], pod, now_s)
            self._reap(now_s)
            if decision.start or decision.stop:
                self._write_index()
        return decision

    def _start(self, pod_obj: Mapping[str, Any], pod: PodView, now_s: float) -> None:
        agent = self.agents.get(pod.name)
        if agent is None:
            workdir = self.dir / f"{pod.name}-{pod.uid[:8]}"
            agent = AgentProcess(pod, free_port(), workdir)
            self.agents[pod.name] = agent
        else:
            agent.restarts += 1
        agent.exited_at_s = None
        try:
            kubeconfig = self._pod_kubeconfig(pod_obj, agent.workdir / "kubeconfig")
            argv, env = agent_command(pod_obj, agent.port, agent.workdir, kubeconfig)
            (agent.workdir / "models").mkdir(parents=True, exist_ok=True)
            with open(agent.log_path, "ab") as out:
                out.write(
                    f"--- {time.strftime('%H:%M:%S')} start #{agent.restarts}: {' '.join(argv)}\n".encode()
                )
                out.flush()
                base_env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
                agent.proc = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=agent.workdir,
                    env={**base_env, **self.extra_env, **env},
                )
        except Exception as e:  # retried after the back-off, like a container that failed to start
            agent.proc = None
            agent.exited_at_s = now_s
            log.warning("agent %s (node %s) could not start: %s", pod.name, pod.node, e)
            return
        log.info("agent %s (node %s) started: pid %d, %s", pod.name, pod.node, agent.proc.pid, agent.url)

    def _pod_kubeconfig(self, pod_obj: Mapping[str, Any], path: Path) -> Path:
        """A kubeconfig with a token of the Pod's ServiceAccount bound to the Pod (TokenRequest)."""
        meta = pod_obj["metadata"]
        account = pod_obj["spec"].get("serviceAccountName") or "default"
        request = {
            "spec": {
                "expirationSeconds": TOKEN_SECONDS,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            }
        }
        token = self.core.create_namespaced_service_account_token(account, meta["namespace"], request)
        return token_kubeconfig(self.kubeconfig, token.status.token, path)

    def _terminate(self, agent: AgentProcess, now_s: float) -> None:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.send_signal(signal.SIGTERM)
            self._stopping.append((agent.proc, now_s + STOP_GRACE_S))
            log.info(
                "agent %s (node %s): pod gone, stopping pid %d",
                agent.pod.name,
                agent.pod.node,
                agent.proc.pid,
            )

    def _reap(self, now_s: float) -> None:
        still = []
        for proc, deadline in self._stopping:
            if proc.poll() is None:
                if now_s >= deadline:
                    proc.kill()
                still.append((proc, deadline))
        self._stopping = still

    def _write_index(self) -> None:
        index = {
            a.pod.node: {
                "url": a.url,
                "pod": a.pod.name,
                "pid": a.proc.pid if a.proc else None,
                "log": str(a.log_path),
            }
            for a in self.agents.values()
        }
        tmp = self.dir / ".agents.json.tmp"
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True))
        tmp.replace(self.dir / "agents.json")

    # -- lifecycle

    def start(self) -> AgentPods:
        """Sync every `interval_s` on a daemon thread until `close()`."""
        self._thread = threading.Thread(target=self._loop, name="agent-pods", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as e:  # an API server hiccup must not end the harness
                log.warning("agent pods: sync failed: %s", e)
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        """Stop following the Pods and stop every agent (SIGTERM, then SIGKILL after STOP_GRACE_S)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            now = time.monotonic()
            for agent in self.agents.values():
                self._terminate(agent, now)
            self.agents.clear()
            deadline = now + STOP_GRACE_S
            for proc, _ in self._stopping:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            self._stopping = []
            self._write_index()

    def __enter__(self) -> AgentPods:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.agent_pods",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--kubeconfig", type=Path, required=True, help="admin kubeconfig (lists Pods, requests tokens)"
    )
    parser.add_argument("--namespace", required=True, help="namespace of the agent Pods")
    parser.add_argument("--dir", type=Path, required=True, help="agents' folders, logs and agents.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from kubernetes import config

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    harness = AgentPods(
        config.new_client_from_config(config_file=str(args.kubeconfig)),
        args.namespace,
        args.kubeconfig,
        args.dir,
    )
    with harness:
        done.wait()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
