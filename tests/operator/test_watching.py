"""The operator's timeouts towards the API server (edgefleet_operator.watching): settings, kopf's
settings, and a kubernetes client whose calls cannot hang on a silent connection."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import kopf
import pytest
from kubernetes import client

from edgefleet_operator.watching import WatchingSettings, bounded, configure_kopf


def test_settings_default_and_from_the_environment() -> None:
    d = WatchingSettings()
    assert d.watch_inactivity_timeout_s > 60  # longer than the API server's bookmark period
    s = WatchingSettings.from_env(
        {"EDGEFLEET_API_READ_TIMEOUT_S": "3", "EDGEFLEET_WATCH_SERVER_TIMEOUT_S": ""}
    )
    assert s.api_read_timeout_s == 3.0 and s.watch_server_timeout_s == d.watch_server_timeout_s
    with pytest.raises(ValueError, match="EDGEFLEET_API_READ_TIMEOUT_S"):
        WatchingSettings.from_env({"EDGEFLEET_API_READ_TIMEOUT_S": "soon"})
    with pytest.raises(ValueError, match="api_connect_timeout_s must be > 0"):
        WatchingSettings(api_connect_timeout_s=0)
    with pytest.raises(ValueError, match="watch_client_timeout_s"):
        WatchingSettings(watch_server_timeout_s=60, watch_client_timeout_s=30)


def test_kopf_gets_the_timeouts() -> None:
    settings = kopf.OperatorSettings()
    configure_kopf(settings, WatchingSettings(watch_server_timeout_s=45.4, watch_inactivity_timeout_s=55))
    w = settings.watching
    assert w.server_timeout == 45 and isinstance(w.server_timeout, int)  # timeoutSeconds is an integer
    assert (w.client_timeout, w.connect_timeout, w.inactivity_timeout) == (90, 10, 55)
    assert settings.networking.request_timeout == 60 and settings.networking.connect_timeout == 10


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never sends a byte (a hung API server, or a
    middlebox that dropped the flow)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    stop.set()
    thread.join(2)
    for s in accepted:
        s.close()
    listener.close()


def test_a_bounded_client_gives_up_on_a_silent_server(silent_server: int) -> None:
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{silent_server}"
    configuration.retries = False
    api = bounded(client.ApiClient(configuration), WatchingSettings(api_read_timeout_s=0.5))
    try:
        t0 = time.monotonic()
        with pytest.raises(Exception, match="timed out"):
            client.CoreV1Api(api).list_node()
        assert time.monotonic() - t0 < 3
        t0 = time.monotonic()
        with pytest.raises(Exception, match="timed out"):  # a timeout the caller names wins
            client.CoreV1Api(api).list_node(_request_timeout=(1, 0.2))
        assert time.monotonic() - t0 < 0.5 + 0.3
    finally:
        api.close()
