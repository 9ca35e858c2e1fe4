"""Helpers of test_delivery: a real agent process in EdgeNode mode with the API server out of
reach (it serves a persisted assignment), and a TorchScript model large enough to cut."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import nn

from node_agent.runtime.model_yaml import parse_model_config, write_model_config
from node_agent.runtime.repository import sha256_file
from tests.faults import agent_process

ROOT = Path(__file__).resolve().parents[2]


def big_model(examples: Path, into: Path) -> tuple[str, str]:
    """A 2.3 MiB TorchScript model with mlp's interface at `into/big/1`; (digest, configDigest)."""
    torch.manual_seed(0)
    module = torch.jit.script(nn.Sequential(nn.Linear(32, 18000), nn.ReLU(), nn.Linear(18000, 4)).eval())
    folder = into / "big" / "1"
    folder.mkdir(parents=True)
    module.save(str(folder / "model.pt"))
    digest = sha256_file(folder / "model.pt")
    mlp = parse_model_config(examples / "mlp" / "1" / "model.yaml")
    write_model_config(
        folder, dataclasses.replace(mlp, name="big", digest=digest, memory_estimate_bytes=None)
    )
    return digest, sha256_file(folder / "model.yaml")


def offline_args(workdir: Path, origin: str, digest: str, config: str, peers: list[str]) -> list[str]:
    """`serve` arguments for EdgeNode mode with a dead API server (a closed port), so the agent
    serves its persisted assignment: big:1 from `origin`, with `peers` as spec.artifactPeers."""
    artifact = {"uri": f"{origin}/big/1/model.pt", "digest": digest, "configDigest": config}
    spec = {
        "nodeName": "edge-1",
        "artifactPeers": peers,
        "models": [{"service": "default/big", "model": "big", "version": "1", "artifact": artifact}],
    }
    args = agent_process.offline_edge_node(workdir, workdir / "state", spec)
    return [
        "--model-repository",
        str(workdir / "models"),
        "--workers",
        "1",
        *args,
        "--download-backoff-max",
        "0.2",
    ]


class AgentProcess(agent_process.AgentProcess):
    """The shared agent process, with the infer call of this module's model."""

    def infer(self, body: bytes) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.base + "/v2/models/big/versions/1/infer", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read()
