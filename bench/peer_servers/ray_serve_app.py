"""Ray Serve (run in its own virtualenv): one deployment per model at /<name>, each
`torch.jit.load`ing the TorchScript file, batching with `@serve.batch` at the model's max batch
and window (`max_batch_size`, `batch_wait_timeout_s`).

Settings (Ray Serve's docs for CPU models): a local Ray instance with the machine's CPUs,
dashboard off; 1 replica per deployment (`num_cpus` 1 each, torch told to use every core, since
Ray sets OMP_NUM_THREADS to the replica's CPUs), the HTTP proxy on loopback. Native JSON:
{"inputs": [flat list]} -> {"outputs": [...]}.

    python ray_serve_app.py SPEC.json PORT
"""

import json
import os
import signal
import sys
import time

import numpy as np
import ray
import torch
from ray import serve
from starlette.requests import Request


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1})
class TorchScriptDeployment:
    def __init__(self, spec: dict) -> None:
        torch.set_num_threads(spec["threads"])
        self.cfg = spec
        self.module = torch.jit.load(spec["path"]).eval()
        self.infer.set_max_batch_size(spec["max_batch"])
        self.infer.set_batch_wait_timeout_s(spec["window_s"])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def infer(self, rows: list) -> list:
        if torch.get_num_threads() != self.cfg["threads"]:  # set per thread; Ray may call from another
            torch.set_num_threads(self.cfg["threads"])
        with torch.inference_mode():
            y = self.module(torch.from_numpy(np.stack(rows))).numpy()
        return [r.tolist() for r in y]

    async def __call__(self, request: Request) -> dict:
        body = await request.json()
        x = np.asarray(body["inputs"], np.float32).reshape(self.cfg["shape"])
        return {"outputs": await self.infer(x)}


def main() -> None:
    with open(sys.argv[1]) as f:
        specs = json.load(f)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
    for spec in specs:
        app = TorchScriptDeployment.options(name=spec["name"]).bind(spec)
        serve.run(app, name=spec["name"], route_prefix="/" + spec["name"], blocking=False)

    def stop(*_: object) -> None:
        serve.shutdown()
        ray.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("ray serve ready", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
