"""Cold start of an agent from the node cache with no API server (issue 18): a node rebooted while
cut off, its agent started by systemd or as a static Pod.

    python -m bench.cold_start               # 5 runs, prints the times
    BENCH_QUICK=1 python -m bench.cold_start  # 1 run

The node's disk holds what an earlier life left: the node cache (the example `mlp` model's
verified artifact and model.yaml, by digest) and the persisted assignment (EdgeNode `edge-1`,
model mlp:1 from an https:// origin). The model repository is empty, the kubeconfig names a
closed port and so does the origin: nothing the agent needs can come over the network. Measured:
seconds from starting `edgefleet-agent serve` (a fresh Python process: imports included) to the
first successful v2 inference, and to the first line saying it listens. Prints only; writes no
docs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet_api.model_spec import Artifact
from node_agent.examples import make_examples
from node_agent.link.node_cache import NodeCache
from node_agent.link.persistence import encode_persisted
from node_agent.runtime.model_yaml import CONFIG_FILE, parse_model_config

ROOT = Path(__file__).resolve().parents[1]
EDGE_NODE = "edge-1"
FEATURES = np.random.default_rng(3).standard_normal((1, 32)).astype(np.float32)


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class OfflineNode:
    """A node's disk after a reboot with the cloud out of reach."""

    root: Path
    digest: str
    origin_model: Path
    """The model's files where the test reads its reference outputs (not reachable by the agent)."""

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def args(self) -> list[str]:
        return [
            "--model-repository", str(self.models), "--cache-dir", str(self.cache),
            "--state-dir", str(self.state), "--edge-node", EDGE_NODE,
            "--kubeconfig", str(self.root / "kubeconfig"), "--workers", "1",
        ]  # fmt: skip


def offline_node(workdir: Path) -> OfflineNode:
    """Write the node's cache, persisted assignment and a kubeconfig to a closed port under
    `workdir/node`; the example models under `workdir/origin` (the agent never reads them)."""
    origin = workdir / "origin"
    make_examples(origin)
    folder = origin / "mlp" / "1"
    config = parse_model_config(folder / CONFIG_FILE)
    node = workdir / "node"
    cache = NodeCache(node / "cache")
    cache.open()
    config_digest = "sha256:" + hashlib.sha256((folder / CONFIG_FILE).read_bytes()).hexdigest()
    keyed = config_digest if "config_digest" in {f.name for f in dataclasses.fields(Artifact)} else None
    text = (folder / CONFIG_FILE).read_text(encoding="utf-8")
    cache.put(folder / config.artifact, config.digest, text, keyed)  # as an agent of this contract did
    dead = closed_port()
    (node / "kubeconfig").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "cloud",
        "clusters": [{"name": "cloud", "cluster": {"server": f"https://127.0.0.1:{dead}",
                                                   "insecure-skip-tls-verify": True}}],
        "users": [{"name": "cloud", "user": {"token": "none"}}],
        "contexts": [{"name": "cloud", "context": {"cluster": "cloud", "user": "cloud"}}],
    }))  # fmt: skip
    spec = {
        "nodeName": EDGE_NODE,
        "models": [{"service": "default/mlp", "model": "mlp", "version": "1", "format": config.format,
                    "artifact": {"uri": f"https://127.0.0.1:{dead}/models/mlp/1/{config.artifact}",
                                 "digest": config.digest, "configDigest": config_digest}}],
    }  # fmt: skip
    state = node / "state"
    state.mkdir(parents=True)
    obj = {"metadata": {"name": EDGE_NODE, "generation": 3}, "spec": spec}
    (state / f"assignment-{EDGE_NODE}.json").write_text(encode_persisted(obj, "2026-12-07T00:00:00Z"))
    return OfflineNode(node, config.digest, folder)


def infer(port: int) -> tuple[int, dict[str, object]]:
    body = {
        "inputs": [
            {"name": "features", "shape": [1, 32], "datatype": "FP32", "data": FEATURES.ravel().tolist()}
        ]
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/mlp/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read() or b"{}")
    except (urllib.error.URLError, ConnectionError):
        return 0, {}


@dataclass(frozen=True)
class ColdStart:
    listening_s: float
    first_inference_s: float
    outputs: list[float]
    log: str


def cold_start(node: OfflineNode, timeout_s: float = 90.0) -> ColdStart:
    """Start `edgefleet-agent serve` on `node`'s disk and time it to its first 200 inference."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'operator'}"}
    log_path = node.root / f"agent-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "node_agent.cli", "-v", "serve", "--host", "127.0.0.1", "--port", "0",
               "--thermal-source", "off", *node.args()]  # fmt: skip
    with open(log_path, "wb") as log_file:
        t0 = time.monotonic()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, env=env, text=True)
        try:
            lines: queue.Queue[str] = queue.Queue()
            stdout = proc.stdout
            assert stdout is not None

            def read() -> None:
                for text in stdout:
                    lines.put(text)

            threading.Thread(target=read, daemon=True).start()
            line = lines.get(timeout=timeout_s)
            listening_s = time.monotonic() - t0
            port = int(line.rsplit(":", 1)[1].strip())
            while True:
                status, doc = infer(port)
                if status == 200:
                    first_s = time.monotonic() - t0
                    break
                if time.monotonic() - t0 > timeout_s or proc.poll() is not None:
                    raise AssertionError(
                        f"no inference (last {status} {doc}); log:\n{log_path.read_text()[-4000:]}"
                    )
                time.sleep(0.01)
            outputs = doc["outputs"][0]["data"]  # type: ignore[index]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    return ColdStart(listening_s, first_s, list(outputs), log_path.read_text(errors="replace"))


def main() -> None:
    runs = 1 if os.environ.get("BENCH_QUICK") == "1" else 5
    with tempfile.TemporaryDirectory() as tmp:
        node = offline_node(Path(tmp))
        results = []
        for i in range(runs):
            for version_dir in node.models.glob("*/*"):  # each run starts from the cache alone
                for f in version_dir.iterdir():
                    f.unlink()
            results.append(cold_start(node))
            r = results[-1]
            print(
                f"run {i + 1}: listening after {r.listening_s:.2f} s, "
                f"first inference after {r.first_inference_s:.2f} s"
            )
    firsts = [r.first_inference_s for r in results]
    print(
        f"cold start from the node cache, no API server, origin unreachable: first successful "
        f"inference after {statistics.median(firsts):.2f} s (median of {runs}; min {min(firsts):.2f}, "
        f"max {max(firsts):.2f}), process start included"
    )


if __name__ == "__main__":
    from bench.report import recorded

    with recorded(
        "cold_start",
        "Cold start from the node cache with no API server (issue 18)",
        "A real `edgefleet-agent serve --edge-node` process whose API server and artifact origin are\n"
        "closed ports, its model repository empty: it serves its persisted assignment from the node\n"
        "cache. Time from process start (imports included) to the first successful inference.",
    ):
        main()
