"""KServe's Python model server (run in its own virtualenv): one `kserve.Model` per model, each
`torch.jit.load`ing the TorchScript file, served on the v2 REST endpoint (JSON, and the binary
tensor extension both ways when asked).

KServe's model server has no server-side batching (in a cluster, batching is the KServe agent
sidecar's job), so each request runs alone; predict is synchronous, as in KServe's examples.
Settings: 1 uvicorn worker, gRPC off, latency logging off, torch on every core.

    python kserve_app.py SPEC.json PORT
"""

import json
import sys
import uuid

import numpy as np
import torch
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

_config_init = uvicorn.Config.__init__


def _loopback(self, *args, **kwargs):  # KServe binds 0.0.0.0; this bench listens on loopback only
    kwargs["host"] = "127.0.0.1"
    _config_init(self, *args, **kwargs)


uvicorn.Config.__init__ = _loopback


class TorchScriptModel(Model):
    def __init__(self, spec: dict) -> None:
        super().__init__(spec["name"])
        self.cfg = spec

    def load(self) -> bool:
        self.module = torch.jit.load(self.cfg["path"]).eval()
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        x = torch.from_numpy(payload.inputs[0].as_numpy())
        with torch.inference_mode():
            y = self.module(x).numpy()
        binary = payload.use_binary_outputs
        out = InferOutput(self.cfg["output_name"], list(y.shape), "FP32")
        out.set_data_from_numpy(y, binary_data=binary)
        return InferResponse(payload.id or str(uuid.uuid4()), self.name, [out], use_binary_outputs=binary)


def main() -> None:
    with open(sys.argv[1]) as f:
        specs = json.load(f)
    torch.set_num_threads(specs[0]["threads"])
    models = []
    for spec in specs:
        model = TorchScriptModel(spec)
        model.load()
        x = torch.zeros((1, *spec["shape"]))
        with torch.inference_mode():
            model.module(x)
        models.append(model)
    ModelServer(http_port=int(sys.argv[2]), workers=1, enable_grpc=False, enable_latency_logging=False).start(
        models
    )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
