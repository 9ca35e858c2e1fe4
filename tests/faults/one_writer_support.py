"""Support of test_one_writer.py: operator replicas as real processes, and a recorder that watches
what they write (EdgeNodes, the operator's Leases, the test's InferenceServices) as it happens.

ResourceVersions of objects stored in one etcd are its revisions: one global order of every write,
across kinds. The tests use them to ask "who held the shard when this spec was written" (Kubernetes
calls them opaque; with the local control plane's single etcd they are the write order, and only
these tests rely on it).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.operator_proc import AGENT_NAMESPACE, FAST_SETTINGS, OperatorProcess
from edgefleet_api import names
from edgefleet_operator.fleet_writer import WRITTEN_BY
from edgefleet_operator.ownership import FLEET_SHARD, failover_bound_s
from edgefleet_operator.shard_leases import LABEL_ROLE, shard_lease_name

SHARD_LEASE = shard_lease_name(FLEET_SHARD)
LEASE_S = float(FAST_SETTINGS["EDGEFLEET_LEASE_DURATION_S"])
RENEW_S = float(FAST_SETTINGS["EDGEFLEET_LEASE_RENEW_S"])
BOUND_S = failover_bound_s(LEASE_S, RENEW_S)
"""How long the fleet may go without a writer after its holder dies (pass time aside)."""


class Replica:
    """One `edgefleet-operator run` process; its identity is what its Leases and writes carry."""

    def __init__(self, control_plane: Any, log_dir: Path, label: str, **env: str) -> None:
        self.control_plane, self.log_dir, self.label = control_plane, log_dir, label
        self.env = env
        self.starts = 0
        self.proc = self._start()

    def _start(self) -> OperatorProcess:
        self.starts += 1
        log_path = self.log_dir / f"{self.label}-{self.starts}.log"
        return OperatorProcess(self.control_plane, log_path, **self.env)

    @property
    def identity(self) -> str:
        return f"{socket.gethostname()}/{self.proc.proc.pid}"

    def kill(self) -> float:
        """SIGKILL; returns the monotonic time it was sent."""
        t = time.monotonic()
        self.proc.kill()
        return t

    def restart(self) -> None:
        self.proc = self._start()

    def metric(self, name: str, **labels: str) -> float:
        """A counter's value from the replica's /metrics (0 when absent or the process is gone)."""
        url = f"http://127.0.0.1:{self.proc.metrics_port}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            return 0.0
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? (\S+)$" if want else rf"^{name} (\S+)$"
        found = re.search(pattern, text, re.M)
        return float(found.group(1)) if found else 0.0

    def writes(self, what: str) -> float:
        return self.metric("edgefleet_operator_api_writes_total", what=what)


@dataclass(frozen=True)
class Seen:
    """One watch event: the object's revision (its resourceVersion), when the test saw it, the object."""

    revision: int
    at_s: float
    kind: str
    obj: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])


class Recorder:
    """Watches EdgeNodes, the operator's Leases and the InferenceServices of `namespace` in threads,
    keeping every event (ADDED and MODIFIED, with the whole object) in arrival order."""

    def __init__(self, kube: Any, namespace: str) -> None:
        from kubernetes import client

        self.custom: Any = client.CustomObjectsApi(kube)
        self.coordination: Any = client.CoordinationV1Api(kube)
        self.namespace = namespace
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watches: list[Any] = []
        self._threads = [
            threading.Thread(target=self._run, args=(kind,), daemon=True, name=f"record-{kind}")
            for kind in ("edgenodes", "leases", "inferenceservices")
        ]
        for t in self._threads:
            t.start()
        time.sleep(0.5)  # the watches are open before the test acts (not a stand-in for work)

    def _stream(self, kind: str, watch: Any) -> Any:
        if kind == "edgenodes":
            return watch.stream(
                self.custom.list_cluster_custom_object, names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL
            )
        if kind == "inferenceservices":
            return watch.stream(
                self.custom.list_namespaced_custom_object,
                names.GROUP,
                names.VERSION,
                self.namespace,
                names.INFERENCE_SERVICE_PLURAL,
            )
        return watch.stream(
            self.coordination.list_namespaced_lease,
            AGENT_NAMESPACE,
            label_selector=LABEL_ROLE,
        )

    def _run(self, kind: str) -> None:
        import json

        from kubernetes import watch

        while not self._stop.is_set():
            w = watch.Watch()
            self._watches.append(w)
            with contextlib.suppress(Exception):
                for event in self._stream(kind, w):
                    obj = event["object"] if isinstance(event["object"], dict) else event.get("raw_object")
                    if isinstance(obj, (str, bytes)):
                        obj = json.loads(obj)
                    if not isinstance(obj, dict) or "metadata" not in obj:
                        continue
                    if event["type"] not in ("ADDED", "MODIFIED"):
                        continue
                    rv = int(obj["metadata"]["resourceVersion"])
                    with self._lock:
                        self.seen.append(Seen(rv, time.monotonic(), kind, obj))
                    if self._stop.is_set():
                        break

    def stop(self) -> None:
        self._stop.set()
        for w in self._watches:
            w.stop()

    def events(self, kind: str) -> list[Seen]:
        with self._lock:
            return sorted((s for s in self.seen if s.kind == kind), key=lambda s: s.revision)

    def spec_writes(self, nodes: set[str]) -> list[Seen]:
        """The events of `nodes`' EdgeNodes whose spec changed (the operator's writes), in order."""
        last: dict[str, Any] = {}
        out = []
        for s in self.events("edgenodes"):
            if s.name not in nodes:
                continue
            spec = s.obj.get("spec")
            if s.name in last and last[s.name] != spec:
                out.append(s)
            last[s.name] = spec
        return out

    def holder_at(self, revision: int, lease: str = SHARD_LEASE) -> str:
        """The shard Lease's holder as of the last Lease write before `revision` ("" if none yet)."""
        holder = ""
        for s in self.events("leases"):
            if s.name != lease or s.revision > revision:
                continue
            holder = (s.obj.get("spec") or {}).get("holderIdentity") or ""
        return holder

    def holder(self) -> str:
        found = self.events("leases")
        shard = [s for s in found if s.name == SHARD_LEASE]
        return ((shard[-1].obj.get("spec") or {}).get("holderIdentity") or "") if shard else ""


def writer(s: Seen) -> str:
    return str((s.obj["metadata"].get("annotations") or {}).get(WRITTEN_BY, ""))


DIGESTS = {"1": "sha256:" + "cd" * 32, "2": "sha256:" + "2e" * 32}


class Fleet:
    """This test's own kwok nodes (labelled test-group=<id>) with simulated agents (they report what
    their EdgeNode spec asks for: the operator is what is tested here, not the agent), and services
    placed on them."""

    def __init__(self, kube: Any, namespace: str, count: int) -> None:
        import uuid

        from kubernetes import client

        from e2e import fleet
        from e2e.sim_agent import SimNode, SimulatedAgents

        self.id = uuid.uuid4().hex[:6]
        self.namespace = namespace
        self.core: Any = client.CoreV1Api(kube)
        self.custom: Any = client.CustomObjectsApi(kube)
        self.agents = SimulatedAgents(kube, AGENT_NAMESPACE)
        self.nodes = fleet.create_nodes(
            self.core, count, device_class="jetson-orin", prefix=f"w{self.id}", labels={"test-group": self.id}
        )
        for n in self.nodes:
            self.agents.add(SimNode(n, "jetson-orin"))

    def cleanup(self) -> None:
        from e2e import fleet

        fleet.delete_nodes(self.core, self.nodes)

    def service(self, name: str, version: str = "1", **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": names.API_VERSION,
            "kind": names.INFERENCE_SERVICE_KIND,
            "metadata": {"name": name},
            "spec": {
                "models": [
                    {
                        "name": "classifier",
                        "version": version,
                        "memoryEstimate": "64Mi",
                        "artifact": {
                            "uri": f"repo://classifier/{version}/model.pt",
                            "digest": DIGESTS[version],
                        },
                    }
                ],
                "sla": {"p95LatencyMs": 20, "p99LatencyMs": 40},
                "placement": {"nodeSelector": {"test-group": self.id}, **spec.pop("placement", {})},
                **spec,
            },
        }

    def apply(self, body: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.INFERENCE_SERVICE_PLURAL, body
        )

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.INFERENCE_SERVICE_PLURAL, name
        )
        return obj

    def patch(self, name: str, body: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            names.GROUP, names.VERSION, self.namespace, names.INFERENCE_SERVICE_PLURAL, name, body
        )

    def rollout(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = (self.get(name).get("status") or {}).get("rollout") or {}
        return found

    def holders(self, name: str) -> list[str]:
        """The nodes whose EdgeNode spec holds a model of service `name`."""
        key = f"{self.namespace}/{name}"
        out = []
        for n in self.nodes:
            try:
                en = self.custom.get_cluster_custom_object(
                    names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, n
                )
            except Exception:
                continue
            if any(m["service"] == key for m in (en.get("spec") or {}).get("models") or []):
                out.append(n)
        return out

    def versions(self, name: str) -> dict[str, set[str]]:
        key = f"{self.namespace}/{name}"
        out: dict[str, set[str]] = {}
        for n in self.nodes:
            en = self.custom.get_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, n)
            out[n] = {m["version"] for m in (en.get("spec") or {}).get("models") or [] if m["service"] == key}
        return out

    def ready(self, name: str) -> bool:
        status = self.get(name).get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        return ready.get("status") == "True"
