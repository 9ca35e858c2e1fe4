"""`kubectl edgefleet` (issue 20): the installed executable, against the local control plane with
the operator and simulated agents. Each command acts through what the operator reads, so each
test checks what the operator did with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import Group, apply, service
from test_rollout_operator import (
    HALVES,
    LONG,
    Operator,
    canary,
    deploy_v1,
    group,
    operator,
    patch_spec,
    ro,
    versions,
    wait,
)

from edgefleet_api import names

pytestmark = pytest.mark.cluster
__all__ = ["group", "operator"]  # the fixtures, shared with the rollout tests

PLUGIN = Path(sys.executable).with_name("kubectl-edgefleet")


def plugin(control_plane: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed plugin as kubectl would (its own process, a kubeconfig)."""
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}
    return subprocess.run([str(PLUGIN), *args], capture_output=True, text=True, timeout=60, env=env)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def refused(result: subprocess.CompletedProcess[str], why: str) -> None:
    """Exit status 1, one line naming the problem, no stack trace."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert why in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_plugin_is_installed_with_the_package() -> None:
    assert PLUGIN.is_file() and os.access(PLUGIN, os.X_OK), PLUGIN
    usage = subprocess.run([str(PLUGIN), "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "rollout" in usage.stdout and "drain" in usage.stdout


def test_rollout_status_pause_resume_promote_and_history(
    control_plane: Any, kube: Any, namespace: str, group: Group, operator: Operator
) -> None:
    group.nodes(4)
    deploy_v1(kube, namespace, "cam", group, operator)
    refused(
        plugin(control_plane, "rollout", "promote", "cam", "-n", namespace), "no canary rollout in progress"
    )
    refused(plugin(control_plane, "rollout", "status", "nosuch", "-n", namespace), "not found")
    patch_spec(kube, namespace, "cam", "2", canary(HALVES, LONG))
    wait(
        lambda: (r := ro(kube, namespace, "cam")).get("waveStartTime") and r,
        "wave 1 analysing",
        group,
        operator,
    )
    status = ok(plugin(control_plane, "rollout", "status", "cam", "-n", namespace))
    assert f"{namespace}/cam: Progressing, wave 1/2 (50%)" in status, status
    assert "stable: 1   canary: 2" in status and "canary nodes (2)" in status, status

    ok(plugin(control_plane, "rollout", "pause", "cam", "-n", namespace))
    wait(lambda: ro(kube, namespace, "cam").get("phase") == "Paused", "paused by the plugin", group, operator)
    assert "already Paused" in ok(plugin(control_plane, "rollout", "pause", "cam", "-n", namespace))
    ok(plugin(control_plane, "rollout", "resume", "cam", "-n", namespace))
    wait(lambda: ro(kube, namespace, "cam").get("phase") == "Progressing", "resumed", group, operator)
    ok(plugin(control_plane, "rollout", "promote", "cam", "-n", namespace))
    wait(
        lambda: ro(kube, namespace, "cam").get("phase") == "Promoted",
        "promoted by the plugin",
        group,
        operator,
    )

    history = ok(plugin(control_plane, "rollout", "history", "cam", "-n", namespace)).splitlines()
    assert history[0].split()[:3] == ["FROM", "TO", "RESULT"], history
    assert history[1].split()[:3] == ["1", "2", "Promoted"], history
    fleet = ok(plugin(control_plane, "get"))
    assert f"{namespace}/cam" in fleet and all(n in fleet for n in group.names), fleet


def test_drain_moves_the_work_off_a_node_and_uncordon_lets_it_take_work_again(
    control_plane: Any, kube: Any, namespace: str, group: Group, operator: Operator
) -> None:
    from kubernetes import client

    group.nodes(3)
    apply(kube, namespace, service("drained", group.id, replicas=2))
    key = f"{namespace}/drained"

    def holding() -> list[str]:
        return sorted(n for n, vs in versions(group, key).items() if vs)

    holders = wait(lambda: h if len(h := holding()) == 2 else None, "two holders", group, operator)
    node = holders[0]
    assert node in ok(plugin(control_plane, "node", "drain", node))
    core = client.CoreV1Api(kube)
    spec = core.read_node(node).spec
    assert spec.unschedulable and any(t.key == f"{names.GROUP}/drain" for t in spec.taints or [])
    # The drained node's work moves to the free node; the service keeps two holders.
    moved = wait(
        lambda: h if len(h := holding()) == 2 and node not in h else None,
        "the work moved off the drained node",
        group,
        operator,
    )
    assert set(moved) == set(group.names) - {node}
    # The agents' Pods are on kwok nodes, which serve no logs: each holder is named with why.
    logs = plugin(control_plane, "logs", "drained", "-n", namespace)
    assert logs.returncode == 1 and "no agent log of" in logs.stderr, logs
    named = sorted(
        line.split("]")[0].lstrip("[") for line in logs.stderr.splitlines() if line.startswith("[")
    )
    assert named == moved, logs.stderr
    assert node in ok(plugin(control_plane, "node", "uncordon", node))
    spec = core.read_node(node).spec
    assert not spec.unschedulable and not any(t.key == f"{names.GROUP}/drain" for t in spec.taints or [])
    refused(plugin(control_plane, "node", "drain", "no-such-node"), "Node no-such-node not found")
