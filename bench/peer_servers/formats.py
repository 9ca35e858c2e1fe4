"""Request formats the servers are spoken to in: bodies built once, and a check of each answer.

- v2 JSON: KServe Open Inference Protocol, the tensor as a JSON list in and out;
- v2 binary: the same with Triton's binary tensor extension in and out (raw FP32 bytes after a
  JSON header whose length `Inference-Header-Content-Length` gives), what tritonclient.http sends;
- native JSON: `{"inputs": [flat FP32 list]}` in, `{"outputs": [list]}` out, for servers with no
  v2 endpoint (Ray Serve, LitServe, TorchServe's /predictions), as their examples do.
Every request is one row; every check asserts the answer holds exactly the model's outputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.harness import Check

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class ModelSpec:
    """One example model as every server gets it: the TorchScript file and its batching policy
    (the repository's model.yaml: max_batch_size, max_queue_delay_s)."""

    name: str
    version: str
    path: str
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    output_size: int
    max_batch: int
    window_s: float

    def rows(self, n: int, seed: int = 100) -> list[np.ndarray]:
        """`n` distinct inputs, one row each (shape 1 x input_shape)."""
        rng = np.random.default_rng(seed)
        return [rng.standard_normal((1, *self.input_shape)).astype(np.float32) for _ in range(n)]


def model_specs(repo: Path, models: Sequence[tuple[str, str]]) -> list[ModelSpec]:
    """The specs of `models` (name, version) as the repository's model.yaml files say."""
    from node_agent.runtime.repository import ModelRepository

    out = []
    for name, version in models:
        c = ModelRepository(repo).config(name, version)
        out.append(
            ModelSpec(
                name,
                version,
                str(repo / name / version / c.artifact),
                c.inputs[0].name,
                tuple(c.inputs[0].shape),
                c.outputs[0].name,
                int(np.prod(c.outputs[0].shape)),
                c.max_batch_size,
                c.max_queue_delay_s,
            )
        )
    return out


def v2_json_bodies(spec: ModelSpec, rows: list[np.ndarray]) -> list[bytes]:
    return [
        json.dumps(
            {
                "inputs": [
                    {
                        "name": spec.input_name,
                        "datatype": "FP32",
                        "shape": list(x.shape),
                        "data": x.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        for x in rows
    ]


def v2_binary_body(spec: ModelSpec, x: np.ndarray) -> tuple[bytes, str]:
    """The body and its Inference-Header-Content-Length."""
    tensor = {
        "name": spec.input_name,
        "datatype": "FP32",
        "shape": list(x.shape),
        "parameters": {"binary_data_size": x.nbytes},
    }
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return header + x.tobytes(), str(len(header))


def native_json_bodies(rows: list[np.ndarray]) -> list[bytes]:
    return [json.dumps({"inputs": x.ravel().tolist()}).encode() for x in rows]


def check_v2_json(size: int) -> Check:
    def check(body: bytes, _headers: Mapping[str, str]) -> None:
        data = json.loads(body)["outputs"][0]["data"]
        if len(data) != size:
            raise ValueError(f"{len(data)} outputs, expected {size}")

    return check


def check_v2_binary(size: int) -> Check:
    def check(body: bytes, headers: Mapping[str, str]) -> None:
        header = int(headers["Inference-Header-Content-Length"])
        if len(body) - header != 4 * size:
            raise ValueError(f"{len(body) - header} output bytes, expected {4 * size}")

    return check


def check_native_json(size: int) -> Check:
    def check(body: bytes, _headers: Mapping[str, str]) -> None:
        data = np.asarray(json.loads(body)["outputs"], np.float32).ravel()
        if data.size != size:
            raise ValueError(f"{data.size} outputs, expected {size}")

    return check
