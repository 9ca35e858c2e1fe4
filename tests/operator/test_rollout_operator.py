"""Canary rollouts driven by the real operator process on the local control plane (issue 6).

Simulated agents (e2e.sim_agent) report what their EdgeNode spec asks for, with SLA windows per
version the tests choose (a slow canary, one with too little traffic) and versions held Loading
(a wave whose nodes have not confirmed the digest yet). Analysis windows are 2 s, or long where a
test must act in the middle of a wave. Every test deploys version 1 on its own 4 nodes first.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import DIGEST, Group, apply, condition, events, eventually, get_status, service

from e2e.operator_proc import OperatorProcess, ensure_agent_namespace
from edgefleet_api import names, wire
from edgefleet_operator import rollout
from edgefleet_operator.rollout.waves import site_order

pytestmark = pytest.mark.cluster

DIGESTS = {"1": DIGEST, "2": "sha256:" + "2e" * 32, "3": "sha256:" + "3f" * 32}
FAST = {"intervalSeconds": 2, "minSamples": 10, "failureLimit": 1}
LONG = {"intervalSeconds": 3600, "minSamples": 10, "failureLimit": 1}
"""A window no test waits out: only a manual action or a spec change can end the wave."""


def custom_api(kube: Any) -> Any:
    """CustomObjectsApi, typed Any: it takes and returns the API's JSON as plain dicts."""
    from kubernetes import client

    return client.CustomObjectsApi(kube)


class Operator:
    """The operator process of this module; a test may SIGKILL it and start a new one."""

    def __init__(self, control_plane: Any, log_dir: Path) -> None:
        self.control_plane = control_plane
        self.log_dir = log_dir
        self.starts = 0
        self.proc = self._start()

    def _start(self) -> OperatorProcess:
        self.starts += 1
        return OperatorProcess(self.control_plane, self.log_dir / f"operator-{self.starts}.log")

    def kill_and_restart(self) -> None:
        self.proc.kill()
        self.proc = self._start()

    def passes(self) -> float:
        """Successful fleet passes so far (0 while the process is still starting)."""
        url = f"http://127.0.0.1:{self.proc.metrics_port}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            return 0.0
        found = re.search(r'^edgefleet_operator_reconciles_total\{result="ok"\} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def operator(control_plane: Any, kube: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    ensure_agent_namespace(kube)
    op = Operator(control_plane, tmp_path_factory.mktemp("operator"))
    yield op
    # The last tests' namespaces are going: let the operator release their services' finalizers.

    custom = custom_api(kube)

    def released() -> bool:
        items = custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.INFERENCE_SERVICE_PLURAL)[
            "items"
        ]
        return not [s for s in items if s["metadata"].get("deletionTimestamp")]

    with contextlib.suppress(AssertionError):
        eventually(released, timeout_s=30, what="deleted services released")
    alive = op.proc.alive()
    op.proc.stop()
    assert alive, f"the operator died during the tests:\n{op.proc.tail()}"
    logs = "".join(p.read_text(errors="replace") for p in sorted(op.log_dir.glob("*.log")))
    assert "Traceback" not in logs, logs[logs.index("Traceback") :][:3000]


@pytest.fixture
def group(kube: Any, operator: Operator) -> Iterator[Group]:
    g = Group(kube)
    yield g
    g.cleanup()


# --- helpers ------------------------------------------------------------------------------------


def wait(check: Callable[[], Any], what: str, group: Group, operator: Operator, timeout_s: float = 60) -> Any:
    """Poll `check` while the simulated agents keep reporting; the operator's log on timeout."""
    return eventually(check, timeout_s, what, step=group.agents.step, operator=operator.proc)


def wait_passes(n: int, group: Group, operator: Operator, min_s: float = 0.0) -> None:
    """Let the operator complete `n` more fleet passes spread over at least `min_s` seconds (a hold
    must survive them, and a wave window that would have ended in that time)."""
    target, until = operator.passes() + n, time.monotonic() + min_s
    wait(
        lambda: operator.passes() >= target and time.monotonic() >= until,
        f"{n} operator passes over {min_s:g}s",
        group,
        operator,
    )


def reported(group: Group, nodes: list[str], key: str, version: str) -> bool:
    """Every one of `nodes` reports `version` of `key` Ready in its EdgeNode status."""
    for n in nodes:
        en = custom_api(group.custom.api_client).get_cluster_custom_object(
            names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, n
        )
        models = (en.get("status") or {}).get("models") or []
        if not any(m["service"] == key and m["version"] == version and m["state"] == "Ready" for m in models):
            return False
    return True


def ro(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = get_status(kube, namespace, name).get("rollout") or {}
    return status


def patch_spec(kube: Any, namespace: str, name: str, version: str, strategy: dict[str, Any]) -> None:
    """Set the service's model version (with its digest) and its rollout strategy in one patch."""

    custom = custom_api(kube)
    obj = custom.get_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, name
    )
    spec = obj["spec"]
    spec["models"][0]["version"] = version
    spec["models"][0]["artifact"]["digest"] = DIGESTS[version]
    spec["rollout"] = strategy
    custom.patch_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, name, {"spec": spec}
    )


def canary(waves: list[dict[str, Any]], analysis: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"strategy": "Canary", "waves": waves, "analysis": analysis, **extra}


HALVES = [{"percent": 50}, {"percent": 100}]


def annotate(kube: Any, namespace: str, name: str, action: str) -> None:

    custom_api(kube).patch_namespaced_custom_object(
        names.GROUP,
        names.VERSION,
        namespace,
        names.INFERENCE_SERVICE_PLURAL,
        name,
        {"metadata": {"annotations": {names.ANNOTATION_ROLLOUT_ACTION: action}}},
    )


def annotation(kube: Any, namespace: str, name: str) -> str | None:

    obj = custom_api(kube).get_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, name
    )
    value: str | None = (obj["metadata"].get("annotations") or {}).get(names.ANNOTATION_ROLLOUT_ACTION)
    return value


def versions(group: Group, key: str) -> dict[str, set[str]]:
    """node -> the versions of `key` its EdgeNode spec holds."""
    return {
        n: {m.rsplit(":", 1)[1] for m in group.edge_models(n) if m.startswith(key + "/")} for n in group.names
    }


def on(group: Group, key: str, version: str) -> list[str]:
    """The nodes whose spec holds exactly `version` of `key`."""
    return sorted(n for n, vs in versions(group, key).items() if vs == {version})


def reasons(kube: Any, namespace: str, name: str) -> list[str]:
    return [r for r, _ in events(kube, namespace, name)]


def deploy_v1(kube: Any, namespace: str, name: str, group: Group, operator: Operator) -> str:
    """Version 1 on every node of the group, Ready; returns the service key."""
    apply(kube, namespace, service(name, group.id))
    wait(
        lambda: (
            condition(get_status(kube, namespace, name), "Ready").get("status") == "True"
            and ro(kube, namespace, name).get("stableVersion") == "1"
        ),
        "v1 ready and stable",
        group,
        operator,
    )
    return f"{namespace}/{name}"


def analysing(kube: Any, namespace: str, name: str, canaries: int) -> dict[str, Any] | None:
    """status.rollout once wave 1's `canaries` nodes confirmed the canary and its window runs."""
    r = ro(kube, namespace, name)
    ok = (
        r.get("phase") == "Progressing"
        and r.get("currentWave") == 0
        and len(r.get("canaryNodes") or []) == canaries
        and r.get("waveStartTime")
    )
    return r if ok else None


def wait_promoted(kube: Any, namespace: str, name: str, what: str, group: Group, operator: Operator) -> Any:
    """Wait for the service's rollout to reach Promoted; its status.rollout."""
    return wait(
        lambda: (r := ro(kube, namespace, name)).get("phase") == "Promoted" and r, what, group, operator
    )


def assert_recorded(kube: Any, namespace: str, name: str, group: Group, key: str) -> None:
    """No node is on a version status.rollout does not record, and only its canary nodes run the canary."""
    r = ro(kube, namespace, name)
    recorded = {r.get("stableVersion"), r.get("canaryVersion")} - {None}
    for node, vs in versions(group, key).items():
        assert vs <= recorded, (node, vs, r)
        if (
            r.get("canaryVersion")
            and r.get("canaryVersion") in vs
            and r.get("phase") in ("Progressing", "Paused")
        ):
            assert node in r["canaryNodes"], (node, vs, r)


def assert_windows_honoured(analysis: list[dict[str, Any]], window_s: int) -> None:
    """Each wave after the first was judged at least a whole window after the previous one passed
    (its window starts when its nodes confirm, which is after that)."""
    times = [wire.parse_time(a["time"]) or 0 for a in analysis if a["result"] == "Passed"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= window_s for g in gaps), (gaps, analysis)


def assert_settled(kube: Any, namespace: str, name: str, group: Group, operator: Operator) -> None:
    """Passes over a finished rollout write nothing to the service (no status churn)."""

    def version() -> str:
        obj = custom_api(kube).get_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, name
        )
        return str(obj["metadata"]["resourceVersion"])

    wait_passes(2, group, operator)
    before = version()
    wait_passes(3, group, operator)
    assert version() == before, "a pass over a settled rollout rewrote the service"


# --- tests --------------------------------------------------------------------------------------


def test_a_slow_version_rolls_back_on_latency(
    kube: Any, namespace: str, group: Group, operator: Operator
) -> None:
    group.nodes(4)
    for sim in group.agents.nodes.values():  # the SLA asks p95 <= 20 ms, p99 <= 40 ms
        sim.sla_by_version = {"2": {"p95LatencyMs": 85.0, "p99LatencyMs": 140.0, "met": False}}
    key = deploy_v1(kube, namespace, "slow", group, operator)
    patch_spec(kube, namespace, "slow", "2", canary(HALVES, FAST))
    r = wait(
        lambda: (r := ro(kube, namespace, "slow")).get("phase") == "RolledBack" and r,
        "the slow canary to roll back",
        group,
        operator,
    )
    assert r["history"][0]["result"] == "RolledBack" and r["history"][0]["toVersion"] == "2"
    failed = [a for a in r["analysis"] if a["result"] == "Failed"]
    assert [a["wave"] for a in failed] == [0], r["analysis"]  # judged once, at the first wave
    assert not [a for a in r["analysis"] if a["result"] == "Passed"]
    wait(lambda: on(group, key, "1") == sorted(group.names), "every node back on v1", group, operator)
    degraded = condition(get_status(kube, namespace, "slow"), "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "RolloutFailed", degraded
    # The failed checks are named with their values and limits.
    assert "p95LatencyMs 85 > 20" in degraded["message"], degraded
    assert "p99LatencyMs 140 > 40" in degraded["message"], degraded
    found = wait(
        lambda: [m for reason, m in events(kube, namespace, "slow") if reason == "RolledBack"],
        "a RolledBack event",
        group,
        operator,
    )
    assert "p95LatencyMs 85 > 20" in found[0], found
    # It stays stopped until the spec changes: no new attempt at v2.
    wait_passes(3, group, operator)
    assert ro(kube, namespace, "slow")["phase"] == "RolledBack"
    assert on(group, key, "1") == sorted(group.names)


def test_low_traffic_holds_as_inconclusive(
    kube: Any, namespace: str, group: Group, operator: Operator
) -> None:
    group.nodes(4)
    for sim in group.agents.nodes.values():  # 2 canary nodes x 3 requests < minSamples 10
        sim.sla_by_version = {"2": {"requests": 3}}
    key = deploy_v1(kube, namespace, "quiet", group, operator)
    patch_spec(kube, namespace, "quiet", "2", canary(HALVES, FAST))
    first = wait(
        lambda: (r := ro(kube, namespace, "quiet")).get("analysis") and r["analysis"][-1],
        "a first analysis",
        group,
        operator,
    )
    assert first["result"] == "Inconclusive" and "6 requests" in first["message"], first
    t0 = wire.parse_time(first["time"])
    assert t0 is not None

    def rejudged() -> dict[str, Any] | None:
        r = ro(kube, namespace, "quiet")
        last = r["analysis"][-1]
        later = (wire.parse_time(last["time"]) or 0) >= t0 + 2 * FAST["intervalSeconds"]
        return r if later else None

    # Judged again over two more windows: it held, neither passing nor failing.
    r = wait(rejudged, "the analysis to be repeated over later windows", group, operator)
    assert r["phase"] == "Progressing" and r["currentWave"] == 0 and r["failedChecks"] == 0, r
    assert [a["result"] for a in r["analysis"]] == ["Inconclusive"], r["analysis"]
    assert "inconclusive" in r["message"] and "holding" in r["message"], r["message"]
    assert len(on(group, key, "2")) == 2 and len(on(group, key, "1")) == 2, versions(group, key)
    assert condition(get_status(kube, namespace, "quiet"), "Degraded").get("reason") != "RolloutFailed"
    assert reasons(kube, namespace, "quiet").count("AnalysisInconclusive") == 1, "said once, not every pass"
    # With enough traffic the same rollout goes on and promotes.
    for sim in group.agents.nodes.values():
        sim.sla_by_version = {}
    r = wait_promoted(kube, namespace, "quiet", "the promotion once traffic arrives", group, operator)
    # (A wave's Inconclusive record is replaced by its verdict, as the state machine's tests specify.)
    assert [(a["wave"], a["result"]) for a in r["analysis"]] == [(0, "Passed"), (1, "Passed")], r["analysis"]


@pytest.mark.parametrize("by", ["spec", "annotation"])
def test_pause_holds_the_wave_and_resume_continues(
    kube: Any, namespace: str, group: Group, operator: Operator, by: str
) -> None:
    group.nodes(4)
    key = deploy_v1(kube, namespace, "hold", group, operator)
    for sim in group.agents.nodes.values():
        sim.loading_versions = {"2"}  # the wave cannot start its analysis before we pause
    patch_spec(kube, namespace, "hold", "2", canary(HALVES, FAST))
    r = wait(
        lambda: (
            (r := ro(kube, namespace, "hold")).get("canaryNodes") and "waiting for 2/2" in r["message"] and r
        ),
        "wave 1 waiting for its canaries",
        group,
        operator,
    )
    canaries = r["canaryNodes"]

    def pause(on_: bool) -> None:
        if by == "spec":
            patch_spec(kube, namespace, "hold", "2", canary(HALVES, FAST, paused=on_))
        else:
            annotate(kube, namespace, "hold", "pause" if on_ else "resume")

    pause(True)
    r = wait(
        lambda: (r := ro(kube, namespace, "hold")).get("phase") == "Paused" and r, "Paused", group, operator
    )
    assert r["step"] == "paused at wave 1/2 (50%)", r["step"]
    want = "spec.rollout.paused" if by == "spec" else "the pause action"
    assert r["message"] == f"paused by {want}", r["message"]
    # The canaries load now; a running wave would pass within its 2 s window. Paused, it holds.
    for sim in group.agents.nodes.values():
        sim.loading_versions = set()
    wait(lambda: reported(group, canaries, key, "2"), "the canaries to report v2 Ready", group, operator)
    wait_passes(3, group, operator, min_s=FAST["intervalSeconds"] + 2)
    r = ro(kube, namespace, "hold")
    assert r["phase"] == "Paused" and r["currentWave"] == 0 and r["canaryNodes"] == canaries, r
    assert r["analysis"] == [] and r["history"] == [], r
    assert on(group, key, "2") == sorted(canaries), versions(group, key)
    if by == "annotation":
        assert annotation(kube, namespace, "hold") is None, "the action annotation is consumed"
        assert r["manuallyPaused"] is True
    pause(False)
    r = wait_promoted(kube, namespace, "hold", "the resumed rollout to promote", group, operator)
    assert [(a["wave"], a["result"]) for a in r["analysis"]] == [(0, "Passed"), (1, "Passed")], r["analysis"]
    assert_windows_honoured(r["analysis"], FAST["intervalSeconds"])
    wait(lambda: on(group, key, "2") == sorted(group.names), "v2 everywhere", group, operator)
    seen = reasons(kube, namespace, "hold")
    assert "RolloutPaused" in seen and "RolloutResumed" in seen, seen


def start_long_wave(kube: Any, namespace: str, name: str, group: Group, operator: Operator) -> str:
    """v1 everywhere, then v2 at its first wave (1 of 4 nodes) with a window no test waits out."""
    group.nodes(4)
    key = deploy_v1(kube, namespace, name, group, operator)
    waves = [{"percent": 25}, {"percent": 50}, {"percent": 100}]
    patch_spec(kube, namespace, name, "2", canary(waves, LONG))
    wait(lambda: analysing(kube, namespace, name, 1), "wave 1 analysing", group, operator)
    assert len(on(group, key, "2")) == 1
    return key


def test_promote_now_finishes_the_rollout(
    kube: Any, namespace: str, group: Group, operator: Operator
) -> None:
    key = start_long_wave(kube, namespace, "prom", group, operator)
    annotate(kube, namespace, "prom", "promote")
    r = wait_promoted(kube, namespace, "prom", "Promoted", group, operator)
    assert r["stableVersion"] == "2" and "canaryVersion" not in r, r
    assert r["history"][0]["result"] == "Promoted" and r["history"][0]["message"] == "promoted manually"
    assert [a["result"] for a in r["analysis"]] == [], "promoted without waiting for any analysis"
    wait(lambda: on(group, key, "2") == sorted(group.names), "v2 everywhere", group, operator)
    assert annotation(kube, namespace, "prom") is None, "the action annotation is consumed"
    assert "RolloutPromoted" in reasons(kube, namespace, "prom")
    assert_settled(kube, namespace, "prom", group, operator)
    r = ro(kube, namespace, "prom")
    assert "canaryVersion" not in r and "waveStartTime" not in r and r["canaryNodes"] == [], r


def test_abort_goes_back_to_stable_until_the_spec_changes(
    kube: Any, namespace: str, group: Group, operator: Operator
) -> None:
    key = start_long_wave(kube, namespace, "abrt", group, operator)
    annotate(kube, namespace, "abrt", "abort")
    r = wait(
        lambda: (r := ro(kube, namespace, "abrt")).get("phase") == "Aborted" and r, "Aborted", group, operator
    )
    assert r["stableVersion"] == "1" and r["history"][0]["result"] == "Aborted", r
    wait(lambda: on(group, key, "1") == sorted(group.names), "v1 everywhere", group, operator)
    assert annotation(kube, namespace, "abrt") is None, "the action annotation is consumed"
    assert "RolloutAborted" in reasons(kube, namespace, "abrt")
    # Aborted stays aborted (the spec still says v2)...
    wait_passes(3, group, operator)
    r = ro(kube, namespace, "abrt")
    assert r["phase"] == "Aborted" and "stopped until the spec changes" in r["message"], r
    assert on(group, key, "1") == sorted(group.names)
    # ...until the spec changes: a new version starts a new rollout.
    patch_spec(kube, namespace, "abrt", "3", canary([{"percent": 25}, {"percent": 100}], LONG))
    wait(
        lambda: (
            (r := ro(kube, namespace, "abrt")).get("phase") == "Progressing" and r.get("canaryVersion") == "3"
        ),
        "a rollout of v3",
        group,
        operator,
    )


def test_reapplying_the_stable_version_is_a_fast_rollback(
    kube: Any, namespace: str, group: Group, operator: Operator
) -> None:
    key = start_long_wave(kube, namespace, "back", group, operator)
    patch_spec(
        kube, namespace, "back", "1", canary([{"percent": 25}, {"percent": 50}, {"percent": 100}], LONG)
    )
    r = wait(
        lambda: (r := ro(kube, namespace, "back")).get("phase") == "RolledBack" and r,
        "RolledBack",
        group,
        operator,
    )
    assert r["history"][0]["message"] == "stable version re-applied", r["history"]
    assert r["stableVersion"] == "1" and "canaryVersion" not in r, r
    wait(lambda: on(group, key, "1") == sorted(group.names), "v1 everywhere", group, operator)
    # The user asked for it: not a failure.
    assert condition(get_status(kube, namespace, "back"), "Degraded").get("reason") != "RolloutFailed"
    found = [m for reason, m in events(kube, namespace, "back") if reason == "RolledBack"]
    assert found and "stable version 1 re-applied" in found[0], found
    assert_settled(kube, namespace, "back", group, operator)


def test_operator_killed_mid_wave_resumes_at_the_same_wave(
    kube: Any, namespace: str, group: Group, operator: Operator
) -> None:
    nodes = group.nodes(4)
    key = deploy_v1(kube, namespace, "kill", group, operator)
    order = rollout.canary_order(key, sorted(nodes))  # wave k's canaries: order[: k + 1]
    for n in order[1:]:
        group.agents.nodes[n].loading_versions = {"2"}  # waves 2.. wait for these nodes
    waves = [{"percent": 25}, {"percent": 50}, {"percent": 75}, {"percent": 100}]
    patch_spec(kube, namespace, "kill", "2", canary(waves, FAST))
    started = None

    def at_wave(w: int) -> Callable[[], Any]:
        return lambda: (r := ro(kube, namespace, "kill")).get("currentWave") == w and r

    def canaries_on_v2(w: int) -> Callable[[], bool]:
        return lambda: set(on(group, key, "2")) == set(order[: w + 1])

    for wave in (1, 2):
        # Kill as soon as status says the wave began: its EdgeNode writes may be under way.
        r = wait(
            at_wave(wave),
            f"wave {wave + 1}",
            group,
            operator,
        )
        operator.kill_and_restart()
        started = started or r["startTime"]
        assert r["startTime"] == started, (r, started)
        assert r["canaryNodes"] == order[: wave + 1], (r["canaryNodes"], order)
        assert_recorded(kube, namespace, "kill", group, key)
        # The new operator picks the rollout up where it was: same wave, same canaries, same start.
        wait(lambda: operator.passes() >= 3, "the restarted operator's passes", group, operator)
        wait(
            canaries_on_v2(wave),
            "the wave's canaries on v2",
            group,
            operator,
        )
        wait_passes(2, group, operator)
        r = ro(kube, namespace, "kill")
        assert (r["phase"], r["currentWave"], r["canaryNodes"]) == ("Progressing", wave, order[: wave + 1]), r
        assert r["startTime"] == started and r["history"] == [], r
        assert_recorded(kube, namespace, "kill", group, key)
        group.agents.nodes[order[wave]].loading_versions = set()  # let this wave pass
    for n in order:
        group.agents.nodes[n].loading_versions = set()
    r = wait_promoted(kube, namespace, "kill", "the rollout to promote", group, operator)
    # Every wave judged and passed exactly once, none skipped, none repeated.
    assert [a["wave"] for a in r["analysis"] if a["result"] == "Passed"] == [0, 1, 2, 3], r["analysis"]
    assert_windows_honoured(r["analysis"], FAST["intervalSeconds"])
    assert [h["result"] for h in r["history"]] == ["Promoted"], r["history"]
    wait(lambda: on(group, key, "2") == sorted(nodes), "v2 everywhere", group, operator)
    seen = events(kube, namespace, "kill")
    assert [reason for reason, _ in seen].count("RolloutStarted") == 1, seen
    for k in (2, 3, 4):  # an event may be lost in a kill, never repeated
        assert sum(1 for reason, m in seen if reason == "WaveStarted" and m.startswith(f"wave {k}/4")) <= 1, (
            seen
        )


# --- the sequential judge on the agents' counters (issue 17) --------------------------------------

SIDE_BY_SIDE = [{"percent": 50, "trafficWeight": 50}, {"percent": 100, "trafficWeight": 50}]
"""Canaries keep stable beside them: every wave has a stable side to compare with."""
JUDGED = {"intervalSeconds": 2, "minSamples": 10, "failureLimit": 1, "progressDeadlineSeconds": 600}


def count_on(group: Group, by_version: dict[str, dict[str, float]]) -> None:
    for sim in group.agents.nodes.values():
        sim.counters_by_version = by_version


def test_the_judge_rolls_a_regressed_canary_back_and_promotes_an_identical_one(
    kube: Any, namespace: str, group: Group, operator: Operator
) -> None:
    group.nodes(4)
    # Every report adds 4000 requests per node (at weight 100): 1% errors, 1% slower than the SLO.
    count_on(group, {"*": {"requests": 4000, "errorRate": 0.01, "slowShare": 0.01}})
    key = deploy_v1(kube, namespace, "judged", group, operator)
    # Version 2 errs 6% of the time; its latencies (SLA windows) are stable's: no threshold fails it.
    count_on(
        group,
        {"*": {"requests": 4000, "errorRate": 0.01, "slowShare": 0.01},
         "2": {"requests": 4000, "errorRate": 0.06, "slowShare": 0.01}},
    )  # fmt: skip
    patch_spec(kube, namespace, "judged", "2", canary(SIDE_BY_SIDE, JUDGED))
    r = wait(
        lambda: (r := ro(kube, namespace, "judged")).get("phase") == "RolledBack" and r,
        "the judge to roll the regressed canary back",
        group,
        operator,
    )
    assert r["currentWave"] == 0 and "error rate" in r["rollbackReason"], r
    assert "e-value" in r["rollbackReason"] and "confidence sequence" in r["rollbackReason"], r
    assert not [a for a in r["analysis"] if a["result"] == "Passed"], r["analysis"]
    wait(lambda: on(group, key, "1") == sorted(group.names), "every node back on v1", group, operator)
    judged = [m for reason, m in events(kube, namespace, "judged") if reason == "JudgeVerdict"]
    assert judged and "Fail" in judged[-1], judged
    degraded = condition(get_status(kube, namespace, "judged"), "Degraded")
    assert degraded["reason"] == "RolloutFailed" and "error rate" in degraded["message"], degraded

    # Version 3 behaves exactly as version 1: the judge passes both waves and it is promoted.
    count_on(group, {"*": {"requests": 4000, "errorRate": 0.01, "slowShare": 0.01}})
    patch_spec(kube, namespace, "judged", "3", canary(SIDE_BY_SIDE, JUDGED))
    seen: list[dict[str, Any]] = []

    def promoted() -> Any:
        r = ro(kube, namespace, "judged")
        if r.get("evidence"):
            seen.append(r["evidence"])
        return r.get("phase") == "Promoted" and r.get("stableVersion") == "3" and r

    r = wait(promoted, "the identical canary to be promoted", group, operator, timeout_s=120)
    assert [(a["wave"], a["result"]) for a in r["analysis"]] == [(0, "Passed"), (1, "Passed")], r["analysis"]
    assert all(a["message"].startswith("judge Pass: ") for a in r["analysis"]), r["analysis"]
    assert seen and all(e["verdict"] != "Fail" for e in seen), seen
    assert any(e["canaryRequests"] > 0 and e["stableRequests"] > 0 for e in seen), seen
    assert "evidence" not in r and "counters" not in r  # the finished rollout keeps no wave state
    # Status says Promoted first; the stable copies beside the canaries go on the next EdgeNode writes.
    wait(lambda: on(group, key, "3") == sorted(group.names), "v3 alone everywhere", group, operator)


def test_a_regression_on_one_site_is_rolled_back_at_that_sites_wave(
    kube: Any, namespace: str, group: Group, operator: Operator
) -> None:
    """Waves by place: one site, then both, then every node. Version 2 errs only on the nodes of
    the site reached second: the first site's wave passes, the second's is rolled back; while each
    wave is judged, every site keeps a node on stable."""
    site_of: dict[str, str] = {}
    for prefix in ("a", "b"):
        site = f"{prefix}{group.id}"
        site_of |= dict.fromkeys(group.nodes(3, prefix=prefix, labels={names.LABEL_SITE: site}), site)
    ok = {"requests": 4000, "errorRate": 0.01, "slowShare": 0.01}
    count_on(group, {"*": ok})
    key = deploy_v1(kube, namespace, "sites", group, operator)
    first, second = site_order(key, sorted(set(site_of.values())))
    for n, site in site_of.items():
        if site == second:
            group.agents.nodes[n].counters_by_version = {"*": ok, "2": {**ok, "errorRate": 0.06}}
    ladder = [{"sites": 1}, {"sites": 2}, {"percent": 100}]
    patch_spec(kube, namespace, "sites", "2", canary(ladder, JUDGED))
    seen: list[dict[str, Any]] = []

    def rolled_back() -> Any:
        r = ro(kube, namespace, "sites")
        if r.get("phase") == "Progressing":
            seen.append(r)
        return r.get("phase") == "RolledBack" and r

    r = wait(rolled_back, "the second site's regression to be rolled back", group, operator, timeout_s=120)
    assert r["currentWave"] == 1 and "error rate" in r["rollbackReason"], r
    assert [(a["wave"], a["result"]) for a in r["analysis"]] == [(0, "Passed"), (1, "Failed")], r["analysis"]
    waves = {s["currentWave"]: s["canaryNodes"] for s in seen if s["canaryNodes"]}
    assert {site_of[n] for n in waves[0]} == {first} and len(waves[0]) == 2, waves
    assert sorted(site_of[n] for n in waves[1]) == sorted([first, first, second, second]), waves
    for s in seen:  # a site never without stable while its canary is judged
        on_canary = [site_of[n] for n in s["canaryNodes"]]
        assert all(on_canary.count(site) <= 2 for site in (first, second)), s
    wait(lambda: on(group, key, "1") == sorted(group.names), "every node back on v1", group, operator)


def test_the_nodes_a_rollout_takes_next_are_told_to_fetch_the_canary_ahead(
    kube: Any, namespace: str, group: Group, operator: Operator
) -> None:
    group.nodes(4)
    key = deploy_v1(kube, namespace, "ahead", group, operator)
    patch_spec(kube, namespace, "ahead", "2", canary(HALVES, LONG))
    r = wait(lambda: analysing(kube, namespace, "ahead", 2), "wave 1 analysing", group, operator)
    custom = custom_api(kube)

    def prefetch(node: str) -> list[tuple[str, str]]:
        en = custom.get_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, node)
        return [(p["service"], p["version"]) for p in en["spec"].get("prefetch") or []]

    others = sorted(set(group.names) - set(r["canaryNodes"]))
    # The last wave takes every other node: each fetches version 2 ahead while it serves version 1.
    wait(
        lambda: all(prefetch(n) == [(key, "2")] for n in others),
        "the next nodes told to prefetch",
        group,
        operator,
    )
    assert all(prefetch(n) == [] for n in r["canaryNodes"])  # they hold it already
    assert on(group, key, "1") == others
    annotate(kube, namespace, "ahead", "promote")
    wait(lambda: on(group, key, "2") == sorted(group.names), "v2 everywhere", group, operator)
    wait(lambda: all(prefetch(n) == [] for n in group.names), "nothing left to fetch ahead", group, operator)
