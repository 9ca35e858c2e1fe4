"""Helpers of test_delivery: a real agent process in EdgeNode mode with the API server out of
reach (it serves a persisted assignment), and a TorchScript model large enough to cut."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from node_agent.link.persistence import encode_persisted
from node_agent.runtime.model_yaml import parse_model_config, write_model_config
from node_agent.runtime.repository import sha256_file

ROOT = Path(__file__).resolve().parents[2]


def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def big_model(examples: Path, into: Path) -> tuple[str, str]:
    """A 2.3 MiB TorchScript model with mlp's interface at `into/big/1`; (digest, configDigest)."""
    torch.manual_seed(0)
    module = torch.jit.script(nn.Sequential(nn.Linear(32, 18000), nn.ReLU(), nn.Linear(18000, 4)).eval())
    folder = into / "big" / "1"
    folder.mkdir(parents=True)
    module.save(str(folder / "model.pt"))
    digest = sha256_file(folder / "model.pt")
    mlp = parse_model_config(examples / "mlp" / "1" / "model.yaml")
    write_model_config(
        folder, dataclasses.replace(mlp, name="big", digest=digest, memory_estimate_bytes=None)
    )
    return digest, sha256_file(folder / "model.yaml")


def offline_args(workdir: Path, origin: str, digest: str, config: str, peers: list[str]) -> list[str]:
    """`serve` arguments for EdgeNode mode with a dead API server (a closed port), so the agent
    serves its persisted assignment: big:1 from `origin`, with `peers` as spec.artifactPeers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    workdir.mkdir(parents=True, exist_ok=True)
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": f"https://127.0.0.1:{dead_port}",
                                                  "insecure-skip-tls-verify": True}}],
        "users": [{"name": "dead", "user": {"token": "none"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "dead"}}],
    }))  # fmt: skip
    artifact = {"uri": f"{origin}/big/1/model.pt", "digest": digest, "configDigest": config}
    spec = {
        "nodeName": "edge-1",
        "artifactPeers": peers,
        "models": [{"service": "default/big", "model": "big", "version": "1", "artifact": artifact}],
    }
    state = workdir / "state"
    state.mkdir()
    obj = {"metadata": {"name": "edge-1", "generation": 1}, "spec": spec}
    (state / "assignment-edge-1.json").write_text(encode_persisted(obj, "2026-01-01T00:00:00Z"))
    return [
        "--model-repository", str(workdir / "models"), "--workers", "1",
        "--edge-node", "edge-1", "--kubeconfig", str(kubeconfig), "--state-dir", str(state),
        "--download-backoff-max", "0.2",
    ]  # fmt: skip


class AgentProcess:
    """`edgefleet-agent serve` as a child process on 127.0.0.1 (a free port)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115 (closed in `stop`)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'operator'}"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node_agent.cli", "serve", "--host", "127.0.0.1", "--port", "0",
             "--thermal-source", "off", *args],
            stdout=subprocess.PIPE, stderr=self._log_file, env=env, text=True,
        )  # fmt: skip
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            self.stop()
            raise AssertionError(f"the agent did not start listening; log:\n{self.tail()}") from None
        assert "serving" in line, line
        self.port = int(line.rsplit(":", 1)[1].strip())
        self.base = f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def infer(self, body: bytes) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.base + "/v2/models/big/versions/1/infer", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self, timeout_s: float = 60) -> None:
        until(lambda: self.get("/v2/health/ready")[0] == 200, timeout_s, f"ready; log:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()
