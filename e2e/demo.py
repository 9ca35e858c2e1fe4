"""`make demo`: a local edge fleet on this machine, with real agents.

1. The local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok) and four
   simulated edge nodes of three classes: two Jetson AGX Orin, a Jetson Orin Nano, an L4 edge server.
2. `helm install` of the chart into edgefleet-system. Its operator Pod cannot run here (no container
   runtime), so the operator runs as a local process with the chart's settings and ServiceAccount
   (e2e/release.py); log in <state>/logs/operator.log.
3. Real agents: every agent Pod the operator creates runs as a local `edgefleet-agent` process
   (e2e/agent_pods.py) serving small TorchScript example models; logs in <state>/agents/.
4. The examples (manifests/examples, their artifacts pointed at the example models), inference
   traffic, then a new version of camera-classifier rolled out in canary waves, with a live fleet
   view until it is promoted.

Everything stays up afterwards; `make cluster-down` stops it all (operator and agents included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from e2e import cluster as localcluster
from e2e import fleet, release
from edgefleet_api import names

REPO = Path(__file__).resolve().parent.parent
SYSTEM = "edgefleet-system"
DEMO = "edgefleet-demo"
NODES = [("orin", "jetson-orin", 2), ("nano", "jetson-nano", 1), ("server", "edge-server", 1)]
WAVE_S = 10
"""Analysis window per canary wave: long enough to watch, short enough to finish in about a minute."""
TIMEOUT_S = 300


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def detached(state: localcluster.ClusterState, name: str, argv: list[str], env: dict[str, str]) -> int:
    """Start `argv` in its own session (log: <state>/logs/<name>.log) unless <name> already runs; its pid
    goes into the cluster state, so `make cluster-down` stops it with everything it started."""
    pid = state.pids.get(name)
    if pid and localcluster.pid_alive(pid):
        return pid
    log = open(Path(state.dir) / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    # The children run from the state folder: the repository goes on their path for `e2e` (the
    # package's editable install maps only edgefleet_api, edgefleet_operator and node_agent).
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    proc = subprocess.Popen(
        argv,
        env={**os.environ, "PYTHONPATH": path, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=state.dir,
    )
    log.close()
    state.pids[name] = proc.pid
    state.save()
    say(f"{name} started (pid {proc.pid}, log {state.dir}/logs/{name}.log)")
    return proc.pid


def install(state: localcluster.ClusterState, kube: Any) -> None:
    """The chart (helm upgrade --install) and its operator as a local process."""
    from kubernetes import client

    def helm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [f"{state.bin_dir}/helm", f"--kubeconfig={state.kubeconfig}", *args],
            check=True,
            capture_output=True,
            text=True,
        )

    localcluster.kubectl(state, "create", "namespace", SYSTEM, check=False)
    localcluster.kubectl(
        state, "label", "namespace", SYSTEM, "pod-security.kubernetes.io/enforce=restricted", "--overwrite"
    )
    values = release.merge(release.FAST_HEALTH_VALUES, release.LOCAL_VALUES, release.SHARED_NAMESPACE_VALUES)
    try:
        release.install(helm, SYSTEM, values, Path(state.dir) / "values.yaml")
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"[demo] helm install failed:\n{e.stderr}") from None
    say(f"helm: release {release.RELEASE} deployed in {SYSTEM} (the operator Pod is pinned to no node)")
    env = release.operator_env(release.read_deployment(client.AppsV1Api(kube), SYSTEM))
    kubeconfig = release.operator_kubeconfig(
        client.CoreV1Api(kube), state.kubeconfig, SYSTEM, Path(state.dir) / "operator.kubeconfig"
    )
    detached(
        state,
        "operator",
        [sys.executable, "-m", "edgefleet_operator.cli", "run", "--liveness", ""],
        {**env, "KUBECONFIG": str(kubeconfig), "EDGEFLEET_METRICS_PORT": str(localcluster.free_port())},
    )
    detached(
        state,
        "agents",
        [
            sys.executable,
            "-m",
            "e2e.agent_pods",
            "--kubeconfig",
            str(state.kubeconfig),
            "--namespace",
            SYSTEM,
            "--dir",
            f"{state.dir}/agents",
        ],
        {"EDGEFLEET_THERMAL_SOURCE": "simulated"},
    )


class Traffic:
    """Inference requests to every agent on a thread: the classifier (no version: each agent's traffic
    split picks one) and, where it is served, the mlp."""

    def __init__(self, agents_json: Path, rate_hz: float = 4.0) -> None:
        self.agents_json = agents_json
        self.period_s = 1.0 / rate_hz
        self.codes: Counter[int] = Counter()
        self.bodies = {
            "classifier": json.dumps(
                {
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "FP32",
                            "shape": [1, 3, 64, 64],
                            "data": [0.5] * (3 * 64 * 64),
                        }
                    ]
                }
            ).encode(),
            "mlp": json.dumps(
                {
                    "inputs": [
                        {
                            "name": "features",
                            "datatype": "FP32",
                            "shape": [1, 32],
                            "data": [0.1 * i for i in range(32)],
                        }
                    ]
                }
            ).encode(),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def urls(self) -> list[str]:
        try:
            return [a["url"] for a in json.loads(self.agents_json.read_text()).values()]
        except (OSError, ValueError):
            return []

    def _run(self) -> None:
        while not self._stop.is_set():
            for url in self.urls():
                for model, body in self.bodies.items():
                    request = urllib.request.Request(
                        f"{url}/v2/models/{model}/infer", body, {"content-type": "application/json"}
                    )
                    try:
                        with urllib.request.urlopen(request, timeout=10) as r:
                            self.codes[r.status] += 1
                    except urllib.error.HTTPError as e:
                        if e.code != 404:  # the mlp lives on the edge server only
                            self.codes[e.code] += 1
                    except OSError:
                        self.codes[0] += 1
            self._stop.wait(self.period_s)

    def summary(self) -> str:
        ok = self.codes.get(200, 0)
        other = ", ".join(f"{c or 'no answer'}: {n}" for c, n in sorted(self.codes.items()) if c != 200)
        return f"inference requests: {ok} ok" + (f", {other}" if other else "")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def fleet_view(kube: Any) -> str:
    from kubernetes import client

    from edgefleet_operator import fleet_view as view

    custom: Any = client.CustomObjectsApi(kube)
    core: Any = client.CoreV1Api(kube)
    edge_nodes = custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL)[
        "items"
    ]
    services = custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.INFERENCE_SERVICE_PLURAL)[
        "items"
    ]
    labels = {n.metadata.name: n.metadata.labels or {} for n in core.list_node().items}
    return view.render(edge_nodes, labels, services)


def show(kube: Any, title: str, traffic: Traffic | None) -> None:
    """The fleet view; on a terminal it redraws in place."""
    if sys.stdout.isatty():
        print("\033[2J\033[H", end="")
    else:
        print()
    print(f"{time.strftime('%H:%M:%S')}  {title}\n{fleet_view(kube)}")
    if traffic:
        print(traffic.summary())
    sys.stdout.flush()


def watch(kube: Any, title: str, done: Any, traffic: Traffic | None = None, every_s: float = 2.0) -> Any:
    """Show the fleet every `every_s` until `done()` returns something truthy (returned)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        show(kube, title, traffic)
        result = done()
        if result:
            return result
        time.sleep(every_s)
    raise SystemExit(f"[demo] timed out after {TIMEOUT_S}s: {title}; see {localcluster.state_dir()}/logs")


def service(kube: Any, name: str) -> dict[str, Any]:
    from kubernetes import client

    custom: Any = client.CustomObjectsApi(kube)
    return dict(
        custom.get_namespaced_custom_object(
            names.GROUP, names.VERSION, DEMO, names.INFERENCE_SERVICE_PLURAL, name
        )
    )


def ready(obj: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def apply(state: localcluster.ClusterState, docs: list[dict[str, Any]], name: str) -> Path:
    path = Path(state.dir) / "demo" / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    print(localcluster.kubectl(state, "apply", "-n", DEMO, "-f", str(path)).stdout, end="")
    return path


def main() -> int:
    state = localcluster.up()
    from kubernetes import client, config

    kube = config.new_client_from_config(config_file=str(state.kubeconfig))
    core = client.CoreV1Api(kube)
    names: list[str] = []
    for prefix, device_class, count in NODES:
        zones = ("zone-a", "zone-b")
        names += fleet.create_nodes(core, count, device_class=device_class, prefix=prefix, zones=zones)
    say(f"{len(names)} simulated edge nodes: {', '.join(names)}")
    install(state, kube)

    demo_dir = Path(state.dir) / "demo"
    demo_dir.mkdir(exist_ok=True)
    say("writing the example models (edgefleet-agent make-examples; small TorchScript models, fixed seeds)")
    models_dir = release.make_example_models(demo_dir / "models")
    models = release.example_models(models_dir)
    localcluster.kubectl(state, "create", "namespace", DEMO, check=False)
    docs = [
        release.resolve_artifacts(release.example(n), models, str(models_dir))
        for n in ("image-classifier", "multi-model", "llm-assistant")
    ]
    docs.append(release.canary_example(models, str(models_dir), "1", WAVE_S))
    say("applying the examples, artifacts pointed at the example models (camera-classifier at version 1)")
    apply(state, docs, "examples")
    names_ = ("image-classifier", "retail-analytics", "camera-classifier", "edge-assistant")
    watch(kube, "agents start and load their models", lambda: all(ready(service(kube, n)) for n in names_))

    traffic = Traffic(Path(state.dir) / "agents" / "agents.json")
    agents = json.loads((Path(state.dir) / "agents" / "agents.json").read_text())
    node, agent = sorted(agents.items())[0]
    body = demo_dir / "image.json"
    body.write_bytes(traffic.bodies["classifier"])
    url = f"{agent['url']}/v2/models/classifier/infer"
    with urllib.request.urlopen(
        urllib.request.Request(url, body.read_bytes(), {"content-type": "application/json"}), timeout=30
    ) as r:
        answer = json.loads(r.read())
    say(
        f"one inference on {node}'s agent: model {answer['model_name']} version {answer['model_version']}, "
        f"{answer['outputs'][0]['name']} = {[round(v, 3) for v in answer['outputs'][0]['data']]}"
    )
    llm_url = sorted(service(kube, "edge-assistant")["status"]["endpoints"])[0]  # an agent serving it
    chat = {"model": "tiny-lm", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 12}
    request = urllib.request.Request(
        f"{llm_url}/v1/chat/completions", json.dumps(chat).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        reply = json.loads(r.read())
    say(
        "one chat completion (OpenAI API) from edge-assistant's tiny-lm: "
        f"{reply['choices'][0]['message']['content']!r} ({reply['usage']['completion_tokens']} tokens; "
        "random weights, so bytes without meaning)"
    )
    time.sleep(3)  # a few rounds of traffic before the rollout, so the fleet view shows latency

    say(f"rolling out camera-classifier 2 in canary waves (5%, 25%, 50%, 100%; {WAVE_S} s analysis each)")
    apply(state, [release.canary_example(models, str(models_dir), "2", WAVE_S)], "camera-classifier-v2")

    def finished() -> str | None:
        phase = ((service(kube, "camera-classifier").get("status") or {}).get("rollout") or {}).get("phase")
        return phase if phase in ("Promoted", "RolledBack", "Aborted") else None

    phase = watch(kube, "rollout of camera-classifier 1 -> 2", finished, traffic)
    traffic.stop()
    show(kube, f"rollout {phase}", traffic)
    print(f"""
The fleet is up, with real agents (one process per agent Pod). Poke at it:
  export KUBECONFIG={state.kubeconfig} PATH={state.bin_dir}:$PATH
  kubectl get nodes,edgenodes
  kubectl get efis -n {DEMO}                       # kubectl describe efis camera-classifier -n {DEMO}
  kubectl get pods -n {SYSTEM} -o wide             # agent Pods (their processes: agents/agents.json)
  helm list -n {SYSTEM}
  curl -s -X POST {url} -H 'content-type: application/json' -d @{body}
  .venv/bin/edgefleet-operator fleet --watch 2     # the live fleet view
  PATH=$PWD/.venv/bin:$PATH kubectl edgefleet rollout history camera-classifier -n {DEMO}  # the plugin
  kubectl annotate node {names[0]} kwok.x-k8s.io/node-  # {names[0]} goes NotReady: its work moves
State and logs under {state.dir}: logs/operator.log, logs/agents.log, agents/*/agent.log
Tear it down: make cluster-down""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
