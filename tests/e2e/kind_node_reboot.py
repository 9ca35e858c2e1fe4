"""A node that reboots while the API server is down comes back serving (issue 18), on kind: a real
kubelet, containerd and node disk, the agent installed as a static Pod by `edgefleet-agent install`.

Steps in file order (a failed step fails the steps after it):

1. the chart installed with its default node disk (hostPath); two fleet workers, one labelled
   `edgefleet.io/agent-managed-by=static-pod` whose agent is the static Pod `edgefleet-agent install
   --static-pod` writes (put in the node's /etc/kubernetes/manifests, with a kubeconfig holding a
   token bound to the Node), the other with the operator's agent Pod; a service on both; the static
   agent answers a v2 infer on the node's own address with the model's outputs.
2. the control plane's kube-apiserver stopped (its static Pod manifest moved out of the kubelet's
   folder: etcd, the controller-manager and the operator keep running, and find no API server), then
   the worker restarted (`docker restart`: its systemd, containerd and kubelet boot again, every
   container is gone). The kubelet starts the static Pod with no API server; the agent finds none,
   serves its persisted assignment, placing the model from the node cache, and answers the same
   infer with the same outputs, the API server still down.
3. the API server back: the mirror Pod is back, the agent heartbeats again, the service is Ready on
   both nodes, and no model moved (the EdgeNode specs are the ones from before the outage, and stay
   so while the operator judges the nodes' health; no Moved/Removed event; the operator's agent Pod
   on the other worker is the same Pod).

Run by `make e2e-kind` (scripts/e2e-kind.sh), after tests/e2e/test_fleet_e2e.py, with its
environment: EDGEFLEET_E2E_KUBECONFIG, EDGEFLEET_E2E_VALUES (images), EDGEFLEET_E2E_EXAMPLES (the
example models here) and EDGEFLEET_E2E_EXAMPLES_AT (the same inside the agent image). kind nodes are
Docker containers named as their Nodes; the test drives them with `docker`. The module is not named
test_*.py so that `make test` (no kind cluster, no Docker) does not collect it; pytest collects a
file named on its command line whatever its name.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from e2e import release
from e2e.waiting import eventually
from edgefleet_api import names

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RUN = uuid.uuid4().hex[:5]
RELEASE = f"edgefleet-reboot-{RUN}"
NAMESPACE = f"efreboot-{RUN}"
"""The release's (the operator's) namespace, Pod Security restricted."""
AGENTS = f"efreboot-agents-{RUN}"
"""The agents' namespace: the chart creates it at privileged (their node disk is a hostPath)."""
APPS = f"efreboot-apps-{RUN}"
FLEET_LABEL = "edgefleet.io/e2e-reboot"
SERVICE = "reboot-classifier"
PORT = 8000
"""The static agent's port on its node (hostNetwork)."""
APISERVER_MANIFEST = "/etc/kubernetes/manifests/kube-apiserver.yaml"
APISERVER_AWAY = "/etc/kubernetes/kube-apiserver.yaml.stopped-by-e2e"
"""Outside the kubelet's staticPodPath: the kubelet stops the API server while the file is here."""
TIMEOUT_S = 300.0
IMAGE = np.random.default_rng(17).standard_normal((1, 3, 64, 64)).astype(np.float32)


def record_timing(name: str, seconds: float) -> None:
    """Adds `name: seconds` to EDGEFLEET_E2E_TIMINGS (a JSON object), if set."""
    path = os.environ.get("EDGEFLEET_E2E_TIMINGS")
    if path:
        file = Path(path)
        timings = json.loads(file.read_text()) if file.exists() else {}
        timings[name] = round(seconds, 1)
        file.write_text(json.dumps(timings, indent=2))


def run(*argv: str, input_: str | None = None, check: bool = True, timeout_s: float = 120) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True, input=input_, timeout=timeout_s)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout


def on_node(node: str, script: str, input_: str | None = None, check: bool = True) -> str:
    """`sh -c script` inside the kind node's container."""
    return run("docker", "exec", "-i", node, "sh", "-c", script, input_=input_, check=check)


def refuses(ip: str, port: int) -> bool:
    """Nothing listens on ip:port (connection refused): the API server is down, not merely slow."""
    try:
        with socket.create_connection((ip, port), timeout=3):
            return False
    except ConnectionRefusedError:
        return True
    except OSError as e:
        raise AssertionError(f"{ip}:{port}: {e} (expected an answer or a refusal)") from None


def post(url: str, body: bytes, timeout_s: float = 30) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def infer(base: str, x: np.ndarray) -> np.ndarray:
    body = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
            ]
        }
    ).encode()
    code, out = post(f"{base}/v2/models/classifier/versions/1/infer", body)
    assert code == 200, f"{base}: {code} {out}"
    (tensor,) = out["outputs"]
    return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])


def answers(base: str) -> bool:
    """The agent's classifier:1 is ready (any failure to connect: not yet)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base}/v2/models/classifier/versions/1/ready", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def reference(examples: Path, x: np.ndarray) -> np.ndarray:
    import torch

    module = torch.jit.load(str(examples / "classifier" / "1" / "model.pt"), map_location="cpu")
    with torch.inference_mode():
        return np.asarray(module(torch.from_numpy(x)).numpy())


# --- the cluster ----------------------------------------------------------------------------------


@dataclass
class Reboot:
    """The kind cluster and what this module put on it."""

    kubeconfig: str
    work: Path
    examples: Path
    examples_at: str
    control_plane: str = ""
    control_plane_ip: str = ""
    static: str = ""
    """The worker whose agent is the static Pod, and that reboots."""
    managed: str = ""
    """The worker with the operator's agent Pod."""
    static_ip: str = ""
    managed_ip: str = ""
    installed: bool = False
    manifest_written: bool = False
    api_stopped: bool = False
    labelled: list[str] = field(default_factory=list)
    before: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    """Node -> its EdgeNode spec's (service, model, version), before the outage."""
    managed_pod_uid: str = ""
    rebooted_at: float = 0.0
    """Wall-clock time just before the workers were restarted."""

    def kubectl(self, *args: str, check: bool = True, input_: str | None = None) -> str:
        kubectl = os.environ.get("EDGEFLEET_E2E_KUBECTL", "kubectl")
        return run(kubectl, f"--kubeconfig={self.kubeconfig}", *args, input_=input_, check=check)

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            ["helm", f"--kubeconfig={self.kubeconfig}", *args], capture_output=True, text=True, timeout=180
        )
        if out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
        return out

    def get(self, *args: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", *args, "-o", "json")))

    def spec_models(self, node: str) -> list[tuple[str, str, str]]:
        en = self.get("edgenode", node)
        return sorted((m["service"], m["model"], str(m["version"])) for m in en["spec"].get("models") or [])

    def agent_pods(self) -> dict[str, dict[str, Any]]:
        """Node -> Pod, for the agents' namespace's Pods not being deleted (mirror Pods included)."""
        pods = self.get("-n", AGENTS, "pods")["items"]
        return {
            p["spec"]["nodeName"]: p
            for p in pods
            if p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")
        }

    def service_ready(self) -> bool:
        status = self.get("-n", APPS, "inferenceservice", SERVICE).get("status") or {}
        ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        return ready.get("status") == "True" and status.get("nodesSummary") == "2/2"

    def moves(self) -> list[tuple[str, str]]:
        items = self.get("-n", APPS, "events", "--field-selector", f"involvedObject.name={SERVICE}")["items"]
        return [
            (e.get("reason", ""), e.get("message", ""))
            for e in items
            if e.get("reason") in ("Moved", "Removed")
        ]

    def agent_log(self) -> str:
        """The static agent container's log, read on the node (no API server needed)."""
        ids = on_node(self.static, "crictl ps --name '^agent$' -q").split()
        return "\n".join(on_node(self.static, f"crictl logs {i} 2>&1", check=False) for i in ids)

    def context(self) -> str:
        parts = [on_node(self.static, "crictl ps -a 2>&1; crictl pods 2>&1", check=False)]
        try:
            parts.append(self.agent_log()[-3000:])
        except AssertionError as e:
            parts.append(str(e))
        if not self.api_stopped:
            parts.append(self.kubectl("get", "-n", APPS, "efis", "-o", "wide", check=False))
            parts.append(self.kubectl("get", "-n", AGENTS, "pods", "-o", "wide", check=False))
        return "\n".join(parts)

    def wait(self, check: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S) -> Any:
        return eventually(check, timeout_s, what, context=self.context)


def node_ip(r: Reboot, node: str) -> str:
    node_obj = r.get("node", node)
    return next(a["address"] for a in node_obj["status"]["addresses"] if a["type"] == "InternalIP")


def blob_path(r: Reboot) -> str:
    """classifier:1's blob in the static agent's node cache, on its node."""
    _, digest = release.example_models(r.examples)[("classifier", "1")]
    disk = f"/var/lib/edgefleet/{names.agent_name(r.static)}/models"
    return f"{disk}/.edgefleet/cache/blobs/sha256/{digest.removeprefix('sha256:')}"


def container_running(node: str) -> bool:
    out = run("docker", "inspect", "-f", "{{.State.Running}}", node, check=False)
    return out.strip() == "true"


@pytest.fixture(scope="module")
def reboot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reboot]:
    kubeconfig = os.environ.get("EDGEFLEET_E2E_KUBECONFIG")
    assert kubeconfig, (
        "run by scripts/e2e-kind.sh (make e2e-kind): EDGEFLEET_E2E_KUBECONFIG is a kind cluster"
    )
    r = Reboot(
        kubeconfig,
        tmp_path_factory.mktemp("reboot-e2e"),
        Path(os.environ["EDGEFLEET_E2E_EXAMPLES"]),
        os.environ["EDGEFLEET_E2E_EXAMPLES_AT"],
    )
    try:
        yield r
    finally:
        teardown(r)


def teardown(r: Reboot) -> None:
    """Leaves the cluster as found: the API server first (nothing else works without it)."""
    if r.api_stopped:
        on_node(r.control_plane, f"mv {APISERVER_AWAY} {APISERVER_MANIFEST}", check=False)
        with contextlib.suppress(AssertionError):
            eventually(
                lambda: r.kubectl("get", "--raw", "/readyz", check=False) == "ok", 180, "the API server"
            )
    if r.manifest_written:
        on_node(r.static, "rm -f /etc/kubernetes/manifests/edgefleet-agent.yaml", check=False)
    if r.installed:
        r.kubectl("delete", "-n", APPS, "inferenceservices", "--all", "--timeout=60s", check=False)
        for name in r.kubectl("get", "-n", APPS, "inferenceservices", "-o", "name", check=False).split():
            r.kubectl(
                "patch",
                "-n",
                APPS,
                name,
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )
        subprocess.run(
            ["helm", f"--kubeconfig={r.kubeconfig}", "uninstall", RELEASE, "-n", NAMESPACE],
            capture_output=True,
            timeout=180,
        )
    for ns in (APPS, AGENTS, NAMESPACE):
        r.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
    for node in r.labelled:
        r.kubectl("label", "node", node, f"{FLEET_LABEL}-", f"{names.LABEL_AGENT_MANAGED_BY}-", check=False)
        if container_running(node):
            on_node(node, f"rm -rf /var/lib/edgefleet/{names.agent_name(node)} /etc/edgefleet", check=False)


# --- the steps ------------------------------------------------------------------------------------


def test_1_static_pod_agent_serves_on_its_node(reboot: Reboot) -> None:
    r = reboot
    nodes = r.get("nodes")["items"]
    (control_plane,) = [
        n["metadata"]["name"]
        for n in nodes
        if "node-role.kubernetes.io/control-plane" in n["metadata"]["labels"]
    ]
    r.control_plane = control_plane
    r.control_plane_ip = node_ip(r, control_plane)

    def ready(node: dict[str, Any]) -> bool:
        conds = node["status"].get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    # Workers of the fleet that are up (the fleet suite before this one stops one of them).
    workers = sorted(
        n["metadata"]["name"]
        for n in nodes
        if n["metadata"]["labels"].get(names.LABEL_FLEET) == "true"
        and ready(n)
        and container_running(n["metadata"]["name"])
    )
    assert len(workers) >= 2, f"two fleet workers up are needed, found {workers}"
    r.static, r.managed = workers[0], workers[1]
    r.static_ip = node_ip(r, r.static)
    r.managed_ip = node_ip(r, r.managed)
    for node in (r.static, r.managed):
        r.kubectl("label", "node", node, f"{FLEET_LABEL}={RUN}", "--overwrite")
        r.labelled.append(node)
    r.kubectl("label", "node", r.static, f"{names.LABEL_AGENT_MANAGED_BY}=static-pod", "--overwrite")

    # The chart with its node disk default (a hostPath, so a privileged agents' namespace of its own),
    # one operator replica on the control plane.
    r.kubectl("create", "namespace", NAMESPACE)
    r.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    values = release.merge(
        yaml.safe_load(Path(os.environ["EDGEFLEET_E2E_VALUES"]).read_text()),
        {
            "operator": {"replicas": 1},
            "agent": {"namespace": AGENTS},
            "fleet": {"selector": {names.LABEL_FLEET: "true", FLEET_LABEL: RUN}},
        },
    )
    release.install(r.helm, NAMESPACE, values, r.work / "values.yaml", RELEASE)
    r.installed = True
    labels = r.get("namespace", AGENTS)["metadata"]["labels"]
    assert labels.get("pod-security.kubernetes.io/enforce") == "privileged"

    # The static agent: a kubeconfig with a token bound to its Node, and the manifest that
    # `edgefleet-agent install --static-pod` writes, in the node's staticPodPath.
    token = r.kubectl(
        "-n", AGENTS, "create", "token", "edgefleet-agent",
        "--bound-object-kind", "Node", "--bound-object-name", r.static, "--duration", "24h",
    ).strip()  # fmt: skip
    here = yaml.safe_load(Path(r.kubeconfig).read_text())
    ca = here["clusters"][0]["cluster"]["certificate-authority-data"]
    node_kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kind",
                "cluster": {
                    # The control plane's node address: the Service IP needs kube-proxy's rules,
                    # which a rebooted node has only once the API server lets kube-proxy start.
                    "server": f"https://{r.control_plane_ip}:6443",
                    "certificate-authority-data": ca,
                },
            }
        ],
        "users": [{"name": "agent", "user": {"token": token}}],
        "contexts": [{"name": "agent", "context": {"cluster": "kind", "user": "agent"}}],
        "current-context": "agent",
    }
    on_node(
        r.static,
        "mkdir -p /etc/edgefleet && cat > /etc/edgefleet/kubeconfig"
        " && chown 65532:65532 /etc/edgefleet/kubeconfig && chmod 0600 /etc/edgefleet/kubeconfig",
        input_=json.dumps(node_kubeconfig),
    )
    image = values["agent"]["image"]
    out_dir = r.work / "manifests"
    exe = Path(sys.executable).with_name("edgefleet-agent")
    said = run(
        str(exe), "install", "--static-pod", str(out_dir), "--edge-node", r.static, "--namespace", AGENTS,
        "--device", "cpu", "--cache-budget", "1Gi", "--port", str(PORT),
        "--image", f"{image['repository']}:{image['tag']}",
    )  # fmt: skip
    assert "edgefleet.io/agent-managed-by=static-pod" in said
    manifest = (out_dir / "edgefleet-agent.yaml").read_text()
    # Written under a dot name, then renamed: the kubelet ignores dot files, never reads half of it.
    on_node(
        r.static,
        "cd /etc/kubernetes/manifests && cat > .edgefleet-agent.yaml"
        " && mv .edgefleet-agent.yaml edgefleet-agent.yaml",
        input_=manifest,
    )
    r.manifest_written = True

    # A service on both fleet nodes: classifier 1, its artifact in the agent image (file://).
    models = release.example_models(r.examples)
    doc = release.resolve_artifacts(release.example("image-classifier"), models, r.examples_at)
    doc["metadata"]["name"] = SERVICE
    doc["spec"]["placement"] = {"nodeSelector": {FLEET_LABEL: RUN}}
    doc["spec"]["sla"] = dict(release.CPU_CANARY_SLA)
    r.kubectl("create", "namespace", APPS)
    applied = time.monotonic()
    r.kubectl("apply", "-n", APPS, "-f", "-", input_=json.dumps(doc))

    base = f"http://{r.static_ip}:{PORT}"
    r.wait(lambda: answers(base), f"the static agent on {r.static} to serve classifier:1 at {base}")
    record_timing("reboot: apply to the static agent serving", time.monotonic() - applied)
    np.testing.assert_allclose(infer(base, IMAGE), reference(r.examples, IMAGE), rtol=1e-4, atol=1e-5)
    r.wait(r.service_ready, f"{SERVICE} Ready on both nodes")

    on_static = [p for p in r.get("-n", AGENTS, "pods")["items"] if p["spec"].get("nodeName") == r.static]
    assert len(on_static) == 1, (
        f"one agent on {r.static}, the static one: {[p['metadata']['name'] for p in on_static]}"
    )
    pods = r.agent_pods()
    static_pod = pods.get(r.static)
    assert static_pod is not None, f"a mirror Pod of the static agent on {r.static}: {sorted(pods)}"
    assert "kubernetes.io/config.mirror" in static_pod["metadata"].get("annotations", {}), (
        f"the agent on {r.static} is the kubelet's static Pod, not one the operator made"
    )
    assert r.managed in pods and "kubernetes.io/config.mirror" not in pods[r.managed]["metadata"].get(
        "annotations", {}
    ), "the other worker's agent is the operator's Pod"
    r.managed_pod_uid = pods[r.managed]["metadata"]["uid"]
    volumes = {v["name"]: v for v in pods[r.managed]["spec"]["volumes"]}
    assert (
        volumes["models"].get("hostPath", {}).get("path")
        == f"/var/lib/edgefleet/{names.agent_name(r.managed)}"
    ), "the operator's agent Pod keeps its node disk on the node (the chart's default), not in an emptyDir"
    for node in (r.static, r.managed):
        r.before[node] = r.spec_models(node)
        assert r.before[node] == [(f"{APPS}/{SERVICE}", "classifier", "1")], (node, r.before[node])

    # The node disk holds the persisted assignment and the model, the version a hard link of the blob.
    disk = f"/var/lib/edgefleet/{names.agent_name(r.static)}/models"
    blob = blob_path(r)
    inodes = on_node(r.static, f"stat -c %i {disk}/classifier/1/model.pt {blob}").split()
    assert len(inodes) == 2 and inodes[0] == inodes[1], f"version and cache blob: inodes {inodes}"
    persisted = json.loads(on_node(r.static, f"cat {disk}/.edgefleet/assignment-{r.static}.json"))
    assert SERVICE in json.dumps(persisted), persisted


def test_2_rebooted_nodes_static_agent_serves_with_the_api_server_down(reboot: Reboot) -> None:
    r = reboot
    assert r.static, "step 1 ran"
    assert not refuses(r.control_plane_ip, 6443)
    on_node(r.control_plane, f"mv {APISERVER_MANIFEST} {APISERVER_AWAY}")
    r.api_stopped = True
    r.wait(lambda: refuses(r.control_plane_ip, 6443), "the kubelet to stop the API server", timeout_s=120)

    # Both workers reboot: the static one, and the one whose agent is the operator's Pod.
    blob = blob_path(r)
    used_before = int(on_node(r.static, f"stat -c %Y {blob}"))
    restarted, restarted_wall = time.monotonic(), time.time()
    r.rebooted_at = restarted_wall
    run("docker", "restart", r.static, r.managed, timeout_s=180)
    # A rebooted node may come back at another address (docker's IPAM, like a DHCP lease, need not
    # give the same one): the agent serves on whatever the node has; the test follows the node.
    for attr, node in (("static_ip", r.static), ("managed_ip", r.managed)):
        ip = run("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", node)
        if ip.strip() != getattr(r, attr):
            print(f"\n{node} came back at {ip.strip()}, was {getattr(r, attr)}")
        setattr(r, attr, ip.strip())

    base = f"http://{r.static_ip}:{PORT}"
    r.wait(lambda: answers(base), f"the static agent on the rebooted {r.static} to serve")
    serving_s = time.monotonic() - restarted
    record_timing("reboot: node restart to the static agent serving (API server down)", serving_s)
    got = infer(base, IMAGE)
    np.testing.assert_allclose(got, reference(r.examples, IMAGE), rtol=1e-4, atol=1e-5)

    log = r.agent_log()
    assert f"serving the persisted assignment of EdgeNode {r.static}" in log, log[-3000:]
    # Placing a version from the node cache touches its blob (the cache's last use): the model was
    # placed from the cache after the boot, no byte of it fetched.
    used_after = int(on_node(r.static, f"stat -c %Y {blob}"))
    assert used_before < used_after >= int(restarted_wall), (used_before, restarted_wall, used_after)
    disk = f"/var/lib/edgefleet/{names.agent_name(r.static)}/models"
    inodes = on_node(r.static, f"stat -c %i {disk}/classifier/1/model.pt {blob}").split()
    assert len(inodes) == 2 and inodes[0] == inodes[1], f"version and cache blob: inodes {inodes}"

    # The other worker's kubelet is up as long (its health endpoint answers), and has started no agent:
    # a kubelet learns its Pods from the API server, and keeps no copy of them across a reboot. The
    # static Pod is what serves through a cold start with no cloud.
    r.wait(
        lambda: on_node(r.managed, "curl -sf http://127.0.0.1:10248/healthz", check=False) == "ok",
        f"{r.managed}'s kubelet to be up",
    )
    assert not on_node(r.managed, "crictl ps --name '^agent$' -q").split(), (
        f"{r.managed}'s kubelet started the operator's agent Pod with no API server"
    )
    assert refuses(r.control_plane_ip, 6443), "the API server stayed down throughout"


def test_3_api_server_back_fleet_converges_with_no_model_moved(reboot: Reboot) -> None:
    r = reboot
    assert r.api_stopped, "step 2 ran"
    on_node(r.control_plane, f"mv {APISERVER_AWAY} {APISERVER_MANIFEST}")
    r.wait(lambda: r.kubectl("get", "--raw", "/readyz", check=False) == "ok", "the API server back")
    r.api_stopped = False
    restored_at = time.time()
    back = time.monotonic()

    def stamp(text: str | None) -> float:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp() if text else 0.0

    def reporting(node: str) -> bool:
        """The node's agent renewed its Lease and wrote its EdgeNode status since the API server came
        back, with its model ready."""
        lease = r.get("-n", AGENTS, "lease", names.agent_name(node))
        status = r.get("edgenode", node).get("status") or {}
        ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        return (
            stamp(lease["spec"].get("renewTime")) > restored_at
            and stamp(status.get("heartbeatTime")) > restored_at
            and ready.get("status") == "True"
        )

    def agent_started_at(node: str) -> float:
        """When the node's agent container started, as its kubelet reports it (0: not running)."""
        pod = r.agent_pods().get(node) or {}
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        running = next((c["state"].get("running") or {} for c in statuses if c["name"] == "agent"), {})
        return stamp(running.get("startedAt"))

    for node in (r.static, r.managed):
        r.wait(functools.partial(reporting, node), f"{node}'s agent to report again")
    r.wait(lambda: agent_started_at(r.static), "the kubelet to report the static agent's mirror Pod")
    # The static agent started after the reboot, before the API server was back; the operator's agent
    # only after (its kubelet needed the API server to learn of its Pod).
    # (startedAt has whole seconds.)
    assert int(r.rebooted_at) <= agent_started_at(r.static) < restored_at, (r.rebooted_at, restored_at)
    r.wait(lambda: agent_started_at(r.managed), f"{r.managed}'s agent Pod running")
    assert agent_started_at(r.managed) >= int(restored_at), (agent_started_at(r.managed), restored_at)
    r.wait(r.service_ready, f"{SERVICE} Ready on both nodes again")
    record_timing(
        "reboot: API server back to both agents reporting, the service Ready", time.monotonic() - back
    )

    # The operator judges a NotReady node after notReadyGraceSeconds (30 s) and an agent silent past
    # its grace plus backoff allowance (30 + 30 s): watch the specs through that, and some.
    watch_until = back + 75
    while time.monotonic() < watch_until:
        for node in (r.static, r.managed):
            assert r.spec_models(node) == r.before[node], f"{node}'s work changed after the outage"
        assert not r.moves(), f"models moved: {r.moves()}"
        time.sleep(2)
    pods = r.agent_pods()
    assert pods[r.managed]["metadata"]["uid"] == r.managed_pod_uid, (
        "the operator's agent Pod is the same Pod, restarted by its kubelet, not replaced"
    )
    assert "kubernetes.io/config.mirror" in pods[r.static]["metadata"].get("annotations", {})
    assert r.service_ready()
    base = f"http://{r.static_ip}:{PORT}"
    np.testing.assert_allclose(infer(base, IMAGE), reference(r.examples, IMAGE), rtol=1e-4, atol=1e-5)
