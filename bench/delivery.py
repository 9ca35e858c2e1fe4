"""Benchmark: delivery over a weak link, on loopback (nothing leaves 127.0.0.1).

    python -m bench.delivery                 # ~30 s on 2 cores; prints the tables
    BENCH_QUICK=1 python -m bench.delivery   # a few seconds, a smoke test

(a) Resume: a download cut at 50% by the origin (`bench.origin`, which honours Range) is
finished by the agent's downloader (`node_agent.link.download.Delivery`); we report the bytes
the origin sent beyond one copy (re-fetched), against the same cut on an origin that ignores
Range (the downloader must start over).

(b) Uplink bytes of a rollout: one model to N nodes in S sites at once (the worst case: no
wave has staged it). Each node is a `Delivery` plus the agent's real peer route
(`serving.artifact_route` on aiohttp) that serves what the node verified; peers come from
the operator's `peers.artifact_peers` (K per node, same site, one seed per site). The origin
is rate-limited (the uplink); each node's bytes from the origin are its site's uplink bytes.
Without peer fetch every node goes to the origin. Goal: <= 1.1 model copies per site.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from bench.common import quick
from bench.origin import Origin
from bench.report import recorded, table
from edgefleet_operator.peers import SITE_LABEL, PeerCandidate, artifact_peers
from node_agent.link.download import Delivery, DeliverySettings, RetryPolicy
from node_agent.serving.artifact_route import ArtifactRoute

MIB = 1024 * 1024


def model_bytes(size: int, seed: int = 1) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


# --- (a) resume ---------------------------------------------------------------------------------


def resume(size: int, ignore_range: bool, workdir: Path) -> list[object]:
    data, digest = model_bytes(size)
    origin = Origin({"m/1/model.pt": data})
    origin.ignore_range = ignore_range
    origin.cuts = [size // 2]
    try:
        d = Delivery(DeliverySettings(retry=RetryPolicy(attempts=3, initial_s=0.05, max_s=0.1)))
        target = workdir / f"resume-{ignore_range}" / "model.pt"
        t0 = time.monotonic()
        report = d.fetch(origin.url("m/1/model.pt"), target, digest)
        elapsed_s = time.monotonic() - t0
        assert target.read_bytes() == data
    finally:
        origin.close()
    refetched = origin.log.sent_bytes - size
    return [
        "ignores Range (200)" if ignore_range else "honours Range (206)",
        f"{size // MIB} MiB",
        len(origin.log.requests),
        origin.log.sent_bytes,
        refetched,
        f"{100 * refetched / size:.2f}%",
        report.discarded_bytes,
        round(elapsed_s, 2),
    ]


# --- (b) rollout --------------------------------------------------------------------------------


@dataclass
class SimNode:
    name: str
    site: str
    target: Path
    route: ArtifactRoute
    endpoint: str = ""


class PeerServers:
    """Each node's peer route on its own aiohttp site, all on one loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runners: list[web.AppRunner] = []

    def serve(self, node: SimNode) -> str:
        async def start() -> str:
            app = web.Application()
            node.route.add_to(app)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            port = runner.addresses[0][1]
            return f"http://127.0.0.1:{port}"

        return asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def close(self) -> None:
        async def stop() -> None:
            for runner in self.runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def rollout(
    size: int, nodes_n: int, sites_n: int, peer_fetch: bool, uplink_bytes_per_s: int, workdir: Path
) -> list[object]:
    data, digest = model_bytes(size, seed=2)
    origin = Origin({"m/1/model.pt": data}, rate_bytes_per_s=uplink_bytes_per_s)
    servers = PeerServers()
    nodes: list[SimNode] = []
    try:
        for i in range(nodes_n):
            target = workdir / f"rollout-{peer_fetch}" / f"n{i}" / "model.pt"
            node = SimNode(f"n{i}", f"site-{i % sites_n}", target, ArtifactRoute())
            node.route.lookup = lambda d, t=target: t if d == digest and t.is_file() else None
            node.endpoint = servers.serve(node)
            nodes.append(node)
        candidates = [PeerCandidate.of(n.name, {SITE_LABEL: n.site}, n.endpoint) for n in nodes]
        chosen = artifact_peers(candidates) if peer_fetch else {}
        settings = DeliverySettings(
            retry=RetryPolicy(attempts=5, initial_s=0.05, max_s=0.5),
            peer_wait_s=120.0,
            peer_min_bytes_per_s=0,
        )

        def fetch(node: SimNode) -> int:
            d = Delivery(settings, peers=chosen.get(node.name, ()), self_url=node.endpoint)
            report = d.fetch(origin.url("m/1/model.pt"), node.target, digest)
            return report.bytes_by_source.get(origin.url("m/1/model.pt"), 0)

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=nodes_n) as pool:
            uplink = list(pool.map(fetch, nodes))
        elapsed_s = time.monotonic() - t0
        assert all(n.target.read_bytes() == data for n in nodes)
    finally:
        servers.close()
        origin.close()
    per_site = [
        sum(b for n, b in zip(nodes, uplink, strict=True) if n.site == s) / size
        for s in sorted({n.site for n in nodes})
    ]
    return [
        "peers, then origin" if peer_fetch else "origin only",
        f"{size // MIB} MiB",
        nodes_n,
        sites_n,
        origin.log.sent_bytes,
        round(origin.log.sent_bytes / size, 2),
        round(max(per_site), 2),
        round(sum(per_site) / len(per_site), 2),
        round(elapsed_s, 2),
    ]


def main() -> None:
    q = quick()
    resume_size = 4 * MIB if q else 32 * MIB
    size, nodes_n, sites_n = (2 * MIB, 10, 2) if q else (16 * MIB, 50, 5)
    uplink = 100 * MIB  # bytes/s from the origin, all sites together
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        work = Path(tmp)
        rows_a = [resume(resume_size, False, work), resume(resume_size, True, work)]
        print("\n(a) a download cut at 50%, finished by the downloader\n")
        print(
            table(
                [
                    "origin",
                    "model",
                    "requests",
                    "origin bytes",
                    "re-fetched bytes",
                    "re-fetched",
                    "discarded",
                    "s",
                ],
                rows_a,
            )
        )
        rows_b = [rollout(size, nodes_n, sites_n, p, uplink, work) for p in (False, True)]
        print(
            f"\n(b) one model to {nodes_n} nodes in {sites_n} sites at once; "
            f"origin (uplink) {uplink // MIB} MiB/s\n"
        )
        print(
            table(
                [
                    "delivery",
                    "model",
                    "nodes",
                    "sites",
                    "origin bytes",
                    "copies (all)",
                    "copies per site (max)",
                    "copies per site (mean)",
                    "s",
                ],
                rows_b,
            )
        )


if __name__ == "__main__":
    with recorded(
        "delivery",
        "Model delivery over a weak link: resume after a cut, peer fetch within a site (issue 18)",
        "Loopback only: a local origin (bench/origin.py) with Range, ETag, cuts and a rate limit; real\n"
        "agents' downloaders (node_agent/link/download.py). Goals: a download cut at 50% re-fetches\n"
        "<= 1% of the model; a rollout to N nodes in S sites costs each site's uplink <= 1.1 model copies.",
    ):
        main()
