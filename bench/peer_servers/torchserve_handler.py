"""TorchServe custom handler (packed into a model archive, run by TorchServe's Python worker):
`torch.jit.load`s the archive's TorchScript file; TorchServe's frontend batches requests (the
model's `batchSize` and `maxBatchDelay`) and hands this one batch at a time. Native JSON:
{"inputs": [flat list]} -> {"outputs": [...]}; the shape and thread count come from the
archive's spec.json.
"""

import json
import os

import numpy as np
import torch

_state: dict = {}


def _initialize(context) -> None:
    model_dir = context.system_properties["model_dir"]
    with open(os.path.join(model_dir, "spec.json")) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    _state["spec"] = spec
    _state["module"] = torch.jit.load(os.path.join(model_dir, "model.pt")).eval()


def handle(data, context):
    if not _state:
        _initialize(context)
    if data is None:
        return None
    spec = _state["spec"]
    rows = []
    for request in data:
        body = request.get("body") or request.get("data")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body)
        rows.append(np.asarray(body["inputs"], np.float32).reshape(spec["shape"]))
    with torch.inference_mode():
        y = _state["module"](torch.from_numpy(np.stack(rows))).numpy()
    return [{"outputs": r.tolist()} for r in y]
