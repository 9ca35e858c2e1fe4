"""Rollout safety faults (issue 16, part 4) against the real local kube-apiserver: the operator's
fleet passes run in the test process (`OperatorPasses`), agents are real processes serving the
example TorchScript models (`AgentProcess`), or, where the test is about what the operator believes,
the test writes the agents' reports itself.

- The stable artifact unreachable during a rollback: the node keeps serving the canary (every
  request answered), its status and the service's Degraded condition say why; once the artifact is
  back it converges to stable with no moment where it serves nothing. A replayed old status of that
  node is overwritten by its agent and changes nothing the operator believes.
- Replayed and older agent reports: analysis neither advances nor rolls back a wave on them.
- A hundred spec edits in a second: the last wins; the agent sees stable, then the final version.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from e2e import waiting
from e2e.operator_proc import AGENT_NAMESPACE, ensure_agent_namespace
from node_agent.runtime.model_yaml import parse_model_config
from node_agent.runtime.repository import sha256_file

from .rollout_safety_support import (
    AgentProcess,
    ArtifactServer,
    Client,
    EdgeNodeWatch,
    FakeClock,
    Fleet,
    OperatorPasses,
    Reporter,
    condition,
    models_of,
    running,
)

pytestmark = pytest.mark.cluster

LONG = {"intervalSeconds": 3600, "minSamples": 10, "failureLimit": 1}
"""A window no test waits out: only a spec change ends the wave."""


# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """classifier/{1,2,...}, mlp/1: real small TorchScript models (fixed seeds)."""
    from node_agent.examples import make_examples

    root = tmp_path_factory.mktemp("model-repo")
    make_examples(root)
    return root


@pytest.fixture
def group(kube: Any, namespace: str) -> Iterator[Fleet]:
    ensure_agent_namespace(kube)
    g = Fleet(kube, namespace)
    yield g


def digest_of(repo: Path, version: str) -> str:
    return parse_model_config(repo / "classifier" / version / "model.yaml").digest


def request_body() -> tuple[dict[str, Any], np.ndarray]:
    x = np.random.default_rng(7).standard_normal((1, 3, 64, 64)).astype(np.float32)
    body = {
        "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    return body, x


def reference(repo: Path, version: str, x: np.ndarray) -> list[float]:
    module = torch.jit.load(str(repo / "classifier" / version / "model.pt"))
    with torch.inference_mode():
        return [float(v) for v in module(torch.from_numpy(x)).numpy().ravel()]


def eventually(check: Any, what: str, timeout_s: float = 30, context: Any = None) -> Any:
    return waiting.eventually(check, timeout_s, what, None, context)


# --- (a) the stable artifact unreachable during a rollback --------------------------------------


def test_a_rollback_whose_stable_artifact_is_unreachable_keeps_serving_the_canary(
    control_plane: Any, kube: Any, group: Fleet, example_repo: Path, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    server = ArtifactServer(example_repo)
    server.start()
    node = group.add_nodes(1)[0]
    repo = tmp_path / "agent-repo"
    repo.mkdir()
    agent = AgentProcess(node, control_plane.kubeconfig, AGENT_NAMESPACE, repo)
    passes = OperatorPasses(kube, group.id)
    key = f"{group.namespace}/cls"
    d1, d2 = digest_of(example_repo, "1"), digest_of(example_repo, "2")
    v1_url, v2_url = server.url("classifier/1/model.pt"), server.url("classifier/2/model.pt")
    c1, c2 = (sha256_file(example_repo / "classifier" / v / "model.yaml") for v in ("1", "2"))
    body, x = request_body()
    client = None

    def seen() -> str:
        with_status = {"node": group.edge_node(node).get("status"), "errors": passes.errors[-3:]}
        return f"{with_status}\nagent:\n{agent.tail()}"

    try:
        with running(server, agent, passes):
            agent.wait_listening()
            passes.start()
            rollout = {"strategy": "Canary", "waves": [{"percent": 100}], "analysis": LONG}
            group.create_service("cls", "1", v1_url, d1, rollout, config=c1)
            eventually(
                lambda: models_of(group.edge_node(node), key).get("1", {}).get("state") == "Ready",
                "classifier:1 Ready on the node",
                context=seen,
            )
            client = Client(agent.port, "classifier", body, {"1": reference(example_repo, "1", x)} | {
                "2": reference(example_repo, "2", x)
            })  # fmt: skip
            client.start()
            eventually(lambda: len(client.answers.items) >= 5, "the client's first answers")
            first_s = client.answers.items[0][0] - client.started[0]

            # The canary: classifier:2 on the node (a 100% wave), classifier:1 gone from it.
            group.set_version("cls", "2", v2_url, d2, config=c2)
            eventually(
                lambda: (
                    set(models_of(group.edge_node(node), key)) == {"2"}
                    and models_of(group.edge_node(node), key)["2"]["state"] == "Ready"
                ),
                "the canary classifier:2 alone on the node",
                context=seen,
            )

            # The stable artifact becomes unreachable (its server down, the node's copy gone: a node
            # re-imaged, or one that joined during the rollout), then the rollout is rolled back.
            server.stop()
            shutil.rmtree(repo / "classifier" / "1", ignore_errors=True)
            group.set_version("cls", "1", v1_url, d1, config=c1)

            def says_why() -> dict[str, Any] | None:
                en = group.edge_node(node)
                m = models_of(en, key)
                ok = (
                    m.get("1", {}).get("state") == "Failed"
                    and m.get("2", {}).get("state") == "Ready"
                    and condition(en, "ServingPrevious").get("reason") == "TargetFailed"
                )
                return en if ok else None

            en = eventually(says_why, "the node to report the unreachable stable artifact", context=seen)
            m = models_of(en, key)
            assert f"fetching {v1_url} failed" in m["1"]["message"], m
            assert "serving in place of classifier:1 Failed" in m["2"]["message"], m
            assert m["2"]["trafficWeight"] == 100
            assert condition(en, "Ready")["status"] == "False"
            failing_report = en["status"]

            def degraded() -> dict[str, Any] | None:
                c = condition(group.service("cls"), "Degraded")
                return (
                    c if c.get("status") == "True" and c.get("reason") == "ServingPreviousVersion" else None
                )

            c = eventually(degraded, "the service Degraded, naming the node", context=seen)
            assert f"{node}: cannot prepare classifier:1" in c["message"]
            assert "still serving classifier:2" in c["message"] and "Connection refused" in c["message"]
            served_while_down = len(client.answers.items)
            assert client.answers.failures() == [], client.answers.failures()[:3]

            # The artifact is back: the node converges to stable, loading it before the canary goes.
            server.start()

            def converged() -> dict[str, Any] | None:
                en = group.edge_node(node)
                m = models_of(en, key)
                ok = set(m) == {"1"} and m["1"]["state"] == "Ready"
                return en if ok and condition(en, "ServingPrevious").get("status") == "False" else None

            en = eventually(converged, "the node back on stable classifier:1", context=seen)
            eventually(
                lambda: condition(group.service("cls"), "Degraded").get("status") == "False",
                "the service no longer Degraded",
                context=seen,
            )
            eventually(lambda: client.answers.versions()[-1:] == ["1"], "requests answered by classifier:1")

            # A replayed old status (the failing one), five times: each is overwritten by the agent (a
            # conditional write: its next diff never lands on the replay), and the operator never
            # believes one meanwhile: the service never goes Degraded again.
            degraded_again: list[tuple[float, str]] = []
            for _ in range(5):
                sequence = group.edge_node(node)["status"]["reportSequence"]
                assert failing_report["reportSequence"] < sequence
                group.write_status(node, failing_report)
                replayed_at = time.monotonic()
                restored = None
                while time.monotonic() - replayed_at < 10 and restored is None:
                    c = condition(group.service("cls"), "Degraded")
                    if c.get("status") == "True":
                        degraded_again.append((round(time.monotonic() - replayed_at, 2), c.get("message")))
                    st = group.edge_node(node)["status"]
                    if st["reportSequence"] > sequence and set(models_of({"status": st}, key)) == {"1"}:
                        restored = st
                    time.sleep(0.02)
                assert restored is not None, "the agent did not overwrite the replayed status"
            assert degraded_again == [], f"the operator believed a replayed report: {degraded_again[:2]}"
            answers = client.stop()
    finally:
        if client is not None:
            client.stop()
        group.cleanup(passes)
    assert answers.failures() == [], answers.failures()[:5]
    assert answers.versions() == ["1", "2", "1"], answers.versions()
    assert served_while_down > 0 and len(answers.items) > served_while_down
    print(
        f"\n(a) {len(answers.items)} requests, all answered (200); versions {answers.versions()}; "
        f"longest gap between answers after the first {answers.longest_gap_s(after=5):.3f} s (the first "
        f"request {first_s:.3f} s); "
        f"{time.monotonic() - t0:.1f} s"
    )


# --- (b) replayed and older agent reports ------------------------------------------------------


def test_replayed_and_older_agent_reports_neither_advance_nor_roll_back_a_wave(
    kube: Any, group: Fleet
) -> None:
    t0 = time.monotonic()
    clock = FakeClock()
    passes = OperatorPasses(kube, group.id, clock)
    agents = Reporter(group, clock)
    digests = {"1": "sha256:" + "a1" * 32, "2": "sha256:" + "b2" * 32}
    nodes = group.add_nodes(2)
    analysis = {"intervalSeconds": 10, "minSamples": 10, "maxP99LatencyMs": 50, "failureLimit": 1}
    rollout = {"strategy": "Canary", "waves": [{"count": 1}, {"count": 2}], "analysis": analysis}

    def uri(v: str) -> str:
        return f"repo://classifier/{v}/model.pt"

    def ro() -> dict[str, Any]:
        status: dict[str, Any] = group.service("cls").get("status", {}).get("rollout") or {}
        return status

    def pass_() -> dict[str, Any]:
        passes.once()
        return ro()

    try:
        group.create_service("cls", "1", uri("1"), digests["1"], rollout)

        def placed() -> bool:  # kwok marks new Nodes Ready a moment after they are created
            passes.once()
            return all(group.edge_node(n).get("spec", {}).get("models") for n in nodes)

        eventually(placed, "v1 placed on both nodes")
        for n in nodes:
            agents.report(n, 10.0)
        assert pass_()["phase"] == "Idle" and ro()["stableVersion"] == "1"

        group.set_version("cls", "2", uri("2"), digests["2"])
        pass_()  # reads the new generation: the spec must hold it 1 s before it rolls out
        time.sleep(1.1)
        state = pass_()
        assert state["phase"] == "Progressing" and len(state["canaryNodes"]) == 1, state
        canary = state["canaryNodes"][0]
        other = next(n for n in nodes if n != canary)

        # Wave 1. The canary first reports a slow v2 (kept for a replay), then a good one.
        slow = agents.report(canary, 500.0)
        agents.report(other, 10.0)
        state = pass_()
        assert state.get("waveStartTime"), state  # the window starts: the canary confirms v2
        clock.skip(1)
        agents.report(canary, 10.0)
        agents.report(other, 10.0)
        pass_()  # the operator has seen the good report
        group.write_status(canary, slow)  # the slow report replayed (an older sequence)
        clock.skip(10)
        state = pass_()
        assert state["currentWave"] == 1 and state["phase"] == "Progressing", state
        assert [a["result"] for a in state["analysis"]] == ["Passed"], state  # judged on the good one
        assert state["failedChecks"] == 0 and "RolledBack" not in str(state.get("history"))
        generation_before = group.edge_node(other)["metadata"]["generation"]

        # Wave 2: the other node runs v2 now. A report of it older than the spec that set v2 there
        # (observedGeneration behind; a newer sequence: only the generation tells) confirms nothing.
        new_generation = group.edge_node(other)["metadata"]["generation"]
        assert {m["version"] for m in group.edge_node(other)["spec"]["models"]} == {"2"}
        agents.report(other, 10.0, generation=new_generation - 1)
        agents.report(canary, 10.0)
        state = pass_()
        assert "waveStartTime" not in state and "waiting for 1/2" in state["message"], state
        clock.skip(20)
        agents.report(other, 10.0, generation=new_generation - 1)
        agents.report(canary, 10.0)
        state = pass_()
        assert state["phase"] == "Progressing" and state["currentWave"] == 1, state
        assert [a["result"] for a in state["analysis"]] == ["Passed"], state  # nothing judged since

        # Its fresh report: the window starts; judged on fresh reports, promoted.
        agents.report(other, 10.0)
        state = pass_()
        assert state.get("waveStartTime"), state
        clock.skip(11)
        agents.report(other, 10.0)
        agents.report(canary, 10.0)
        state = pass_()
        assert state["phase"] == "Promoted" and ro()["stableVersion"] == "2", state
        assert [a["result"] for a in state["analysis"]] == ["Passed", "Passed"]
        assert generation_before == new_generation
        ignored = passes.reconciler.reader.views.ledger.ignored
        assert ignored >= 1, "the replayed report was never seen as one"
    finally:
        group.cleanup(passes)
    print(f"\n(b) replay ignored ({ignored} report(s)); {time.monotonic() - t0:.1f} s")


# --- (c) a hundred spec edits in a second ----------------------------------------------------------


def test_a_hundred_spec_edits_in_a_second_reach_the_agent_as_the_last_one(
    control_plane: Any, kube: Any, group: Fleet, example_repo: Path, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    node = group.add_nodes(1)[0]
    repo = tmp_path / "agent-repo"
    shutil.copytree(example_repo / "classifier", repo / "classifier")
    agent = AgentProcess(node, control_plane.kubeconfig, AGENT_NAMESPACE, repo)
    passes = OperatorPasses(kube, group.id)
    key = f"{group.namespace}/cls"
    d1, d2 = digest_of(example_repo, "1"), digest_of(example_repo, "2")
    watcher = EdgeNodeWatch(group, node, key)

    def seen() -> str:
        return f"{group.edge_node(node).get('status')}\nagent:\n{agent.tail()}"

    try:
        with running(agent, passes, watcher):
            agent.wait_listening()
            passes.start(interval_s=0.02)
            group.create_service("cls", "1", "repo://classifier/1/model.pt", d1)  # AllAtOnce
            eventually(
                lambda: models_of(group.edge_node(node), key).get("1", {}).get("state") == "Ready",
                "classifier:1 Ready on the node",
                context=seen,
            )
            watcher.start()
            passes_before, burst_start = passes.passes, time.monotonic()
            for i in range(99):  # versions that exist nowhere: an agent told to run one would fail
                generation = group.set_version(
                    "cls", f"9.{i}", f"repo://classifier/9.{i}/model.pt", f"sha256:{i:064x}"
                )
            generation = group.set_version("cls", "2", "repo://classifier/2/model.pt", d2)
            burst_s, burst_passes = time.monotonic() - burst_start, passes.passes - passes_before

            def converged() -> bool:
                svc = group.service("cls").get("status") or {}
                m = models_of(group.edge_node(node), key)
                return (
                    set(m) == {"2"}
                    and m["2"]["state"] == "Ready"
                    and svc.get("observedGeneration") == generation
                    and (svc.get("rollout") or {}).get("stableVersion") == "2"
                )

            eventually(converged, "the node and the service on the last edit (classifier:2)", context=seen)
    finally:
        group.cleanup(passes)
    prepared = sorted({m for line in agent.lines for m in re.findall(r"prepared (classifier:\S+)", line)})
    assert burst_passes >= 3, f"the operator passed {burst_passes} times during the burst: nothing raced it"
    assert [sorted(v) for v in watcher.spec_versions if v] == [["1"], ["2"]], watcher.spec_versions
    assert watcher.status_versions <= {"1", "2"}, watcher.status_versions
    assert prepared == ["classifier:1", "classifier:2"], prepared
    print(
        f"\n(c) 100 edits in {burst_s:.2f} s, {burst_passes} operator passes meanwhile; the agent saw "
        f"{[sorted(v) for v in watcher.spec_versions]}; {time.monotonic() - t0:.1f} s"
    )
