"""A real `edgefleet-agent serve` process on 127.0.0.1 (a free port) for the fault tests, and the
polling helper they share."""

from __future__ import annotations

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

from e2e.children import stop_child
from node_agent.link.persistence import encode_persisted

ROOT = Path(__file__).resolve().parents[2]


def until(check: Callable[[], bool], timeout_s: float = 15.0, what: str = "") -> None:
    """Poll `check` until it holds; an AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class AgentProcess:
    """`edgefleet-agent serve ARGS` as a child process; its log in `log`, its port parsed from
    the line it prints once listening."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115 (closed in `stop`/`kill`)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'operator'}"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node_agent.cli", "serve", "--host", "127.0.0.1", "--port", "0",
             "--thermal-source", "off", *args],
            stdout=subprocess.PIPE, stderr=self._log_file, env=env, text=True,
        )  # fmt: skip
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout

        def read() -> None:
            for line in stdout:
                lines.put(line)

        threading.Thread(target=read, daemon=True).start()
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            self.kill()
            raise AssertionError(f"the agent did not start listening; log:\n{self.tail()}") from None
        assert "serving" in line, line
        self.port = int(line.rsplit(":", 1)[1].strip())
        self.base = f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of GET `path`; (0, b"") when the agent does not answer."""
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def wait_ready(self, timeout_s: float = 60) -> None:
        until(lambda: self.get("/v2/health/ready")[0] == 200, timeout_s, f"ready; log:\n{self.tail()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log_file.close()

    def stop(self) -> None:
        stop_child(self.proc, grace_s=30, kill_wait_s=10)
        self._log_file.close()


def offline_edge_node(workdir: Path, state: Path, spec: dict[str, object]) -> list[str]:
    """`serve` arguments for EdgeNode `edge-1` whose API server is a closed port, with `spec`
    persisted as its last assignment in `state`: the agent serves it offline."""
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
    state.mkdir(parents=True, exist_ok=True)
    obj = {"metadata": {"name": "edge-1", "generation": 1}, "spec": spec}
    (state / "assignment-edge-1.json").write_text(encode_persisted(obj, "2026-01-01T00:00:00Z"))
    return ["--edge-node", "edge-1", "--kubeconfig", str(kubeconfig), "--state-dir", str(state)]
