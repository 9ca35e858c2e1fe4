"""Canary rollouts (pure): exact scenarios, then properties over random sequences (hypothesis).

The "world" here is a small simulation of the fleet: each node loads what the last decision
targeted (or keeps what it had, when told to lag) and reports an SLA window per model version it
holds, scaled by the traffic weight it gives that version.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet_api.edge_node import EdgeNodeStatus, ModelCounters
from edgefleet_api.inference_service import AnalysisSpec, InferenceServiceSpec, WaveSpec
from edgefleet_api.model_spec import ModelRef, ModelSpec
from edgefleet_api.rollout_status import ACTIVE, Outcome, Phase, Revision, RolloutStatus
from edgefleet_api.schema_inference_service import inference_service_status
from edgefleet_api.sla import SlaWindow
from edgefleet_operator import rollout
from edgefleet_operator.rollout import (
    Action,
    Decision,
    NodeObservation,
    NodeTarget,
    Strategy,
    analyse,
    canary_order,
    has_checks,
    observe,
    parse_action,
    wave_nodes,
)

REPO = Path(__file__).resolve().parents[2]
SERVICE = "default/camera"
T0 = 1_800_000_000.0


# --- factories ---------------------------------------------------------------------------------


def digest(tag: str) -> str:
    return "sha256:" + (tag * 64)[:64]


def model(version: str, tag: str | None = None, name: str = "classifier") -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "artifact": {"uri": f"repo://{name}/{version}/model.pt", "digest": digest(tag or version)},
        "format": "torchscript",
    }


def isvc_spec(
    *models: dict[str, Any],
    waves: Sequence[dict[str, Any]] | None = ({"percent": 25}, {"percent": 50}, {"percent": 100}),
    analysis: dict[str, Any] | None = None,
    strategy: str = "Canary",
    paused: bool = False,
    sla: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rollout: dict[str, Any] = {"strategy": strategy, "paused": paused}
    if waves is not None:
        rollout["waves"] = [dict(w) for w in waves]
    rollout["analysis"] = {"intervalSeconds": 60, "minSamples": 100, "maxP99LatencyMs": 50.0} | (
        analysis or {}
    )
    spec: dict[str, Any] = {"models": list(models or [model("1")]), "rollout": rollout}
    if sla:
        spec["sla"] = sla
    return spec


NODES = tuple(f"node-{i:02d}" for i in range(8))


def spec_of(spec: dict[str, Any]) -> rollout.RolloutSpec:
    return rollout.parse_spec(InferenceServiceSpec.from_obj(spec))


def revision(models: Collection[dict[str, Any]]) -> Revision:
    return Revision.of(ModelSpec.from_obj(m) for m in models)


def window(requests: int, p95_ms: float, p99_ms: float, err: float = 0.0, rps: float = 0.0) -> SlaWindow:
    return SlaWindow(
        p95_latency_s=p95_ms / 1000, p99_latency_s=p99_ms / 1000, throughput_rps=rps, error_rate=err,
        requests=requests,
    )  # fmt: skip


def step(
    spec: rollout.RolloutSpec,
    previous: dict[str, Any] | None,
    nodes: Sequence[str],
    observations: Mapping[str, NodeObservation],
    now: float,
    action: Action | None = None,
    service: str = "",
    spec_age_s: float | None = None,
    sites: Mapping[str, str] | None = None,
) -> Decision:
    """`rollout.step` as the reconciler drives it, through status.rollout's wire form (JSON): the
    decision's status comes back as the dict it writes."""
    state = RolloutStatus.from_obj(json.loads(json.dumps(previous))) if previous is not None else None
    d = rollout.step(spec, state, nodes, observations, now, action, service, spec_age_s, sites)
    return dataclasses.replace(d, status=d.status.to_obj())  # type: ignore[arg-type]


def rev(d: Decision, key: str) -> Revision | None:
    models = d.status.get(key)  # type: ignore[attr-defined]
    return revision(models) if models else None


def world(
    d: Decision,
    nodes: Collection[str] = NODES,
    *,
    lagging: Collection[str] = (),
    before: Mapping[str, NodeObservation] | None = None,
    requests: int = 1000,
    canary_p99: float = 20.0,
    stable_p99: float = 20.0,
    canary_err: float = 0.0,
    temps: Mapping[str, float] | None = None,
) -> dict[str, NodeObservation]:
    """Observations after the nodes acted on decision `d` (lagging ones show `before`)."""
    canary = rev(d, "canaryModels")
    out = {}
    for n in nodes:
        if n in lagging:
            out[n] = (before or {}).get(n, NodeObservation())
            continue
        loaded, windows = set(), {}
        for t in d.targets.get(n, ()):
            is_canary = t.revision == canary
            for ref in t.revision.refs:
                loaded.add(ref)
                served = requests * t.traffic_weight // 100
                p99 = canary_p99 if is_canary else stable_p99
                windows[ref] = window(served, p99 * 0.8, p99, canary_err if is_canary else 0.0, served / 60)
        out[n] = NodeObservation(frozenset(loaded), windows, (temps or {}).get(n))
    return out


class Runner:
    """Drives `step` like the reconciler: status in, status out, with the world following."""

    def __init__(
        self, spec: dict[str, Any], nodes: Sequence[str] = NODES, sites: Mapping[str, str] | None = None
    ) -> None:
        self.spec = spec_of(spec)
        self.nodes = tuple(nodes)
        self.sites = dict(sites or {})
        self.status: dict[str, Any] | None = None
        self.now = T0
        self.obs: dict[str, NodeObservation] = {}
        self.last: Decision | None = None

    def tick(self, dt: float = 0.0, action: Action | None = None, **world_kw: Any) -> Decision:
        self.now += dt
        d = step(self.spec, self.status, self.nodes, self.obs, self.now, action, SERVICE, sites=self.sites)
        self.status, self.last = d.status, d
        self.obs = world(d, self.nodes, before=self.obs, **world_kw)
        return d

    def set_spec(self, spec: dict[str, Any]) -> None:
        self.spec = spec_of(spec)


def phase(d: Decision) -> str:
    return str(d.status["phase"])


def canary_nodes(d: Decision) -> list[str]:
    return list(d.status["canaryNodes"])


def reasons(d: Decision) -> list[str]:
    return [e.reason for e in d.events]


def on_revision(d: Decision, r: Revision | None) -> set[str]:
    return {n for n, ts in d.targets.items() if any(t.revision == r for t in ts)}


# --- spec parsing ------------------------------------------------------------------------------


def test_parse_spec_of_the_canary_example() -> None:
    doc = yaml.safe_load((REPO / "manifests/examples/canary-rollout.yaml").read_text())
    spec = spec_of(doc["spec"])
    assert spec.strategy is Strategy.CANARY
    assert [(w.percent, w.traffic_weight) for w in spec.waves] == [(5, 50), (25, 50), (50, 100), (100, 100)]
    a = spec.analysis
    assert (a.interval_s, a.min_samples, a.failure_limit) == (120, 200, 1)
    assert (a.max_p99_latency_s, a.max_error_rate, a.max_latency_regression_pct) == (0.06, 0.01, 20)
    assert a.max_p95_latency_s == 0.03  # from spec.sla.p95LatencyMs: the SLA is the default threshold
    assert spec.revision.refs == (ModelRef("classifier", "2", "sha256:" + "0" * 63 + "4"),)


def test_parse_spec_defaults() -> None:
    no_rollout = spec_of({"models": [model("1")]})
    assert no_rollout.strategy is Strategy.ALL_AT_ONCE and not has_checks(no_rollout.analysis)
    no_waves = spec_of(isvc_spec(model("1"), waves=None))
    assert [(w.percent, w.count) for w in no_waves.waves] == [(100, None)]
    all_at_once = spec_of(isvc_spec(model("1"), strategy="AllAtOnce"))
    assert [(w.percent, w.count) for w in all_at_once.waves] == [(100, None)]


def test_wave_node_counts() -> None:
    assert [wave_nodes(WaveSpec(percent=p), 20) for p in (5, 25, 50, 100)] == [1, 5, 10, 20]
    assert [wave_nodes(WaveSpec(percent=p), 3) for p in (5, 25, 50, 100)] == [1, 1, 2, 3]
    assert (
        wave_nodes(WaveSpec(count=7), 4) == 4
        and wave_nodes(WaveSpec(count=2), 4) == 2
        and wave_nodes(WaveSpec(percent=10), 0) == 0
    )
    with pytest.raises(ValueError):
        WaveSpec(percent=10, count=1)
    with pytest.raises(ValueError):
        WaveSpec()


def test_revision_is_every_models_version_and_digest() -> None:
    a = revision([model("1", name="det"), model("1", name="cls")])
    assert [r.name for r in a.refs] == ["cls", "det"] and a.label == "1,1"
    assert revision([model("1", name="cls"), model("1", name="det")]) == a  # order-free
    assert revision([model("1", "e", name="cls"), model("1", name="det")]) != a  # digest only


def test_parse_action() -> None:
    assert parse_action("promote") is Action.PROMOTE and parse_action(" Abort ") is Action.ABORT
    assert parse_action(None) is None and parse_action("") is None
    with pytest.raises(ValueError, match="unknown rollout action"):
        parse_action("yolo")


def test_observe_reads_the_edge_node_status() -> None:
    status = {
        "gpu": {"temperatureC": 61.5},
        "models": [
            {"service": SERVICE, "model": "classifier", "version": "2", "digest": digest("2"),
             "state": "Ready", "sla": {"requests": 300, "p95LatencyMs": 12.0, "p99LatencyMs": 20.0,
                                       "errorRate": 0.01, "throughputRps": 5.0}},
            {"service": SERVICE, "model": "classifier", "version": "3", "digest": digest("3"),
             "state": "Loading"},
            {"service": SERVICE, "model": "classifier", "version": "4", "state": "Ready"},  # no digest
            {"service": SERVICE, "model": "classifier", "version": "5", "digest": digest("5"),
             "state": "Failed"},
            {"service": "other/svc", "model": "classifier", "version": "1", "digest": digest("1"),
             "state": "Ready"},
        ],
    }  # fmt: skip
    o = observe(SERVICE, EdgeNodeStatus.from_obj(status), "jetson")
    ref = ModelRef("classifier", "2", digest("2"))
    assert o.loaded == {ref} and o.temperature_c == 61.5 and o.node_class == "jetson"
    assert o.windows[ref] == window(300, 12.0, 20.0, 0.01, 5.0)
    assert o.confirms(revision([model("2")])) and not o.confirms(revision([model("4")]))
    assert o.failed == {ModelRef("classifier", "5", digest("5"))}


# --- first deployment, happy path ----------------------------------------------------------------


def test_first_deployment_becomes_stable_once_every_node_confirms() -> None:
    r = Runner(isvc_spec(model("1")))
    d = r.tick(lagging={"node-03"})
    v1 = revision([model("1")])
    assert phase(d) == "Progressing" and d.status["step"] == "initial deploy"
    assert on_revision(d, v1) == set(NODES) and canary_nodes(d) == []
    d = r.tick(5, lagging={"node-03"})  # node-03 still has nothing
    assert phase(d) == "Progressing" and "1/8" in d.status["message"]
    d = r.tick(5)
    assert phase(d) == "Progressing"  # the world confirms after this decision
    d = r.tick(5)
    assert phase(d) == "Idle" and d.status["stableVersion"] == "1" and "Deployed" in reasons(d)
    assert d.status["history"] == [] and "canaryVersion" not in d.status


def test_canary_waves_advance_and_promote() -> None:
    r = Runner(isvc_spec(model("1"), waves=[{"percent": 25, "trafficWeight": 50}, {"percent": 50},
                                             {"percent": 100}]))  # fmt: skip
    r.tick()
    r.tick()
    assert phase(r.last) == "Idle"
    r.set_spec(isvc_spec(model("2"), waves=[{"percent": 25, "trafficWeight": 50}, {"percent": 50},
                                             {"percent": 100}]))  # fmt: skip
    v1, v2 = revision([model("1")]), revision([model("2")])
    d = r.tick(1)
    assert (
        phase(d) == "Progressing" and d.status["step"] == "wave 1/3 (25%)" and "RolloutStarted" in reasons(d)
    )
    first = canary_nodes(d)
    assert len(first) == 2 and first == canary_order(SERVICE, NODES)[:2]
    for n in first:  # side by side: stable keeps half of the traffic
        assert [(t.revision, t.traffic_weight) for t in d.targets[n]] == [(v1, 50), (v2, 50)]
    assert on_revision(d, v2) == set(first) and on_revision(d, v1) == set(NODES)
    assert set(d.node_versions().values()) == {"1"}  # 50/50: stable still serves as much
    assert "waveStartTime" not in d.status  # the window starts when the nodes confirm
    d = r.tick(1)
    assert d.status["waveStartTime"] and d.status["currentWave"] == 0
    d = r.tick(59)
    assert d.status["currentWave"] == 0 and "1s of the window left" in d.status["message"]
    d = r.tick(1)
    assert d.status["currentWave"] == 1 and d.status["analysis"][-1]["result"] == "Passed"
    assert "p99LatencyMs 20 ok, limit 50" in d.status["analysis"][-1]["message"]
    second = canary_nodes(d)
    assert second[:2] == first and len(second) == 4  # a growing prefix
    assert all(d.targets[n] == d.targets[second[0]] for n in second)
    assert {n for n, v in d.node_versions().items() if v == "2"} == set(second)
    assert [t.traffic_weight for t in d.targets[second[0]]] == [100]
    d = r.tick(1)
    d = r.tick(60)
    assert d.status["currentWave"] == 2 and len(canary_nodes(d)) == 8
    d = r.tick(1)
    d = r.tick(60)
    assert phase(d) == "Promoted" and d.status["stableVersion"] == "2" and canary_nodes(d) == []
    assert on_revision(d, v2) == set(NODES) and "RolloutPromoted" in reasons(d)
    h = d.status["history"][0]
    assert (h["fromVersion"], h["toVersion"], h["result"]) == ("1", "2", "Promoted")
    assert [a["result"] for a in d.status["analysis"]] == ["Passed"] * 3
    assert d.degraded is None


def promoted_runner(**kw: Any) -> Runner:
    """v1 stable on NODES, spec now at v2 (first decision of the rollout made)."""
    r = Runner(isvc_spec(model("1"), **kw))
    r.tick()
    r.tick()
    assert r.status and r.status["phase"] == "Idle"
    r.set_spec(isvc_spec(model("2"), **kw))
    r.tick(1)
    return r


def test_a_wave_holds_until_every_node_confirms_the_digest() -> None:
    r = promoted_runner()
    wave_nodes = canary_nodes(r.last)
    # One canary node reports version 2 loaded, but with another digest: not confirmed.
    wrong = ModelRef("classifier", "2", digest("f"))
    for _ in range(5):
        r.tick(60)
        r.obs[wave_nodes[0]] = NodeObservation(frozenset({wrong}), {wrong: window(5000, 1, 1)})
    assert r.status and r.status["currentWave"] == 0 and "waveStartTime" not in r.status
    assert "waiting for 1/2 node(s) to load 2" in r.status["message"]
    d = r.tick(60)  # the world now confirms
    d = r.tick(1)
    assert "waveStartTime" in d.status and d.status["currentWave"] == 0
    assert r.tick(60).status["currentWave"] == 1


def test_too_little_traffic_is_inconclusive_and_holds() -> None:
    r = promoted_runner()
    r.tick(1, requests=40)  # 2 canary nodes x 40 requests < minSamples 100
    d = r.tick(60, requests=40)
    assert d.status["currentWave"] == 0 and phase(d) == "Progressing"
    assert d.status["analysis"][-1]["result"] == "Inconclusive"
    assert "80 requests" in d.status["analysis"][-1]["message"] and "holding" in d.status["message"]
    assert "AnalysisInconclusive" in reasons(d)
    d = r.tick(60, requests=40)
    assert "AnalysisInconclusive" not in reasons(d)  # said once per wave
    assert len(d.status["analysis"]) == 1 and d.status["currentWave"] == 0
    d = r.tick(60)  # traffic arrives (the world reports it after this decision)
    d = r.tick(1)
    assert d.status["currentWave"] == 1 and [a["result"] for a in d.status["analysis"]] == ["Passed"]


def test_failed_check_rolls_every_canary_back_and_stops() -> None:
    r = promoted_runner()
    v1 = revision([model("1")])
    r.tick(1, canary_p99=80.0)
    d = r.tick(60, canary_p99=80.0)
    assert phase(d) == "RolledBack" and canary_nodes(d) == []
    assert on_revision(d, v1) == set(NODES) and all(len(ts) == 1 for ts in d.targets.values())
    assert d.degraded is not None
    reason, message = d.degraded
    assert reason == "RolloutFailed" and "p99LatencyMs 80 > 50" in message and "wave 1" in message
    warnings = {e.reason for e in d.events if e.warning}
    assert {"AnalysisFailed", "RolledBack"} <= warnings
    assert d.status["history"][0]["result"] == "RolledBack" and d.status["failedChecks"] == 1
    assert d.status["rollbackReason"] == message
    # Stopped until the spec changes: time and good numbers change nothing.
    for _ in range(3):
        d = r.tick(600)
        assert phase(d) == "RolledBack" and on_revision(d, v1) == set(NODES) and d.events == ()
    # Re-applying stable clears Degraded; a new revision starts a new rollout.
    r.set_spec(isvc_spec(model("1")))
    d = r.tick(1)
    assert d.degraded is None and phase(d) == "RolledBack" and "canaryVersion" not in d.status
    r.set_spec(isvc_spec(model("3")))
    d = r.tick(1)
    assert phase(d) == "Progressing" and d.status["canaryVersion"] == "3" and d.status["failedChecks"] == 0


def test_failure_limit_counts_failed_checks_across_windows() -> None:
    r = promoted_runner(analysis={"failureLimit": 2})
    r.tick(1, canary_p99=80.0)
    d = r.tick(60, canary_p99=80.0)
    assert phase(d) == "Progressing" and d.status["failedChecks"] == 1 and d.status["currentWave"] == 0
    assert d.degraded is None and "AnalysisFailed" in reasons(d)
    d = r.tick(30, canary_p99=80.0)  # a new window started at the failure
    assert phase(d) == "Progressing"
    d = r.tick(30, canary_p99=80.0)
    assert phase(d) == "RolledBack" and d.status["failedChecks"] == 2
    assert [a["result"] for a in d.status["analysis"]] == ["Failed", "Failed"]


def test_a_wave_that_passes_early_bakes_before_it_advances() -> None:
    r = promoted_runner(analysis={"bakeSeconds": 300})
    d = r.tick(1)
    start = d.status["waveStartTime"]
    d = r.tick(60)  # window over, thresholds pass: still baking
    assert d.status["currentWave"] == 0 and phase(d) == "Progressing"
    assert d.status["message"] == "baking: 60 s of 300" and d.status["analysis"] == []
    assert "AnalysisPassed" not in reasons(d)
    d = r.tick(239)
    assert d.status["currentWave"] == 0 and d.status["message"] == "baking: 299 s of 300"
    assert d.status["waveStartTime"] == start
    d = r.tick(1)
    assert d.status["currentWave"] == 1 and d.status["analysis"][-1]["result"] == "Passed"
    assert "AnalysisPassed" in reasons(d)


def test_a_wave_bake_time_overrides_the_analysis_one_and_a_failure_still_rolls_back() -> None:
    waves = [{"percent": 25, "bakeSeconds": 0}, {"percent": 50}, {"percent": 100}]
    r = promoted_runner(waves=waves, analysis={"bakeSeconds": 600})
    r.tick(1)
    d = r.tick(60)
    assert d.status["currentWave"] == 1  # wave 1 bakes 0 s
    r.tick(1)
    d = r.tick(60)
    assert d.status["currentWave"] == 1 and d.status["message"] == "baking: 60 s of 600"
    d = r.tick(60, canary_p99=80.0)
    d = r.tick(1, canary_p99=80.0)  # a failing threshold while baking still rolls back
    assert phase(d) == "RolledBack" and "p99LatencyMs 80 > 50" in d.status["rollbackReason"]


def fail_on(r: Runner, nodes: Collection[str]) -> None:
    """`nodes` report the canary model Failed (and not loaded) from now on."""
    canary = rev(r.last, "canaryModels") if r.last is not None else None
    assert canary is not None
    for n in nodes:
        r.obs[n] = dataclasses.replace(
            r.obs[n], loaded=r.obs[n].loaded - set(canary.refs), failed=frozenset(canary.refs)
        )


def test_a_wave_rolls_back_when_too_many_canary_nodes_fail_to_load() -> None:
    waves = [{"percent": 50}, {"percent": 100}]
    r = promoted_runner(waves=waves, analysis={"maxFailedNodePercent": 25})
    v1 = revision([model("1")])
    wave = canary_nodes(r.last)
    assert len(wave) == 4
    fail_on(r, wave[:2])
    d = r.tick(1)
    assert phase(d) == "RolledBack" and on_revision(d, v1) == set(NODES) and canary_nodes(d) == []
    reason = d.status["rollbackReason"]
    assert "2 rolled back to 1 at wave 1: 2/4 canary node(s) failed, more than 25%" in reason
    assert f"{wave[0]}: classifier:2 Failed" in reason and f"{wave[1]}: classifier:2 Failed" in reason
    assert d.degraded == ("RolloutFailed", reason) and d.status["analysis"][-1]["result"] == "Failed"
    assert "RolledBack" in {e.reason for e in d.events if e.warning}


def test_failed_nodes_within_the_share_hold_and_an_unset_share_only_waits() -> None:
    waves = [{"percent": 50}, {"percent": 100}]
    r = promoted_runner(waves=waves, analysis={"maxFailedNodePercent": 25})
    fail_on(r, canary_nodes(r.last)[:1])  # 1/4 = 25%: not more than the limit
    d = r.tick(1)
    assert phase(d) == "Progressing" and "waiting for 1/4 node(s) to load 2" in d.status["message"]
    r = promoted_runner(waves=waves)
    fail_on(r, canary_nodes(r.last))
    d = r.tick(600)
    assert phase(d) == "Progressing" and "waiting for 4/4 node(s) to load 2" in d.status["message"]


def test_canary_nodes_silent_through_the_window_count_as_failed() -> None:
    waves = [{"percent": 50}, {"percent": 100}]
    r = promoted_runner(waves=waves, analysis={"maxFailedNodePercent": 25})
    wave = canary_nodes(r.last)
    d = r.tick(1)
    start = T0 + 2
    assert d.status["waveStartTime"]
    for n in wave[:2]:  # these two wrote their last report before the window began
        r.obs[n] = dataclasses.replace(r.obs[n], heartbeat_s=start - 10)
    d = r.tick(60)
    assert phase(d) == "RolledBack"
    assert "2/4 canary node(s) failed" in d.status["rollbackReason"]
    assert f"{wave[0]}: no report within the window" in d.status["rollbackReason"]


def test_bake_and_failed_share_validation() -> None:
    with pytest.raises(ValueError, match="bakeSeconds must be at least 0"):
        AnalysisSpec(bake_s=-1)
    with pytest.raises(ValueError, match="wave bakeSeconds must be at least 0"):
        WaveSpec(percent=10, bake_s=-5)
    for bad in (-1, 100.5):
        with pytest.raises(ValueError, match="maxFailedNodePercent must be in"):
            AnalysisSpec(max_failed_node_percent=bad)
    with pytest.raises(ValueError, match="maxFailedNodePercent must be in"):
        spec_of(isvc_spec(model("1"), analysis={"maxFailedNodePercent": 150}))
    a = AnalysisSpec.from_obj({"bakeSeconds": 30, "maxFailedNodePercent": 20})
    assert (a.bake_s, a.max_failed_node_percent) == (30, 20.0)
    assert AnalysisSpec.from_obj(a.to_obj()) == a
    w = WaveSpec.from_obj({"percent": 10, "bakeSeconds": 7})
    assert w.bake_s == 7 and WaveSpec.from_obj(w.to_obj()) == w
    assert (AnalysisSpec().bake_s, AnalysisSpec().max_failed_node_percent) == (0, None)


def test_regression_against_stable_on_comparable_nodes() -> None:
    spec = AnalysisSpec(min_samples=100, max_latency_regression_pct=20, max_error_rate_increase=0.01)
    v1, v2 = revision([model("1")]), revision([model("2")])
    a, b = v1.refs[0], v2.refs[0]

    def node(ref: ModelRef, p99: float, cls: str, err: float = 0.0) -> NodeObservation:
        return NodeObservation(frozenset({ref}), {ref: window(500, 5.0, p99, err, 8.0)}, None, cls)

    obs = {"c": node(b, 13.0, "orin"), "s1": node(a, 10.0, "orin"), "s2": node(a, 2.0, "nano")}
    result = analyse(spec, v1, v2, ["c"], obs)
    # Compared only with the orin node: 13 > 10 * 1.2 (the fast nano node is not comparable).
    assert result.outcome is Outcome.FAILED
    assert [c.name for c in result.failed] == ["p99Regression"]
    assert "p99Regression 13 > 12" in result.message
    obs["c"] = node(b, 11.0, "orin", err=0.05)
    result = analyse(spec, v1, v2, ["c"], obs)
    assert [c.name for c in result.failed] == ["errorRateIncrease"]
    # Without a baseline (too little stable traffic) the relative checks are skipped, not failed.
    obs = {"c": node(b, 13.0, "orin")}
    result = analyse(spec, v1, v2, ["c"], obs)
    assert result.outcome is Outcome.PASSED and all(c.passed is None for c in result.checks)
    assert "skipped" in result.message


def test_absolute_checks_throughput_and_temperature() -> None:
    v1, v2 = revision([model("1")]), revision([model("2")])
    a, b = v1.refs[0], v2.refs[0]
    obs = {
        "c1": NodeObservation(frozenset({b}), {b: window(200, 10.0, 25.0, 0.0, 4.0)}, 70.0),
        "c2": NodeObservation(frozenset({b}), {b: window(200, 30.0, 45.0, 0.0, 4.0)}, 74.0),
        "s": NodeObservation(frozenset({a}), {a: window(200, 10.0, 20.0, 0.0, 8.0)}, 60.0),
    }
    spec = AnalysisSpec(
        min_samples=100, max_p95_latency_s=0.025, min_throughput_rps=6, max_temperature_increase_c=15
    )
    result = analyse(spec, v1, v2, ["c1", "c2"], obs, traffic_weight=50)
    by_name = {c.name: c for c in result.checks}
    assert by_name["p95LatencyMs"].value == 30.0 and by_name["p95LatencyMs"].passed is False  # worst node
    assert by_name["throughputRps"].limit == 3.0 and by_name["throughputRps"].passed  # 6 rps x 50%
    assert by_name["temperatureC"].value == 72.0 and by_name["temperatureC"].passed
    hot = AnalysisSpec(min_samples=100, max_temperature_increase_c=5)
    assert [c.name for c in analyse(hot, v1, v2, ["c1", "c2"], obs).failed] == ["temperatureC"]


def test_temperature_regression_rolls_back_in_a_rollout() -> None:
    analysis = {"maxTemperatureIncreaseC": 5.0}
    r = promoted_runner(analysis=analysis)
    hot = {n: 80.0 for n in canary_nodes(r.last)}
    temps = {n: hot.get(n, 60.0) for n in NODES}
    r.tick(1, temps=temps)
    d = r.tick(60, temps=temps)
    assert phase(d) == "RolledBack" and d.degraded and "temperatureC 80 > 65" in d.degraded[1]


# --- manual control -----------------------------------------------------------------------------


def test_pause_in_spec_holds_and_resume_restarts_the_window() -> None:
    r = promoted_runner()
    r.tick(1)
    r.tick(30)
    r.set_spec(isvc_spec(model("2"), paused=True))
    d = r.tick(1)
    assert phase(d) == "Paused" and d.status["step"] == "paused at wave 1/3 (25%)"
    assert "RolloutPaused" in reasons(d) and "waveStartTime" not in d.status
    for _ in range(3):
        d = r.tick(600)
        assert phase(d) == "Paused" and d.status["currentWave"] == 0 and len(canary_nodes(d)) == 2
    r.set_spec(isvc_spec(model("2")))
    d = r.tick(1)
    assert phase(d) == "Progressing" and "RolloutResumed" in reasons(d)
    start = d.status["waveStartTime"]
    assert r.tick(59).status["currentWave"] == 0  # a full window after the resume
    d = r.tick(1)
    assert d.status["currentWave"] == 1 and start


def test_pause_and_resume_actions() -> None:
    r = promoted_runner()
    d = r.tick(1, action=Action.PAUSE)
    assert phase(d) == "Paused" and d.status["manuallyPaused"] and "pause action" in d.status["message"]
    d = r.tick(600)
    assert phase(d) == "Paused"  # the caller cleared the annotation; the pause persists in status
    d = r.tick(1, action=Action.RESUME)
    assert phase(d) == "Progressing" and not d.status["manuallyPaused"]


def test_promote_now() -> None:
    r = promoted_runner()
    d = r.tick(1, action=Action.PROMOTE)
    v2 = revision([model("2")])
    assert phase(d) == "Promoted" and d.status["stableVersion"] == "2"
    assert on_revision(d, v2) == set(NODES) and d.status["history"][0]["message"] == "promoted manually"


def test_abort_goes_back_to_stable_and_stops() -> None:
    r = promoted_runner()
    r.tick(1)
    d = r.tick(1, action=Action.ABORT)
    v1 = revision([model("1")])
    assert phase(d) == "Aborted" and on_revision(d, v1) == set(NODES) and canary_nodes(d) == []
    assert d.status["history"][0]["result"] == "Aborted" and d.degraded is None
    d = r.tick(600)
    assert phase(d) == "Aborted" and d.status["canaryVersion"] == "2"
    d = r.tick(1, action=Action.PROMOTE)  # nothing in progress to promote
    assert phase(d) == "Aborted" and reasons(d) == ["RolloutActionIgnored"] and d.events[0].warning


def test_reapplying_stable_is_a_fast_rollback() -> None:
    r = promoted_runner()
    r.tick(1)
    r.set_spec(isvc_spec(model("1")))
    d = r.tick(1)
    v1 = revision([model("1")])
    assert phase(d) == "RolledBack" and on_revision(d, v1) == set(NODES) and d.degraded is None
    assert d.status["history"][0]["message"] == "stable version re-applied"
    assert "canaryVersion" not in d.status and canary_nodes(d) == []


def test_a_new_revision_supersedes_the_rollout() -> None:
    r = promoted_runner()
    r.tick(1)
    d = r.tick(60)
    assert d.status["currentWave"] == 1
    before = canary_nodes(d)
    r.set_spec(isvc_spec(model("3")))
    d = r.tick(1)
    v1, v3 = revision([model("1")]), revision([model("3")])
    assert d.status["history"][0]["result"] == "Superseded" and d.status["canaryVersion"] == "3"
    assert d.status["currentWave"] == 0 and d.status["analysis"] == []
    assert canary_nodes(d) == before[:2]  # the same order: wave 1 of the new rollout
    assert on_revision(d, v3) == set(canary_nodes(d)) and on_revision(d, v1) == set(NODES) - set(before[:2])


def test_all_at_once() -> None:
    r = Runner(isvc_spec(model("1"), strategy="AllAtOnce"))
    r.tick()
    r.tick()
    r.set_spec(isvc_spec(model("2"), strategy="AllAtOnce"))
    d = r.tick(1)
    v2 = revision([model("2")])
    assert phase(d) == "Progressing" and on_revision(d, v2) == set(NODES)
    assert all(len(ts) == 1 for ts in d.targets.values())
    d = r.tick(1)
    assert (
        phase(d) == "Promoted"
        and d.status["analysis"] == []
        and d.status["history"][0]["result"] == "Promoted"
    )


def test_multi_model_revision_and_shared_models() -> None:
    det1, cls1 = model("1", name="det"), model("1", name="cls")
    cls1b = model("1", "b", name="cls")  # same version label, new artifact
    waves = [{"percent": 50, "trafficWeight": 30}, {"percent": 100}]
    r = Runner(isvc_spec(det1, cls1, waves=waves))
    r.tick()
    r.tick()
    r.set_spec(isvc_spec(det1, cls1b, waves=waves))
    d = r.tick(1)
    assert phase(d) == "Progressing"  # a digest change alone is a new revision
    n = canary_nodes(d)[0]
    placed = {(m.name, m.artifact.digest): w for m, w in d.placed(n)}
    # det is in both revisions: listed once with all the traffic; cls split 70/30.
    assert placed == {("cls", digest("1")): 70, ("cls", digest("b")): 30, ("det", digest("1")): 100}
    other = next(x for x in NODES if x not in canary_nodes(d))
    assert {(m.name, w) for m, w in d.placed(other)} == {("cls", 100), ("det", 100)}


def test_the_stable_models_survive_in_status_when_the_spec_moves_on() -> None:
    r = promoted_runner()
    d = r.last
    assert d is not None
    v1 = revision([model("1")])
    n = next(x for x in NODES if x not in canary_nodes(d))
    ((entry, weight),) = d.placed(n)
    assert entry.artifact.uri == "repo://classifier/1/model.pt" and weight == 100
    assert d.models[v1] == tuple(ModelSpec.from_obj(m) for m in d.status["stableModels"])  # type: ignore[index]


def test_a_replaced_canary_node_must_confirm_before_the_wave_is_judged() -> None:
    r = promoted_runner()
    r.tick(1)
    before = canary_nodes(r.tick(30))
    assert r.status and r.status["waveStartTime"]
    r.nodes = (*(n for n in NODES if n != before[0]), "node-99")  # placement moved a canary
    r.obs["node-99"] = NodeObservation()
    new = next(n for n in canary_order(SERVICE, r.nodes) if n not in before)
    for _ in range(3):  # the replacement is slow to load: the wave is not judged
        d = r.tick(60, lagging={new})
        assert canary_nodes(d) == [before[1], new] and "waveStartTime" not in d.status
        assert d.status["currentWave"] == 0 and "waiting for 1/2" in d.status["message"]
    d = r.tick(60)  # the replacement loads after this pass
    assert "waveStartTime" not in d.status
    d = r.tick(1)
    assert d.status["currentWave"] == 0 and d.status["waveStartTime"]  # the window starts now
    assert r.tick(59).status["currentWave"] == 0
    d = r.tick(60)
    assert d.status["currentWave"] == 1


def test_canary_order_is_deterministic_and_per_service() -> None:
    nodes = [f"n{i}" for i in range(50)]
    assert canary_order("a/x", nodes) == canary_order("a/x", list(reversed(nodes)))
    assert canary_order("a/x", nodes)[:5] != canary_order("a/y", nodes)[:5]


def test_status_round_trip_and_schema() -> None:
    r = promoted_runner(analysis={"failureLimit": 2})
    r.tick(1, canary_p99=80.0)
    during = r.tick(60, canary_p99=80.0).status
    assert during["waveStartTime"] and during["failedChecks"] == 1
    after = r.tick(60, canary_p99=80.0).status
    assert after["phase"] == "RolledBack" and after["history"] and after["analysis"]
    schema = inference_service_status()["properties"]["rollout"]
    for status in (during, after):
        state = RolloutStatus.from_obj(status)
        assert state.to_obj() == status
        assert RolloutStatus.from_obj(json.loads(json.dumps(status))) == state
        assert set(status) <= set(schema["properties"])
        assert status["phase"] in schema["properties"]["phase"]["enum"]
    for key in ("analysis", "history"):
        assert set(after[key][0]) <= set(schema["properties"][key]["items"]["properties"])
        assert after[key][0]["result"] in schema["properties"][key]["items"]["properties"]["result"]["enum"]


def test_same_inputs_twice_change_nothing_and_say_nothing() -> None:
    r = promoted_runner()
    r.tick(1)
    d1 = r.tick(10)
    d2 = step(r.spec, d1.status, r.nodes, r.obs, r.now, None, SERVICE)
    assert d2.status == d1.status and d2.events == () and d2.targets == d1.targets


# --- properties ---------------------------------------------------------------------------------

QUALITIES: dict[str, dict[str, Any]] = {"good": {}, "slow": {"canary_p99": 90.0}, "quiet": {"requests": 10}}
"""World settings: good numbers; a p99 over the limit; too few requests to judge."""
QUALITY = st.sampled_from(sorted(QUALITIES))
TICK = st.tuples(
    st.integers(0, 90),  # seconds since the last pass
    st.sets(st.integers(0, 7), max_size=8),  # nodes that lag (do not act on the last decision)
    QUALITY,
    st.booleans(),  # the operator crashed: this pass's status is never written
)


def fleet_spec(waves: list[int], limit: int, weight: int) -> dict[str, Any]:
    return {
        "waves": [{"percent": p, "trafficWeight": weight if p < 100 else 100} for p in waves],
        "analysis": {"failureLimit": limit, "intervalSeconds": 30, "minSamples": 100},
    }


WAVES = st.lists(st.integers(1, 100), min_size=1, max_size=4, unique=True).map(sorted)


def drive(
    spec_kw: dict[str, Any], nodes: Sequence[str], ticks: Sequence[tuple[int, set[int], str, bool]]
) -> tuple[Runner, list[tuple[dict[str, Any] | None, Decision, dict[str, NodeObservation]]]]:
    """Run a v1 -> v2 rollout through `ticks`; returns the runner and (status in, decision, obs in)."""
    r = Runner(isvc_spec(model("1"), **spec_kw), nodes)
    r.tick()
    r.tick()
    assert r.status and r.status["phase"] == "Idle"
    r.set_spec(isvc_spec(model("2"), **spec_kw))
    trace: list[tuple[dict[str, Any] | None, Decision, dict[str, NodeObservation]]] = []
    for dt, lag, quality, crashed in ticks:
        before_status, before_obs, before_now = r.status, r.obs, r.now
        kw: dict[str, Any] = QUALITIES[quality]
        d = r.tick(dt, lagging={nodes[i] for i in lag if i < len(nodes)}, **kw)
        trace.append((before_status, d, before_obs))
        if crashed:  # the status write was lost: the next pass starts from the old one
            r.status = before_status
        # A restarted operator (status through JSON) decides exactly the same.
        again = step(
            r.spec, json.loads(json.dumps(before_status)), nodes, before_obs, before_now + dt, None, SERVICE
        )
        assert again.status == d.status and again.targets == d.targets and again.events == d.events
    return r, trace


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    waves=WAVES,
    limit=st.integers(1, 3),
    weight=st.sampled_from([20, 50, 100]),
    n_nodes=st.integers(1, 8),
    ticks=st.lists(TICK, max_size=30),
    stuck=st.sets(st.integers(0, 7), max_size=3),
    stuck_until=st.integers(0, 30),
)
def test_rollout_invariants_over_random_sequences(
    waves: list[int],
    limit: int,
    weight: int,
    n_nodes: int,
    ticks: list[Any],
    stuck: set[int],
    stuck_until: int,
) -> None:
    nodes = NODES[:n_nodes]
    v1, v2 = revision([model("1")]), revision([model("2")])
    # Some nodes are stuck (act on no decision) for a while, on top of each pass's random laggards.
    ticks = [(dt, lag | stuck if i < stuck_until else lag, q, c) for i, (dt, lag, q, c) in enumerate(ticks)]
    tail: list[tuple[int, set[int], str, bool]] = [(30, set(), "good", False)] * (
        2 * len(waves) + 2
    )  # then it goes well: can it end well?
    _, trace = drive(fleet_spec(waves, limit, weight), nodes, [*ticks, *tail])
    for before, d, obs in trace:
        old = RolloutStatus.from_obj(before)
        new = RolloutStatus.from_obj(d.status)
        # Every node targets only recorded revisions; a node off stable is a recorded canary.
        recorded = {r for r in (new.stable, new.canary) if r is not None}
        assert all(t.revision in recorded for ts in d.targets.values() for t in ts)
        assert all(sum(t.traffic_weight for t in ts) == 100 for ts in d.targets.values())
        off_stable = {n for n, ts in d.targets.items() if ts != (NodeTarget(new.stable, 100),)}
        assert off_stable <= set(new.canary_nodes) if new.phase in ACTIVE else not off_stable
        # Within a rollout the canary set is a growing prefix.
        if old.phase in ACTIVE and new.phase in ACTIVE and old.canary == new.canary:
            assert new.canary_nodes[: len(old.canary_nodes)] == old.canary_nodes
        # Never skips a wave; advances only past a wave whose nodes all confirmed the digest.
        if old.phase in (Phase.PROGRESSING,) and new.phase in (Phase.PROGRESSING, Phase.PROMOTED):
            assert new.wave in (old.wave, old.wave + 1) or new.phase is Phase.PROMOTED
            if new.wave == old.wave + 1 or (new.phase is Phase.PROMOTED and old.phase is Phase.PROGRESSING):
                assert old.canary_nodes and all(obs[n].confirms(v2) for n in old.canary_nodes)
        # Never promotes once the failed checks reached the limit.
        if old.failed_checks >= limit:
            assert new.phase is not Phase.PROMOTED or old.phase is Phase.PROMOTED
        if new.phase is Phase.PROMOTED and old.phase is not Phase.PROMOTED:
            assert new.stable == v2 and old.failed_checks < limit
        if new.phase is Phase.ROLLED_BACK:
            assert new.stable == v1 and not off_stable


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    waves=WAVES,
    limit=st.integers(1, 3),
    n_nodes=st.integers(1, 8),
    ticks=st.lists(TICK, max_size=15),
    final=st.sampled_from(["good", "slow"]),
)
def test_rollout_terminates_once_the_fleet_confirms(
    waves: list[int], limit: int, n_nodes: int, ticks: list[Any], final: str
) -> None:
    nodes = NODES[:n_nodes]
    # Whatever happened before, once every node acts and traffic is steady the rollout ends.
    tail: list[tuple[int, set[int], str, bool]] = [(30, set(), final, False)] * (
        2 * len(waves) * (limit + 1) + 4
    )
    r, _ = drive(fleet_spec(waves, limit, 50), nodes, [*ticks, *tail])
    assert r.status is not None
    assert r.status["phase"] in ("Promoted", "RolledBack")
    if r.status["phase"] == "Promoted":
        assert r.status["stableVersion"] == "2"
    else:
        assert r.status["stableVersion"] == "1" and r.status["failedChecks"] >= limit


# --- fresh reports only -------------------------------------------------------------------------


def test_observe_ignores_a_report_older_than_the_spec_that_set_the_version() -> None:
    ref = ModelRef("classifier", "2", digest("2"))
    status = EdgeNodeStatus.from_obj(
        {
            "observedGeneration": 4,
            "heartbeatTime": "2027-01-15T08:00:00Z",
            "models": [
                {"service": SERVICE, "model": "classifier", "version": "2", "digest": digest("2"),
                 "state": "Ready", "sla": {"requests": 300, "p99LatencyMs": 20.0}},
            ],
        }
    )  # fmt: skip
    assert observe(SERVICE, status, set_at={(SERVICE, ref): 4}).loaded == {ref}
    stale = observe(SERVICE, status, set_at={(SERVICE, ref): 5})  # told to run it at generation 5
    assert stale.loaded == frozenset() and stale.windows == {}
    assert observe(SERVICE, EdgeNodeStatus()).heartbeat_s == float("-inf")  # no heartbeat: never fresh


def test_an_unchanged_status_counts_as_current_as_of_the_agents_last_lease_renewal() -> None:
    from edgefleet_api import wire

    status = EdgeNodeStatus.from_obj({"observedGeneration": 1, "heartbeatTime": "2027-01-15T08:00:00Z"})
    written = wire.parse_time("2027-01-15T08:00:00Z")
    assert written is not None
    window = written + 600  # a wave's window starting 10 minutes after the last status write
    assert not observe(SERVICE, status).fresh(window)
    assert observe(SERVICE, status, alive_s=window + 5).fresh(window)  # renewed since: still current
    assert not observe(SERVICE, status, alive_s=window - 5).fresh(window)
    assert observe(SERVICE, EdgeNodeStatus(), alive_s=window + 5).heartbeat_s == float("-inf")  # no report


def test_the_observation_memo_answers_as_observe_and_observes_again_only_on_change() -> None:
    """Kept from pass to pass per (service, node): the same object while the status object, node
    class, entries' generations and Lease renewal hold; observed afresh when any of them changes;
    forgotten after a pass that did not ask for it. Every answer equals `observe`'s."""
    status = EdgeNodeStatus.from_obj(
        {"observedGeneration": 4, "heartbeatTime": "2027-01-15T08:00:00Z", "models": [
            {"service": SERVICE, "model": "classifier", "version": "2", "digest": digest("2"),
             "state": "Ready"}]}
    )  # fmt: skip
    ref = ModelRef("classifier", "2", digest("2"))
    memo = rollout.ObservationMemo()
    calls = [
        ("n1", status, "jetson", {(SERVICE, ref): 4}, 10.0),
        ("n1", status, "jetson", {(SERVICE, ref): 4}, 10.0),  # unchanged: kept
        ("n1", status, "jetson", {(SERVICE, ref): 4}, 11.0),  # the Lease renewed
        ("n1", status, "jetson", {(SERVICE, ref): 5}, 11.0),  # told to run it at generation 5
        ("n1", dataclasses.replace(status), "jetson", {(SERVICE, ref): 5}, 11.0),  # a new report
        ("n1", status, "x86", {(SERVICE, ref): 5}, 11.0),
        ("n2", status, "x86", {(SERVICE, ref): 5}, 11.0),
    ]
    got = []
    for node, st_, cls, set_at, alive in calls:
        o = memo.observe(SERVICE, node, st_, cls, set_at, alive)
        assert o == observe(SERVICE, st_, cls, set_at, alive)
        got.append(o)
    assert got[1] is got[0] and got[2] is not got[1] and got[3].loaded == frozenset()
    assert got[4] is not got[3] and got[5].node_class == "x86"
    memo.end_pass()
    kept = memo.observe(SERVICE, "n2", status, "x86", {(SERVICE, ref): 5}, 11.0)
    assert kept is got[6]  # the next pass reuses it
    memo.end_pass()
    memo.end_pass()  # a pass that did not ask for n1 or n2
    assert memo.observe(SERVICE, "n2", status, "x86", {(SERVICE, ref): 5}, 11.0) is not kept


def test_a_wave_is_judged_only_on_reports_written_within_its_window() -> None:
    r = promoted_runner()
    d = r.tick(1)
    start = d.status["waveStartTime"]
    assert start
    written_before = T0 + 1  # the canaries' last reports predate the window: as if replayed
    old = {n: dataclasses.replace(o, heartbeat_s=written_before) for n, o in r.obs.items()}
    good = dict(r.obs)
    r.obs = old
    d = step(r.spec, r.status, r.nodes, r.obs, r.now + 60, None, SERVICE)
    assert d.status["currentWave"] == 0 and "to report within the window" in d.status["message"]
    assert d.status.get("analysis", []) == [] and d.events == ()
    fresh = {n: dataclasses.replace(o, heartbeat_s=r.now + 30) for n, o in good.items()}
    d = step(r.spec, r.status, r.nodes, fresh, r.now + 60, None, SERVICE)
    assert d.status["currentWave"] == 1 and d.status["analysis"][-1]["result"] == "Passed"


def test_a_stale_failing_report_rolls_nothing_back() -> None:
    r = promoted_runner()
    r.tick(1, canary_p99=20.0)
    start_s = T0 + 2
    bad = world(r.last, r.nodes, canary_p99=80.0)
    replayed = {n: dataclasses.replace(o, heartbeat_s=start_s - 5) for n, o in bad.items()}
    d = step(r.spec, r.status, r.nodes, replayed, r.now + 60, None, SERVICE)
    assert phase(d) == "Progressing" and d.status["currentWave"] == 0 and "RolledBack" not in reasons(d)


def test_a_burst_of_spec_edits_reaches_the_nodes_as_its_last_revision_only() -> None:
    r = promoted_runner()  # v2 is the canary now
    v1, v2 = revision([model("1")]), revision([model("2")])
    before = r.last
    assert before is not None
    for version in ("3", "4", "5"):  # edits in quick succession: each younger than the settle time
        r.set_spec(isvc_spec(model(version)))
        d = step(r.spec, r.status, r.nodes, r.obs, r.now, None, SERVICE, spec_age_s=0.1)
        assert d.targets == before.targets and d.status["canaryVersion"] == "2"
        assert "waits for the spec to settle" in d.status["message"] and "RolloutStarted" not in reasons(d)
        assert on_revision(d, v1) | on_revision(d, v2) == set(NODES)
    d = step(r.spec, r.status, r.nodes, r.obs, r.now + 1, None, SERVICE, spec_age_s=1.0)
    assert d.status["canaryVersion"] == "5" and "RolloutSuperseded" in reasons(d)
    # Back to stable (a rollback) never waits; nor does a first deployment.
    r.set_spec(isvc_spec(model("1")))
    d = step(r.spec, r.status, r.nodes, r.obs, r.now, None, SERVICE, spec_age_s=0.0)
    assert phase(d) == "RolledBack" and on_revision(d, v1) == set(NODES)
    first = step(spec_of(isvc_spec(model("1"))), None, NODES, {}, T0, None, SERVICE, spec_age_s=0.0)
    assert on_revision(first, v1) == set(NODES)


def test_the_reader_dates_a_spec_generation_that_replaces_one_it_read() -> None:
    from edgefleet_operator.fleet_read import TypedViews

    def obj(generation: int) -> dict[str, Any]:
        meta = {"name": "camera", "namespace": "default", "uid": "u1", "generation": generation}
        return {"metadata": meta, "spec": isvc_spec(model(str(generation)))}

    views = TypedViews()
    assert views.service(obj(1)).spec_age_s is None  # the first generation read: not young
    views.keep_only([], [obj(2)])  # the next pass lists generation 2
    age = views.service(obj(2)).spec_age_s
    assert age is not None and 0 <= age < 1.0
    again = views.service(obj(2)).spec_age_s
    assert again is not None and again >= age
    views.keep_only([], [])
    assert views.service(obj(3)).spec_age_s is None  # a service forgotten, then seen anew


# --- the sequential judge on the agents' counters ------------------------------------------------


class CounterRunner(Runner):
    """A Runner whose agents also report cumulative counters per model version (status.models[]
    .counters): each tick, every node serves `rate` requests per second split by traffic weight,
    a version's errors and slow requests at its own rates (deterministic: the floor of the
    expected count). `restart(node)` starts that agent's counters again at 0 in a new epoch."""

    def __init__(self, spec: dict[str, Any], nodes: Sequence[str] = NODES) -> None:
        super().__init__(spec, nodes)
        self.rate = 20.0
        self.error = {"1": 0.01, "2": 0.01}
        self.slow = {"1": 0.01, "2": 0.01}
        self.served: dict[tuple[str, ModelRef], float] = {}
        self.epochs: dict[str, int] = {}
        self.slo_s: float | None = 0.05

    def restart(self, node: str) -> None:
        self.epochs[node] = self.epochs.get(node, 0) + 1
        for key in [k for k in self.served if k[0] == node]:
            del self.served[key]

    def tick(self, dt: float = 0.0, action: Action | None = None, **world_kw: Any) -> Decision:
        d = super().tick(dt, action, **world_kw)
        for n, o in self.obs.items():
            counters = {}
            for t in d.targets.get(n, ()):
                for ref in t.revision.refs:
                    key = (n, ref)
                    self.served[key] = self.served.get(key, 0.0) + self.rate * dt * t.traffic_weight / 100
                    total = int(self.served[key])
                    counters[ref] = ModelCounters(
                        f"epoch-{self.epochs.get(n, 0)}",
                        total,
                        int(total * self.error[ref.version]),
                        int(total * self.slow[ref.version]) if self.slo_s is not None else 0,
                        self.slo_s,
                    )
            self.obs[n] = dataclasses.replace(o, counters=counters)
        return d


JUDGED_WAVES = ({"percent": 25, "trafficWeight": 50}, {"percent": 100, "trafficWeight": 50})


def judged_runner(**analysis: Any) -> CounterRunner:
    spec = {"intervalSeconds": 60} | analysis
    r = CounterRunner(isvc_spec(model("1"), waves=JUDGED_WAVES, analysis=spec))
    r.tick()
    r.tick()
    assert r.status and r.status["phase"] == "Idle"
    r.set_spec(isvc_spec(model("2"), waves=JUDGED_WAVES, analysis=spec))
    r.tick(1)
    return r


def run_until(r: Runner, done: Any, dt: float = 10.0, limit: int = 500) -> Decision:
    for _ in range(limit):
        d = r.tick(dt)
        if done(d):
            return d
    raise AssertionError(f"not done after {limit} ticks: {r.status}")


def test_parse_judge_settings_and_their_errors() -> None:
    a = spec_of(
        isvc_spec(model("1"), analysis={"falseRollbackRate": 0.05, "onDeadline": "Rollback"})
    ).analysis
    assert (a.false_rollback_rate, a.error_rate_increase, a.slow_share_ratio, a.power) == (
        0.05,
        0.01,
        1.5,
        0.8,
    )
    assert (a.progress_deadline_s, a.on_deadline) == (600, "Rollback")
    assert AnalysisSpec.from_obj(a.to_obj()) == a
    for bad, words in (
        ({"falseRollbackRate": 0}, "falseRollbackRate"),
        ({"errorRateIncrease": 1.5}, "errorRateIncrease"),
        ({"slowShareRatio": 1.0}, "slowShareRatio"),
        ({"power": 1}, "power"),
        ({"progressDeadlineSeconds": 0}, "progressDeadlineSeconds"),
        ({"onDeadline": "Fail"}, "onDeadline"),
        ({"judge": "Bayes"}, "judge must be one of"),
        ({"power": "high"}, "analysis.power must be a number"),
    ):
        with pytest.raises(ValueError, match=words):
            spec_of(isvc_spec(model("1"), analysis=bad))


def test_a_clear_regression_fails_the_judge_and_rolls_back() -> None:
    r = judged_runner()
    r.error["2"] = 0.08  # 1% -> 8% errors
    d = run_until(r, lambda d: phase(d) != "Progressing")
    assert phase(d) == "RolledBack" and d.status["currentWave"] == 0
    reason = d.status["rollbackReason"]
    assert "error rate" in reason and "e-value" in reason and "confidence sequence" in reason
    assert "RolledBack" in reasons(d) and on_revision(d, revision([model("2")])) == set()
    assert d.status["analysis"][-1]["result"] == "Failed"
    assert r.now - T0 < 600  # well before the progress deadline


def test_a_slow_share_regression_fails_the_judge() -> None:
    r = judged_runner()
    r.slow["2"] = 0.06  # 1% -> 6% slower than the SLO latency; errors identical
    d = run_until(r, lambda d: phase(d) != "Progressing")
    assert phase(d) == "RolledBack" and "slow share" in d.status["rollbackReason"]
    assert "error rate" not in d.status["rollbackReason"].split(": ", 1)[1].split(";")[0]


def test_an_identical_canary_passes_once_the_evidence_suffices() -> None:
    r = judged_runner(progressDeadlineSeconds=7200)
    r.tick(60)  # the wave's window begins: the readings are its baselines
    d = r.tick(60)
    assert d.status["currentWave"] == 0 and d.status["evidence"]["verdict"] == "Continue"
    assert "holding: judge Continue" in d.status["message"]
    evidence = d.status["evidence"]
    assert evidence["canaryRequests"] > 0 and evidence["stableRequests"] > evidence["canaryRequests"]
    assert [m["name"] for m in evidence["metrics"]] == ["error rate", "slow share"]
    assert all("e-value" in m["message"] for m in evidence["metrics"])
    d = run_until(r, lambda d: d.status["currentWave"] == 1 or phase(d) != "Progressing", dt=60)
    assert phase(d) == "Progressing" and [a["result"] for a in d.status["analysis"]] == ["Passed"]
    assert d.status["analysis"][0]["message"].startswith("judge Pass: ")
    assert "JudgeVerdict" in reasons(d) and "evidence" not in d.status  # a new wave: new evidence
    d = run_until(r, lambda d: phase(d) != "Progressing", dt=60)
    assert phase(d) == "Promoted"


def test_without_an_slo_latency_the_error_rate_alone_judges() -> None:
    r = judged_runner(progressDeadlineSeconds=7200)
    r.rate, r.slo_s = 200.0, None  # no slow request is ever counted
    d = run_until(r, lambda d: d.status["currentWave"] == 1 or phase(d) != "Progressing", dt=60)
    assert phase(d) == "Progressing" and [a["result"] for a in d.status["analysis"]] == ["Passed"]
    d = r.tick(60)  # wave 2's window begins
    assert [m["name"] for m in d.status["evidence"]["metrics"]] == ["error rate"]
    d = run_until(r, lambda d: phase(d) != "Progressing", dt=60)
    assert phase(d) == "Promoted"


def test_no_traffic_holds_then_pauses_at_the_deadline() -> None:
    r = judged_runner(progressDeadlineSeconds=300)
    r.rate = 0.0
    d = r.tick(100)
    d = r.tick(100)
    assert phase(d) == "Progressing" and d.status["evidence"]["verdict"] == "Continue"
    assert "to the progress deadline" in d.status["message"]
    d = run_until(r, lambda d: phase(d) != "Progressing", dt=50)
    assert phase(d) == "Paused" and d.status["pauseReason"].startswith("no evidence after 3")
    assert "0 canary requests, 0 stable" in d.status["message"]
    assert "RolloutPaused" in reasons(d) and not d.status.get("rollbackReason")
    for _ in range(3):  # stays paused; never fails for lack of data
        d = r.tick(600)
        assert phase(d) == "Paused" and d.status["pauseReason"]
    d = r.tick(1, Action.RESUME)
    assert phase(d) == "Progressing" and "pauseReason" not in d.status


def test_a_silent_canary_node_meets_the_deadline_too() -> None:
    r = judged_runner(progressDeadlineSeconds=300)
    r.tick(10)
    d = r.tick(10)
    assert d.status["evidence"]["verdict"] == "Continue"
    node = canary_nodes(d)[0]
    stale = {node: dataclasses.replace(r.obs[node], heartbeat_s=T0)}  # writes nothing after this
    for _ in range(40):
        r.obs.update(stale)
        d = r.tick(50)
        r.obs.update(stale)
        if phase(d) != "Progressing":
            break
    assert phase(d) == "Paused" and "to report within the window" in d.status["pauseReason"]


def test_judge_thresholds_leaves_the_wave_to_the_limits_alone() -> None:
    r = judged_runner(judge="Thresholds")
    r.error["2"] = 0.08  # the judge would fail this; no threshold is set on errors
    d = run_until(r, lambda d: phase(d) != "Progressing")
    assert phase(d) == "Promoted" and "evidence" not in d.status
    assert not [a for a in d.status["analysis"] if a["message"].startswith("judge")]


def test_no_traffic_rolls_back_at_the_deadline_when_the_spec_says_so() -> None:
    r = judged_runner(progressDeadlineSeconds=300, onDeadline="Rollback")
    r.rate = 0.0
    d = run_until(r, lambda d: phase(d) != "Progressing", dt=50)
    assert phase(d) == "RolledBack" and "no evidence after" in d.status["rollbackReason"]


def test_counters_of_a_restarted_agent_add_up() -> None:
    r = judged_runner(progressDeadlineSeconds=7200)
    node = canary_nodes(r.last)[0]
    d = r.tick(10)
    d = r.tick(10)

    def total(d: Decision) -> int:
        return sum(
            c["totalRequests"]
            for c in d.status["counters"]
            if c["node"] == node and c["model"] == "classifier/2"
        )

    assert total(d) == 100  # 20 req/s x 50% x 10 s since the window's baseline reading
    d = r.tick(10)
    assert total(d) == 200
    r.restart(node)  # the agent's counters begin again at 0, in a new epoch
    d = r.tick(10)  # (the operator still reads the old epoch's last report)
    assert total(d) == 300
    d = r.tick(10)  # the new epoch reads 100 requests: all of them are new
    assert total(d) == 400
    assert {c["epoch"] for c in d.status["counters"] if c["node"] == node} == {"epoch-1@50"}
    d = r.tick(10)
    assert total(d) == 500 and d.status["evidence"]["canaryRequests"] == 2 * 500


def test_a_changed_slo_latency_rebaselines_without_adding() -> None:
    r = judged_runner(progressDeadlineSeconds=7200)
    node = canary_nodes(r.last)[0]
    r.tick(10)
    d = r.tick(10)

    def total(d: Decision) -> int:
        return sum(
            c["totalRequests"]
            for c in d.status["counters"]
            if c["node"] == node and c["model"] == "classifier/2"
        )

    assert total(d) == 100
    r.slo_s = 0.08  # the agent now counts slow requests against 80 ms (same epoch)
    d = r.tick(10)  # (the last reading at 50 ms)
    assert total(d) == 200
    d = r.tick(10)  # the first at 80 ms: a new baseline, nothing added
    assert total(d) == 200
    assert {c["epoch"] for c in d.status["counters"] if c["node"] == node} == {"epoch-0@80"}
    d = r.tick(10)
    assert total(d) == 300


def test_an_operator_restart_resumes_with_the_same_baselines() -> None:
    r = judged_runner(progressDeadlineSeconds=7200)
    r.tick(30)
    r.tick(30)
    mid = RolloutStatus.from_obj(r.status)
    assert mid.counters and mid.evidence is not None
    r.tick(0)  # the world reports once more; a fresh operator reads status from the API
    later = r.now + 30
    kept = rollout.step(r.spec, mid, r.nodes, r.obs, later, service=SERVICE)
    restarted = rollout.step(r.spec, RolloutStatus.from_obj(json.loads(json.dumps(mid.to_obj()))),
                             r.nodes, r.obs, later, service=SERVICE)  # fmt: skip
    assert restarted.status == kept.status and restarted.status.counters == kept.status.counters
    assert {(c.node, c.model): c.total for c in kept.status.counters} != {
        (c.node, c.model): c.total for c in mid.counters
    }  # it went on counting from the recorded baselines
    schema = inference_service_status()["properties"]["rollout"]["properties"]
    status = kept.status.to_obj()
    assert set(status["evidence"]) <= set(schema["evidence"]["properties"])
    assert set(status["counters"][0]) <= set(schema["counters"]["items"]["properties"])
    assert len(status["counters"]) <= schema["counters"]["maxItems"]


def test_a_judged_wave_decided_twice_on_the_same_reports_counts_nothing_twice() -> None:
    r = judged_runner(progressDeadlineSeconds=7200)
    r.tick(10)
    r.tick(10)
    state = RolloutStatus.from_obj(r.status)
    once = rollout.step(r.spec, state, r.nodes, r.obs, r.now + 5, service=SERVICE)
    twice = rollout.step(r.spec, once.status, r.nodes, r.obs, r.now + 5, service=SERVICE)
    assert twice.status == once.status and not twice.events
    assert once.status.evidence is not None and once.status.evidence.canary_requests > 0
