"""`edgefleet-agent install --systemd DIR | --static-pod DIR`: the files a node runs its agent
from, so that it comes back serving after a reboot with no cloud. Each file's agent command is
parsed by the agent's own parser (what systemd or the kubelet would run must be valid)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from edgefleet_api import names
from node_agent.cli import build_parser, main
from node_agent.link.install import InstallSettings, static_pod, systemd_unit


def test_install_systemd_writes_a_unit_that_restarts_always_and_serves_from_the_node_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "install",
        "--systemd",
        str(tmp_path),
        "--edge-node",
        "jetson-7",
        "--endpoint",
        "http://10.0.0.7:8000",
    ]
    assert main(argv) == 0
    unit = (tmp_path / "edgefleet-agent.service").read_text()
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert lines["Restart"] == "always" and lines["StartLimitIntervalSec"] == "0"
    assert lines["ReadWritePaths"] == "/var/lib/edgefleet/edgefleet-agent-jetson-7"
    assert lines["StateDirectory"] == "edgefleet/edgefleet-agent-jetson-7"
    assert "Requires" not in lines, "it starts whether the network (and the cloud) is there or not"
    exe, *args = shlex.split(lines["ExecStart"])
    assert exe == "/usr/local/bin/edgefleet-agent"
    parsed = build_parser().parse_args(args)
    assert parsed.command == "serve" and parsed.edge_node == "jetson-7"
    assert parsed.model_repository == Path("/var/lib/edgefleet/edgefleet-agent-jetson-7/models")
    assert (
        parsed.kubeconfig == Path("/etc/edgefleet/kubeconfig") and parsed.endpoint == "http://10.0.0.7:8000"
    )
    out = capsys.readouterr().out
    assert "systemctl enable --now edgefleet-agent.service" in out
    assert f"{names.LABEL_AGENT_MANAGED_BY}=systemd" in out
    if shutil.which("systemd-analyze"):  # the unit's syntax, as systemd reads it
        check = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(tmp_path / "edgefleet-agent.service")],
            capture_output=True,
            text=True,
        )
        assert "Unknown key" not in check.stderr and "Invalid" not in check.stderr, check.stderr


def test_install_static_pod_writes_a_host_network_pod_with_the_node_disk(tmp_path: Path) -> None:
    assert main(["install", "--static-pod", str(tmp_path), "--edge-node", "n1", "--port", "8010"]) == 0
    pod = json.loads((tmp_path / "edgefleet-agent.yaml").read_text())  # JSON is YAML
    spec = pod["spec"]
    assert spec["hostNetwork"] is True and "serviceAccountName" not in spec  # the kubelet refuses SAs
    assert pod["metadata"]["labels"][names.LABEL_AGENT_MANAGED_BY] == "static-pod"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["node-disk"]["hostPath"] == {
        "path": "/var/lib/edgefleet/edgefleet-agent-n1",
        "type": "DirectoryOrCreate",
    }
    assert volumes["kubeconfig"]["hostPath"]["path"] == "/etc/edgefleet"
    (container,) = spec["containers"]
    assert container["ports"][0]["hostPort"] == 8010
    parsed = build_parser().parse_args(container["args"])
    assert parsed.model_repository == Path("/var/lib/edgefleet/models") and parsed.port == 8010
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["node-disk"] == "/var/lib/edgefleet"


def test_install_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):  # one of --systemd / --static-pod is required
        build_parser().parse_args(["install", "--edge-node", "n1"])
    assert main(["install", "--systemd", str(tmp_path), "--edge-node", "n1", "--kubeconfig", "rel/kc"]) == 2
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError):
        InstallSettings("n1", port=0)
    assert "n1" in systemd_unit(InstallSettings("n1")) and "n1" in static_pod(InstallSettings("n1"))
