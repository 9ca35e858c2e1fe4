"""`link.download`: resumable, paced, retried downloads with peer fetch, against a real local
HTTP origin this test controls (`bench.origin`: cuts, Range ignored, corrupt bytes); the pacing
and backoff logic on fake time; the agent's peer route (`serving.artifact_route`) on a real
aiohttp server."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from bench.origin import Origin
from edgefleet_api.edge_node import seed_rank
from node_agent.errors import DigestMismatch, InvalidModel
from node_agent.link.download import (
    ARTIFACT_ROUTE,
    Delivery,
    DeliverySettings,
    RetryPolicy,
    TokenBucket,
    part_path,
    peer_url,
)
from node_agent.serving.artifact_route import ArtifactRoute

SIZE = 4 * 1024 * 1024 + 123
DATA = random.Random(7).randbytes(SIZE)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
QUICK = RetryPolicy(attempts=3, initial_s=0.01, max_s=0.02, total_s=10.0)


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin({"m/1/model.pt": DATA})
    yield server
    server.close()


def delivery(**kwargs: object) -> Delivery:
    settings = DeliverySettings(retry=QUICK, peer_timeout_s=2.0, **kwargs)  # type: ignore[arg-type]
    return Delivery(settings)


def test_a_cut_at_half_resumes_with_a_range_request(origin: Origin, tmp_path: Path) -> None:
    """The first response is cut at 50%: the second asks for the rest (If-Range with the ETag),
    gets a 206 from the cut, and the whole verifies; nothing but the missing half is fetched."""
    origin.cuts = [SIZE // 2]
    target = tmp_path / "model.pt"
    report = delivery().fetch(origin.url("m/1/model.pt"), target, DIGEST)
    assert target.read_bytes() == DATA and not part_path(target).exists()
    assert [status for _, _, status in origin.log.requests] == [200, 206]
    assert origin.log.requests[1][1] == f"bytes={SIZE // 2}-"
    assert report.resumed_from == [SIZE // 2]
    assert report.received_bytes == SIZE and report.discarded_bytes == 0
    assert origin.log.sent_bytes == SIZE  # not a byte twice


def test_a_part_left_by_a_killed_agent_is_resumed_and_its_hash_rebuilt(
    origin: Origin, tmp_path: Path
) -> None:
    target = tmp_path / "model.pt"
    part_path(target).write_bytes(DATA[:1_000_000])
    report = delivery().fetch(origin.url("m/1/model.pt"), target, DIGEST)
    assert target.read_bytes() == DATA
    assert report.resumed_from == [1_000_000] and origin.log.sent_bytes == SIZE - 1_000_000


def test_range_ignored_starts_over(origin: Origin, tmp_path: Path) -> None:
    """A server that answers 200 to a Range request: the part is emptied and the body taken whole."""
    origin.ignore_range = True
    origin.cuts = [SIZE // 3]
    target = tmp_path / "model.pt"
    report = delivery().fetch(origin.url("m/1/model.pt"), target, DIGEST)
    assert target.read_bytes() == DATA
    assert [status for _, _, status in origin.log.requests] == [200, 200]
    assert report.discarded_bytes == SIZE // 3 and report.resumed_from == []


def test_wrong_bytes_never_get_the_name(origin: Origin, tmp_path: Path) -> None:
    origin.corrupt = True
    target = tmp_path / "model.pt"
    with pytest.raises(DigestMismatch, match="refusing to load it"):
        delivery().fetch(origin.url("m/1/model.pt"), target, DIGEST)
    assert not target.exists() and not part_path(target).exists()


def test_a_wrong_part_is_dropped_and_fetched_once_more_from_the_start(origin: Origin, tmp_path: Path) -> None:
    """A part whose bytes are not the artifact's prefix (an older file): the resumed whole does
    not verify, so it is fetched again from byte 0, and then verifies."""
    target = tmp_path / "model.pt"
    part_path(target).write_bytes(b"\0" * 1000)
    report = delivery().fetch(origin.url("m/1/model.pt"), target, DIGEST)
    assert target.read_bytes() == DATA
    assert report.discarded_bytes == SIZE and [s for _, _, s in origin.log.requests] == [206, 200]


def test_retries_are_bounded_and_say_what_failed(origin: Origin, tmp_path: Path) -> None:
    origin.cuts = [1000, 1000, 1000, 1000]
    sleeps: list[float] = []
    d = Delivery(DeliverySettings(retry=QUICK), sleep=sleeps.append)
    target = tmp_path / "model.pt"
    with pytest.raises(InvalidModel, match=r"fetching .* failed: (cut after|the transfer stopped)"):
        d.fetch(origin.url("m/1/model.pt"), target, DIGEST)
    assert len(origin.log.requests) == QUICK.attempts and len(sleeps) == QUICK.attempts - 1
    assert not target.exists() and part_path(target).stat().st_size == 3000  # kept to resume from
    with pytest.raises(InvalidModel, match="HTTP 404"):  # permanent: not retried
        d.fetch(origin.url("nowhere"), tmp_path / "x", DIGEST)
    assert len(origin.log.requests) == QUICK.attempts + 1


def test_backoff_grows_with_jitter_and_stops_at_the_total_time(tmp_path: Path) -> None:
    """Against a closed port, on fake time: delays double from initial_s within [d/2, d], capped
    at max_s, and no retry starts past total_s."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/m.pt"
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    policy = RetryPolicy(attempts=50, initial_s=1.0, max_s=8.0, total_s=40.0)
    d = Delivery(DeliverySettings(retry=policy), clock=lambda: now[0], sleep=sleep, rng=random.Random(1))
    with pytest.raises(InvalidModel, match="out of time"):
        d.fetch(dead, tmp_path / "m.pt", DIGEST)
    for i, delay in enumerate(sleeps):
        cap = min(8.0, 2.0**i)
        assert cap / 2 <= delay <= cap
    assert sum(sleeps) <= 40.0 and sum(sleeps) + 8.0 > 40.0 - 8.0
    assert max(sleeps) > 4.0  # it did reach the cap


def test_token_bucket_paces_to_its_rate() -> None:
    """Pure pacing: chunks taken as fast as allowed pass at the rate after the first burst, and
    several takers sharing a bucket share the rate."""
    bucket = TokenBucket(1_000_000, burst_bytes=100_000)
    now, passed = 0.0, 0
    while now < 10.0:
        wait_s = bucket.take(64 * 1024, now)
        passed += 64 * 1024
        assert passed <= 100_000 + 1_000_000 * now + 64 * 1024 + 1  # the invariant (one chunk of debt)
        now += wait_s
    assert 0.97 <= passed / (1_000_000 * now + 100_000) <= 1.03
    shared = TokenBucket(1000, burst_bytes=1)
    assert shared.take(500, 0.0) == pytest.approx(0.499)
    assert shared.take(500, 0.0) == pytest.approx(0.999)  # the second taker waits behind the first
    assert shared.take(0, 1.0) == 0.0  # paid back by the time


def test_a_bandwidth_limit_holds_on_a_real_download(origin: Origin, tmp_path: Path) -> None:
    """8 Mbit/s: 4 MiB takes about 4 s of waits (asserted on the pacing sleeps, not the clock)."""
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        time.sleep(s / 100)  # the logic paces; the test need not wait it out

    rate = 1_000_000
    d = Delivery(DeliverySettings(bandwidth_bytes_per_s=rate, burst_bytes=65536, retry=QUICK), sleep=sleep)
    d.fetch(origin.url("m/1/model.pt"), tmp_path / "model.pt", DIGEST)
    assert sum(waits) >= (SIZE - 65536) / rate - 0.1


def test_peers_first_a_corrupt_or_dead_peer_falls_back_to_the_origin(origin: Origin, tmp_path: Path) -> None:
    """A dead peer and a peer serving wrong bytes: both left behind, the origin delivers; a good
    peer delivers everything and the origin sends nothing."""
    hex_ = DIGEST.removeprefix("sha256:")
    bad = Origin({ARTIFACT_ROUTE.lstrip("/") + hex_: DATA})
    bad.corrupt = True
    good = Origin({ARTIFACT_ROUTE.lstrip("/") + hex_: DATA})
    try:
        d = delivery()
        d.peers = ("http://127.0.0.1:9", bad.base)
        report = d.fetch(origin.url("m/1/model.pt"), tmp_path / "a.pt", DIGEST)
        assert (tmp_path / "a.pt").read_bytes() == DATA
        assert report.rejected_peers == [peer_url(bad.base, DIGEST)]
        assert report.bytes_by_source[origin.url("m/1/model.pt")] == SIZE

        d.peers = (good.base,)
        sent = origin.log.sent_bytes
        report = d.fetch(origin.url("m/1/model.pt"), tmp_path / "b.pt", DIGEST)
        assert (tmp_path / "b.pt").read_bytes() == DATA and origin.log.sent_bytes == sent
        assert report.bytes_by_source == {peer_url(good.base, DIGEST): SIZE}
    finally:
        bad.close()
        good.close()


def test_a_peer_cut_midway_is_resumed_from_the_origin(origin: Origin, tmp_path: Path) -> None:
    hex_ = DIGEST.removeprefix("sha256:")
    peer = Origin({ARTIFACT_ROUTE.lstrip("/") + hex_: DATA})
    peer.cuts = [SIZE // 2]
    try:
        d = delivery()
        d.peers = (peer.base,)
        report = d.fetch(origin.url("m/1/model.pt"), tmp_path / "a.pt", DIGEST)
        assert (tmp_path / "a.pt").read_bytes() == DATA
        assert origin.log.sent_bytes == SIZE - SIZE // 2 and report.resumed_from == [SIZE // 2]
    finally:
        peer.close()


def test_a_non_seed_waits_for_a_peer_to_hold_it(origin: Origin, tmp_path: Path) -> None:
    """Peers that answer 404 (not held yet) are polled again while the seed fetches; the node
    that ranks first among itself and its peers goes to the origin at once."""
    hex_ = DIGEST.removeprefix("sha256:")
    peer = Origin({})
    try:
        me = next(u for i in range(256) if seed_rank(u := f"http://10.0.0.{i}:8000") > seed_rank(peer.base))
        polls = []

        def sleep(s: float) -> None:
            polls.append(s)
            if len(polls) == 2:
                peer.files[ARTIFACT_ROUTE.lstrip("/") + hex_] = DATA  # the seed finished

        settings = DeliverySettings(retry=QUICK, peer_wait_s=5.0)
        d = Delivery(settings, peers=(peer.base,), self_url=me, sleep=sleep)
        assert not d.is_seeder()
        report = d.fetch(origin.url("m/1/model.pt"), tmp_path / "a.pt", DIGEST)
        assert origin.log.sent_bytes == 0 and report.bytes_by_source == {peer_url(peer.base, DIGEST): SIZE}
        assert len(polls) == 2
        seed = Delivery(settings, peers=(me,), self_url=peer.base)
        assert seed.is_seeder()
    finally:
        peer.close()


# --- the serving side -------------------------------------------------------------------------


def test_the_peer_route_serves_verified_artifacts_by_digest_with_range(tmp_path: Path) -> None:
    held = tmp_path / "model.pt"
    held.write_bytes(DATA)
    asked: list[str] = []

    def lookup(digest: str) -> Path | None:
        asked.append(digest)
        return held if digest == DIGEST else None

    route = ArtifactRoute(lookup)
    app = web.Application()
    route.add_to(app)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    runner = web.AppRunner(app)
    asyncio.run_coroutine_threadsafe(runner.setup(), loop).result(10)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    asyncio.run_coroutine_threadsafe(site.start(), loop).result(10)
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        with urllib.request.urlopen(peer_url(base, DIGEST)) as r:
            assert r.status == 200 and r.read() == DATA
        request = urllib.request.Request(peer_url(base, DIGEST), headers={"Range": "bytes=1000-"})
        with urllib.request.urlopen(request) as r:
            assert r.status == 206 and r.headers["Content-Range"] == f"bytes 1000-{SIZE - 1}/{SIZE}"
            assert r.read() == DATA[1000:]
        for path in (
            ARTIFACT_ROUTE + "0" * 64,  # not held
            ARTIFACT_ROUTE + "..%2F..%2Fetc%2Fpasswd",  # not a digest: never a path
            ARTIFACT_ROUTE + DIGEST.removeprefix("sha256:").upper(),
        ):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + path)
            assert e.value.code == 404
        assert asked == [DIGEST, DIGEST, "sha256:" + "0" * 64]  # only valid digests reach the lookup
        # a Delivery fetches from it as a peer
        d = delivery()
        d.peers = (base,)
        d.fetch("http://127.0.0.1:9/unused", tmp_path / "copy.pt", DIGEST)
        assert (tmp_path / "copy.pt").read_bytes() == DATA
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
