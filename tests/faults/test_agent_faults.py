"""Faults against a real agent on loopback, serving the example repository (real TorchScript
models): connection attacks while a normal client works, a model unloaded under load, files that
escape the repository, an agent killed mid-download, an agent that cannot serve.

Each test asserts its invariant: every request gets exactly one answer, and the right one
(200 for admitted work, 503 + Retry-After for a model out of service, 4xx with a reason for a
model whose files fail the repository's checks); no partial file ever has an artifact's name;
readiness says whether the agent can serve, liveness only whether it is stuck.
"""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import http.server
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edgefleet_api.types import Priority
from node_agent.agent import Agent, AgentSettings
from node_agent.examples import make_examples
from node_agent.runtime.model_yaml import parse_model_config, write_model_config
from node_agent.runtime.repository import sha256_file
from node_agent.serving.http import HttpSettings
from node_agent.serving.service import HealthSettings
from tests.faults.agent_process import AgentProcess, offline_edge_node, until

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
FEATURES = np.random.default_rng(3).standard_normal((1, 32)).astype(np.float32)
MLP_BODY = json.dumps(
    {
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": [1, 32], "data": FEATURES.ravel().tolist()}
        ]
    }
).encode()
IMAGE_BODY = json.dumps(
    {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [1, 3, 64, 64],
                "data": np.random.default_rng(5).standard_normal(3 * 64 * 64).round(3).tolist(),
            }
        ]
    }
).encode()


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples") / "models"
    make_examples(root)
    return root


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outside")


@pytest.fixture(scope="module")
def repo(examples: Path, outside: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples plus three models copied from mlp/1 whose files fail the checks:
    `yamlout` (model.yaml a symlink out of the repository), `artout` (model.pt one), and
    `tampered` (model.pt not the bytes its digest names)."""
    root = tmp_path_factory.mktemp("faults") / "models"
    shutil.copytree(examples, root)
    mlp = parse_model_config(root / "mlp" / "1" / "model.yaml")
    for name in ("yamlout", "artout", "tampered"):
        folder = root / name / "1"
        folder.mkdir(parents=True)
        shutil.copy(root / "mlp" / "1" / "model.pt", folder / "model.pt")
        write_model_config(folder, dataclasses.replace(mlp, name=name))
    (outside / "yamlout").mkdir()
    shutil.move(root / "yamlout" / "1" / "model.yaml", outside / "yamlout" / "model.yaml")
    (root / "yamlout" / "1" / "model.yaml").symlink_to(outside / "yamlout" / "model.yaml")
    shutil.move(root / "artout" / "1" / "model.pt", outside / "artout.pt")
    (root / "artout" / "1" / "model.pt").symlink_to(outside / "artout.pt")
    with open(root / "tampered" / "1" / "model.pt", "ab") as f:
        f.write(b"tampered")
    return root


def call(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    source: str | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request on a fresh connection; (status, lower-cased headers, JSON body or bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60,
                                      source_address=(source, 0) if source else None)  # fmt: skip
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    if hdrs.get("content-type", "").startswith("application/json"):
        return resp.status, hdrs, json.loads(data)
    return resp.status, hdrs, data


def get(port: int, path: str) -> tuple[int, dict[str, str], Any]:
    return call(port, "GET", path)


def metric(port: int, prefix: str) -> float:
    text = get(port, "/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


@pytest.fixture(scope="module")
def agent(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    running = AgentProcess(
        ["--model-repository", str(repo), "--workers", "1", "--max-request-size", "1Mi",
         "--max-connections", "96", "--max-connections-per-peer", "40", "--header-timeout", "1",
         "--idle-timeout", "1", "--body-timeout", "1", "--preload", "mlp"],
        tmp_path_factory.mktemp("agent-log") / "agent.log",
    )  # fmt: skip
    running.wait_ready()
    yield running
    running.stop()


# --- (a) connection attacks while a normal client works ---------------------------------------


def _slowloris(port: int, stop: threading.Event) -> None:
    """Connections from 127.0.0.2 dribbling a header a byte at a time; reopened when closed."""
    socks: list[socket.socket] = []
    try:
        while not stop.is_set():
            while len(socks) < 12:
                s = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=("127.0.0.2", 0))
                socks.append(s)
            for s in list(socks):
                try:
                    s.send(b"G")
                except OSError:  # closed by the agent: header timeout
                    socks.remove(s)
                    s.close()
            stop.wait(0.2)
    finally:
        for s in socks:
            s.close()


def _idle_uploads(port: int, stop: threading.Event) -> None:
    """Uploads from 127.0.0.3 declaring ~1 MiB and sending nothing; reopened when closed."""
    socks: list[socket.socket] = []
    head = f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {MIB - 1}\r\n\r\n".encode()
    try:
        while not stop.is_set():
            while len(socks) < 12:
                s = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=("127.0.0.3", 0))
                s.sendall(head)
                s.setblocking(False)
                socks.append(s)
            for s in list(socks):
                try:
                    if s.recv(65536) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                socks.remove(s)  # answered (408) or closed: open another
                s.close()
            stop.wait(0.1)
    finally:
        for s in socks:
            s.close()


def _gzip_bombs(port: int, stop: threading.Event, answers: list[int]) -> None:
    """gzip bodies from 127.0.0.4, under 1 MiB on the wire and 256 MiB inflated, one after another."""
    bomb = gzip.compress(b"\0" * (256 * MIB), compresslevel=9)
    assert len(bomb) < MIB
    while not stop.is_set():
        gz = {"Content-Encoding": "gzip"}
        answers.append(call(port, "POST", "/v2/models/mlp/infer", bomb, gz, "127.0.0.4")[0])


def test_attacks_leave_normal_requests_and_liveness_unharmed(agent: AgentProcess) -> None:
    port = agent.port

    def normal() -> float:
        start = time.monotonic()
        status, _, doc = call(port, "POST", "/v2/models/mlp/infer", MLP_BODY)
        assert status == 200, doc
        return time.monotonic() - start

    baseline = sorted(normal() for _ in range(20))
    stop = threading.Event()
    bombs: list[int] = []
    attackers = [
        threading.Thread(target=_slowloris, args=(port, stop), daemon=True),
        threading.Thread(target=_idle_uploads, args=(port, stop), daemon=True),
        threading.Thread(target=_gzip_bombs, args=(port, stop, bombs), daemon=True),
    ]
    for t in attackers:
        t.start()
    latencies: list[float] = []
    live: list[tuple[int, float]] = []
    try:
        until(lambda: len(bombs) >= 1, 15, "the first bomb's answer")  # the attack is on
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            latencies.append(normal())
            start = time.monotonic()
            live.append((get(port, "/v2/health/live")[0], time.monotonic() - start))
    finally:
        stop.set()
        for t in attackers:
            t.join(15)
    # every normal request answered 200 (asserted in `normal`), none slow past a loose bound
    assert len(latencies) >= 10
    p50 = sorted(latencies)[len(latencies) // 2]
    assert p50 < 10 * baseline[len(baseline) // 2] + 0.1, (p50, baseline)
    assert max(latencies) < 2.0, max(latencies)
    assert all(status == 200 for status, _ in live) and max(s for _, s in live) < 1.0, live
    assert bombs and set(bombs) == {413}, bombs  # each bomb refused, none served, none dropped
    assert get(port, "/v2/health/ready")[0] == 200


# --- (c) files that escape the repository -----------------------------------------------------


def test_escaping_files_and_a_bad_digest_answer_4xx_and_show_unavailable(
    agent: AgentProcess, repo: Path, outside: Path
) -> None:
    port = agent.port
    answers: list[str] = []
    for name, reason in (
        ("yamlout", "model.yaml resolves outside the model repository"),
        ("artout", "artifact 'model.pt' resolves outside the model repository"),
        ("tampered", "has digest sha256:"),
    ):
        status, _, doc = call(port, "POST", f"/v2/models/{name}/versions/1/infer", MLP_BODY)
        assert status == 409 and reason in doc["error"], (name, status, doc)
        answers.append(json.dumps(doc))
        status, _, doc = get(port, f"/v2/models/{name}/versions/1/ready")
        assert status == 400 and reason in doc["error"], (name, doc)  # never 200 READY
        answers.append(json.dumps(doc))
    status, _, index = call(port, "POST", "/v2/repository/index")
    assert status == 200
    states = {(e["name"], e["version"]): e for e in index}
    for name in ("yamlout", "artout", "tampered"):
        assert states[(name, "1")]["state"] == "UNAVAILABLE" and states[(name, "1")]["reason"], states
    assert states[("mlp", "1")]["state"] == "READY"
    answers.append(json.dumps(index))
    for text in answers:  # no path on disk in any answer
        assert str(repo) not in text and str(outside) not in text and "/tmp" not in text, text
    assert call(port, "POST", "/v2/models/mlp/versions/1/infer", MLP_BODY)[0] == 200


# --- (b) a model unloaded with requests in flight ---------------------------------------------


def test_unload_lets_admitted_requests_finish_and_answers_new_ones_503(agent: AgentProcess) -> None:
    port = agent.port
    slow = "/v2/models/classifier/versions/2-slow/infer"
    assert call(port, "POST", slow, IMAGE_BODY)[0] == 200  # loaded
    admitted = 'edgefleet_requests_total{model="classifier",version="2-slow"}'
    admitted_before = metric(port, admitted)
    n = 24

    def timed() -> tuple[tuple[int, dict[str, str], Any], float]:
        return call(port, "POST", slow, IMAGE_BODY), time.monotonic()

    with ThreadPoolExecutor(n + 8) as pool:
        in_flight = [pool.submit(timed) for _ in range(n)]
        until(lambda: metric(port, admitted) >= admitted_before + n, 30, "the requests admitted")
        unload_sent = time.monotonic()
        unload = pool.submit(call, port, "POST", "/v2/repository/models/classifier/unload")
        until(lambda: "unloading" in json.dumps(get(port, "/v2/models/classifier/ready")[2]) or unload.done(),
              15, "the unload under way")  # fmt: skip
        during = [call(port, "POST", slow, IMAGE_BODY) for _ in range(3)]
        finished = [f.result(60) for f in in_flight]
        assert unload.result(60)[0] == 200
    results = [result for result, _ in finished]
    assert max(at for _, at in finished) > unload_sent, "some requests were still in flight"
    # the unload waited for the admitted requests, then freed the memory (none reloaded it)
    assert metric(port, 'edgefleet_resident_model_bytes{model="classifier"') == 0
    after = [call(port, "POST", "/v2/models/classifier/infer", IMAGE_BODY) for _ in range(2)]
    assert [status for status, _, _ in results] == [200] * n, [r[2] for r in results if r[0] != 200]
    for status, headers, doc in during + after:  # a known model out of service: 503, retry later
        assert status == 503 and int(headers["retry-after"]) >= 1, (status, doc)
    assert call(port, "POST", "/v2/models/never-known/infer", IMAGE_BODY)[0] == 404
    assert call(port, "POST", "/v2/repository/models/classifier/load")[0] == 200
    assert call(port, "POST", slow, IMAGE_BODY)[0] == 200


# --- (d) an agent killed mid-download ---------------------------------------------------------


class SlowArtifactServer:
    """Serves `<root>` over HTTP on 127.0.0.1; `model.pt` is sent in two parts, the second only
    once `release` is set (a link that stalls mid-transfer)."""

    def __init__(self, root: Path, first_part_bytes: int) -> None:
        release = self.release = threading.Event()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:
                if not self.path.endswith("/model.pt"):
                    super().do_GET()
                    return
                data = (root / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data[:first_part_bytes])
                    self.wfile.flush()
                    release.wait(60)
                    self.wfile.write(data[first_part_bytes:])
                except OSError:
                    pass  # the agent was killed

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _big_model(examples: Path, into: Path) -> str:
    """A 2.3 MiB TorchScript model with mlp's interface at `into/big/1`; returns its digest."""
    torch.manual_seed(0)
    module = torch.jit.script(nn.Sequential(nn.Linear(32, 18000), nn.ReLU(), nn.Linear(18000, 4)).eval())
    folder = into / "big" / "1"
    folder.mkdir(parents=True)
    module.save(str(folder / "model.pt"))
    digest = sha256_file(folder / "model.pt")
    mlp = parse_model_config(examples / "mlp" / "1" / "model.yaml")
    big = dataclasses.replace(mlp, name="big", digest=digest, memory_estimate_bytes=None)
    write_model_config(folder, big)
    return digest


def _offline_edge_node(state: Path, models_uri: str, digest: str, workdir: Path, config: str) -> list[str]:
    """Arguments for EdgeNode mode with the API server out of reach (a closed port), so the
    agent serves its persisted assignment: model big:1 from `models_uri`."""
    spec = {
        "nodeName": "edge-1",
        "models": [{"service": "default/big", "model": "big", "version": "1",
                    "artifact": {"uri": f"{models_uri}/big/1/model.pt", "digest": digest,
                                 "configDigest": config}}],
    }  # fmt: skip
    return offline_edge_node(workdir, state, spec)


def test_an_agent_killed_mid_download_never_loads_a_partial_file(examples: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    digest = _big_model(examples, served)
    size = (served / "big" / "1" / "model.pt").stat().st_size
    assert size > 2 * MIB
    server = SlowArtifactServer(served, first_part_bytes=MIB + MIB // 2)
    root = tmp_path / "models"
    args = ["--model-repository", str(root), "--workers", "1",
            *_offline_edge_node(tmp_path / "state", server.base, digest, tmp_path,
                                sha256_file(served / "big" / "1" / "model.yaml"))]  # fmt: skip
    target = root / "big" / "1" / "model.pt"
    try:
        first = AgentProcess(args, tmp_path / "agent-1.log")

        def partial() -> list[Path]:
            part = target.with_name("model.pt.part")  # kept to resume from (`link.download`)
            return [part] if part.is_file() and part.stat().st_size >= MIB else []

        until(lambda: bool(partial()), 30, f"a partial download; log:\n{first.tail()}")
        assert get(first.port, "/v2/health/ready")[0] == 503  # still preparing its assignment
        for path in ("/v2/models/big/infer", "/v2/models/big/versions/1/infer"):
            status, headers, doc = call(first.port, "POST", path, MLP_BODY)  # assigned, not ready
            assert status == 503 and headers["retry-after"] == "1" and "assigned" in doc["error"], doc
        assert call(first.port, "POST", "/v2/models/big/versions/2/infer", MLP_BODY)[0] == 404
        assert call(first.port, "POST", "/v2/models/mlp/infer", MLP_BODY)[0] == 404  # not assigned
        first.kill()
        leftovers = partial()
        assert leftovers and not target.exists(), "a partial file never has the artifact's name"

        server.release.set()  # the second life gets the whole artifact
        second = AgentProcess(args, tmp_path / "agent-2.log")
        try:
            second.wait_ready(60)
            assert not any(p.exists() for p in leftovers), "the partial download became the artifact"
            status, _, doc = call(second.port, "POST", "/v2/models/big/versions/1/infer", MLP_BODY)
            assert status == 200, doc
            with torch.inference_mode():
                want = torch.jit.load(str(served / "big" / "1" / "model.pt"))(torch.from_numpy(FEATURES))
            np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]), want.numpy().ravel(), atol=1e-5)
            assert sha256_file(target) == digest
            assert not list(root.glob("*/*/.*.tmp")), "no temp file left"
        finally:
            second.stop()
    finally:
        server.close()


# --- (e) readiness when the agent cannot serve ------------------------------------------------


class InProcessAgent:
    """A real agent on 127.0.0.1 on its own loop thread, so the test can reach its parts."""

    def __init__(self, settings: AgentSettings) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.agent = Agent(settings)
        asyncio.run_coroutine_threadsafe(self.agent.start(), self.loop).result(60)
        self.port = self.agent.port

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.agent.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_readiness_follows_whether_the_agent_can_serve(examples: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(examples, root)
    health = HealthSettings(worker_stuck_s=1.0, worker_dead_s=2.0, check_interval_s=0.0)
    settings = AgentSettings(root, workers=1, urgent_workers=0, health=health, thermal_source="off",
                             http=HttpSettings(host="127.0.0.1", port=0))  # fmt: skip
    running = InProcessAgent(settings)
    port = running.port
    try:
        assert get(port, "/v2/health/ready")[0] == 200

        # the repository's volume goes away: not ready (nothing new can load), still live
        root.rename(tmp_path / "gone")
        status, _, doc = get(port, "/v2/health/ready")
        assert status == 503 and "model repository cannot be read" in doc["error"], doc
        assert str(tmp_path) not in doc["error"]
        assert get(port, "/v2/health/live")[0] == 200
        (tmp_path / "gone").rename(root)
        assert get(port, "/v2/health/ready")[0] == 200

        # busy is not stuck: a stream of batches keeps the agent ready
        with ThreadPoolExecutor(4) as pool:
            busy = [pool.submit(call, port, "POST", "/v2/models/mlp/infer", MLP_BODY) for _ in range(40)]
            readiness = [get(port, "/v2/health/ready")[0] for _ in range(5)]
            assert all(f.result(60)[0] == 200 for f in busy)
        assert readiness == [200] * 5

        # the only worker hangs in a batch (a device call that never returns): not ready, then
        # not live; back to both once it returns
        pool_ = running.agent.pool
        assert pool_ is not None
        hung = threading.Event()
        done: list[object] = []
        pool_.submit(lambda _stream: hung.wait(30), lambda r, e: done.append(e), priority=Priority.NORMAL)
        until(lambda: get(port, "/v2/health/ready")[0] == 503, 10, "not ready")
        status, _, doc = get(port, "/v2/health/ready")
        assert "stuck on one batch" in doc.get("error", ""), doc
        until(lambda: get(port, "/v2/health/live")[0] == 503, 10, "not live")
        start = time.monotonic()
        assert get(port, "/v2/health/live")[0] == 503 and time.monotonic() - start < 1.0  # answered fast
        hung.set()
        until(lambda: bool(done), 5, "the batch to return")
        until(lambda: get(port, "/v2/health/ready")[0] == 200 and get(port, "/v2/health/live")[0] == 200,
              5, "ready and live again")  # fmt: skip
        assert call(port, "POST", "/v2/models/mlp/infer", MLP_BODY)[0] == 200
    finally:
        running.close()
