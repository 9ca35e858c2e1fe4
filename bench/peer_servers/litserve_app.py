"""LitServe (run in its own virtualenv): one `LitAPI` per model at /predict/<name>, each
`torch.jit.load`ing the TorchScript file, with LitServe's batching at the model's max batch and
window (`max_batch_size`, `batch_timeout`).

Settings (LitServe's docs for throughput on CPU): accelerator cpu, 1 worker per device (a
worker process per API, torch on every core), `fast_queue` (ZeroMQ between the API server and
the workers), 1 API server process. Native JSON: {"inputs": [flat list]} -> {"outputs": [...]}.

    python litserve_app.py SPEC.json PORT
"""

import json
import sys

import litserve as ls
import numpy as np
import torch


class TorchScriptAPI(ls.LitAPI):
    def __init__(self, spec: dict) -> None:
        super().__init__(
            max_batch_size=spec["max_batch"],
            batch_timeout=spec["window_s"],
            api_path="/predict/" + spec["name"],
        )
        self.cfg = spec

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.cfg["threads"])
        self.module = torch.jit.load(self.cfg["path"]).eval()

    def decode_request(self, request: dict) -> np.ndarray:
        return np.asarray(request["inputs"], np.float32).reshape(self.cfg["shape"])

    def batch(self, inputs: list) -> torch.Tensor:
        return torch.from_numpy(np.stack(inputs))

    def predict(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.module(x).numpy()

    def unbatch(self, output: np.ndarray) -> list:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict:
        return {"outputs": output.tolist()}


def main() -> None:
    with open(sys.argv[1]) as f:
        specs = json.load(f)
    server = ls.LitServer(
        [TorchScriptAPI(s) for s in specs],
        accelerator="cpu",
        workers_per_device=1,
        fast_queue=True,
        timeout=30,
    )
    server.run(
        host="127.0.0.1",
        port=int(sys.argv[2]),
        num_api_servers=1,
        generate_client_file=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
