"""What bench.fleet_scale measures with: CPU and RSS of a process (/proc), a TCP proxy that counts
the bytes through it (in its own process), the API server's requests by kind and the share of them
an operator makes, and quantiles of a Prometheus histogram between two snapshots."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from bench.fleet_e2e import metric


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` so far; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class CountingProxy:
    """A TCP pass-through to `target` on 127.0.0.1 (TLS passes as is) counting the bytes each way,
    in a child process of its own (in this one it would share the interpreter lock with the
    driver's polls, and slow the operator's calls down). A connection the target refuses is
    closed at once."""

    def __init__(self, target: tuple[str, int]) -> None:
        ctx = multiprocessing.get_context("fork")
        self._up, self._down = ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False)
        port = ctx.Value("i", 0)
        self.proc = ctx.Process(target=_proxy, args=(target, port, self._up, self._down), daemon=True)
        self.proc.start()
        deadline = time.monotonic() + 30
        while not port.value and time.monotonic() < deadline:
            time.sleep(0.05)
        if not port.value:
            raise RuntimeError("the counting proxy did not start")
        self.port = int(port.value)

    @property
    def up(self) -> int:
        return int(self._up.value)

    @property
    def down(self) -> int:
        return int(self._down.value)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(5)

    def kubeconfig(self, source: Path, path: Path) -> Path:
        config = yaml.safe_load(source.read_text())
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path


def _proxy(target: tuple[str, int], port: Any, up: Any, down: Any) -> None:
    """The proxy's process: serve until terminated."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, counter: Any) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await r.read(65536):
                    counter.value += len(data)
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w, up), pipe(up_r, writer, down))

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port.value = int(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def apiserver_requests(kube: Any, server: str) -> dict[tuple[str, str, str], float]:
    """The API server's `apiserver_request_total` by (verb, resource, subresource)."""
    text = kube.rest_client.pool_manager.request("GET", f"{server}/metrics", timeout=30).data.decode()
    out: dict[tuple[str, str, str], float] = {}
    for labels, value in re.findall(r"^apiserver_request_total\{([^}]*)\} (\S+)$", text, re.M):
        d = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = (d.get("verb", ""), d.get("resource", ""), d.get("subresource", ""))
        out[key] = out.get(key, 0.0) + float(value)
    return out


OPERATOR_WRITES = frozenset({"inferenceservices", "services", "endpointslices", "events"})


def operator_like(by: dict[tuple[str, str, str], float]) -> float:
    """The requests of the kinds the operator makes (and the simulated agents, which the caller
    subtracts, counted on their side): every LIST and WATCH; GETs but of Nodes and Leases (kwok's);
    writes to services and their bookkeeping, EdgeNode specs, agent Pods (created, deleted: kwok
    writes their status) and Leases by PATCH or POST (kwok's node Leases are PUT). What the rest of
    the control plane makes of these (its informers' re-watches) is measured before the operator
    starts and subtracted too."""
    total = 0.0
    for (verb, resource, sub), v in by.items():
        if (
            verb in ("LIST", "WATCH")
            or (verb == "GET" and resource not in ("leases", "nodes"))
            or (
                verb in ("POST", "PATCH", "PUT", "DELETE")
                and (
                    resource in OPERATOR_WRITES
                    or (resource == "edgenodes" and not sub)
                    or (resource == "pods" and not sub and verb in ("POST", "DELETE"))
                    or (resource == "leases" and verb in ("PATCH", "POST"))
                )
            )
        ):
            total += v
    return total


def agents_like(traffic: dict[str, dict[str, float]]) -> float:
    """The simulated agents' requests `operator_like` counts too (all but their status writes)."""
    return sum(v["requests"] for k, v in traffic.items() if k != "status")


def histogram_quantiles(
    before: dict[float, float], after: dict[float, float], qs: tuple[float, ...]
) -> list[float]:
    """Quantiles of the observations between two snapshots of a cumulative histogram (le -> count),
    linear within a bucket."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    total = counts[-1] if counts else 0.0
    out = []
    for q in qs:
        target, prev_le, prev_c = q * total, 0.0, 0.0
        value = float("nan")
        for le, c in zip(les, counts, strict=True):
            if c >= target and total:
                hi = le if le != float("inf") else prev_le
                value = prev_le + (hi - prev_le) * ((target - prev_c) / (c - prev_c) if c > prev_c else 1.0)
                break
            prev_le, prev_c = le, c
        out.append(value)
    return out


def pass_histogram(port: int) -> dict[float, float]:
    name = "edgefleet_operator_reconcile_duration_seconds_bucket"
    out = {}
    for le in ("0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "+Inf"):
        out[float(le)] = metric(port, rf'{name}\{{le="{re.escape(le)}"\}}')
    return out
