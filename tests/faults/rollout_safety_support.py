"""Helpers of tests/faults/test_rollout_safety.py: the test's own fleet Nodes and services (`Fleet`),
agent reports written by the test (`Reporter`) and watched (`EdgeNodeWatch`), a real agent process
with fast link timings, an artifact server the test takes down and brings back, the operator's
fleet passes run in the test process against the real API server, and a client that counts every
answer.

Run as a script (`python rollout_safety_support.py agent ...`), this module is the agent process:
the same composition as `edgefleet-agent serve --edge-node` (`Agent` + `EdgeNodeMode`), with link
timings a test can wait out (a failed artifact is retried after 1 s, not 30 s).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e import fleet
from e2e.operator_proc import AGENT_NAMESPACE
from edgefleet_api import names, wire

REPO = Path(__file__).resolve().parents[2]


# --- the test's fleet, and what agents report ---------------------------------------------------


class Fleet:
    """A test's own fleet Nodes (labelled test-group=<id>) and API access."""

    def __init__(self, kube: Any, namespace: str) -> None:
        from kubernetes import client

        self.kube, self.namespace = kube, namespace
        self.id = uuid.uuid4().hex[:6]
        self.core = client.CoreV1Api(kube)
        self.custom = client.CustomObjectsApi(kube)
        self.coordination = client.CoordinationV1Api(kube)
        self.nodes: list[str] = []

    def add_nodes(self, count: int) -> list[str]:
        made = fleet.create_nodes(
            self.core, count, "jetson-orin", prefix=f"rs{self.id}", labels={"test-group": self.id}
        )
        self.nodes += made
        return made

    def edge_node(self, node: str) -> dict[str, Any]:
        """The EdgeNode as the API server holds it ({} before the operator made it)."""
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self.custom.get_cluster_custom_object(
                names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, node
            )
        except ApiException as e:
            if e.status != 404:
                raise
            return {}
        return obj

    def service(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.INFERENCE_SERVICE_PLURAL, name
        )
        return obj

    def create_service(
        self, name: str, version: str, uri: str, digest: str, rollout: Any = None, config: str | None = None
    ) -> None:
        spec: dict[str, Any] = {
            "models": [model_entry(version, uri, digest, config)],
            "sla": {"p95LatencyMs": 5000, "p99LatencyMs": 10000},
            "placement": {"nodeSelector": {"test-group": self.id}},
        }
        if rollout is not None:
            spec["rollout"] = rollout
        body = {
            "apiVersion": names.API_VERSION,
            "kind": names.INFERENCE_SERVICE_KIND,
            "metadata": {"name": name},
            "spec": spec,
        }
        self.custom.create_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.INFERENCE_SERVICE_PLURAL, body
        )

    def set_version(self, name: str, version: str, uri: str, digest: str, config: str | None = None) -> int:
        """Patch the service's model to `version`; returns the new generation. `config`: the
        configDigest of an https:// artifact's model.yaml."""
        patch = {"spec": {"models": [model_entry(version, uri, digest, config)]}}
        obj = self.custom.patch_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.INFERENCE_SERVICE_PLURAL, name, patch
        )
        return int(obj["metadata"]["generation"])

    def write_status(self, node: str, status: dict[str, Any]) -> None:
        self.custom.patch_cluster_custom_object_status(
            names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, node, {"status": status}
        )

    def cleanup(self, passes: OperatorPasses | None) -> None:
        """Delete the services and Nodes; the operator's passes release the services' finalizers
        and delete the EdgeNodes."""
        items = self.custom.list_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.INFERENCE_SERVICE_PLURAL
        )["items"]
        for s in items:
            self.custom.delete_namespaced_custom_object(
                names.GROUP,
                names.VERSION,
                self.namespace,
                names.INFERENCE_SERVICE_PLURAL,
                s["metadata"]["name"],
            )
        fleet.delete_nodes(self.core, self.nodes)
        if passes is None:
            return
        for _ in range(20):
            passes.stop()
            passes.once()
            left = self.custom.list_namespaced_custom_object(
                names.GROUP, names.VERSION, self.namespace, names.INFERENCE_SERVICE_PLURAL
            )["items"]
            if not left:
                break
            time.sleep(0.1)


def model_entry(version: str, uri: str, digest: str, config: str | None = None) -> dict[str, Any]:
    artifact = {"uri": uri, "digest": digest} | ({"configDigest": config} if config else {})
    return {
        "name": "classifier",
        "version": version,
        "memoryEstimate": "64Mi",
        "artifact": artifact,
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [3, 64, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}],
    }


def models_of(en: dict[str, Any], service: str) -> dict[str, dict[str, Any]]:
    """version -> status entry of the service's classifier."""
    return {
        m["version"]: m
        for m in (en.get("status") or {}).get("models") or []
        if m["service"] == service and m["model"] == "classifier"
    }


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


class Reporter:
    """Writes the EdgeNode status and Lease an agent would, as the test says (the analysis reads
    nothing else), with the report sequence numbered per node like an agent's."""

    def __init__(self, group: Fleet, clock: FakeClock) -> None:
        self.group, self.clock = group, clock
        self.sequence: dict[str, int] = {}

    def report(
        self, node: str, p99_ms: float, *, generation: int | None = None, requests: int = 100
    ) -> dict[str, Any]:
        """Every model of the node's spec Ready with the spec's digest and an SLA window; returns the
        status written (to replay it later)."""
        en = self.group.edge_node(node)
        seq = self.sequence[node] = self.sequence.get(node, 1000) + 1
        models = [
            {
                "service": m["service"],
                "model": m["model"],
                "version": m["version"],
                "digest": m["artifact"]["digest"],
                "state": "Ready",
                "memoryBytes": 8 << 20,
                "trafficWeight": m.get("trafficWeight", 100),
                "sla": {"requests": requests, "p95LatencyMs": p99_ms * 0.8, "p99LatencyMs": p99_ms,
                        "errorRate": 0.0, "throughputRps": requests / 10},
            }
            for m in en["spec"].get("models") or []
        ]  # fmt: skip
        status = {
            "observedGeneration": en["metadata"]["generation"] if generation is None else generation,
            "heartbeatTime": wire.rfc3339(self.clock()),
            "reportSequence": seq,
            "endpoint": f"http://{node}.test:8000",
            "gpu": {
                "name": "cpu",
                "memoryTotalBytes": 8 << 30,
                "memoryUsedBytes": 0,
                "memoryFreeBytes": 8 << 30,
            },
            "models": models,
            "loadedModels": len(models),
            "conditions": [],
        }
        self.group.write_status(node, status)
        self.lease(node)
        return status

    def lease(self, node: str) -> None:
        from kubernetes.client.exceptions import ApiException

        name = names.agent_name(node)
        spec = {
            "holderIdentity": name,
            "leaseDurationSeconds": 30,
            "renewTime": wire.rfc3339_micro(self.clock()),
        }
        try:
            self.group.coordination.patch_namespaced_lease(name, AGENT_NAMESPACE, {"spec": spec})
        except ApiException as e:
            if e.status != 404:
                raise
            body = {
                "metadata": {
                    "name": name,
                    "labels": {"app.kubernetes.io/name": names.AGENT_APP, names.LABEL_NODE: node},
                },
                "spec": spec,
            }
            self.group.coordination.create_namespaced_lease(AGENT_NAMESPACE, body)


class FakeClock:
    """The operator's clock: the wall clock plus what the test skips ahead."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def skip(self, seconds: float) -> None:
        self.offset += seconds


class EdgeNodeWatch:
    """Every version of the EdgeNode's spec and status as a watch delivers them: what its agent sees
    (spec) and what it says it has (status)."""

    def __init__(self, group: Fleet, node: str, key: str) -> None:
        self.group, self.node, self.key = group, node, key
        self.spec_versions: list[frozenset[str]] = []
        self.status_versions: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            w = watch.Watch()
            for event in w.stream(
                self.group.custom.list_cluster_custom_object,
                names.GROUP,
                names.VERSION,
                names.EDGE_NODE_PLURAL,
                field_selector=f"metadata.name={self.node}",
                timeout_seconds=2,
            ):
                obj = event["object"]
                versions = frozenset(
                    m["version"] for m in obj.get("spec", {}).get("models") or [] if m["service"] == self.key
                )
                if not self.spec_versions or self.spec_versions[-1] != versions:
                    self.spec_versions.append(versions)
                self.status_versions |= set(models_of(obj, self.key))
                if self._stop.is_set():
                    w.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# --- the agent process ----------------------------------------------------------------------------


def agent_main(node: str, kubeconfig: str, namespace: str, repository: str) -> None:
    """The agent of EdgeNode `node`, serving `repository` on 127.0.0.1 (an ephemeral port, printed)."""
    import asyncio
    import logging

    from node_agent.agent import Agent, AgentSettings, serve
    from node_agent.link.mode import EdgeNodeMode
    from node_agent.link.settings import LinkSettings
    from node_agent.serving.http import HttpSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    root = Path(repository)
    link = LinkSettings(
        edge_node=node,
        namespace=namespace,
        state_dir=root / ".edgefleet",
        endpoint="http://127.0.0.1:8000",
        watch_timeout_s=5,
        request_timeout_s=5.0,
        lease_renew_s=1.0,
        lease_duration_s=10,
        status_tick_s=0.1,
        status_min_interval_s=0.2,
        status_metrics_interval_s=0.5,
        status_max_interval_s=2.0,
        reconcile_interval_s=0.3,
        retry_failed_s=1.0,
        backoff_initial_s=0.1,
        backoff_max_s=0.5,
        startup_timeout_s=5.0,
    )
    mode = EdgeNodeMode(link, kubeconfig)
    settings = AgentSettings(model_repository=root, http=HttpSettings(host="127.0.0.1", port=0))

    def listening(agent: Agent) -> None:
        print(f"agent listening on http://127.0.0.1:{agent.port}", flush=True)

    asyncio.run(serve(Agent(settings, extensions=[mode], overlay=mode.configs), on_listening=listening))


class AgentProcess:
    """`agent_main` in its own process; its output is kept (`lines`)."""

    def __init__(self, node: str, kubeconfig: Path, namespace: str, repository: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, (str(REPO), str(REPO / "operator"), env.get("PYTHONPATH")))
        )
        command = [sys.executable, __file__, "agent", node, str(kubeconfig), namespace, str(repository)]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.append(line)

    def wait_listening(self, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(r"agent listening on http://127\.0\.0\.1:(\d+)", line):
                    self.port = int(m.group(1))
                    return self.port
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"the agent did not start:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "".join(self.lines[-n:])

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 15 s (its exit is not what these tests are about)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


# --- the artifact server --------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class ArtifactServer:
    """A static HTTP server of `root` on 127.0.0.1: `stop()` makes it refuse connections, `start()`
    brings it back on the same port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = 0
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"


# --- the operator's passes ------------------------------------------------------------------------


class OperatorPasses:
    """The operator's fleet passes (`FleetReconciler.reconcile_once`) over the test's own nodes,
    against the real API server: run by the test (`once`) or in a thread (`start`/`stop`)."""

    def __init__(self, kube: Any, group: str, clock: Callable[[], float] = time.time) -> None:
        from edgefleet_api import names
        from edgefleet_operator import settings as settings_mod
        from edgefleet_operator.metrics import OperatorMetrics
        from edgefleet_operator.reconciler import FleetReconciler

        selector = f"{names.LABEL_FLEET}=true,test-group={group}"
        self.settings = settings_mod.from_env({"EDGEFLEET_FLEET_SELECTOR": selector})
        self.reconciler = FleetReconciler(kube, self.settings, OperatorMetrics(), clock)
        self.passes = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def once(self) -> None:
        self.reconciler.reconcile_once()
        self.passes += 1

    def start(self, interval_s: float = 0.1) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.once()
                except Exception as e:  # a conflict or a transient error: the next pass redoes it
                    self.errors.append(f"{type(e).__name__}: {e}")
                self._stop.wait(interval_s)

        self._thread = threading.Thread(target=loop, name="operator-passes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        self._stop.clear()


# --- a client that counts every answer ------------------------------------------------------------


@dataclass
class Answers:
    """Every request the client sent, with its one answer: (monotonic time, HTTP status, version)."""

    items: list[tuple[float, int, str]] = field(default_factory=list)

    def failures(self) -> list[tuple[float, int, str]]:
        return [a for a in self.items if a[1] != 200 or a[2] == "?"]

    def versions(self) -> list[str]:
        """The versions that answered, runs collapsed: ['2', '1'] for 2, 2, 1, 1."""
        out: list[str] = []
        for _, _, v in self.items:
            if not out or out[-1] != v:
                out.append(v)
        return out

    def longest_gap_s(self, after: int = 0) -> float:
        """The longest time between two successive answers, from the `after`-th on."""
        times = [t for t, code, _ in self.items[after:] if code == 200]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


class Client:
    """Sends inference requests for model `model` (no version) one after another in a thread and
    tells which version answered by comparing the output with each version's own."""

    def __init__(self, port: int, model: str, body: dict[str, Any], outputs: dict[str, list[float]]) -> None:
        self.url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
        self.body = json.dumps(body).encode()
        self.outputs = outputs
        self.answers = Answers()
        self.started: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="client", daemon=True)

    def _version(self, data: list[float]) -> str:
        for version, expected in self.outputs.items():
            if all(abs(a - b) <= 1e-4 + 1e-4 * abs(b) for a, b in zip(data, expected, strict=True)):
                return version
        return "?"

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            request = urllib.request.Request(
                self.url, data=self.body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    out = json.loads(response.read())
                    code, version = response.status, self._version(out["outputs"][0]["data"])
            except urllib.error.HTTPError as e:
                code, version = e.code, e.read().decode(errors="replace")[:200]
            except OSError as e:
                code, version = 0, str(e)
            self.answers.items.append((time.monotonic(), code, version))
            self.started.append(started)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> Answers:
        self._stop.set()
        self._thread.join(30)
        return self.answers


@contextlib.contextmanager
def running(*things: Any) -> Iterator[None]:
    """Stop every started thing (in reverse order) however the block ends."""
    try:
        yield
    finally:
        for thing in reversed(things):
            with contextlib.suppress(Exception):
                thing.stop()


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "agent":
    agent_main(*sys.argv[2:])
