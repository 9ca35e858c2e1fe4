"""Edge autonomy on the operator's side (issue 18), pure: a node whose Node object's Ready flaps
while its agent heartbeats keeps its work, and its agent Pod tolerates the taints the node
lifecycle controller puts on such a node, so neither the operator nor Kubernetes takes the agent
(and its node cache) away."""

from __future__ import annotations

from edgefleet_operator.fleet_types import Health
from edgefleet_operator.health import HealthTracker, NodeSignals
from edgefleet_operator.manifests import NODE_TAINTS, agent_pod
from edgefleet_operator.settings import AgentPodSettings, FleetSettings

NOW = 1_000_000.0


def test_a_flapping_ready_flag_with_a_heartbeating_agent_never_moves_the_work() -> None:
    """Ready goes False for just under the grace and back, again and again, while the agent renews
    its Lease every 10 s: the node is Suspect at worst, never NotReady, never loses its work (so no
    flap damping either), and is Healthy whenever Ready is back."""
    settings = FleetSettings()
    tracker = HealthTracker(settings)
    seen = set()
    t = NOW
    ready, since = True, NOW - 3600.0
    for _ in range(40):  # 40 flaps, a pass every 5 s
        for step in range(int(settings.not_ready_grace_s // 5)):
            now = t + 5.0 * step
            renew = now - (now % 10.0)  # the agent's last renewal: at most 10 s ago
            health = tracker.judge(NodeSignals("edge-1", ready, since, renew, has_work=True), now)
            seen.add(health)
            assert health in (Health.HEALTHY, Health.SUSPECT), (ready, now - since, health)
            if ready:
                assert health is Health.HEALTHY
        t += settings.not_ready_grace_s - 1.0
        ready, since = not ready, t  # the flag flips just before the grace runs out
    assert seen == {Health.HEALTHY, Health.SUSPECT}
    assert not tracker.lost_work_at, "no flap damping: the node never lost its work"


def test_the_agent_pod_tolerates_what_a_flapping_or_cut_off_node_is_tainted_with() -> None:
    """The node lifecycle controller taints a NotReady node node.kubernetes.io/not-ready and an
    unreachable one node.kubernetes.io/unreachable (NoExecute): by default the agent Pod tolerates
    both with no tolerationSeconds, so it is never evicted for it (Kubernetes' default toleration
    is 300 s); the chart can bound it."""
    en = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeNode", "metadata": {"name": "n1", "uid": "u1"},
          "spec": {"nodeName": "n1"}}  # fmt: skip
    assert set(NODE_TAINTS) == {"node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"}
    tolerations = agent_pod(en, AgentPodSettings())["spec"]["tolerations"]
    for taint in NODE_TAINTS:
        (t,) = [t for t in tolerations if t["key"] == taint]
        assert t["effect"] == "NoExecute" and t["operator"] == "Exists" and "tolerationSeconds" not in t
    bounded = agent_pod(en, AgentPodSettings(unreachable_toleration_s=600))["spec"]["tolerations"]
    assert sorted(t.get("tolerationSeconds") for t in bounded if t["key"] in NODE_TAINTS) == [600, 600]
    # a chart that names one of those keys itself keeps its own toleration, unchanged
    own = {
        "key": "node.kubernetes.io/unreachable",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 5,
    }
    mine = agent_pod(en, AgentPodSettings(tolerations=(own,)))["spec"]["tolerations"]
    assert [t for t in mine if t["key"] == "node.kubernetes.io/unreachable"] == [own]


def test_the_charts_download_bandwidth_reaches_the_agent_and_none_by_default() -> None:
    en = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeNode",
          "metadata": {"name": "n1", "uid": "u1"}, "spec": {"nodeName": "n1"}}  # fmt: skip
    args = agent_pod(en, AgentPodSettings(download_bandwidth="5Mi"))["spec"]["containers"][0]["args"]
    assert args[args.index("--download-bandwidth") + 1] == "5Mi"
    assert "--download-bandwidth" not in agent_pod(en, AgentPodSettings())["spec"]["containers"][0]["args"]
    grpc = agent_pod(en, AgentPodSettings(grpc_port=8001))["spec"]["containers"][0]
    assert grpc["args"][grpc["args"].index("--grpc-port") + 1] == "8001"
    assert {"name": "grpc", "containerPort": 8001} in grpc["ports"]
