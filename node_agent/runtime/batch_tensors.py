"""Tensor conversion at a batch's boundary: numpy arrays outside the worker, torch tensors
inside it, and the backend call between them.

Guarantees:
- `to_tensors` makes CPU tensors that share the arrays' memory (no copy) where torch can:
  C-contiguous, writable arrays; any other array is copied once, in C order.
- BF16, which numpy lacks, travels as uint16 arrays holding the raw bits: inputs named in
  `bf16` go to the model as bfloat16 (a view, no copy), BF16 outputs come back as uint16.
- `run_backend` returns every output as a numpy array on the CPU, detached from autograd,
  with the batch's rows along dim 0, or raises (`TypeError`: the backend returned no dict;
  `ValueError`: an output's rows differ from the inputs').

Cost: a batch costs one `torch.from_numpy` per input and one `.numpy()` per output; its
members get numpy views of the outputs (measured: a torch view costs 1.5-3.5 us to create,
a numpy slice 0.5 us, iterating one-row views out of an output 0.1 us: much of the
per-request budget at batch 32). Torch is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

Tensors = dict[str, "torch.Tensor"]
Arrays = dict[str, np.ndarray]


class RunsBatches(Protocol):
    """The part of `Backend` the batcher uses."""

    def run(self, inputs: Tensors, stream: Any = None) -> Tensors: ...


def to_torch(array: np.ndarray, bf16: bool) -> torch.Tensor:
    """A CPU tensor over `array` (copied only when torch cannot share it); with `bf16`, its
    uint16 bits viewed as bfloat16."""
    import torch

    flags = array.flags
    if not (flags.writeable and flags.c_contiguous):
        array = np.array(array, order="C")  # torch.from_numpy needs a writable array
    if bf16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Any tensor as a numpy array: detached, on the CPU, BF16 as uint16 bits."""
    import torch

    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        t = t.cpu()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def to_tensors(inputs: Arrays, bf16: frozenset[str]) -> Tensors:
    """Numpy inputs as CPU tensors (no copy where torch can share the array)."""
    if bf16:
        return {n: to_torch(a, n in bf16) for n, a in inputs.items()}
    from_numpy = _from_numpy or _import_from_numpy()
    tensors: Tensors = {}
    for n, a in inputs.items():  # (`to_torch`, inlined: a call is a third of the cost here)
        flags = a.flags
        tensors[n] = from_numpy(a) if flags.writeable and flags.c_contiguous else to_torch(a, False)
    return tensors


_from_numpy: Any = None
"""`torch.from_numpy` once torch is imported (`_import_from_numpy`)."""


def _import_from_numpy() -> Any:
    global _from_numpy
    import torch

    _from_numpy = torch.from_numpy
    return _from_numpy


def run_backend(backend: RunsBatches, tensors: Tensors, rows: int, device: str, stream: Any) -> Arrays:
    """Run one batch of CPU tensors on `backend`; outputs as numpy arrays, each with `rows`
    rows.

    Each torch call costs a microsecond or more here, a large share of a small batch: the
    common case (CPU, outputs that `.numpy()` takes as they are) makes no others."""
    if device != "cpu":
        tensors = {n: t.to(device, non_blocking=True) for n, t in tensors.items()}
    outputs = backend.run(tensors, stream)
    if type(outputs) is not dict and not isinstance(outputs, dict):
        raise TypeError(f"backend returned {type(outputs).__name__}, expected a dict of tensors")
    arrays: Arrays = {}
    for name, t in outputs.items():
        try:
            a = t.numpy()  # raises for grad, device and BF16 tensors: to_numpy handles those
        except (RuntimeError, TypeError):
            a = to_numpy(t)
        if a.ndim == 0 or a.shape[0] != rows:
            raise ValueError(f"output {name!r} has shape {a.shape} for {rows} input rows")
        arrays[name] = a
    return arrays
