"""Metrics a real Prometheus uses (issue 20): every metric the chart's Grafana dashboard and its
recording rules and alerts query exists in the exposition of a running agent (after real
inference) or of the operator, with every label the query uses; the rules pass `promtool check
rules` where promtool is built (scripts/promtool.sh), and parse otherwise."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet_api.rollout_status import Phase
from edgefleet_operator.metrics import OperatorMetrics
from edgefleet_operator.pass_report import PassReport
from node_agent.agent import AgentSettings
from node_agent.control.sla_monitor import SlaSettings
from node_agent.serving.http import HttpSettings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "edgefleet"
TARGET_LABELS = {"instance", "job", "namespace", "pod", "container", "endpoint", "node"}
"""Labels Prometheus (and the chart's PodMonitor relabelling: `node`) adds to every series."""
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def exposition_labels(text: str) -> dict[str, set[str]]:
    """sample name -> the label names its samples carry."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
        out.setdefault(family.name, set())
    return out


@pytest.fixture(scope="module")
def exposed(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """The label names of every series a running agent (after real inference) and the operator
    (after a pass with rollout events) expose."""
    from agent_runner import RunningAgent, post_infer

    repo = tmp_path_factory.mktemp("monitoring") / "models"
    shutil.copytree(example_repo, repo)
    # The classifier gets an SLA, as an InferenceService gives it through its EdgeNode.
    model_yaml = repo / "classifier" / "2" / "model.yaml"  # the version "classifier" requests get
    slo = "p95_latency_s: 0.5\np99_latency_s: 1.0\nsla_window_s: 5\n"
    model_yaml.write_text(model_yaml.read_text() + slo)
    # The simulated thermal source stands in for the GPU sensor this machine lacks (same metrics).
    settings = AgentSettings(
        repo,
        workers=1,
        http=HttpSettings(host="127.0.0.1", port=0),
        thermal_source="simulated",
        sla=SlaSettings(min_requests=5),
    )
    running = RunningAgent(settings)
    try:
        sla = running.agent.sla
        assert sla is not None
        x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
        for _ in range(8):
            assert post_infer(running.url, "classifier", x) == 200
        sla.tick()
        with urllib.request.urlopen(f"http://{running.url}/metrics", timeout=30) as r:
            agent = exposition_labels(r.read().decode())
    finally:
        running.close()
    metrics = OperatorMetrics()
    report = PassReport(nodes=3, services=1, health={"a": "Healthy", "b": "AgentSilent"})
    report.wrote("edgenode_spec")
    report.rollout_events.update({"RolledBack": 1, "RolloutPromoted": 1, "RolloutStarted": 2})
    metrics.observe_pass(report, 0.05, ok=True)
    operator = exposition_labels(generate_latest(metrics.registry).decode())
    assert Phase.ROLLED_BACK.value == "RolledBack"  # the reason the rules and the dashboard match
    yield agent | operator


def queried(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names the expression uses with it) for each of our metrics in `expr`.
    Labels: every `by`/`without` list and matcher in the expression (a query's grouping applies to
    the metrics inside it; these expressions hold one metric family each, or families that share
    their labels)."""
    names = re.findall(r"(?<![:\w])(edgefleet_[a-z0-9_]+)(?![\w:])", expr)
    grouped = {g.strip() for m in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr) for g in m.split(",")}
    matched = set(re.findall(r"[{,]\s*([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", expr))
    return [(n, (grouped | matched) - {""}) for n in names]


def check(expr: str, exposed: dict[str, set[str]], where: str) -> list[str]:
    problems = []
    for name, labels in queried(expr):
        if name not in exposed:
            problems.append(f"{where}: {name} is in no exposition")
            continue
        have = exposed[name] | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
        if labels - have:
            problems.append(
                f"{where}: {name} has no label {sorted(labels - have)} (has {sorted(exposed[name])})"
            )
    return problems


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads((CHART / "dashboards" / "edgefleet.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def rule_groups() -> list[dict[str, object]]:
    text = (CHART / "rules" / "edgefleet-rules.yaml").read_text().replace("__FOR__", "5m")
    groups = yaml.safe_load(text)
    assert isinstance(groups, list) and groups
    return groups


def test_every_dashboard_query_reads_exposed_metrics_and_labels(exposed: dict[str, set[str]]) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 12
    problems = [p for title, expr in exprs for p in check(expr, exposed, title)]
    assert not problems, "\n".join(problems)
    legends = json.loads((CHART / "dashboards" / "edgefleet.json").read_text())
    for panel in legends["panels"]:
        for t in panel.get("targets", []):
            used = set(re.findall(r"\{\{(\w+)\}\}", t.get("legendFormat", "")))
            grouped = {g.strip() for m in re.findall(r"by \(([^)]*)\)", t["expr"]) for g in m.split(",")}
            assert used <= grouped, (panel["title"], used, grouped)


def test_latency_panels_aggregate_histograms_across_nodes() -> None:
    latency = [e for title, e in dashboard_exprs() if "latency" in title.lower()]
    assert latency and all("histogram_quantile" in e and "_bucket" in e for e in latency), latency
    assert not any("quantile=" in e for _, e in dashboard_exprs()), "a precomputed quantile cannot aggregate"


def test_every_rule_reads_exposed_metrics_and_labels(exposed: dict[str, set[str]]) -> None:
    problems, alerts = [], set()
    for group in rule_groups():
        for r in group["rules"]:  # type: ignore[attr-defined]
            where = r.get("record") or r.get("alert")
            problems += check(r["expr"], exposed, where)
            if "alert" in r:
                alerts.add(r["alert"])
                assert r["annotations"]["summary"], r
    assert not problems, "\n".join(problems)
    assert {
        "EdgefleetSLABreach",
        "EdgefleetThermalThrottling",
        "EdgefleetRolledBack",
        "EdgefleetAgentSilent",
    } <= alerts


def promtool() -> Path:
    """scripts/k8s-build.sh builds it beside the control plane's binaries (`make binaries`)."""
    versions = REPO / "scripts" / "k8s-versions.sh"
    done = subprocess.run(
        ["bash", "-c", f'source "{versions}" && echo "$K8S_BIN"'], capture_output=True, text=True
    )
    path = Path(done.stdout.strip()) / "promtool"
    assert path.is_file(), f"{path} is missing: run `make binaries` (scripts/k8s-build.sh builds it)"
    return path


@pytest.mark.cluster  # promtool is built with the control plane's binaries (`make binaries`)
def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups()}))
    done = subprocess.run(
        [str(promtool()), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout, done.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": "sum(("}]}]})
    )
    assert (
        subprocess.run([str(promtool()), "check", "rules", str(broken)], capture_output=True).returncode != 0
    )
