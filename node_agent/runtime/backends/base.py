"""The backend interface: load an artifact, run a batch, report measured memory, unload.

A backend instance holds one loaded model version. Batches are dicts of input
name -> tensor whose first dimension is the batch; outputs likewise. Backends
are synchronous and called from stream-pool worker threads; one instance may be
called from several threads at once (TorchScript is thread-safe for inference).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from node_agent.types import ModelConfig


class Backend(abc.ABC):
    """One loaded model version."""

    config: ModelConfig

    @classmethod
    @abc.abstractmethod
    def load(cls, config: ModelConfig, version_dir: Path, device: str) -> Backend:
        """Load the (already digest-checked) artifact onto `device` ('cpu', 'cuda:0')."""

    @abc.abstractmethod
    def run(self, inputs: dict[str, torch.Tensor], stream: object | None = None) -> dict[str, torch.Tensor]:
        """Run one batch. `stream` is a torch.cuda.Stream on GPU, None on CPU."""

    @property
    @abc.abstractmethod
    def memory_bytes(self) -> int:
        """Memory this model holds, measured at load (allocator delta, engine size, or RSS delta)."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Release the model's memory. Idempotent."""
