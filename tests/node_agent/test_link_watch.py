"""The EdgeNode watch's retry discipline against a real socket that refuses (no cluster): a
`restart` asked for while the API server is out of reach never bypasses the backoff, so a fleet
whose links all fail does not retry in a tight loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from node_agent.link.settings import LinkSettings
from node_agent.link.watch import EdgeNodeWatch


@contextlib.contextmanager
def edge_node_watch(
    port: int, settings: LinkSettings, failed: Callable[[str, BaseException], object]
) -> Iterator[tuple[EdgeNodeWatch, threading.Thread]]:
    """A watch of EdgeNode n1 against http://127.0.0.1:`port` (no retries), its callbacks on a loop
    thread; yields it and its (not yet started) runner thread; closes the loop and client after."""
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.retries = False
    api = client.ApiClient(configuration)
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    watch = EdgeNodeWatch(
        settings,
        client.CustomObjectsApi(api),
        time.monotonic,
        listed=lambda obj: None,
        event=lambda kind, obj: None,
        answered=lambda: None,
        failed=failed,
    )
    try:
        yield watch, threading.Thread(target=watch.run, args=(loop,), daemon=True)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(2)
        loop.close()
        api.close()


def refusing_port() -> tuple[socket.socket, int]:
    """A port that accepts each connection and closes it at once, counting them."""
    listener = socket.create_server(("127.0.0.1", 0))
    return listener, int(listener.getsockname()[1])


def test_restarts_while_unreachable_keep_the_backoff(tmp_path: Path) -> None:
    listener, port = refusing_port()
    accepted: list[float] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(time.monotonic())
            conn.close()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    settings = LinkSettings(
        "n1", "ns", tmp_path, request_timeout_s=1.0, backoff_initial_s=0.2, backoff_max_s=0.4
    )
    failures: list[BaseException] = []
    with edge_node_watch(port, settings, lambda call, exc: failures.append(exc)) as (watch, runner):
        runner.start()
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.0:
                watch.restart()  # the link asking again and again, as each failed call would
                time.sleep(0.01)
        finally:
            watch.stop()
            runner.join(5)
            stop.set()
            acceptor.join(2)
            listener.close()
    # one attempt per backoff (0.1-0.4 s), plus at most one immediate retry each: never a tight loop
    assert 3 <= len(accepted) <= 2 * (2.0 / 0.1) + 2, len(accepted)
    assert len(failures) >= 3 and not runner.is_alive()


def test_a_stop_that_lands_while_the_watch_request_is_sent_is_not_missed(tmp_path: Path) -> None:
    """`stop` cuts the watch response in progress; one asked for after the request went out but
    before its response was registered must still end the watch at once, not after the server's
    watch timeout (the agent's process could not exit until then)."""
    import http.server
    import json

    held = threading.Event()

    class Server(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if "watch=true" not in self.path:
                body = json.dumps({"items": [], "metadata": {"resourceVersion": "7"}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            assert watch is not None
            watch.stop()  # the stop lands now: the request is out, its response not yet seen
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            held.wait(30)  # then nothing, as a quiet watch sends nothing for minutes

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = LinkSettings("n1", "ns", tmp_path, request_timeout_s=5.0, watch_timeout_s=30)
    with edge_node_watch(server.server_address[1], settings, lambda call, exc: None) as (watch, runner):
        try:
            runner.start()
            runner.join(3)
            assert not runner.is_alive(), "the watch kept waiting on a response after stop()"
        finally:
            held.set()
            server.shutdown()
            server.server_close()
