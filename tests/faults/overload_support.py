"""The client side of `test_agent_overload`, run in a process of its own:
`python -m tests.faults.overload_support capacity URL SECONDS ROWS` prints the requests per
second 8 closed-loop clients get; `... flood URL RATE SECONDS ROWS` floods open-loop and
prints every request's (status, seconds, Retry-After) and the /v2/health/live probes' seconds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
import numpy as np

MODEL, VERSION = "classifier", "2-slow"
PATH = f"/v2/models/{MODEL}/versions/{VERSION}/infer"


def body(rows: int, seed: int = 0, timeout_s: float | None = None) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor infer request of `rows` images (with the v2 `timeout` parameter)."""
    x = np.random.default_rng(seed).standard_normal((rows, 3, 64, 64)).astype(np.float32)
    parameters = {} if timeout_s is None else {"timeout": int(timeout_s * 1e6)}
    header = json.dumps(
        {
            "parameters": parameters,
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
        }
    ).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return header + x.tobytes(), headers


async def one(
    session: aiohttp.ClientSession, url: str, payload: bytes, headers: dict[str, str]
) -> tuple[int, float, str | None]:
    start = time.monotonic()
    async with session.post(url + PATH, data=payload, headers=headers) as resp:
        await resp.read()
        return resp.status, time.monotonic() - start, resp.headers.get("Retry-After")


async def capacity(url: str, seconds: float, rows: int) -> float:
    """Closed loop, 8 clients of `rows` rows each: requests per second the agent serves
    (their requests carry a 30 s timeout: admission lets them all queue, the model never
    waits for work)."""
    payload, headers = body(rows, timeout_s=30.0)
    done = 0
    stop = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < stop:
            status, _, _ = await one(session, url, payload, headers)
            assert status == 200, status
            done += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, url, payload, headers) for _ in range(4)))  # warm
        start = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(8)))
        return done / (time.monotonic() - start)


async def flood(url: str, rate: float, seconds: float, rows: int) -> dict[str, list[Any]]:
    """Open loop at `rate` req/s of `rows` rows for `seconds`, and /v2/health/live every 50 ms
    meanwhile: each request's (status, seconds, Retry-After), the requests that got no answer
    (their errors), the probes' seconds."""
    payload, headers = body(rows)
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=0)
    live: list[float] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        running = True

        async def probe() -> None:
            while running:
                start = time.monotonic()
                async with session.get(url + "/v2/health/live") as resp:
                    assert resp.status == 200
                live.append(time.monotonic() - start)
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        tasks = []
        start = time.monotonic()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, url, payload, headers)))
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        running = False
        await prober
    return {
        "outcomes": [o for o in outcomes if not isinstance(o, BaseException)],
        "errors": [repr(o) for o in outcomes if isinstance(o, BaseException)],
        "live": live,
    }


def main(argv: list[str]) -> None:
    command, url = argv[0], argv[1]
    if command == "capacity":
        print(json.dumps(asyncio.run(capacity(url, float(argv[2]), int(argv[3])))))
    else:
        print(json.dumps(asyncio.run(flood(url, float(argv[2]), float(argv[3]), int(argv[4])))))


if __name__ == "__main__":
    main(sys.argv[1:])
