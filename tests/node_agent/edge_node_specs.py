"""EdgeNode objects as the operator writes them, for the tests of the link's pure modules
(assignment, plan, persistence, node status)."""

from __future__ import annotations

from typing import Any

from edgefleet_api.types import ModelId
from node_agent.link.assignment import Assignment, parse_edge_node

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:01:00Z"
GIB = 1 << 30


def entry(model: str = "classifier", version: str = "1", digest: str = D1, **kw: Any) -> dict[str, Any]:
    """An EdgeNode spec entry as the operator writes it."""
    out: dict[str, Any] = {
        "service": kw.pop("service", "default/cls"),
        "model": model,
        "version": version,
        "artifact": {"uri": kw.pop("uri", f"repo://{model}/{version}/model.pt"), "digest": digest},
        "format": "torchscript",
        "task": "predict",
        "priority": "normal",
        "pinned": False,
        "preload": True,
        "trafficWeight": 100,
        "memoryBudgetBytes": 64 << 20,
    }
    out.update(kw)
    return out


def edge_node(*models: dict[str, Any], generation: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeNode",
        "metadata": {"name": "node-a", "generation": generation, "resourceVersion": "42"},
        "spec": {"nodeName": "node-a", "models": list(models), **spec},
        "status": {"loadedModels": 3},
    }


def assignment(*models: dict[str, Any], **spec: Any) -> Assignment:
    return parse_edge_node(edge_node(*models, **spec))


C1, C2 = ModelId("classifier", "1"), ModelId("classifier", "2")
MLP = ModelId("mlp", "1")
