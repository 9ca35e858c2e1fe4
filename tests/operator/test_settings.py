"""Operator settings from the environment the Helm chart's Deployment sets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgefleet_operator.settings import AgentPodSettings, FleetSettings, from_env

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_without_environment() -> None:
    s = from_env({})
    assert s.fleet == FleetSettings() and s.agent == AgentPodSettings()


def test_the_agents_backoff_cap_is_read() -> None:
    """Not a chart value (yet): the agents' link backoff cap, which the agent Pods keep at its default."""
    assert from_env({}).fleet.agent_backoff_max_s == 30.0
    assert from_env({"EDGEFLEET_AGENT_BACKOFF_MAX_S": "16"}).fleet.agent_backoff_max_s == 16.0


def test_every_chart_variable_is_read() -> None:
    tolerations = [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}]
    env = {
        "EDGEFLEET_FLEET_SELECTOR": "edgefleet.io/fleet=a,tier",
        "EDGEFLEET_AGENT_GRACE_S": "12", "EDGEFLEET_NOT_READY_GRACE_S": "40",
        "EDGEFLEET_FLAP_DAMPING_S": "7.5", "EDGEFLEET_MEMORY_RESERVE_FRACTION": "0.2",
        "EDGEFLEET_DEBOUNCE_S": "0.25", "EDGEFLEET_RESYNC_S": "30", "EDGEFLEET_METRICS_PORT": "9090",
        "EDGEFLEET_AGENT_NAMESPACE": "fleet", "EDGEFLEET_AGENT_IMAGE": "registry.local/agent:1",
        "EDGEFLEET_GPU_RESOURCE": "nvidia.com/gpu.shared", "EDGEFLEET_AGENT_RUNTIME_CLASS": "nvidia",
        "EDGEFLEET_AGENT_TOLERATIONS": json.dumps(tolerations),
        "EDGEFLEET_AGENT_CPU_REQUEST": "500m", "EDGEFLEET_AGENT_MEMORY_REQUEST": "1Gi",
        "EDGEFLEET_AGENT_MEMORY_LIMIT": "6Gi", "EDGEFLEET_AGENT_THERMAL_SOFT_LIMIT_C": "70",
        "EDGEFLEET_AGENT_THERMAL_SOFT_MARGIN_C": "5", "EDGEFLEET_AGENT_WORKERS": "2",
        "EDGEFLEET_AGENT_URGENT_WORKERS": "0", "EDGEFLEET_AGENT_HOST_PATH": "/data/edgefleet",
        "EDGEFLEET_AGENT_CACHE_BUDGET": "40Gi", "EDGEFLEET_AGENT_UNREACHABLE_TOLERATION_S": "7200",
        "EDGEFLEET_AGENTS_EXTERNAL": "true", "EDGEFLEET_AGENT_DOWNLOAD_BANDWIDTH": "5Mi",
        "EDGEFLEET_AGENT_GRPC_PORT": "8001", "EDGEFLEET_AGENT_LEASE_RENEW_S": "4",
        "EDGEFLEET_AGENT_BACKOFF_MAX_S": "16", "EDGEFLEET_RECONNECT_WAIT_MAX_S": "600",
        "EDGEFLEET_LEASE_DURATION_S": "20", "EDGEFLEET_LEASE_RENEW_S": "4", "EDGEFLEET_LEASE_MARGIN_S": "2.5",
        "EDGEFLEET_LEASE_NAMESPACE": "ops", "EDGEFLEET_SITE_SHARDS": "8",
    }  # fmt: skip
    s = from_env(env)
    o = s.ownership
    assert (o.lease_duration_s, o.renew_interval_s, o.margin_s, s.lease_namespace) == (20, 4, 2.5, "ops")
    assert o.site_shards == 8
    assert s.fleet.node_selector == {"edgefleet.io/fleet": "a", "tier": "true"}
    assert (s.fleet.agent_grace_s, s.fleet.not_ready_grace_s, s.fleet.flap_damping_s) == (12, 40, 7.5)
    assert s.fleet.agent_backoff_max_s == 16 and s.fleet.reconnect_wait_max_s == 600
    assert s.fleet.memory_reserve_fraction == 0.2
    assert (s.reconcile_debounce_s, s.resync_interval_s, s.metrics_port) == (0.25, 30, 9090)
    a = s.agent
    assert (a.namespace, a.image, a.gpu_resource, a.runtime_class) == (
        "fleet", "registry.local/agent:1", "nvidia.com/gpu.shared", "nvidia"
    )  # fmt: skip
    assert a.tolerations == tuple(tolerations)
    assert (a.cpu_request, a.memory_request, a.memory_limit) == ("500m", "1Gi", "6Gi")
    assert (a.thermal_soft_limit_c, a.thermal_soft_margin_c) == (70.0, 5.0)
    assert (a.workers, a.urgent_workers) == (2, 0)
    assert (a.host_path, a.cache_budget, a.unreachable_toleration_s, a.external) == (
        "/data/edgefleet", "40Gi", 7200, True
    )  # fmt: skip
    assert (a.download_bandwidth, a.grpc_port, a.lease_renew_s) == ("5Mi", 8001, 4)
    # and these are exactly the variables the chart's operator Deployment sets
    template = (ROOT / "helm/edgefleet/templates/deployment.yaml").read_text()
    assert set(re.findall(r"name: (EDGEFLEET_[A-Z_0-9]+)", template)) == set(env)


def test_the_agent_grace_spans_three_lease_renewals() -> None:
    """Issue 22: agents renew at an interval the chart scales with the fleet; the grace must hold
    three of them (one lost renewal never moves work)."""
    assert from_env({}).fleet.agent_grace_s == 45 and from_env({}).agent.lease_renew_s is None
    s = from_env({"EDGEFLEET_AGENT_LEASE_RENEW_S": "40", "EDGEFLEET_AGENT_GRACE_S": "120"})
    assert s.agent.lease_renew_s == 40
    with pytest.raises(ValueError, match="LEASE_RENEW_S"):
        from_env({"EDGEFLEET_AGENT_LEASE_RENEW_S": "40"})  # the default grace, 45 s, spans one
    with pytest.raises(ValueError, match="LEASE_RENEW_S"):
        from_env({"EDGEFLEET_AGENT_LEASE_RENEW_S": "0"})


def test_leases_live_in_the_agent_namespace_unless_told_and_backoff_defaults() -> None:
    s = from_env({"EDGEFLEET_AGENT_NAMESPACE": "fleet"})
    assert s.lease_namespace == "fleet"
    assert (s.ownership.lease_duration_s, s.ownership.renew_interval_s) == (15, 5)
    assert (s.api_backoff_base_s, s.api_backoff_cap_s) == (1, 30)
    s = from_env({"EDGEFLEET_API_BACKOFF_BASE_S": "0.5", "EDGEFLEET_API_BACKOFF_CAP_S": "10"})
    assert (s.api_backoff_base_s, s.api_backoff_cap_s) == (0.5, 10)


def test_empty_values_keep_defaults() -> None:
    s = from_env({"EDGEFLEET_AGENT_RUNTIME_CLASS": "", "EDGEFLEET_AGENT_THERMAL_SOFT_LIMIT_C": "",
                  "EDGEFLEET_AGENT_TOLERATIONS": ""})  # fmt: skip
    assert s.agent.runtime_class is None and s.agent.thermal_soft_limit_c is None
    assert s.agent.tolerations == AgentPodSettings.tolerations


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDGEFLEET_AGENT_GRACE_S": "soon"}, "EDGEFLEET_AGENT_GRACE_S must be a number, got 'soon'"),
        ({"EDGEFLEET_METRICS_PORT": "80.5"}, "EDGEFLEET_METRICS_PORT must be an integer"),
        ({"EDGEFLEET_MEMORY_RESERVE_FRACTION": "1.5"}, r"MEMORY_RESERVE_FRACTION must be in \[0, 1\)"),
        ({"EDGEFLEET_AGENT_TOLERATIONS": "[{"}, "EDGEFLEET_AGENT_TOLERATIONS is not JSON"),
        ({"EDGEFLEET_AGENT_TOLERATIONS": '{"key": "x"}'}, "must be a JSON list of toleration objects"),
        ({"EDGEFLEET_NOT_READY_GRACE_S": "-1"}, "not-ready grace must be >= 0"),
        ({"EDGEFLEET_AGENT_BACKOFF_MAX_S": "-1"}, "agent backoff max must be >= 0"),
        ({"EDGEFLEET_AGENT_WORKERS": "0"}, "EDGEFLEET_AGENT_WORKERS must be >= 1"),
        ({"EDGEFLEET_AGENT_URGENT_WORKERS": "two"}, "EDGEFLEET_AGENT_URGENT_WORKERS must be an integer"),
        ({"EDGEFLEET_LEASE_RENEW_S": "15"}, "renew interval"),
        ({"EDGEFLEET_API_BACKOFF_BASE_S": "60"}, "0 < base <= cap"),
    ],
)
def test_malformed_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_env(env)


def test_chart_agent_settings_reach_the_agent_pod_and_the_agent_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgefleet_operator.manifests import agent_pod
    from node_agent.cli import build_parser

    env = {
        "EDGEFLEET_GPU_RESOURCE": "nvidia.com/gpu.shared", "EDGEFLEET_AGENT_RUNTIME_CLASS": "nvidia",
        "EDGEFLEET_AGENT_CPU_REQUEST": "500m", "EDGEFLEET_AGENT_MEMORY_LIMIT": "6Gi",
        "EDGEFLEET_AGENT_THERMAL_SOFT_LIMIT_C": "70", "EDGEFLEET_AGENT_THERMAL_SOFT_MARGIN_C": "5",
        "EDGEFLEET_AGENT_TOLERATIONS": '[{"key": "edge", "operator": "Exists"}]',
        "EDGEFLEET_AGENT_WORKERS": "3", "EDGEFLEET_AGENT_URGENT_WORKERS": "0",
    }  # fmt: skip
    en = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeNode", "metadata": {"name": "n1", "uid": "u1"},
          "spec": {"nodeName": "n1"}}  # fmt: skip
    pod = agent_pod(en, from_env(env).agent)
    spec = pod["spec"]
    container = spec["containers"][0]
    assert spec["runtimeClassName"] == "nvidia"
    # the chart's tolerations, then an unreachable or not-ready node keeps its agent for good
    assert spec["tolerations"] == [
        {"key": "edge", "operator": "Exists"},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    ]
    assert container["resources"]["limits"] == {"memory": "6Gi", "nvidia.com/gpu.shared": "1"}
    assert container["resources"]["requests"]["cpu"] == "500m"
    pod_env = {e["name"]: e.get("value") for e in container["env"]}
    assert pod_env["EDGEFLEET_THERMAL_SOFT_LIMIT_C"] == "70"
    assert pod_env["EDGEFLEET_THERMAL_SOFT_MARGIN_C"] == "5"
    assert (pod_env["EDGEFLEET_WORKERS"], pod_env["EDGEFLEET_URGENT_WORKERS"]) == ("3", "0")
    for name in ("EDGEFLEET_THERMAL_SOFT_LIMIT_C", "EDGEFLEET_THERMAL_SOFT_MARGIN_C", "EDGEFLEET_WORKERS",
                 "EDGEFLEET_URGENT_WORKERS"):  # fmt: skip
        monkeypatch.setenv(name, str(pod_env[name]))
    args = build_parser().parse_args([*container["args"]])
    assert (args.thermal_soft_limit, args.thermal_soft_margin) == (70.0, 5.0)
    assert (args.workers, args.urgent_workers) == (3, 0)
    assert "runtimeClassName" not in agent_pod(en, from_env({}).agent)["spec"]
    # a slow first start (torch import, first load) is the startup probe's, not a liveness restart
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/live"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("EDGEFLEET_WORKERS", "2.5", r"\$EDGEFLEET_WORKERS is not an integer: '2.5'"),
        ("EDGEFLEET_URGENT_WORKERS", "one", r"\$EDGEFLEET_URGENT_WORKERS is not an integer"),
        ("EDGEFLEET_THERMAL_SOFT_LIMIT_C", "hot", r"\$EDGEFLEET_THERMAL_SOFT_LIMIT_C is not a number"),
    ],
)
def test_the_agent_names_a_malformed_setting_from_its_pod_environment(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    from node_agent.cli import build_parser

    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=message):
        build_parser()


def test_agent_pods_keep_their_node_disk_and_tolerate_an_unreachable_node_as_the_chart_says() -> None:
    """The node disk (model repository, node cache, persisted assignment) is a hostPath per agent,
    made the agent user's by a root init container that may only chown; the tolerations of an
    unreachable or not-ready node are bounded only when the chart says; an empty host path (or an
    unknown unit) falls back to the emptyDir, and a relative one is refused."""
    from edgefleet_operator.manifests import agent_pod
    from node_agent.cli import build_parser

    en = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeNode", "metadata": {"name": "n1", "uid": "u1"},
          "spec": {"nodeName": "n1"}}  # fmt: skip
    spec = agent_pod(en, from_env({}).agent)["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"]["hostPath"] == {
        "path": "/var/lib/edgefleet/edgefleet-agent-n1",
        "type": "DirectoryOrCreate",
    }
    (init,) = spec["initContainers"]
    assert init["command"] == ["chown", "65532:65532", "/var/lib/edgefleet"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["volumeMounts"] == [{"name": "models", "mountPath": "/var/lib/edgefleet"}]
    container = spec["containers"][0]
    assert {"name": "models", "mountPath": "/var/lib/edgefleet"} in container["volumeMounts"]
    args = build_parser().parse_args(container["args"])
    assert args.model_repository == Path("/var/lib/edgefleet/models") and args.cache_budget == "10Gi"
    unbounded = [t for t in spec["tolerations"] if t["key"].startswith("node.kubernetes.io/")]
    assert len(unbounded) == 2 and all("tolerationSeconds" not in t for t in unbounded)

    env = {"EDGEFLEET_AGENT_UNREACHABLE_TOLERATION_S": "3600", "EDGEFLEET_AGENT_HOST_PATH": "/data/ef",
           "EDGEFLEET_AGENT_CACHE_BUDGET": "50Gi"}  # fmt: skip
    spec = agent_pod(en, from_env(env).agent)["spec"]
    bounded = [t for t in spec["tolerations"] if t["key"].startswith("node.kubernetes.io/")]
    assert [t["tolerationSeconds"] for t in bounded] == [3600, 3600]
    assert spec["volumes"][0]["hostPath"]["path"] == "/data/ef/edgefleet-agent-n1"
    assert "50Gi" in spec["containers"][0]["args"]

    spec = agent_pod(en, from_env({"EDGEFLEET_AGENT_HOST_PATH": ""}).agent)["spec"]
    assert spec["volumes"][0] == {"name": "models", "emptyDir": {}} and "initContainers" not in spec
    with pytest.raises(ValueError, match="absolute"):
        from_env({"EDGEFLEET_AGENT_HOST_PATH": "var/lib"})
    with pytest.raises(ValueError, match="TOLERATION"):
        from_env({"EDGEFLEET_AGENT_UNREACHABLE_TOLERATION_S": "-1"})
