"""Connections and bodies against a real agent on loopback, as an attacker or a bad network would
send them: idle uploads, slowloris, idle keep-alive, floods from one peer, slow bodies, gzip bombs.
Each test asserts the property (real requests still served, the connection closed, the refusal's
status), never a duration."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import logging
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_runner import RunningAgent

from node_agent.agent import AgentSettings
from node_agent.serving.connections import ConnectionLimits
from node_agent.serving.event_loop import new_event_loop
from node_agent.serving.http import HttpSettings

MIB = 1 << 20
MLP = "/v2/models/mlp/versions/1/infer"
LIMITS = ConnectionLimits(
    max_connections=64, max_connections_per_peer=8, header_timeout_s=1.0, idle_timeout_s=1.0
)
FEATURES = np.random.default_rng(3).standard_normal((1, 32)).astype(np.float32)
BODY = json.dumps(
    {
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": [1, 32], "data": FEATURES.ravel().tolist()}
        ]
    }
).encode()


@pytest.fixture(scope="module")
def agent(example_repo: Path) -> Iterator[RunningAgent]:
    http = HttpSettings(
        host="127.0.0.1",
        port=0,
        max_request_bytes=1 * MIB,
        max_inflight_request_bytes=2 * MIB,
        body_timeout_s=1.0,
        connections=LIMITS,
    )
    running = RunningAgent(AgentSettings(example_repo, workers=1, http=http))
    yield running
    running.close()


def post(port: int, body: bytes, headers: dict[str, str] | None = None, path: str = MLP) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes `sock` (reads until EOF; a timeout means it stayed open)."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_declared_but_unsent_bodies_hold_nothing(agent: RunningAgent) -> None:
    # Four uploads declaring the whole in-flight budget between them and sending nothing used to
    # turn every real request away with 503 for as long as they stayed open.
    idle = [connect(agent.port) for _ in range(4)]
    try:
        for sock in idle:
            sock.sendall(f"POST {MLP} HTTP/1.1\r\nHost: x\r\nContent-Length: {MIB - 1}\r\n\r\n".encode())
        status, doc = post(agent.port, BODY)
        assert status == 200, doc
    finally:
        for sock in idle:
            sock.close()


def test_bytes_that_did_arrive_are_still_bounded(agent: RunningAgent) -> None:
    held = [connect(agent.port) for _ in range(2)]
    try:
        for sock in held:  # each holds just under 1 MiB of the 2 MiB budget, its body unfinished
            sock.sendall(f"POST {MLP} HTTP/1.1\r\nHost: x\r\nContent-Length: {MIB}\r\n\r\n".encode())
            sock.sendall(b" " * (MIB - 64 * 1024))
        api = agent.agent.http_api
        assert api is not None
        deadline = time.monotonic() + 30  # sendall returns before the agent has read those bytes
        while api.bodies.held < 2 * (MIB - 64 * 1024) and time.monotonic() < deadline:
            time.sleep(0.01)
        status, doc = post(agent.port, b" " * (MIB - 1024) + BODY[: 1024 - 1])
        assert status == 503 and "request bytes in flight" in doc["error"], doc
    finally:
        for sock in held:
            sock.close()
    assert post(agent.port, BODY)[0] == 200


def test_headers_dribbled_too_slowly_get_the_connection_closed(agent: RunningAgent) -> None:
    with connect(agent.port) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHo")
        assert closed_by_server(sock)
    with connect(agent.port) as sock:  # and one that says nothing at all
        assert closed_by_server(sock)


def test_an_idle_kept_alive_connection_is_closed(agent: RunningAgent) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    try:
        conn.request("GET", "/v2/health/live")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Connection", "").lower() != "close"
        resp.read()
        assert conn.sock is not None
        assert closed_by_server(conn.sock)
    finally:
        conn.close()


def test_one_peer_cannot_take_every_connection(agent: RunningAgent) -> None:
    held = [connect(agent.port) for _ in range(LIMITS.max_connections_per_peer)]
    try:
        for sock in held:  # each inside a request (its body unfinished), so no timer closes it
            sock.sendall(f"POST {MLP} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode())
        with connect(agent.port) as extra:
            data = b""
            while chunk := extra.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head, data
        assert "too many connections" in json.loads(body)["error"]
    finally:
        for sock in held:
            sock.close()
    assert post(agent.port, BODY)[0] == 200  # their slots are free again


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closed(agent: RunningAgent) -> None:
    with connect(agent.port) as sock:
        sock.sendall(f"POST {MLP} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n\r\n".encode())
        sock.sendall(BODY[:10])
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data
    assert "did not arrive within 1 s" in json.loads(data.partition(b"\r\n\r\n")[2])["error"]


def test_compressed_bodies_are_served_and_bombs_refused(agent: RunningAgent) -> None:
    plain = post(agent.port, BODY)
    assert plain[0] == 200
    for encoding, packed in (("gzip", gzip.compress(BODY)), ("deflate", zlib.compress(BODY))):
        status, doc = post(agent.port, packed, {"Content-Encoding": encoding})
        assert (status, doc["outputs"]) == (200, plain[1]["outputs"]), encoding
    # Under the 1 MiB limit on the wire, 256 MiB inflated: refused once the inflated bytes pass it.
    bomb = gzip.compress(b"\0" * (256 * MIB), compresslevel=9)
    assert len(bomb) < MIB
    status, doc = post(agent.port, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "exceeds the limit of 1048576 bytes" in doc["error"], doc
    status, doc = post(agent.port, gzip.compress(BODY)[:-9], {"Content-Encoding": "gzip"})
    assert status == 400 and "truncated" in doc["error"], doc
    status, doc = post(agent.port, b"not gzip at all", {"Content-Encoding": "gzip"})
    assert status == 400 and "not valid" in doc["error"], doc
    status, doc = post(agent.port, BODY, {"Content-Encoding": "br"})
    assert status == 415 and "unsupported Content-Encoding 'br'" in doc["error"], doc
    assert post(agent.port, BODY)[0] == 200


def test_a_client_gone_mid_body_is_one_log_line_not_a_traceback(
    agent: RunningAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node_agent")
    with connect(agent.port) as sock:
        sock.sendall(f"POST {MLP} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n\r\n".encode())
        sock.sendall(BODY[:10])
    until(lambda: any("closed the connection before its body arrived" in r.message for r in caplog.records))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text
    assert post(agent.port, BODY)[0] == 200


def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_agent_serves_on_uvloop_where_it_is_installed() -> None:
    """The agent's loop (and so these tests' loops: conftest) is uvloop's; the connection guard
    takes its transports, which implement asyncio.Transport without subclassing it."""
    uvloop = pytest.importorskip("uvloop")
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()

    async def policy_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    assert isinstance(asyncio.run(policy_loop()), uvloop.Loop)
