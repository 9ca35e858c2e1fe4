"""A compact fleet of simulated agents: one process, one asyncio loop, thousands of nodes, each
costing the API server what a real agent's link (`node_agent.link`) does, with its settings
(`LinkSettings`, and so the same `EDGEFLEET_LINK_*` variables):

- its Lease renewed every `lease_renew_s` less a jitter (a merge patch of renewTime, its answer
  in protobuf; created on 404), started at a random phase so the fleet does not renew in step;
- a list and watch of its own EdgeNode (field selector on its name), with bookmarks, resumed
  from the last resourceVersion every `watch_timeout_s`, relisted on 410 Gone and every
  `resync_s`; a failed call retried after the link's jittered exponential `Backoff`;
- its EdgeNode status written only on change (`e2e.sim_agent.status_for`: every assigned model
  Ready), as a merge patch against what it wrote last, at most every `status_min_interval_s`;
  while `traffic` is on, each node's SLA window rolls every `status_metrics_interval_s` (a write,
  as a real agent serving requests makes one).

Every request is counted client side by what it is for (`lease`, `status`, `list`, `watch`):
requests, and HTTP bytes up (request line, headers, body) and down (status line, headers, body:
for a watch, every line read). TLS framing is not counted.

    python -m e2e.sim_fleet --kubeconfig K --nodes a-000,a-001 --stats S --control C

The driver steers it through the JSON file `--control` (read every second: {"traffic": bool,
"bad": {version: sla override}, "silent": [node, ...], "reconnect_per_s": rate}) and reads
`--stats` (rewritten every second). `SimFleetProcess` runs it as a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2e.children import stop_child
from e2e.sim_agent import SimNode, micro_time, status_for
from edgefleet_api import names
from edgefleet_api.backoff import Backoff
from edgefleet_api.patch import merge_patch
from node_agent.link.lease import PROTOBUF, renewal_wait_s
from node_agent.link.settings import BOOKMARK_S, LinkSettings

USER_AGENT = "edgefleet-sim-agent"
EDGE_NODES = f"/apis/{names.GROUP}/{names.VERSION}/{names.EDGE_NODE_PLURAL}"
KINDS = ("lease", "status", "list", "watch")


@dataclass
class Traffic:
    """Requests and HTTP bytes of one kind of call."""

    requests: int = 0
    up: int = 0
    down: int = 0
    errors: int = 0


@dataclass
class Agent:
    """One simulated agent's state."""

    node: SimNode
    spec_models: list[dict[str, Any]] | None = None
    generation: int = 0
    written: dict[str, Any] = field(default_factory=dict)
    """The status this agent wrote last (what its next merge patch is computed against)."""
    last_write_s: float = -1e9
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    renewed_at: float = 0.0
    """Wall-clock time of the last successful Lease renewal (0: none yet)."""
    watching: bool = False
    reported_at: float = 0.0
    """Wall-clock time of the last successful status write."""
    window_requests: int = 0


class SimFleet:
    """The simulated agents of `nodes`, against the API server of `kubeconfig`."""

    def __init__(
        self, kubeconfig: Path, nodes: Iterable[str], namespace: str, settings: LinkSettings
    ) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
        self.server = cluster["server"]
        self.ssl = ssl.create_default_context(cafile=cluster["certificate-authority"])
        self.ssl.load_cert_chain(user["client-certificate"], user["client-key"])
        self.namespace = namespace
        self.s = settings
        self.agents = {n: Agent(SimNode(n, "edge-server")) for n in nodes}
        self.traffic = {k: Traffic() for k in KINDS}
        self.control: dict[str, Any] = {"traffic": False, "bad": {}, "silent": []}
        self.calls = asyncio.Semaphore(64)
        """Calls other than watches in flight at once (the agents' own connections are many; the
        simulator's process is one, and must not queue thousands of TLS handshakes at once)."""
        self.rng = random.Random()
        self.next_admission = 0.0
        """The monotonic time the next agent retrying its Lease gets through (`admitted`)."""
        self.started = time.time()

    # --- HTTP --------------------------------------------------------------------------------

    async def call(
        self,
        session: Any,
        kind: str,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/merge-patch+json",
        accept: str = "application/json",
    ) -> tuple[int, Any]:
        """One request; (status, decoded JSON or None). Counts it under `kind`."""
        import aiohttp

        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        headers = {"Accept": accept} | ({"Content-Type": content_type} if data is not None else {})
        t = self.s.request_timeout_s
        async with self.calls:
            try:
                async with session.request(
                    method,
                    self.server + path,
                    data=data,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=t),
                ) as resp:
                    raw = await resp.read()
            except Exception:
                self.traffic[kind].errors += 1
                raise
        self._count(kind, resp, len(raw))
        return resp.status, (json.loads(raw) if raw and resp.status < 300 and kind == "list" else None)

    def _count(self, kind: str, resp: Any, body_down: int) -> None:
        info = resp.request_info
        line = len(info.method) + len(info.url.raw_path_qs) + 11
        up = line + sum(len(k) + len(v) + 4 for k, v in info.headers.items()) + 2
        up += int(info.headers.get("Content-Length") or 0)
        down = 17 + len(resp.reason or "") + sum(len(k) + len(v) + 4 for k, v in resp.raw_headers) + 2
        tr = self.traffic[kind]
        tr.requests += 1
        tr.up += up
        tr.down += down + body_down

    # --- one agent ---------------------------------------------------------------------------

    async def lease_loop(self, session: Any, a: Agent) -> None:
        name = names.agent_name(a.node.name)
        path = f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{name}"
        backoff = Backoff(self.s.backoff_initial_s, self.s.backoff_max_s)
        await asyncio.sleep(self.rng.uniform(0, self.s.lease_renew_s))  # a fleet that starts together
        full = True
        while True:
            if a.node.name in self.control["silent"]:
                await asyncio.sleep(1.0)
                continue
            started, now = time.monotonic(), micro_time()
            spec: dict[str, Any] = {"renewTime": now}
            if full:
                spec |= {"holderIdentity": name, "leaseDurationSeconds": self.s.lease_duration_s}
            try:
                status, _ = await self.call(session, "lease", "PATCH", path, {"spec": spec}, accept=PROTOBUF)
                if status == 404:
                    labels = {"app.kubernetes.io/name": names.AGENT_APP, names.LABEL_NODE: a.node.name}
                    body = {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": name, "labels": labels},
                        "spec": {**spec, "acquireTime": now},
                    }
                    status, _ = await self.call(
                        session, "lease", "POST", path.rsplit("/", 1)[0], body, "application/json"
                    )
                if status >= 300 and status != 409:
                    raise RuntimeError(f"lease: HTTP {status}")
            except Exception:
                await asyncio.sleep(backoff.next())
                await self.admitted()
                continue
            backoff.reset()
            full = False
            a.renewed_at = time.time()
            await asyncio.sleep(renewal_wait_s(self.s, self.rng.random(), time.monotonic() - started))

    async def admitted(self) -> None:
        """With control `reconnect_per_s`: agents retrying after an error get through at that rate
        (no burst, no debt), as an API server's admission limits (max in flight, priority and
        fairness) let a large fleet's reconnect storm in; 0 or unset: at once."""
        while (rate := float(self.control.get("reconnect_per_s") or 0)) > 0:
            now = time.monotonic()
            if now >= self.next_admission:
                self.next_admission = now + 1.0 / rate
                return
            await asyncio.sleep(self.next_admission - now + self.rng.uniform(0, 1.0 / rate))

    async def watch_loop(self, session: Any, a: Agent) -> None:
        import aiohttp

        backoff = Backoff(self.s.backoff_initial_s, self.s.backoff_max_s)
        selector = f"fieldSelector=metadata.name%3D{a.node.name}"
        rv: str | None = None
        listed_at = -1e18
        while True:
            try:
                if rv is None or time.monotonic() - listed_at >= self.s.resync_s:
                    status, out = await self.call(session, "list", "GET", f"{EDGE_NODES}?{selector}")
                    if status != 200 or out is None:
                        raise RuntimeError(f"list: HTTP {status}")
                    rv, listed_at = out["metadata"]["resourceVersion"], time.monotonic()
                    if out["items"]:
                        self.seen(a, out["items"][0])
                    backoff.reset()
                query = (
                    f"{selector}&watch=1&allowWatchBookmarks=true&resourceVersion={rv}"
                    f"&timeoutSeconds={int(self.s.watch_timeout_s)}"
                )
                timeout = aiohttp.ClientTimeout(
                    sock_connect=self.s.request_timeout_s,
                    sock_read=min(self.s.watch_timeout_s, BOOKMARK_S) + self.s.request_timeout_s,
                )
                tr = self.traffic["watch"]
                async with session.get(f"{self.server}{EDGE_NODES}?{query}", timeout=timeout) as resp:
                    self._count("watch", resp, 0)
                    if resp.status != 200:
                        raise RuntimeError(f"watch: HTTP {resp.status}")
                    a.watching = True
                    backoff.reset()
                    async for line in resp.content:
                        tr.down += len(line)
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            rv = None if obj.get("code") == 410 else rv
                            break
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self.seen(a, obj)
                a.watching = False
            except asyncio.CancelledError:
                raise
            except Exception:
                a.watching = False
                self.traffic["watch"].errors += 1
                await asyncio.sleep(backoff.next())

    def seen(self, a: Agent, obj: dict[str, Any]) -> None:
        """An EdgeNode read: a new spec makes the agent report."""
        generation = int(obj["metadata"].get("generation") or 0)
        models = list((obj.get("spec") or {}).get("models") or [])
        if generation != a.generation or models != a.spec_models:
            a.generation, a.spec_models = generation, models
            a.dirty.set()

    async def status_loop(self, session: Any, a: Agent) -> None:
        backoff = Backoff(self.s.backoff_initial_s, self.s.backoff_max_s)
        roll = self.s.status_metrics_interval_s
        await asyncio.sleep(self.rng.uniform(0, roll))
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(a.dirty.wait(), roll)
            if a.spec_models is None or a.node.name in self.control["silent"]:
                continue
            rolled = bool(self.control["traffic"]) and not a.dirty.is_set()
            if rolled:
                a.window_requests += 500  # the window rolled: it holds another 10 s of requests
            a.dirty.clear()
            wait_s = a.last_write_s + self.s.status_min_interval_s - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            a.node.sla_by_version = self.control["bad"]
            a.node.sla["requests"] = 3000 + a.window_requests
            en = {"metadata": {"generation": a.generation}, "spec": {"models": a.spec_models}}
            status = status_for(a.node, en)
            body = merge_patch(a.written, status)
            if set(body) <= {"heartbeatTime"}:
                continue  # nothing the operator acts on changed
            try:
                path = f"{EDGE_NODES}/{a.node.name}/status"
                code, _ = await self.call(session, "status", "PATCH", path, {"status": body})
                if code >= 300:
                    raise RuntimeError(f"status: HTTP {code}")
            except Exception:
                a.dirty.set()
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            a.written, a.last_write_s, a.reported_at = status, time.monotonic(), time.time()

    # --- the whole fleet ---------------------------------------------------------------------

    async def run(self, stats: Path, control: Path) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(ssl=self.ssl, limit=0, ttl_dns_cache=None)
        async with aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT}) as session:
            tasks = []
            for a in self.agents.values():
                for loop in (self.lease_loop, self.watch_loop, self.status_loop):
                    tasks.append(asyncio.create_task(loop(session, a)))
            try:
                while True:
                    self.read_control(control)
                    self.write_stats(stats)
                    await asyncio.sleep(1.0)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def read_control(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            self.control = {**self.control, **json.loads(path.read_text())}

    def write_stats(self, path: Path) -> None:
        agents = self.agents.values()
        renewed = [a.renewed_at for a in agents]
        ticks = os.times()
        out = {
            "time": time.time(),
            "nodes": len(self.agents),
            "cpu_s": ticks.user + ticks.system,
            "watching": sum(1 for a in agents if a.watching),
            "leased": sum(1 for r in renewed if r),
            "oldest_renewal": min(renewed) if renewed else 0.0,
            "traffic": {k: vars(v) for k, v in self.traffic.items()},
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(path)


class SimFleetProcess:
    """`python -m e2e.sim_fleet` as a child process: `control(...)` steers it, `stats()` reads it.
    Link settings come from `env` (`EDGEFLEET_LINK_*`) and the defaults."""

    def __init__(
        self, kubeconfig: Path, nodes: list[str], directory: Path, namespace: str, **env: str
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.stats_path, self.control_path = directory / "stats.json", directory / "control.json"
        self.stats_path.unlink(missing_ok=True)
        (directory / "nodes.txt").write_text("\n".join(nodes))
        self.log = open(directory / "sim.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "e2e.sim_fleet",
                "--kubeconfig",
                str(kubeconfig),
                "--nodes-file",
                str(directory / "nodes.txt"),
                "--namespace",
                namespace,
                "--stats",
                str(self.stats_path),
                "--control",
                str(self.control_path),
            ],
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def control(self, **values: Any) -> None:
        current: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            current = json.loads(self.control_path.read_text())
        tmp = self.control_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**current, **values}))
        tmp.replace(self.control_path)

    def stats(self) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the simulator exited ({self.proc.returncode})")
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def stop(self) -> None:
        stop_child(self.proc)
        self.log.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig", type=Path, required=True)
    p.add_argument("--nodes-file", type=Path, required=True)
    p.add_argument("--namespace", default="edgefleet-system")
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--control", type=Path, required=True)
    args = p.parse_args(argv)
    nodes = [n for n in args.nodes_file.read_text().split() if n]
    settings = LinkSettings.from_env(
        edge_node="sim", namespace=args.namespace, state_dir=Path("/nonexistent")
    )
    fleet = SimFleet(args.kubeconfig, nodes, args.namespace, settings)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await fleet.run(args.stats, args.control)

    asyncio.run(run())


if __name__ == "__main__":
    main()
