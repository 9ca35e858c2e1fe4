"""The Helm chart installed on a cluster, and on the local control plane its operator run as a process.

`helm install` works here as anywhere: CRDs, ServiceAccounts, least-privilege RBAC, the agent
admission policy, the operator Deployment. The operator's Pod cannot run on the local control plane
(there is no container runtime; a kwok node would only pretend to run it), so `LOCAL_VALUES` pins it
to no node - it stays Pending, and `kubectl describe` says why - and `operator_env` +
`operator_kubeconfig` give a local `edgefleet-operator run` what that Pod would have had: the
Deployment's environment and a token of the chart's operator ServiceAccount, so the chart's RBAC is
what the operator runs with.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from e2e.agent_pods import token_kubeconfig

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "edgefleet"
RELEASE = "edgefleet"
NOWHERE_LABEL = ("edgefleet.io/e2e", "operator-runs-as-a-local-process")
"""A node label no node carries: the chart's operator Pod stays Pending with this in its reason."""
LOCAL_VALUES: dict[str, Any] = {"operator": {"nodeSelector": {NOWHERE_LABEL[0]: NOWHERE_LABEL[1]}}}
SHARED_NAMESPACE_VALUES: dict[str, Any] = {
    "agent": {"namespace": "", "nodeCache": {"hostPath": ""}},
    "namespace": {"create": False},
}
"""Agents in the release namespace (Pod Security "restricted", created before the install): their node
disk an emptyDir, as restricted requires (the chart's default gives them a privileged namespace of
their own for a hostPath node disk; kwok nodes have no disk anyway)."""
FAST_HEALTH_VALUES: dict[str, Any] = {
    "fleet": {"notReadyGraceSeconds": 2, "flapDampingSeconds": 30},
    "operator": {"reconcileDebounceSeconds": 0.2, "resyncIntervalSeconds": 1},
}
"""Health timings for tests and the demo: a NotReady node loses its work 2 s after the controller-manager
says so. The agent grace stays at the chart's 30 s: agents renew their Lease every 10 s."""
LOCAL_ONLY_ENV = ("EDGEFLEET_METRICS_PORT",)
"""Deployment variables that name Pod-network ports; a local process gets free ones instead."""

Helm = Callable[..., subprocess.CompletedProcess[str]]


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of values dicts; later layers win."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def fullname(release: str = RELEASE) -> str:
    """The chart's `edgefleet.fullname`: the release name if it holds the chart's, else release-edgefleet."""
    return (release if "edgefleet" in release else f"{release}-edgefleet")[:50].rstrip("-")


def operator_name(release: str = RELEASE) -> str:
    """Name of the operator's Deployment and ServiceAccount."""
    return f"{fullname(release)}-operator"


def write_values(values: Mapping[str, Any], path: Path) -> None:
    """A values file for helm, as JSON (which is YAML): every string stays quoted. PyYAML writes
    "430e5" bare, and helm's YAML reads that as a number (a random run id once made the schema
    refuse the fleet selector)."""
    path.write_text(json.dumps(dict(values), indent=1))


def install(
    helm: Helm, namespace: str, values: Mapping[str, Any], values_path: Path, release: str = RELEASE
) -> str:
    """`helm upgrade --install` of the chart into `namespace` (created); returns helm's notes."""
    write_values(values, values_path)
    out = helm(
        "upgrade",
        "--install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--create-namespace",
        "--values",
        str(values_path),
        "--wait=false",
    )
    return str(out.stdout)


def uninstall(helm: Helm, namespace: str, release: str = RELEASE) -> None:
    helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s")


def operator_env(deployment: Mapping[str, Any]) -> dict[str, str]:
    """The operator container's literal environment from the chart's Deployment (JSON), minus
    LOCAL_ONLY_ENV. Refuses variables from Secrets or fields: a local process cannot resolve them."""
    (container,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "operator"
    ]
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "valueFrom" in var:
            raise ValueError(f"operator env {var['name']} is not a literal value; cannot run it locally")
        if var["name"] not in LOCAL_ONLY_ENV:
            env[var["name"]] = str(var.get("value", ""))  # the API server drops an empty value
    return env


def operator_kubeconfig(
    core: Any, base: Path, namespace: str, path: Path, release: str = RELEASE, seconds: int = 24 * 3600
) -> Path:
    """A kubeconfig with a token of the chart's operator ServiceAccount (TokenRequest)."""
    token = core.create_namespaced_service_account_token(
        operator_name(release), namespace, {"spec": {"expirationSeconds": seconds}}
    )
    return token_kubeconfig(base, token.status.token, path)


def read_deployment(apps: Any, namespace: str, release: str = RELEASE) -> dict[str, Any]:
    obj = apps.read_namespaced_deployment(operator_name(release), namespace)
    return dict(apps.api_client.sanitize_for_serialization(obj))


# --- the examples, pointed at real example models -------------------------------------------------

EXAMPLES = REPO / "manifests" / "examples"


def make_example_models(root: Path) -> Path:
    """`edgefleet-agent make-examples root` (small TorchScript models, fixed seeds) unless done."""
    if not (root / "classifier" / "1" / "model.yaml").is_file():
        exe = Path(sys.executable).with_name("edgefleet-agent")
        subprocess.run([str(exe), "make-examples", str(root)], check=True, capture_output=True, text=True)
    return root


def example_models(root: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(model, version) -> (artifact file name, digest), from the model.yaml files under `root`."""
    out = {}
    for path in sorted(root.glob("*/*/model.yaml")):
        config = yaml.safe_load(path.read_text())
        out[(str(config["name"]), str(config["version"]))] = (str(config["artifact"]), str(config["digest"]))
    return out


def resolve_artifacts(
    doc: Mapping[str, Any], models: Mapping[tuple[str, str], tuple[str, str]], at: str
) -> dict[str, Any]:
    """A copy of an InferenceService whose artifacts are the example models: `file://<at>/<model>/
    <version>/<artifact>` with the digest the model was written with. The examples in manifests/
    carry placeholder digests; agents refuse an artifact whose digest does not match."""
    out = yaml.safe_load(yaml.safe_dump(dict(doc)))
    for model in out["spec"]["models"]:
        key = (str(model["name"]), str(model["version"]))
        if key not in models:
            raise ValueError(f"no example model {key[0]}:{key[1]} (have {sorted(models)})")
        artifact, digest = models[key]
        model["artifact"] = {"uri": f"file://{at}/{key[0]}/{key[1]}/{artifact}", "digest": digest}
    return out


def example(name: str) -> dict[str, Any]:
    """manifests/examples/<name>.yaml as a dict."""
    return dict(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text()))


CPU_CANARY_SLA = {"p95LatencyMs": 2000, "p99LatencyMs": 4000, "maxErrorRate": 0.05, "windowSeconds": 30}
"""An SLA for CPU agents on a shared machine: latency there is noise, so canaries are judged on errors
(the analysis' latency limits default to the SLA's)."""


def canary_example(
    models: Mapping[tuple[str, str], tuple[str, str]], at: str, version: str, interval_s: int
) -> dict[str, Any]:
    """The canary-rollout example at classifier `version`, its artifacts resolved, with a short analysis
    (`interval_s` per wave, 10 requests at least, failing above 5% errors) and `CPU_CANARY_SLA`.
    Judged by thresholds: the suite sends a few requests a second, and the sequential judge needs
    about 2,000 canary requests to pass a clean canary (its path is tested in
    tests/operator/test_rollout_operator.py with simulated agents' counters)."""
    doc = example("canary-rollout")
    doc["spec"]["models"][0]["version"] = version
    doc["spec"]["rollout"]["analysis"] = {
        "intervalSeconds": interval_s,
        "minSamples": 10,
        "failureLimit": 1,
        "maxErrorRate": 0.05,
        "judge": "Thresholds",
    }
    doc["spec"]["sla"] = dict(CPU_CANARY_SLA)
    return resolve_artifacts(doc, models, at)
