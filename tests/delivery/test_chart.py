"""The Helm chart and the install bundle against the real local control plane: lint, a server-side
dry run, the values schema, RBAC without wildcards, and a real `helm install` / `helm uninstall`
in which the agent admission policy is exercised with a token bound to an agent Pod."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import cluster as localcluster
from e2e import fleet
from e2e.release import write_values
from e2e.waiting import eventually
from edgefleet_api import names
from edgefleet_operator import manifests
from edgefleet_operator.settings import AgentPodSettings

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "edgefleet"
KUBE_VERSION = "1.30.0"
RBAC_KINDS = {"ClusterRole", "Role"}


class Helm:
    def __init__(self, state: localcluster.ClusterState) -> None:
        self.state = state

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [f"{self.state.bin_dir}/helm", f"--kubeconfig={self.state.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=180,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
        return out

    def template(self, *args: str, namespace: str = "edgefleet-system") -> list[dict[str, Any]]:
        text = self(
            "template",
            "edgefleet",
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            KUBE_VERSION,
            *args,
        ).stdout
        return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def helm(control_plane: localcluster.ClusterState) -> Helm:
    return Helm(control_plane)


def kubectl(
    state: localcluster.ClusterState, *args: str, check: bool = True, input_: str | None = None
) -> subprocess.CompletedProcess[str]:
    return localcluster.kubectl(state, *args, check=check, input_=input_)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, over all rules of a Role or ClusterRole."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


# --- static: lint, schema, rendering ---------------------------------------------------------


def test_helm_lint_strict(helm: Helm) -> None:
    out = helm("lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART))
    assert "0 chart(s) failed" in out.stdout


def test_lint_with_every_option_on(helm: Helm) -> None:
    helm(
        "lint",
        "--strict",
        "--kube-version",
        KUBE_VERSION,
        str(CHART),
        "--set",
        "namespace.create=true,serviceMonitor.enabled=true,grafanaDashboard.enabled=true,"
        "podMonitor.enabled=true,prometheusRule.enabled=true,"
        "operator.verbose=true,agent.thermal.softLimitC=70",
    )


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("operator.replicas=0", "replicas"),
        ("operator.leaseDurationSeconds=1", "leaseDurationSeconds"),
        ("fleet.memoryReserveFraction=1.5", "memoryReserveFraction"),
        ("fleet.agentGraceSeconds=-1", "agentGraceSeconds"),
        ("agent.gpuResource=not a resource", "gpuResource"),
        ("operator.image.pullPolicy=Sometimes", "pullPolicy"),
        ("namespace.podSecurity=lax", "podSecurity"),
        ("agent.nodeCache.hostPath=var/lib", "hostPath"),
        ("agent.unreachableTolerationSeconds=-1", "unreachableTolerationSeconds"),
    ],
)
def test_schema_rejects_bad_values(helm: Helm, setting: str, complaint: str) -> None:
    out = helm(
        "template", "edgefleet", str(CHART), "--kube-version", KUBE_VERSION, "--set", setting, check=False
    )
    assert out.returncode != 0, f"--set {setting} was accepted"
    assert "values don't meet the specifications of the schema" in out.stderr
    assert complaint in out.stderr


def test_deployment_is_two_rolling_restricted_replicas(helm: Helm) -> None:
    docs = helm.template("--set", "fleet.selector.site=berlin,agent.thermal.softLimitC=72")
    dep = one(docs, "Deployment")
    # Two replicas share the fleet by Leases (one writes, one stands by), so they may roll.
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = dep["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = dep["spec"]["selector"]["matchLabels"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    # A standby replica is Ready (the same probe: it passes without holding anything).
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {"name": "healthz", "containerPort": 8081} in container["ports"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["EDGEFLEET_LEASE_NAMESPACE"] == "edgefleet-system", "the operator's Leases in its own"
    assert (env["EDGEFLEET_LEASE_DURATION_S"], env["EDGEFLEET_LEASE_RENEW_S"]) == ("15", "5")
    # The variables operator/settings.py reads, with the values' meaning.
    assert set(env["EDGEFLEET_FLEET_SELECTOR"].split(",")) == {"edgefleet.io/fleet=true", "site=berlin"}
    assert env["EDGEFLEET_AGENT_NAMESPACE"] == "edgefleet-agents"  # their own: privileged (hostPath)
    assert env["EDGEFLEET_AGENT_IMAGE"] == "ghcr.io/edgefleet/agent:0.1.0"
    assert env["EDGEFLEET_AGENT_THERMAL_SOFT_LIMIT_C"] == "72"
    assert json.loads(env["EDGEFLEET_AGENT_TOLERATIONS"])[0]["key"] == "node-role.kubernetes.io/edge"
    for name in (
        "EDGEFLEET_AGENT_GRACE_S",
        "EDGEFLEET_NOT_READY_GRACE_S",
        "EDGEFLEET_FLAP_DAMPING_S",
        "EDGEFLEET_DEBOUNCE_S",
        "EDGEFLEET_RESYNC_S",
        "EDGEFLEET_MEMORY_RESERVE_FRACTION",
        "EDGEFLEET_LEASE_MARGIN_S",
    ):
        float(env[name])
    assert container["image"] == "ghcr.io/edgefleet/operator:0.1.0"


def test_values_written_by_the_harness_keep_number_like_strings(helm: Helm, tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    write_values({"fleet": {"selector": {"edgefleet.io/e2e-fleet": "430e5"}}}, path)
    pod = one(helm.template("--values", str(path)), "Deployment")["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert "edgefleet.io/e2e-fleet=430e5" in env["EDGEFLEET_FLEET_SELECTOR"].split(",")


def test_replicas_coordinate_by_leases_not_kopf_peering(helm: Helm) -> None:
    # Every replica runs kopf standalone (its handlers stay live: sharding needs them); the Leases in
    # the release namespace decide who writes. An old values file's peering.create still installs.
    for docs in (helm.template(), helm.template("--set", "peering.create=true")):
        assert not by_kind(docs, "ClusterKopfPeering")
        args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert not [a for a in args if "peering" in a]
    docs = helm.template(namespace="ops")
    leases = one(docs, "Role", "-leases")
    assert leases["metadata"]["namespace"] == "ops"
    assert grants(leases) == {
        ("coordination.k8s.io", "leases"): {"get", "list", "watch", "create", "update", "delete"}
    }
    binding = one(docs, "RoleBinding", "-leases")
    assert binding["roleRef"]["name"] == leases["metadata"]["name"]
    assert binding["subjects"][0]["namespace"] == "ops"
    assert ("kopf.dev", "clusterkopfpeerings") not in grants(one(docs, "ClusterRole", "-operator"))


def test_a_disruption_budget_keeps_one_replica_and_none_for_a_single_one(helm: Helm) -> None:
    docs = helm.template()
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    )
    # With one replica a PDB of minAvailable 1 would block every node drain.
    assert not by_kind(helm.template("--set", "operator.replicas=1"), "PodDisruptionBudget")
    assert not by_kind(
        helm.template("--set", "operator.podDisruptionBudget.enabled=false"), "PodDisruptionBudget"
    )


def test_optional_monitoring_objects(helm: Helm) -> None:
    assert not by_kind(helm.template(), "ServiceMonitor")
    assert not by_kind(helm.template(), "ConfigMap")
    docs = helm.template("--set", "serviceMonitor.enabled=true,grafanaDashboard.enabled=true")
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service", "-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    dashboard = json.loads(one(docs, "ConfigMap")["data"]["edgefleet.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    assert "edgefleet_operator_fleet_nodes" in exprs and "edgefleet_gpu_temperature_celsius" in exprs
    # The agents: a PodMonitor selecting the Pods the operator creates, each series labelled with its node.
    assert not by_kind(helm.template(), "PodMonitor") and not by_kind(helm.template(), "PrometheusRule")
    docs = helm.template("--set", "podMonitor.enabled=true,prometheusRule.enabled=true,prometheusRule.for=2m")
    pods = one(docs, "PodMonitor")["spec"]
    env = {
        e["name"]: e.get("value")
        for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    pod = manifests.agent_pod(
        {
            "apiVersion": "edgefleet.io/v1alpha1",
            "kind": "EdgeNode",
            "metadata": {"name": "n1", "uid": "u"},
            "spec": {"nodeName": "n1"},
        },
        AgentPodSettings(namespace=env["EDGEFLEET_AGENT_NAMESPACE"]),
    )
    assert pods["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pods["namespaceSelector"]["matchNames"] == [pod["metadata"]["namespace"]]
    endpoint = pods["podMetricsEndpoints"][0]
    assert endpoint["port"] == pod["spec"]["containers"][0]["ports"][0]["name"]
    assert endpoint["relabelings"][0]["targetLabel"] == "node"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    rules = one(docs, "PrometheusRule")["spec"]["groups"]
    alerts = {r["alert"]: r for g in rules for r in g["rules"] if "alert" in r}
    assert set(alerts) == {"EdgefleetSLABreach", "EdgefleetThermalThrottling", "EdgefleetRolledBack",
                           "EdgefleetAgentSilent"}  # fmt: skip
    assert alerts["EdgefleetSLABreach"]["for"] == "2m"
    assert "{{ $labels.node }}" in alerts["EdgefleetSLABreach"]["annotations"]["summary"]


def test_the_agents_namespace_is_their_own_and_privileged_for_their_node_disk(helm: Helm) -> None:
    """The agents' node disk is a hostPath, which Pod Security "baseline" and "restricted" forbid: their
    namespace (not the operator's, the release namespace) is "privileged"; with the node disk off
    (an emptyDir) and create false, the chart renders no Namespace, as before."""
    docs = helm.template()
    ns = one(docs, "Namespace")
    assert ns["metadata"]["name"] == "edgefleet-agents"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    env = {
        e["name"]: e.get("value")
        for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert (
        env["EDGEFLEET_AGENT_NAMESPACE"] == "edgefleet-agents"
        and env["EDGEFLEET_LEASE_NAMESPACE"] == "edgefleet-system"
    )
    assert (
        env["EDGEFLEET_AGENT_HOST_PATH"] == "/var/lib/edgefleet"
        and env["EDGEFLEET_AGENTS_EXTERNAL"] == "false"
    )
    assert "EDGEFLEET_AGENT_UNREACHABLE_TOLERATION_S" not in env  # unbounded by default
    docs = helm.template(
        "--set", "agent.unreachableTolerationSeconds=600,agent.external=true,agent.nodeCache.budget=50Gi"
    )
    env = {
        e["name"]: e.get("value")
        for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert (
        env["EDGEFLEET_AGENT_UNREACHABLE_TOLERATION_S"] == "600"
        and env["EDGEFLEET_AGENTS_EXTERNAL"] == "true"
    )
    assert env["EDGEFLEET_AGENT_CACHE_BUDGET"] == "50Gi"
    assert not by_kind(helm.template("--set", "namespace.create=false"), "Namespace")


def test_rbac_has_no_wildcards_and_least_privilege(helm: Helm) -> None:
    docs = helm.template("--set", "namespace.create=true,serviceMonitor.enabled=true")
    roles = [d for d in docs if d["kind"] in RBAC_KINDS]
    assert len(roles) == 5
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in rule.get(key, []), f"{role['metadata']['name']}: wildcard in {key}"
            assert set(rule) <= {"apiGroups", "resources", "verbs"}
            assert rule["verbs"] and rule["resources"]
        assert ("", "secrets") not in grants(role), "no Secret access"
    agent_cluster = grants(one(docs, "ClusterRole", "-agent"))
    assert agent_cluster == {
        ("edgefleet.io", "edgenodes"): {"get", "list", "watch"},
        ("edgefleet.io", "edgenodes/status"): {"get", "patch"},
    }
    agent_ns = one(docs, "Role", "-agent")
    assert agent_ns["metadata"]["namespace"] == "edgefleet-agents"
    assert grants(agent_ns) == {("coordination.k8s.io", "leases"): {"get", "create", "patch"}}
    operator_cluster = grants(one(docs, "ClusterRole", "-operator"))
    assert ("", "pods") not in operator_cluster, "agent Pods are read and written in the agent namespace only"
    assert operator_cluster[("", "services")] == {"list", "watch", "create", "patch"}
    assert operator_cluster[("", "nodes")] == {"get", "list", "watch"}
    assert operator_cluster[("edgefleet.io", "inferenceservices")] == {"get", "list", "watch", "patch"}
    assert "delete" not in operator_cluster[("edgefleet.io", "inferenceservices")]
    assert ("coordination.k8s.io", "leases") not in operator_cluster
    operator_ns = grants(one(docs, "Role", "-operator"))
    assert operator_ns[("", "pods")] >= {"create", "delete"}
    assert operator_ns[("coordination.k8s.io", "leases")] == {"get", "list", "watch"}


def test_install_bundle_is_in_sync(control_plane: localcluster.ClusterState) -> None:
    env = {**os.environ, "PATH": f"{control_plane.bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(
        [str(REPO / "scripts" / "render-install.sh"), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, f"manifests/install.yaml is stale:\n{out.stdout[-3000:]}{out.stderr}"
    docs = [d for d in yaml.safe_load_all((REPO / "manifests" / "install.yaml").read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds.count("CustomResourceDefinition") == 2
    assert kinds.index("Namespace") < kinds.index("ServiceAccount") < kinds.index("Deployment")
    for role in (d for d in docs if d["kind"] in RBAC_KINDS):
        assert all("*" not in rule[k] for rule in role["rules"] for k in ("apiGroups", "resources", "verbs"))


# --- against the API server ------------------------------------------------------------------


def test_rendered_chart_passes_server_side_dry_run(
    helm: Helm, control_plane: localcluster.ClusterState, namespace: str
) -> None:
    text = helm(
        "template",
        "edgefleet",
        str(CHART),
        "--namespace",
        namespace,
        "--include-crds",
        "--kube-version",
        KUBE_VERSION,
        "--set",
        f"agent.namespace={namespace}",
    ).stdout
    out = kubectl(control_plane, "apply", "--dry-run=server", "-f", "-", input_=text)
    for kind in (
        "deployment.apps/edgefleet-operator",
        "clusterrole.rbac.authorization.k8s.io/edgefleet-agent",
        "validatingadmissionpolicy.admissionregistration.k8s.io/edgefleet-agent-own-node",
        "role.rbac.authorization.k8s.io/edgefleet-operator",
    ):
        assert kind in out.stdout
    assert out.stdout.count("(server dry run)") == len([d for d in yaml.safe_load_all(text) if d])


@pytest.fixture
def release(helm: Helm, control_plane: localcluster.ClusterState, namespace: str) -> Iterator[dict[str, str]]:
    """A fresh release in a fresh namespace; its agents get a namespace of their own from the chart."""
    name = f"ef{uuid.uuid4().hex[:6]}"
    agent_ns = f"{namespace[:50]}-agents"
    # Enforce "restricted" on the release namespace too: the operator Pod must pass it.
    kubectl(control_plane, "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    settings = f"agent.namespace={agent_ns},namespace.create=true"
    info = {"name": name, "namespace": namespace, "agent_ns": agent_ns, "fullname": f"{name}-edgefleet"}
    try:
        helm("install", name, str(CHART), "--namespace", namespace, "--set", settings, "--wait=false")
        yield info
    finally:
        helm("uninstall", name, "--namespace", namespace, "--wait", "--timeout", "60s", check=False)


def agent_kubeconfig(state: localcluster.ClusterState, token: str, tmp_path: Path) -> Path:
    """The admin kubeconfig with its user replaced by a bearer token."""
    config = yaml.safe_load(state.kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    path = tmp_path / "agent.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def test_helm_install_and_uninstall(
    helm: Helm, control_plane: localcluster.ClusterState, kube: Any, release: dict[str, str], tmp_path: Path
) -> None:
    from kubernetes import client

    ns, agent_ns, full = release["namespace"], release["agent_ns"], release["fullname"]
    op = f"{full}-operator"
    st = control_plane
    status = json.loads(helm("status", release["name"], "-n", ns, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"

    # What the chart created.
    kubectl(st, "-n", ns, "get", f"deployment/{op}", f"serviceaccount/{op}", f"service/{op}-metrics")
    kubectl(
        st,
        "-n",
        agent_ns,
        "get",
        "serviceaccount/edgefleet-agent",
        f"role/{op}",
        f"role/{full}-agent",
        f"rolebinding/{op}",
        f"rolebinding/{full}-agent",
    )
    kubectl(
        st,
        "get",
        f"clusterrole/{op}",
        f"clusterrole/{full}-agent",
        f"clusterrolebinding/{op}",
        f"clusterrolebinding/{full}-agent",
    )
    kubectl(
        st,
        "get",
        f"validatingadmissionpolicy/{full}-agent-own-node",
        f"validatingadmissionpolicybinding/{full}-agent-own-node",
    )
    labels = json.loads(kubectl(st, "get", "namespace", agent_ns, "-o", "json").stdout)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"  # the agents' hostPath node disk
    kubectl(st, "-n", ns, "get", f"role/{op}-leases", f"rolebinding/{op}-leases", f"poddisruptionbudget/{op}")
    # The operator Pod passes Pod Security "restricted" (the ReplicaSet could create it).
    eventually(
        lambda: kubectl(
            st, "-n", ns, "get", "pods", "-l", "app.kubernetes.io/name=edgefleet-operator", "-o", "name"
        ).stdout.strip(),
        what="the operator Pod to be admitted under restricted Pod Security",
    )

    # The admission policy: an agent Pod on node A, with a token bound to it, may write EdgeNode A
    # and Lease edgefleet-agent-A, and nothing of node B.
    core = client.CoreV1Api(kube)
    custom = client.CustomObjectsApi(kube)
    prefix = f"vap{uuid.uuid4().hex[:5]}"
    node_a, node_b = fleet.create_nodes(core, 2, device_class="edge-server", prefix=prefix)
    try:
        edge_nodes = {}
        for node in (node_a, node_b):
            try:
                edge_nodes[node] = custom.create_cluster_custom_object(
                    names.GROUP,
                    names.VERSION,
                    names.EDGE_NODE_PLURAL,
                    manifests.edge_node(core.api_client.sanitize_for_serialization(core.read_node(node))),
                )
            except client.exceptions.ApiException as e:
                if e.status != 409:
                    raise
                edge_nodes[node] = custom.get_cluster_custom_object(
                    names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, node
                )
        # The operator's own agent Pod spec (its node disk a hostPath), in the chart's agent namespace;
        # the operator's namespace ("restricted") refuses it.
        pod = manifests.agent_pod(edge_nodes[node_a], AgentPodSettings(namespace=agent_ns))
        spec = {k: v for k, v in pod["spec"].items() if k != "serviceAccountName"}  # none there
        elsewhere = {
            **pod,
            "metadata": {**pod["metadata"], "namespace": ns, "ownerReferences": []},
            "spec": spec,
        }
        refused = kubectl(
            st, "-n", ns, "create", "--dry-run=server", "-f", "-", input_=json.dumps(elsewhere), check=False
        )
        assert refused.returncode != 0 and "hostPath" in refused.stderr, refused.stderr
        core.create_namespaced_pod(agent_ns, pod)
        pod_name = pod["metadata"]["name"]
        eventually(
            lambda: core.read_namespaced_pod(pod_name, agent_ns).spec.node_name == node_a,
            what="the agent Pod to be bound to its node",
        )
        token = kubectl(
            st,
            "-n",
            agent_ns,
            "create",
            "token",
            "edgefleet-agent",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            pod_name,
            "--duration",
            "10m",
        ).stdout.strip()
        as_agent = agent_kubeconfig(st, token, tmp_path)

        def agent(*args: str, input_: str | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [f"{st.bin_dir}/kubectl", f"--kubeconfig={as_agent}", *args],
                capture_output=True,
                text=True,
                input=input_,
                timeout=60,
            )

        def patch_status(node: str) -> subprocess.CompletedProcess[str]:
            return agent(
                "patch",
                "edgenode",
                node,
                "--subresource=status",
                "--type=merge",
                "-p",
                json.dumps({"status": {"agentVersion": "policy-test"}}),
            )

        def create_lease(name: str) -> subprocess.CompletedProcess[str]:
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": agent_ns},
                "spec": {"holderIdentity": node_a, "leaseDurationSeconds": 30},
            }
            return agent("create", "-f", "-", input_=json.dumps(lease))

        own = patch_status(node_a)
        assert own.returncode == 0, own.stderr
        # A policy and binding just installed take effect at the apiserver's next policy refresh
        # (about a second; Kubernetes' own integration tests poll for it too): the first writes
        # may still pass, so poll until the other node's is denied (a broken policy never is).
        other = eventually(
            lambda: (r := patch_status(node_b)).returncode != 0 and r,
            timeout_s=30,
            what="the admission policy to deny a write to another node's EdgeNode",
        )
        assert f"may write only EdgeNode {node_a}, not {node_b}" in other.stderr
        own_lease = create_lease(names.agent_name(node_a))
        assert own_lease.returncode == 0, own_lease.stderr
        other_lease = create_lease(names.agent_name(node_b))
        assert other_lease.returncode != 0
        assert f"may write only Lease {names.agent_name(node_a)}" in other_lease.stderr
        # RBAC: the agent reads EdgeNodes but cannot change their spec or touch Pods.
        assert agent("auth", "can-i", "patch", "edgenodes").stdout.strip() == "no"
        assert agent("auth", "can-i", "create", "pods", "-n", agent_ns).stdout.strip() == "no"
        assert agent("get", "edgenode", node_a).returncode == 0
        core.delete_namespaced_pod(pod_name, agent_ns, grace_period_seconds=0)
    finally:
        for node in (node_a, node_b):
            custom.delete_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, node)
        fleet.delete_nodes(core, [node_a, node_b])

    # Uninstall removes everything the chart made (the CRDs stay, as Helm keeps them).
    helm("uninstall", release["name"], "--namespace", ns, "--wait", "--timeout", "60s")
    for args in (
        ("-n", ns, "get", "deployment", op),
        ("get", "clusterrole", op),
        ("get", "clusterrole", f"{full}-agent"),
        ("get", "validatingadmissionpolicy", f"{full}-agent-own-node"),
    ):
        out = kubectl(st, *args, check=False)
        assert out.returncode != 0 and "NotFound" in out.stderr, args
    gone = kubectl(st, "get", "namespace", agent_ns, "-o", "json", check=False)
    assert gone.returncode != 0 or json.loads(gone.stdout)["metadata"].get("deletionTimestamp")
    kubectl(st, "get", "crd", "inferenceservices.edgefleet.io")
