"""Model backends: TorchScript (CPU and CUDA) and TensorRT (NVIDIA GPUs).

`backend_for(format)` maps a model.yaml `format` to its Backend class. Backend modules
are imported on first use, so importing this package pulls in neither torch nor tensorrt.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node_agent.runtime.backends.base import Backend

# format -> (module, class name, default artifact file name)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "torchscript": ("node_agent.runtime.backends.torchscript", "TorchScriptBackend", "model.pt"),
    "tensorrt": ("node_agent.runtime.backends.tensorrt", "TensorRTBackend", "model.plan"),
    "tinylm-npz": ("node_agent.generation.transformer", "TinyLMBackend", "model.npz"),
    "huggingface": ("node_agent.generation.hf_checkpoint", "HFCheckpointBackend", "SHA256SUMS"),
}
FORMATS: tuple[str, ...] = tuple(_BACKENDS)
"""Formats the agent can load (the CRD also names 'onnx', which no backend serves yet)."""


def backend_for(fmt: str) -> type[Backend]:
    """The Backend class for a model format; ValueError for an unknown format."""
    try:
        module_name, class_name, _ = _BACKENDS[fmt]
    except KeyError:
        raise ValueError(f"no backend for format {fmt!r}; known: {', '.join(FORMATS)}") from None
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls


def default_artifact(fmt: str) -> str:
    """The artifact file name used when model.yaml names none ('model.pt', 'model.plan')."""
    return _BACKENDS[fmt][2] if fmt in _BACKENDS else "model"
