"""End to end: a whole fleet driven through helm, kubectl and the KServe v2 API, with real agents.

One scenario, in steps that run in file order (a failed step fails the steps after it): install the
chart, apply the examples and infer through the v2 API, a canary that promotes, a canary that rolls
back (the failing example model), a node that goes NotReady, uninstall.

Local (the default; in `make test`): the local control plane with three kwok nodes (two jetson-orin,
one edge-server). The chart is installed with helm; its operator Pod cannot run without a container
runtime, so it is pinned to no node and the operator runs as a local process with the chart's
environment and ServiceAccount (e2e/release.py). The agent Pods the operator creates run as real
`edgefleet-agent` processes with tokens bound to their Pods (e2e/agent_pods.py), serving the
TorchScript example models (`edgefleet-agent make-examples`).

On an existing cluster (`make e2e-kind` sets these): EDGEFLEET_E2E_KUBECONFIG (the cluster; fleet
nodes labelled edgefleet.io/fleet=true and edgefleet.io/device-class, advertising nvidia.com/gpu),
EDGEFLEET_E2E_VALUES (a values file: images), EDGEFLEET_E2E_EXAMPLES (the example models on this
host) and EDGEFLEET_E2E_EXAMPLES_AT (the same models inside the agent image),
EDGEFLEET_E2E_NODE_DOWN (a command taking a node down, `{node}` replaced). The chart's Pods run for
real; agents are reached with `kubectl port-forward`, and the image-classifier's `-v2` Service from a
client Pod in the cluster (kubectl cannot port-forward to a Service without a selector, and the
operator's Services have none: their agents live in another namespace). EDGEFLEET_E2E_TIMINGS, when
set, is a JSON file the suite writes what it measured to (install to operator Ready, apply to a
first inference through the Service).

The examples are applied as written except for their artifacts (pointed at the example models, with
their real digests) and, for the canary, a short analysis and an SLA sized for a shared CPU: latency
on a busy 2-core machine is noise, so the canaries are judged on errors.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from e2e import fleet, release
from e2e.agent_pods import AgentPods, PodView, ProcessView, agent_command, backoff_s, decide
from e2e.waiting import eventually
from edgefleet_api import names
from edgefleet_operator import manifests

RUN = uuid.uuid4().hex[:5]
FLEET_LABEL = "edgefleet.io/e2e-fleet"
NAMESPACE = f"efe2e-{RUN}"
"""The release's namespace; the agents run there too (agent.namespace empty)."""
APPS = f"efe2e-apps-{RUN}"
"""Where the InferenceServices go."""
RELEASE = f"edgefleet-e2e-{RUN}"
"""Its own release name: cluster-scoped objects carry it, so a demo's release in the cluster is left alone."""
OPERATOR = release.operator_name(RELEASE)
FULL = release.fullname(RELEASE)
EXISTING = os.environ.get("EDGEFLEET_E2E_KUBECONFIG")
TIMEOUT_S = 300 if EXISTING else 150


def record_timing(name: str, seconds: float) -> None:
    """Adds `name: seconds` to EDGEFLEET_E2E_TIMINGS (a JSON object), if set."""
    path = os.environ.get("EDGEFLEET_E2E_TIMINGS")
    if not path:
        return
    file = Path(path)
    timings = json.loads(file.read_text()) if file.exists() else {}
    timings[name] = round(seconds, 1)
    file.write_text(json.dumps(timings, indent=2))


# --- where the suite runs -------------------------------------------------------------------------


@dataclass
class Fleet:
    """The cluster under test and what runs on it; the steps share one."""

    kubectl_argv: list[str]
    helm_argv: list[str]
    work: Path
    """This run's files: values, applied manifests, logs and agents' folders (local)."""
    examples: Path
    """The example models on this host (model.yaml files: digests; artifacts: reference outputs)."""
    examples_at: str
    """Where agents find the same models (file:// artifacts)."""
    nodes: dict[str, str] = field(default_factory=dict)
    """Fleet node -> device class."""
    local: Any = None
    """LocalParts on the local control plane; None on an existing cluster."""
    forwards: PortForwards | None = None
    client_image: str = ""
    """An image with Python for client Pods inside the cluster (the agent's); real clusters only."""
    installed: bool = False
    down: list[str] = field(default_factory=list)
    traffic: Traffic | None = None

    def kubectl(self, *args: str, check: bool = True, input_: str | None = None) -> str:
        out = subprocess.run(
            [*self.kubectl_argv, *args], capture_output=True, text=True, input=input_, timeout=120
        )
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
        return out.stdout

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([*self.helm_argv, *args], capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
        return out

    def get(self, *args: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", *args, "-o", "json")))

    def service(self, name: str) -> dict[str, Any]:
        return self.get("-n", APPS, "inferenceservice", name)

    def spec_models(self, node: str) -> list[tuple[str, str, str]]:
        """(service, model, version) in the node's EdgeNode spec."""
        en = self.get("edgenode", node)
        return [(m["service"], m["model"], str(m["version"])) for m in en["spec"].get("models") or []]

    def versions_of(self, service: str) -> dict[str, set[str]]:
        """Node -> versions of `service` its EdgeNode spec holds (nodes without it left out)."""
        out: dict[str, set[str]] = {}
        for node in self.nodes:
            versions = {v for s, _, v in self.spec_models(node) if s == f"{APPS}/{service}"}
            if versions:
                out[node] = versions
        return out

    def agent_pods(self) -> dict[str, str]:
        """Node -> agent Pod name, for Pods not being deleted."""
        pods = self.get("-n", NAMESPACE, "pods", "-l", f"app.kubernetes.io/name={names.AGENT_APP}")["items"]
        return {
            p["spec"]["nodeName"]: p["metadata"]["name"]
            for p in pods
            if p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")
        }

    def reach(self, node: str) -> str | None:
        """Base URL of `node`'s agent from here, None if it has none."""
        if self.local is not None:
            return self.local.agents.url(node) if self.local.agents else None
        pod = self.agent_pods().get(node)
        return self.forwards.url(pod) if pod and self.forwards else None

    def context(self) -> str:
        """What to show when a step times out: the operator's log tail, and the efis table."""
        parts = [self.kubectl("get", "-n", APPS, "efis", check=False)]
        if self.local is not None and self.local.operator is not None:
            parts.append(f"operator log:\n{self.local.operator.tail(3000)}")
        if self.local is not None and self.local.agents is not None:
            parts += [f"agent {n} log:\n{self.local.agents.log_tail(n, 800)}" for n in self.nodes]
        return "\n".join(parts)

    def wait(self, check: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S) -> Any:
        return eventually(check, timeout_s, what, context=self.context)


@dataclass
class LocalParts:
    """What the suite runs itself on the local control plane."""

    state: Any
    kube: Any
    operator: Any = None
    agents: AgentPods | None = None


class PortForwards:
    """`kubectl port-forward` to agent Pods on a real cluster, one per Pod, started on first use."""

    def __init__(self, kubectl_argv: list[str]) -> None:
        self.kubectl_argv = kubectl_argv
        self.procs: dict[str, tuple[subprocess.Popen[str], str]] = {}

    def url(self, pod: str) -> str:
        proc, url = self.procs.get(pod, (None, ""))
        if proc is None or proc.poll() is not None:
            proc = subprocess.Popen(
                [*self.kubectl_argv, "-n", NAMESPACE, "port-forward", f"pod/{pod}", ":8000"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            line = proc.stdout.readline() if proc.stdout else ""
            m = re.search(r"127\.0\.0\.1:(\d+)", line)
            if not m:
                proc.kill()
                raise AssertionError(f"kubectl port-forward to {pod}: {line!r}")
            url = f"http://127.0.0.1:{m.group(1)}"
            self.procs[pod] = (proc, url)
        return url

    def close(self) -> None:
        for proc, _ in self.procs.values():
            proc.kill()
            proc.wait(10)


# --- the v2 API -----------------------------------------------------------------------------------


def post(url: str, body: bytes, timeout_s: float = 30) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def infer_body(name: str, x: np.ndarray) -> bytes:
    inputs = [{"name": name, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    return json.dumps({"inputs": inputs}).encode()


def infer(base: str, model: str, version: str | None, x: np.ndarray, input_name: str) -> np.ndarray:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    code, out = post(base + path, infer_body(input_name, x))
    assert code == 200, f"{base}{path}: {code} {out}"
    (tensor,) = out["outputs"]
    return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])


def reference(examples: Path, model: str, version: str, x: np.ndarray) -> np.ndarray:
    """The example model's output computed here, from the same artifact the agents load."""
    import torch

    module = torch.jit.load(str(examples / model / version / "model.pt"), map_location="cpu")
    with torch.inference_mode():
        return np.asarray(module(torch.from_numpy(x)).numpy())


CLIENT = """
import json, math, sys, time, urllib.request
url, name, shape = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
deadline = time.monotonic() + float(sys.argv[4])
data = [math.sin(i) for i in range(math.prod(shape))]
body = json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": shape, "data": data}]}).encode()
tries = 0
while True:
    tries += 1
    try:
        request = urllib.request.Request(url, body, {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            print(json.dumps({"tries": tries, "response": json.loads(r.read())}))
            break
    except Exception as e:
        if time.monotonic() > deadline:
            print(json.dumps({"tries": tries, "error": repr(e)}))
            sys.exit(1)
        time.sleep(0.5)
"""


SINE_SHAPE = (1, 3, 64, 64)


def sine_input(shape: tuple[int, ...]) -> np.ndarray:
    """The client Pod's input: sin(0), sin(1), ... (no random generator to agree on across numpy versions)."""
    return np.array([math.sin(i) for i in range(math.prod(shape))], dtype=np.float32).reshape(shape)


def infer_in_cluster(
    f: Fleet, url: str, input_name: str, shape: tuple[int, ...], timeout_s: float
) -> dict[str, Any]:
    """POSTs sine_input(shape) to `url` from a Pod in the apps namespace (on a fleet node: they hold
    the image), retrying until it answers 200 or `timeout_s` passes; the Pod's JSON report."""
    pod = f"v2-client-{uuid.uuid4().hex[:6]}"
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "namespace": APPS},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {names.LABEL_FLEET: "true"},
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "client",
                    "image": f.client_image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python", "-c", CLIENT, url, input_name, json.dumps(shape), str(timeout_s)],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    f.kubectl("apply", "-f", "-", input_=json.dumps(manifest))
    try:
        f.wait(
            lambda: f.get("-n", APPS, "pod", pod)["status"].get("phase") in ("Succeeded", "Failed"),
            f"client Pod {pod} to finish",
            timeout_s=timeout_s + 60,
        )
        log = f.kubectl("logs", "-n", APPS, pod).strip().splitlines()
    finally:
        f.kubectl("delete", "-n", APPS, "pod", pod, "--wait=false", check=False)
    report: dict[str, Any] = json.loads(log[-1]) if log else {"error": "no output"}
    assert "response" in report, f"{url} from inside the cluster: {report}"
    return report


IMAGE = np.random.default_rng(7).standard_normal((1, 3, 64, 64)).astype(np.float32)
FEATURES = np.random.default_rng(8).standard_normal((1, 32)).astype(np.float32)


class Traffic:
    """Classifier requests naming no version (the agent's traffic split picks one) to every agent,
    `rate_hz` rounds a second, on a thread; response codes counted per phase."""

    def __init__(self, fleet_: Fleet, rate_hz: float = 5.0) -> None:
        self.fleet = fleet_
        self.period_s = 1.0 / rate_hz
        self.body = infer_body("image", IMAGE)
        self.phase = "start"
        self.codes: Counter[tuple[str, int]] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for node in list(self.fleet.nodes):
                if node in self.fleet.down:
                    continue
                try:
                    base = self.fleet.reach(node)
                    if base:
                        code, _ = post(f"{base}/v2/models/classifier/infer", self.body, timeout_s=10)
                        self.codes[(self.phase, code)] += 1
                except Exception:  # an agent that is starting or stopping; counted, not fatal
                    self.codes[(self.phase, -1)] += 1
            self._stop.wait(self.period_s)

    def counts(self, phase: str) -> dict[int, int]:
        return {code: n for (p, code), n in self.codes.items() if p == phase}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


# --- fixtures -------------------------------------------------------------------------------------


def canary(models: dict[tuple[str, str], tuple[str, str]], at: str, version: str) -> dict[str, Any]:
    """The canary-rollout example at `version`, judged on errors in 6 s windows."""
    return release.canary_example(models, at, version, interval_s=6)


@pytest.fixture(scope="module")
def fleet_(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("fleet-e2e")
    if EXISTING:
        kubectl_argv = [os.environ.get("EDGEFLEET_E2E_KUBECTL", "kubectl"), f"--kubeconfig={EXISTING}"]
        f = Fleet(
            kubectl_argv,
            ["helm", f"--kubeconfig={EXISTING}"],
            work,
            Path(os.environ["EDGEFLEET_E2E_EXAMPLES"]),
            os.environ["EDGEFLEET_E2E_EXAMPLES_AT"],
            forwards=PortForwards(kubectl_argv),
        )
        agent_image = yaml.safe_load(Path(os.environ["EDGEFLEET_E2E_VALUES"]).read_text())["agent"]["image"]
        f.client_image = f"{agent_image['repository']}:{agent_image['tag']}"
        for node in json.loads(f.kubectl("get", "nodes", "-l", f"{names.LABEL_FLEET}=true", "-o", "json"))[
            "items"
        ]:
            name = node["metadata"]["name"]
            f.nodes[name] = node["metadata"]["labels"].get(names.LABEL_DEVICE_CLASS, "")
            f.kubectl("label", "node", name, f"{FLEET_LABEL}={RUN}", "--overwrite")
    else:
        state = request.getfixturevalue("control_plane")
        kube = request.getfixturevalue("kube")
        examples = release.make_example_models(work / "examples")
        f = Fleet(
            [f"{state.bin_dir}/kubectl", f"--kubeconfig={state.kubeconfig}"],
            [f"{state.bin_dir}/helm", f"--kubeconfig={state.kubeconfig}"],
            work,
            examples,
            str(examples),
            local=LocalParts(state, kube),
        )
        from kubernetes import client

        core = client.CoreV1Api(kube)
        labels = {FLEET_LABEL: RUN}
        for prefix, device_class, count in (("orin", "jetson-orin", 2), ("server", "edge-server", 1)):
            for name in fleet.create_nodes(core, count, device_class, prefix=f"{prefix}{RUN}", labels=labels):
                f.nodes[name] = device_class
    try:
        yield f
    finally:
        teardown(f)


def teardown(f: Fleet) -> None:
    if f.traffic:
        f.traffic.stop()
    if f.installed:  # a step failed: release the services while the operator still runs
        f.kubectl("delete", "-n", APPS, "inferenceservices", "--all", "--timeout=60s", check=False)
        for name in f.kubectl("get", "-n", APPS, "inferenceservices", "-o", "name", check=False).split():
            # Nothing else removes the operator's finalizer: no service may outlive the run.
            f.kubectl(
                "patch",
                "-n",
                APPS,
                name,
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )
        f.kubectl("delete", "namespace", APPS, "--wait=false", check=False)
    local = f.local
    if local is not None and local.agents is not None:
        local.agents.close()
    if local is not None and local.operator is not None:
        local.operator.stop()
    if f.forwards:
        f.forwards.close()
    if f.installed:
        subprocess.run(
            [*f.helm_argv, "uninstall", RELEASE, "-n", NAMESPACE], capture_output=True, timeout=180
        )
    # Pods on a node that went down never finish terminating (no kubelet confirms it).
    f.kubectl("delete", "pods", "--all", "-n", NAMESPACE, "--force", "--grace-period=0", check=False)
    f.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    if local is not None:
        from kubernetes import client

        fleet.delete_nodes(client.CoreV1Api(local.kube), list(f.nodes))
    else:
        for node in f.nodes:
            f.kubectl("label", "node", node, f"{FLEET_LABEL}-", check=False)


def by_class(f: Fleet, device_class: str) -> list[str]:
    return sorted(n for n, c in f.nodes.items() if c == device_class)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def events(f: Fleet, name: str) -> list[tuple[str, str]]:
    items = f.get("-n", APPS, "events", "--field-selector", f"involvedObject.name={name}")["items"]
    return [(e.get("reason", ""), e.get("message", "")) for e in items]


def apply(f: Fleet, docs: list[dict[str, Any]], name: str) -> None:
    path = f.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    f.kubectl("apply", "-n", APPS, "-f", str(path))


def rollout_phase(f: Fleet, name: str) -> dict[str, Any] | None:
    status = f.service(name).get("status") or {}
    return status if (status.get("rollout") or {}).get("phase") else None


# --- the scenario ---------------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.slow
def test_1_helm_install_brings_up_the_operator(fleet_: Fleet) -> None:
    f = fleet_
    f.kubectl("create", "namespace", NAMESPACE)
    f.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    values = release.merge(
        release.FAST_HEALTH_VALUES,
        release.SHARED_NAMESPACE_VALUES,
        {
            "fleet": {"selector": {names.LABEL_FLEET: "true", FLEET_LABEL: RUN}},
        },
        release.LOCAL_VALUES if f.local is not None else {},
        yaml.safe_load(Path(os.environ["EDGEFLEET_E2E_VALUES"]).read_text()) if EXISTING else {},
    )
    installing = time.monotonic()
    notes = release.install(f.helm, NAMESPACE, values, f.work / "values.yaml", RELEASE)
    f.installed = True
    assert f'installed as release "{RELEASE}" in namespace "{NAMESPACE}"' in notes
    status = json.loads(f.helm("status", RELEASE, "-n", NAMESPACE, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    f.kubectl(
        "get",
        "-n",
        NAMESPACE,
        f"deployment/{OPERATOR}",
        "serviceaccount/edgefleet-agent",
        f"role/{FULL}-agent",
    )
    f.kubectl("get", f"clusterrole/{OPERATOR}", f"validatingadmissionpolicy/{FULL}-agent-own-node")

    local = f.local
    if local is not None:
        from kubernetes import client

        from e2e.operator_proc import OperatorProcess

        core, apps = client.CoreV1Api(local.kube), client.AppsV1Api(local.kube)
        deployment = release.read_deployment(apps, NAMESPACE, RELEASE)
        pinned = deployment["spec"]["template"]["spec"]["nodeSelector"]
        assert pinned == {release.NOWHERE_LABEL[0]: release.NOWHERE_LABEL[1]}
        env = release.operator_env(deployment)
        assert env["EDGEFLEET_AGENT_NAMESPACE"] == NAMESPACE and env["EDGEFLEET_NOT_READY_GRACE_S"] == "2"
        kubeconfig = release.operator_kubeconfig(
            core, local.state.kubeconfig, NAMESPACE, f.work / "operator.kubeconfig", RELEASE
        )
        local.operator = OperatorProcess(
            local.state, f.work / "operator.log", KUBECONFIG=str(kubeconfig), **env
        )
        local.agents = AgentPods(local.kube, NAMESPACE, local.state.kubeconfig, f.work / "agents").start()
    else:
        f.kubectl("-n", NAMESPACE, "rollout", "status", f"deployment/{OPERATOR}", "--timeout=180s")
        record_timing("helm install to the operator Pod Ready", time.monotonic() - installing)

    # The operator, with the chart's RBAC, makes one EdgeNode per fleet node, owned by its Node.
    def edge_nodes() -> dict[str, Any]:
        items = f.get("edgenodes")["items"]
        return {e["metadata"]["name"]: e for e in items if e["metadata"]["name"] in f.nodes}

    found = f.wait(lambda: (e := edge_nodes()) and set(e) == set(f.nodes) and e, "an EdgeNode per fleet node")
    for name, en in found.items():
        assert en["metadata"]["ownerReferences"][0]["kind"] == "Node", name
        assert en["spec"]["nodeName"] == name


@pytest.mark.cluster
@pytest.mark.slow
def test_2_examples_are_placed_and_served_through_the_v2_api(fleet_: Fleet) -> None:
    f = fleet_
    models = release.example_models(f.examples)
    served_as_written = ("image-classifier", "multi-model", "llm-assistant")
    docs = [release.resolve_artifacts(release.example(n), models, f.examples_at) for n in served_as_written]
    docs.append(canary(models, f.examples_at, "1"))  # the previous release of camera-classifier
    # Every example a user may apply is applied here and must serve (a broken one fails this step).
    assert {*served_as_written, "canary-rollout"} == {p.stem for p in release.EXAMPLES.glob("*.yaml")}
    f.kubectl("create", "namespace", APPS)
    applying = time.monotonic()
    apply(f, docs, "examples")
    if f.local is None:
        # Through the image-classifier's Service, as a client in the cluster calls it: cluster DNS,
        # the Service, the operator's EndpointSlice, Pod networking to an agent on another node.
        url = f"http://{manifests.service_name('image-classifier')}.{APPS}.svc/v2/models/classifier/infer"
        report = infer_in_cluster(f, url, "image", SINE_SHAPE, TIMEOUT_S)
        record_timing("kubectl apply to a v2 inference through the -v2 Service", time.monotonic() - applying)
        (tensor,) = report["response"]["outputs"]
        got = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        want = reference(f.examples, "classifier", "1", sine_input(SINE_SHAPE))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    names = ("image-classifier", "retail-analytics", "camera-classifier", "edge-assistant")

    def all_ready() -> bool:
        return all(condition(f.service(n), "Ready").get("status") == "True" for n in names)

    f.wait(all_ready, "the examples Ready on real agents")
    table = f.kubectl("get", "-n", APPS, "efis")
    assert re.search(r"image-classifier\s+True\s+2/2\s+1\b", table), table

    orins, servers = by_class(f, "jetson-orin"), by_class(f, "edge-server")
    assert sorted(f.versions_of("image-classifier")) == orins  # nodeSelector: jetson-orin
    assert (
        sorted(f.versions_of("retail-analytics")) == servers[: max(1, len(servers) // 2)]
    )  # nodeFraction 0.5
    assert sorted(f.versions_of("camera-classifier")) == sorted(f.nodes)  # no selector: everywhere
    pods = f.agent_pods()
    assert sorted(pods) == sorted(f.nodes), "one agent Pod per node with work"
    status = f.service("image-classifier")["status"]
    reachable = sorted(u for n in orins if (u := f.reach(n)))
    assert len(reachable) == len(orins)
    if f.local is not None:
        assert sorted(status["endpoints"]) == reachable, "endpoints are where the agents listen"

    # Every node answers with the model's own output, computed here from the same artifact.
    for node in f.nodes:
        base = f.reach(node)
        assert base is not None, node
        got = infer(base, "classifier", "1", IMAGE, "image")
        np.testing.assert_allclose(got, reference(f.examples, "classifier", "1", IMAGE), rtol=1e-4, atol=1e-5)
    for node in f.versions_of("retail-analytics"):
        got = infer(f.reach(node) or "", "mlp", "1", FEATURES, "features")
        np.testing.assert_allclose(got, reference(f.examples, "mlp", "1", FEATURES), rtol=1e-4, atol=1e-5)
    with urllib.request.urlopen(f"{f.reach(orins[0])}/v2/models/classifier", timeout=10) as r:
        meta = json.loads(r.read())
    assert meta["name"] == "classifier" and "1" in meta["versions"]

    # The LLM example answers a chat request (OpenAI API) on each of its agents, greedily the same
    # tokens as the v2 generate extension on the same prompt.
    llm_nodes = f.versions_of("edge-assistant")
    assert len(llm_nodes) == 2, llm_nodes  # replicas: 2
    chat = {"model": "tiny-lm", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
            "temperature": 0}  # fmt: skip
    for node in llm_nodes:
        base = f.reach(node) or ""
        code, answer = post(base + "/v1/chat/completions", json.dumps(chat).encode(), timeout_s=60)
        assert code == 200 and answer["object"] == "chat.completion", (code, answer)
        assert answer["usage"]["completion_tokens"] >= 1, answer
        prompt = "<|user|>\nhello\n<|assistant|>\n"  # the default chat template (tiny-lm has none)
        params = {"max_tokens": 8, "temperature": 0}
        code, v2 = post(
            base + "/v2/models/tiny-lm/generate",
            json.dumps({"text_input": prompt, "parameters": params}).encode(),
        )
        assert code == 200 and v2["text_output"] == answer["choices"][0]["message"]["content"], (v2, answer)


@pytest.mark.cluster
@pytest.mark.slow
def test_3_a_good_canary_promotes_wave_by_wave(fleet_: Fleet) -> None:
    f = fleet_
    f.traffic = Traffic(f)
    f.traffic.phase = "promote"
    models = release.example_models(f.examples)
    apply(f, [canary(models, f.examples_at, "2")], "canary-v2")  # the example as written: classifier 2

    def promoted() -> dict[str, Any] | None:
        status = rollout_phase(f, "camera-classifier")
        return status if status and status["rollout"]["phase"] == "Promoted" else None

    status = f.wait(promoted, "camera-classifier 1 -> 2 to be Promoted", timeout_s=TIMEOUT_S + 120)
    history = status["rollout"]["history"][0]
    assert (history["fromVersion"], history["toVersion"]) == ("1", "2"), history
    waves = len(release.example("canary-rollout")["spec"]["rollout"]["waves"])
    passed = [a["wave"] for a in status["rollout"]["analysis"] if a["result"] == "Passed"]
    assert passed == list(range(waves)), status["rollout"]["analysis"]  # every wave judged and passed
    f.wait(
        lambda: (
            all(v == {"2"} for v in f.versions_of("camera-classifier").values())
            and len(f.versions_of("camera-classifier")) == len(f.nodes)
        ),
        "classifier 2 on every node",
    )
    f.wait(lambda: condition(f.service("camera-classifier"), "Ready").get("status") == "True", "Ready on v2")
    for node in f.nodes:
        got = infer(f.reach(node) or "", "classifier", "2", IMAGE, "image")
        np.testing.assert_allclose(got, reference(f.examples, "classifier", "2", IMAGE), rtol=1e-4, atol=1e-5)
    codes = f.traffic.counts("promote")
    assert codes.get(200, 0) > 50, codes
    assert not {c: n for c, n in codes.items() if c >= 500 or c < 0}, (
        f"requests failed during the rollout: {codes}"
    )


@pytest.mark.cluster
@pytest.mark.slow
def test_4_a_failing_canary_rolls_back(fleet_: Fleet) -> None:
    f = fleet_
    assert f.traffic is not None
    f.traffic.phase = "rollback"
    models = release.example_models(f.examples)
    apply(f, [canary(models, f.examples_at, "2-failing")], "canary-failing")

    def rolled_back() -> dict[str, Any] | None:
        status = rollout_phase(f, "camera-classifier")
        return status if status and status["rollout"]["phase"] == "RolledBack" else None

    status = f.wait(rolled_back, "the failing canary to roll back", timeout_s=TIMEOUT_S + 60)
    history = status["rollout"]["history"][0]
    assert (history["fromVersion"], history["toVersion"], history["result"]) == (
        "2",
        "2-failing",
        "RolledBack",
    )
    failed = [a for a in status["rollout"]["analysis"] if a["result"] == "Failed"]
    assert failed and "errorRate" in failed[-1]["message"], status["rollout"]["analysis"]
    degraded = condition(f.service("camera-classifier"), "Degraded")
    assert degraded.get("status") == "True" and "error" in degraded.get("message", "").lower(), degraded
    f.wait(
        lambda: all(v == {"2"} for v in f.versions_of("camera-classifier").values()), "every node back on 2"
    )
    f.wait(lambda: any(r == "RolledBack" for r, _ in events(f, "camera-classifier")), "a RolledBack event")
    # The canary's errors were real: its model raised, and the agents answered 500.
    traffic = f.traffic
    assert traffic.counts("rollback").get(500, 0) > 0, traffic.counts("rollback")
    traffic.phase = "after-rollback"
    f.wait(lambda: traffic.counts("after-rollback").get(200, 0) >= 20, "traffic served after the rollback")


@pytest.mark.cluster
@pytest.mark.slow
def test_5_a_node_that_goes_not_ready_loses_its_work(fleet_: Fleet) -> None:
    f = fleet_
    gone, stays = by_class(f, "jetson-orin")[:2]
    f.down.append(gone)
    if f.local is not None:
        # kwok stops heartbeating the Node; the controller-manager marks it NotReady after its grace.
        f.kubectl("annotate", "node", gone, "kwok.x-k8s.io/node-")
    else:
        subprocess.run(shlex.split(os.environ["EDGEFLEET_E2E_NODE_DOWN"].format(node=gone)), check=True)
    f.wait(lambda: not f.spec_models(gone), f"{gone}'s work to be taken away", timeout_s=TIMEOUT_S + 60)
    # On a real cluster the whole node stops: its agent's Lease goes stale and the node controller
    # marks the Node NotReady after its own grace (40 s), whichever comes first moves the work.
    f.wait(
        lambda: condition(f.get("node", gone), "Ready").get("status") in ("False", "Unknown"),
        f"{gone} NotReady",
    )
    whys = ("not ready",) if f.local is not None else ("not ready", "agent silent")
    f.wait(
        lambda: any(
            r in ("Moved", "Removed") and gone in m and any(why in m for why in whys)
            for r, m in events(f, "image-classifier")
        ),
        "an event saying why",
    )
    f.wait(lambda: gone not in f.agent_pods(), "its agent Pod to be deleted")
    if f.local is not None:
        agents = f.local.agents
        f.wait(lambda: agents is not None and agents.url(gone) is None, "its agent process to stop")

    def still_served() -> bool:
        status = f.service("image-classifier")["status"]
        return (
            condition(f.service("image-classifier"), "Ready").get("status") == "True"
            and status.get("nodesSummary") == "1/1"
        )

    f.wait(still_served, "image-classifier Ready on the remaining orin")
    assert sorted(f.versions_of("image-classifier")) == [stays]
    got = infer(f.reach(stays) or "", "classifier", "1", IMAGE, "image")
    np.testing.assert_allclose(got, reference(f.examples, "classifier", "1", IMAGE), rtol=1e-4, atol=1e-5)


@pytest.mark.cluster
@pytest.mark.slow
def test_6_uninstall_unloads_everything_and_removes_the_release(fleet_: Fleet) -> None:
    f = fleet_
    if f.traffic:
        f.traffic.stop()
        f.traffic = None
    f.kubectl("delete", "-n", APPS, "inferenceservices", "--all", "--timeout=120s")
    assert not f.get("-n", APPS, "inferenceservices")["items"], "the finalizer let every service go"
    up = [n for n in f.nodes if n not in f.down]
    f.wait(lambda: not any(f.spec_models(n) for n in up), "every EdgeNode spec emptied")
    f.wait(lambda: not (set(f.agent_pods()) & set(up)), "idle agent Pods removed")
    if f.local is not None:
        agents = f.local.agents
        f.wait(lambda: agents is not None and not agents.running(), "every agent process stopped")
    release.uninstall(f.helm, NAMESPACE, RELEASE)
    f.installed = False
    for args in (
        ("-n", NAMESPACE, "deployment", OPERATOR),
        ("clusterrole", OPERATOR),
        ("validatingadmissionpolicy", f"{FULL}-agent-own-node"),
    ):
        assert not f.kubectl("get", *args, "--ignore-not-found", "-o", "name"), args
    f.kubectl("get", "crd", "inferenceservices.edgefleet.io")  # Helm keeps CRDs
    f.kubectl("delete", "namespace", APPS, "--wait=false")


# --- the harness's decisions (no cluster) ---------------------------------------------------------


def pod_view(
    name: str, uid: str = "u1", node: str | None = "n1", deleting: bool = False, phase: str = "Running"
) -> PodView:
    return PodView(name, uid, "ns", node, deleting, phase)


def test_harness_starts_bound_pods_and_stops_pods_that_go() -> None:
    pods = [
        pod_view("a"),
        pod_view("b", node=None),
        pod_view("c", deleting=True),
        pod_view("d", phase="Failed"),
    ]
    running = {"c": ProcessView("u1", True), "gone": ProcessView("u9", True)}
    d = decide(pods, running, now_s=0.0)
    assert [p.name for p in d.start] == ["a"], "unbound, deleting and finished Pods get no process"
    assert d.stop == ("c", "gone")


def test_harness_replaces_a_pod_by_uid_and_restarts_exits_after_backoff() -> None:
    d = decide([pod_view("a", uid="new")], {"a": ProcessView("old", True)}, now_s=0.0)
    assert d.stop == ("a",) and [p.uid for p in d.start] == ["new"]
    exited = {"a": ProcessView("u1", False, exited_at_s=10.0, restarts=2)}
    assert backoff_s(2) == 4.0 and backoff_s(20) == 30.0
    assert decide([pod_view("a")], exited, now_s=13.9).start == ()
    assert [p.name for p in decide([pod_view("a")], exited, now_s=14.0).start] == ["a"]
    assert decide([pod_view("a")], {"a": ProcessView("u1", True)}, now_s=99.0) == decide([], {}, 0.0)


def test_agent_command_runs_the_pods_args_with_local_ports_folders_and_credentials(tmp_path: Path) -> None:
    from edgefleet_operator import manifests
    from edgefleet_operator.settings import AgentPodSettings

    en = {
        "apiVersion": names.API_VERSION,
        "kind": names.EDGE_NODE_KIND,
        "metadata": {"name": "orin-1", "uid": "e1"},
        "spec": {"nodeName": "orin-1"},
    }
    pod = manifests.agent_pod(en, AgentPodSettings(namespace="ns1"))
    argv, env = agent_command(pod, 4242, tmp_path, tmp_path / "kc", exe=Path("/bin/agent"))
    assert argv[:4] == ["/bin/agent", "serve", "--edge-node", "orin-1"]
    flags = dict(zip(argv[4::2], argv[5::2], strict=True))
    assert flags == {
        "--cache-budget": "10Gi",  # the Pod's own, kept (the node cache sits in the model repository)
        "--host": "127.0.0.1",
        "--port": "4242",
        "--model-repository": str(tmp_path / "models"),
        "--state-dir": str(tmp_path / "state"),
        "--kubeconfig": str(tmp_path / "kc"),
        "--namespace": "ns1",
        "--endpoint": "http://127.0.0.1:4242",
    }
    assert env == {
        "EDGEFLEET_NODE_NAME": "orin-1",
        "EDGEFLEET_NAMESPACE": "ns1",
        "EDGEFLEET_POD_IP": "127.0.0.1",
    }
    with pytest.raises(ValueError, match="no container 'agent'"):
        agent_command({**pod, "spec": {"containers": []}}, 1, tmp_path, tmp_path)


def test_resolved_examples_point_at_real_models_with_their_digests(tmp_path: Path) -> None:
    version = tmp_path / "classifier" / "2"
    version.mkdir(parents=True)
    (version / "model.yaml").write_text(
        yaml.safe_dump(
            {"name": "classifier", "version": "2", "artifact": "model.pt", "digest": "sha256:" + "ab" * 32}
        )
    )
    models = release.example_models(tmp_path)
    doc = release.resolve_artifacts(release.example("canary-rollout"), models, "/opt/models")
    assert doc["spec"]["models"][0]["artifact"] == {
        "uri": "file:///opt/models/classifier/2/model.pt",
        "digest": "sha256:" + "ab" * 32,
    }
    assert doc["spec"]["rollout"] == release.example("canary-rollout")["spec"]["rollout"], (
        "only artifacts change"
    )
    with pytest.raises(ValueError, match=r"no example model classifier:1 \(have \[\('classifier', '2'\)\]\)"):
        release.resolve_artifacts(release.example("multi-model"), models, "/opt/models")


def test_operator_env_is_the_deployments_minus_pod_network_ports() -> None:
    container: dict[str, Any] = {
        "name": "operator",
        "env": [
            {"name": "EDGEFLEET_RESYNC_S", "value": "1"},
            {"name": "EDGEFLEET_METRICS_PORT", "value": "8080"},
        ],
    }
    deployment = {"spec": {"template": {"spec": {"containers": [container]}}}}
    assert release.operator_env(deployment) == {"EDGEFLEET_RESYNC_S": "1"}
    container["env"].append({"name": "EDGEFLEET_AGENT_HOST_PATH"})  # value "": the API server leaves it out
    assert release.operator_env(deployment)["EDGEFLEET_AGENT_HOST_PATH"] == ""
    container["env"].append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})
    with pytest.raises(ValueError, match="X is not a literal value"):
        release.operator_env(deployment)
