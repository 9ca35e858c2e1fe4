"""What the watch and outage fault tests run: their own control plane (etcd and a kube-apiserver
the tests stop and restart, apart from the session's shared one), a TCP proxy between the
clients and the API server that can stall its connections, real agent processes
(`edgefleet-agent serve --edge-node`) and the real operator, a load of infer requests that
records every answer, and a watcher of the EdgeNode statuses that records what goes backwards.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import numpy as np
import yaml

from e2e import cluster, fleet
from edgefleet_api import names

T = TypeVar("T")


# --- the control plane ----------------------------------------------------------------------------


@contextmanager
def own_control_plane(directory: Path) -> Iterator[cluster.ClusterState]:
    """etcd and a kube-apiserver (CRDs installed) with their state in `directory`; stopped and
    removed afterwards. The session's shared control plane is left alone."""
    env = {"EDGEFLEET_CLUSTER_DIR": str(directory)}
    try:
        with mock.patch.dict(os.environ, env):
            state = cluster.up(full=False, quiet=True)
        yield state
    finally:  # also when `up` failed half-way: nothing of it is left running
        with mock.patch.dict(os.environ, env):
            cluster.down(quiet=True)


def restart_apiserver(state: cluster.ClusterState, timeout_s: float = 60) -> float:
    """Start the stopped kube-apiserver again (same port, same etcd); seconds until /readyz."""
    t0 = time.monotonic()
    cluster.start_apiserver(state)
    cluster.wait_for("kube-apiserver /readyz", lambda: cluster.readyz(state, 2.0), timeout_s, state)
    return time.monotonic() - t0


def proxied_kubeconfig(state: cluster.ClusterState, port: int, path: Path) -> Path:
    """A copy of `state`'s kubeconfig whose server is the proxy on 127.0.0.1:`port` (the API
    server's certificate names 127.0.0.1, so TLS passes through unchanged)."""
    config = yaml.safe_load(state.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


# --- the proxy ------------------------------------------------------------------------------------


class StallProxy:
    """A TCP pass-through (the TLS stream as is) on 127.0.0.1, on its own loop thread.

    `stall()`: every connection open now stops forwarding, both ways, and stays open (a
    middlebox that dropped the flow: the client's socket sees nothing, ever); connections made
    afterwards pass. When the target refuses (the API server is stopped), a new connection is
    closed at once, as a refused one would be.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="stall-proxy", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._open: dict[asyncio.StreamWriter, asyncio.Event] = {}
        """Per open connection (its client side), its stall switch."""
        self._transports: set[asyncio.WriteTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: asyncio.Event | None = None
        self.connections = 0
        self.port = self.call(self._start())

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stall(self) -> int:
        """Stall every open connection; returns how many."""

        async def stall() -> int:
            for switch in self._open.values():
                switch.set()
            return len(self._open)

        return self.call(stall())

    def close(self) -> None:
        """Close the listener and every connection, stalled or not; stop the thread."""

        async def close() -> None:
            assert self._server is not None and self._closing is not None
            self._server.close()
            self._closing.set()
            for transport in list(self._transports):
                transport.abort()
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5)
            await self._server.wait_closed()

        self.call(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    async def _start(self) -> int:
        self._closing = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._closing is not None
        closing = self._closing
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        switch = asyncio.Event()
        self._open[writer] = switch
        self._transports |= {writer.transport, up_writer.transport}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with suppress(OSError):
                while data := await src.read(65536):
                    if switch.is_set():
                        await closing.wait()  # stalled: never forwarded, the socket kept open
                        return
                    dst.write(data)
                    await dst.drain()
            if not switch.is_set():
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            if switch.is_set():
                await closing.wait()
        finally:
            self._open.pop(writer, None)
            self._transports -= {writer.transport, up_writer.transport}
            writer.transport.abort()
            up_writer.transport.abort()


# --- the parts: agents, load, statuses ------------------------------------------------------------

LINK_ENV = {
    "EDGEFLEET_LINK_WATCH_TIMEOUT_S": "30",
    "EDGEFLEET_LINK_REQUEST_TIMEOUT_S": "2",
    "EDGEFLEET_LINK_LEASE_RENEW_S": "1",
    "EDGEFLEET_LINK_LEASE_DURATION_S": "5",
    "EDGEFLEET_LINK_STATUS_TICK_S": "0.2",
    "EDGEFLEET_LINK_STATUS_MIN_INTERVAL_S": "0.5",
    "EDGEFLEET_LINK_STATUS_METRICS_INTERVAL_S": "1",
    "EDGEFLEET_LINK_STATUS_MAX_INTERVAL_S": "2",
    "EDGEFLEET_LINK_RECONCILE_INTERVAL_S": "0.5",
    "EDGEFLEET_LINK_BACKOFF_INITIAL_S": "4",
    "EDGEFLEET_LINK_BACKOFF_MAX_S": "16",
}
"""The agents' link settings in these tests: a watch of 30 s (a stalled watch left to its read
timeout would take 32 s; the tests' bounds are shorter, so only the link's restart meets
them), calls bounded by 2 s, Lease every second. The backoff (4 s doubling to 16 s, jittered)
spaces retries after a 12 s outage as the defaults (0.5 s doubling to 30 s) do after a longer
one: agents come back seconds after the API server, later than the operator's first pass."""


class AgentProcess:
    """`edgefleet-agent serve --edge-node NAME` in its own process, on 127.0.0.1."""

    def __init__(self, node: str, kubeconfig: Path, namespace: str, repository: Path) -> None:
        self.node = node
        command = [
            sys.executable, "-m", "node_agent.cli", "-v", "serve", "--edge-node", node,
            "--kubeconfig", str(kubeconfig), "--namespace", namespace,
            "--model-repository", str(repository), "--host", "127.0.0.1", "--port", "0",
            "--workers", "1", "--thermal-source", "simulated",
        ]  # fmt: skip
        env = {**os.environ, **LINK_ENV, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.append(line)

    @property
    def port(self) -> int | None:
        for line in list(self.lines):
            if m := re.search(r"http://127\.0\.0\.1:(\d+)", line):
                return int(m.group(1))
        return None

    def log(self, pattern: str) -> list[str]:
        return [line for line in list(self.lines) if re.search(pattern, line)]

    def tail(self, n: int = 30) -> str:
        return "".join(self.lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)


def infer_body(seed: int) -> bytes:
    x = np.random.default_rng(seed).standard_normal((1, 3, 64, 64)).astype(np.float32)
    inputs = [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    return json.dumps({"inputs": inputs}).encode()


class Load:
    """Infer requests to each agent in turn, one at a time, from a thread, until `stop()`;
    every request's outcome is recorded: its status code, or the error that stood for none."""

    def __init__(self, ports: list[int], model: str = "classifier", pause_s: float = 0.05) -> None:
        self.ports, self.model, self.pause_s = ports, model, pause_s
        self.outcomes: list[tuple[float, int, str]] = []
        """(monotonic time answered, port, '200' | other status | 'error: ...') per request sent."""
        self.sent = 0
        self._body = infer_body(7)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stopping.is_set():
            port = self.ports[i % len(self.ports)]
            i += 1
            self.sent += 1
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v2/models/{self.model}/infer",
                data=self._body,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    response.read()
                    outcome = str(response.status)
            except urllib.error.HTTPError as e:
                outcome = str(e.code)
            except OSError as e:
                outcome = f"error: {e}"
            self.outcomes.append((time.monotonic(), port, outcome))
            self._stopping.wait(self.pause_s)

    def stop(self) -> Counter[str]:
        self._stopping.set()
        self._thread.join(15)
        return self.summary()

    def summary(self) -> Counter[str]:
        return Counter(outcome for _, _, outcome in self.outcomes)

    def between(self, start_s: float, end_s: float) -> int:
        """Requests answered between two `time.monotonic()` readings."""
        return sum(1 for t, _, _ in self.outcomes if start_s <= t <= end_s)


class StatusWatcher:
    """Polls the EdgeNodes of `nodes` (admin client, straight to the API server) from a thread
    and records each status's heartbeatTime and observedGeneration: `backwards` lists every time
    one went back. Reads that fail (the API server is stopped) are skipped."""

    def __init__(self, api: Any, nodes: list[str], period_s: float = 0.25) -> None:
        from kubernetes import client

        configuration = copy.deepcopy(api.configuration)
        configuration.retries = False  # a failed read is skipped, not retried
        self._api = client.ApiClient(configuration)
        self._custom = client.CustomObjectsApi(self._api)
        self.nodes, self.period_s = nodes, period_s
        self.last: dict[str, tuple[str, int]] = {}
        self.seen: dict[str, list[tuple[str, int]]] = {n: [] for n in nodes}
        self.backwards: list[str] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            for node in self.nodes:
                try:
                    en: Any = self._custom.get_cluster_custom_object(
                        names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, node, _request_timeout=(1, 2)
                    )
                except Exception:  # the API server is down: nothing to compare
                    continue
                status = en.get("status") or {}
                now = (str(status.get("heartbeatTime") or ""), int(status.get("observedGeneration") or 0))
                before = self.last.get(node)
                if before is not None and (now[0] < before[0] or now[1] < before[1]):
                    self.backwards.append(f"{node}: {before} -> {now}")
                if before != now:
                    self.seen[node].append(now)
                self.last[node] = now
            self._stopping.wait(self.period_s)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)
        self._api.close()


# --- the fleet's objects --------------------------------------------------------------------------


def create_ready_nodes(api: Any, count: int, prefix: str, group: str) -> list[str]:
    """`count` fleet Nodes with a Ready condition (no kubelet or kwok here: nothing changes it)."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    nodes = fleet.create_nodes(
        core, count, device_class="jetson-orin", prefix=prefix, labels={"test-group": group}
    )
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}
    for node in nodes:
        condition = {**ready, "lastHeartbeatTime": now, "lastTransitionTime": now}
        core.patch_node_status(node, {"status": {"conditions": [condition]}})
    return nodes


def inference_service(name: str, group: str, digest: str, replicas: int, p95_ms: float) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.INFERENCE_SERVICE_KIND,
        "metadata": {"name": name},
        "spec": {
            "models": [
                {
                    "name": "classifier",
                    "version": "1",
                    "memoryEstimate": "64Mi",
                    "artifact": {"uri": "repo://classifier/1/model.pt", "digest": digest},
                    "inputs": [{"name": "image", "datatype": "FP32", "shape": [3, 64, 64]}],
                    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}],
                }
            ],
            "sla": {"p95LatencyMs": p95_ms, "p99LatencyMs": 2 * p95_ms},
            "placement": {"nodeSelector": {"test-group": group}, "replicas": replicas},
        },
    }


def edge_node(api: Any, node: str) -> dict[str, Any]:
    from kubernetes import client

    obj: Any = client.CustomObjectsApi(api).get_cluster_custom_object(
        names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, node, _request_timeout=(2, 5)
    )
    return dict(obj)


def applied(api: Any, node: str, p95_ms: float) -> dict[str, Any] | None:
    """The EdgeNode when its spec carries the SLA `p95_ms` (the operator applied the edit) and its
    agent reports that generation reconciled with the model Ready (the agent applied it)."""
    try:
        en = edge_node(api, node)
    except Exception:
        return None
    models = en.get("spec", {}).get("models") or []
    if not models or any((m.get("sla") or {}).get("p95LatencyMs") != p95_ms for m in models):
        return None
    status = en.get("status") or {}
    states = [m.get("state") for m in status.get("models") or []]
    if status.get("observedGeneration") != en["metadata"]["generation"] or states != ["Ready"]:
        return None
    return en
