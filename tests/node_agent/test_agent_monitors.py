"""The SLA and thermal monitors composed into a real agent, seen over HTTP.

A real agent serves the example models; its SLA monitor measures every batch, escalates a
model that misses an (impossible) latency objective and makes the request path shed the
low-priority class (503 with Retry-After) while urgent requests still run; its thermal
monitor, on the simulated source under a heat ramp, lowers the concurrency gate and batch
sizes before the simulated hardware throttles and restores them once cool. EdgeNode mode
serves the assigned versions only and leaves load/unload to the operator.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from agent_runner import RunningAgent
from prometheus_client.parser import text_string_to_metric_families

from edgefleet_api.types import ModelId, Priority
from node_agent.agent import Agent, AgentSettings
from node_agent.control.sla_monitor import SlaSettings
from node_agent.control.thermal import ThermalSettings
from node_agent.link.assigned_configs import AssignedConfigs
from node_agent.runtime.repository import ModelRepository
from node_agent.serving.http import HttpSettings

LOCAL = HttpSettings(host="127.0.0.1", port=0)


def post(running: RunningAgent, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any, Any]:
    """(status, JSON body, headers) of a POST to the agent."""
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(f"http://{running.url}{path}", data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def infer_body(priority: str, seed: int = 0) -> dict[str, Any]:
    x = np.random.default_rng(seed).standard_normal((1, 3, 64, 64)).astype(np.float32)
    tensor = {"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return {"inputs": [tensor], "parameters": {"priority": priority}}


def metrics(running: RunningAgent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{running.url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def until(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < give_up, f"timed out waiting until {what}"
        time.sleep(0.02)


@pytest.fixture()
def strict_repo(example_repo: Path, tmp_path: Path) -> Path:
    """The examples, classifier/1 with a p95 objective of 10 us (no request meets it)."""
    root = tmp_path / "models"
    shutil.copytree(example_repo, root)
    config_file = root / "classifier" / "1" / "model.yaml"
    doc = yaml.safe_load(config_file.read_text())
    doc["p95_latency_s"] = 1e-5
    config_file.write_text(yaml.safe_dump(doc))
    return root


@pytest.fixture()
def sla_agent(strict_repo: Path) -> Iterator[RunningAgent]:
    quick = SlaSettings(
        interval_s=0.05, control_window_s=1.0, min_requests=5, min_control_requests=5,
        escalate_interval_s=0.0, recover_after_s=600.0,
    )  # fmt: skip
    running = RunningAgent(AgentSettings(strict_repo, workers=1, http=LOCAL, sla=quick, thermal_source="off"))
    yield running
    running.close()


def test_sla_violation_sheds_low_priority_requests_on_the_request_path(sla_agent: RunningAgent) -> None:
    agent = sla_agent.agent
    assert agent.sla is not None and agent.thermal is None
    model = ModelId("classifier", "1")
    path = "/v2/models/classifier/versions/1/infer"

    def escalated_to_shedding() -> bool:
        for i in range(5):  # normal priority: admitted until level 3
            status, _, _ = post(sla_agent, path, infer_body("normal", i))
            assert status in (200, 503)
        return model in agent.sla.models() and agent.sla.level(model) >= 2

    until(escalated_to_shedding, "the SLA monitor escalated classifier/1 to a shedding level")
    status, body, headers = post(sla_agent, path, infer_body("low"))
    assert status == 503, body
    assert "low priority requests are shed" in body["error"]
    assert float(headers["Retry-After"]) >= 0.05
    status, body, _ = post(sla_agent, path, infer_body("high"))
    assert status == 200 and len(body["outputs"][0]["data"]) == 10

    assert agent.controls is not None
    assert agent.controls.refused[(model, Priority.LOW)] == 1
    m = metrics(sla_agent)

    def sample(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted({"model": "classifier", "version": "1", **labels}.items())))]

    shed = sum(n for (refused, _), n in agent.controls.refused.items() if refused == model)
    assert sample("edgefleet_admissions_refused_total", reason="priority_shed") == shed >= 1
    assert sample("edgefleet_sla_mitigation_level") >= 2
    assert sample("edgefleet_sla_violations_total", objective="p95_latency") >= 1
    other = ModelId("mlp", "1")  # another model is not mitigated by classifier's SLA
    assert agent.controls.admits(other, Priority.LOW)


def test_sla_change_in_the_config_reaches_the_monitor(strict_repo: Path) -> None:
    """An SLA that changes in the model's config (EdgeNode.spec in a cluster) is measured
    against from the next tick on."""
    quick = SlaSettings(interval_s=0.05)
    running = RunningAgent(AgentSettings(strict_repo, workers=1, http=LOCAL, thermal_source="off", sla=quick))
    try:
        agent = running.agent
        assert agent.sla is not None and agent.engine is not None
        status, _, _ = post(running, "/v2/models/classifier/versions/1/infer", infer_body("normal"))
        assert status == 200
        model = ModelId("classifier", "1")
        assert agent.sla.spec(model).p95_latency_s == pytest.approx(1e-5)
        config_file = strict_repo / "classifier" / "1" / "model.yaml"
        doc = yaml.safe_load(config_file.read_text())
        doc["p95_latency_s"] = 0.5
        doc.setdefault("parameters", {})["sla_window_s"] = "30"
        config_file.write_text(yaml.safe_dump(doc))
        until(lambda: agent.sla.spec(model).p95_latency_s == pytest.approx(0.5), "the new p95 objective")
        assert agent.sla.spec(model).window_s == 30
    finally:
        running.close()


def test_heat_ramp_lowers_concurrency_and_batches_then_restores(example_repo: Path) -> None:
    thermal = ThermalSettings(soft_limit_c=40.0, interval_s=0.05, hold_s=0.2, lookahead_s=1.0)
    settings = AgentSettings(example_repo, workers=1, http=LOCAL, thermal_source="simulated", thermal=thermal)
    running = RunningAgent(settings)
    try:
        agent = running.agent
        monitor, controls = agent.thermal, agent.controls
        assert monitor is not None and controls is not None and controls.gate is not None
        gate = controls.gate
        assert gate.max_concurrency == settings.max_concurrency == 2 and gate.limit == 2

        async def planned_batch() -> int:
            assert agent.engine is not None
            return agent.engine.batcher("classifier", "1").policy.decision().batch_size

        unmitigated = running.call(planned_batch())
        source = monitor.source
        source.ambient_c = 200.0  # heat ramp: about 6 K/s
        until(lambda: monitor.state.level >= 2, "the thermal monitor reached level 2")
        status = monitor.status
        assert status is not None and status.reading.temperature_c is not None
        assert status.reading.temperature_c < source.model.slowdown_c  # acted before the hardware
        assert gate.limit == 1
        assert running.call(planned_batch()) < unmitigated
        m = metrics(running)
        assert m[("edgefleet_concurrency_limit", ())] == 1
        assert m[("edgefleet_thermal_mitigation_level", ())] >= 2
        assert m[("edgefleet_gpu_temperature_celsius", ())] > 30.0  # heating (level 2 is wanted ahead of 40)
        assert m[("edgefleet_gpu_soft_limit_celsius", ())] == 40.0

        source.ambient_c = -200.0  # cooling: back down one level at a time
        until(lambda: monitor.state.level == 0, "the thermal monitor recovered to level 0")
        assert gate.limit == 2
        assert running.call(planned_batch()) == unmitigated
        status, _, _ = post(running, "/v2/models/classifier/versions/1/infer", infer_body("normal"))
        assert status == 200
    finally:
        running.close()


def test_auto_thermal_source_takes_a_real_sensor_or_runs_no_monitor(example_repo: Path) -> None:
    from node_agent.control.thermal_sources import detect_source

    sensor = detect_source()
    running = RunningAgent(AgentSettings(example_repo, workers=1, http=LOCAL))
    try:
        if sensor is None:  # no NVML, no sysfs GPU zone: no simulated readings in its place
            assert running.agent.thermal is None
            assert ("edgefleet_gpu_temperature_celsius", ()) not in metrics(running)
        else:
            assert running.agent.thermal is not None
            assert type(running.agent.thermal.source) is type(sensor)
    finally:
        running.close()
        if sensor is not None:
            sensor.close()


def test_bad_thermal_source_is_refused() -> None:
    with pytest.raises(ValueError, match="thermal_source must be one of auto, nvml, sysfs, simulated, off"):
        AgentSettings(Path("."), thermal_source="lava")


def test_edge_node_mode_serves_assigned_versions_and_refuses_repository_control(example_repo: Path) -> None:
    assigned = AssignedConfigs()
    assigned.put(ModelRepository(example_repo).config("classifier", "2"))
    running = RunningAgent(AgentSettings(example_repo, workers=1, http=LOCAL, thermal_source="off"), assigned)
    try:
        status, index, _ = post(running, "/v2/repository/index")
        assert status == 200
        assert [(e["name"], e["version"], e["state"]) for e in index] == [("classifier", "2", "READY")]
        with urllib.request.urlopen(f"http://{running.url}/v2/models/classifier", timeout=30) as resp:
            assert json.loads(resp.read())["versions"] == ["2"]
        status, body, _ = post(running, "/v2/models/classifier/infer", infer_body("normal"))
        assert status == 200 and body["model_version"] == "2"
        for path in ("/v2/models/mlp/infer", "/v2/models/classifier/versions/1/infer"):
            status, body, _ = post(running, path, infer_body("normal"))
            assert status == 404 and "not assigned to this node" in body["error"], path
        for action in ("load", "unload"):
            status, body, _ = post(running, f"/v2/repository/models/classifier/{action}")
            assert status == 409 and "change the InferenceService" in body["error"], action
    finally:
        running.close()


def test_edge_node_mode_makes_its_repository_on_an_empty_volume(tmp_path: Path) -> None:
    # The chart mounts an emptyDir at /var/lib/edgefleet and points the repository below it: the
    # first real Pods crashed with "model repository ... is not a directory".
    root = tmp_path / "volume" / "models"
    running = RunningAgent(
        AgentSettings(root, workers=1, http=LOCAL, thermal_source="off"), AssignedConfigs()
    )
    try:
        assert root.is_dir()
        status, index, _ = post(running, "/v2/repository/index")
        assert status == 200 and index == []
    finally:
        running.close()


def test_a_repository_that_is_a_file_is_refused_even_in_edge_node_mode(tmp_path: Path) -> None:
    (tmp_path / "models").write_text("not a folder")
    agent = Agent(AgentSettings(tmp_path / "models", workers=1, http=LOCAL), overlay=AssignedConfigs())
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        asyncio.run(agent.start())


def test_monitors_tick_while_the_agent_runs_and_stop_with_it(example_repo: Path) -> None:
    settings = AgentSettings(
        example_repo, workers=1, http=LOCAL, thermal_source="simulated",
        sla=SlaSettings(interval_s=0.05), thermal=ThermalSettings(interval_s=0.05),
    )  # fmt: skip
    gc.unfreeze()
    running = RunningAgent(settings)
    # ready: what the process holds is frozen out of the cyclic GC (no 100 ms full collections)
    assert gc.get_freeze_count() > 0
    agent = running.agent
    assert agent.sla is not None and agent.thermal is not None
    until(lambda: agent.thermal is not None and agent.thermal.status is not None, "a thermal sample")
    status, _, _ = post(running, "/v2/models/classifier/versions/1/infer", infer_body("normal"))
    assert status == 200
    model = ModelId("classifier", "1")
    until(lambda: agent.sla is not None and agent.sla.report(model) is not None, "an SLA report")

    async def monitor_tasks() -> list[str]:
        return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().endswith("-monitor"))

    assert running.call(monitor_tasks()) == ["sla-monitor", "thermal-monitor"]
    running.call(agent.stop())
    assert running.call(monitor_tasks()) == []
    running.close()
