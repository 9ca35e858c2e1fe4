"""TorchScript backend: a `torch.jit.load`ed archive on CPU or one CUDA device.

Calling convention of the scripted module: `forward` takes the inputs positionally, in
model.yaml's `inputs` order, each batched on dim 0; it returns one Tensor (the single
output), a tuple/list of Tensors (in `outputs` order) or a Dict[str, Tensor] (by name).

Errors from `run`: wrong input names -> `InvalidInput`; anything the model raises ->
`InferenceFailed` (the original exception is its `__cause__`), except CUDA out-of-memory
(`torch.cuda.OutOfMemoryError`), which propagates unchanged so the caller can treat it
as a capacity problem; after `unload` -> `ShuttingDown`.

Optimized at load (model.yaml `parameters.optimize`, default true): the module is frozen
(`torch.jit.freeze`: weights become constants, conv + batch-norm folded, dead code and
dropout removed) and, on CPU, `torch.jit.optimize_for_inference` runs too (oneDNN/MKLDNN
convolutions on pre-packed weights: ~1.2-1.8x a small CNN's speed at batch 1, ~2.5-2.8x at
batch 16, outputs equal to ~1e-7 relative). On CUDA only the freeze is applied. A module that
cannot be frozen or optimized is served as loaded (logged once); `optimize: false` skips both.

Measured memory (`memory_bytes`), taken once at load:
- CUDA: the caching allocator's peak `torch.cuda.max_memory_allocated(device)` during
  load plus one warm-up batch at `max_batch_size`, minus `memory_allocated` before the load;
  i.e. weights + the activations of a full batch. (It resets the device's peak statistic;
  a concurrent allocation by another thread on the same device would be counted too.)
- CPU: bytes of the archive's parameters and buffers (deduplicated by storage; the optimized
  module holds the same weights, repacked) plus the
  growth of the process's resident set size (/proc/self/statm) across one warm-up batch at
  `max_batch_size`, measured while its outputs are still alive. The RSS part is a lower
  bound of the activation memory (the C allocator reuses freed memory) and is noisy when
  other threads allocate meanwhile; the parameter part is exact.
A warm-up batch that raises (a model that fails by design) does not fail the load; it is
logged and kept in `warmup_error`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from node_agent.errors import InferenceFailed, InvalidInput, InvalidModel, ShuttingDown
from node_agent.runtime.backends.base import Backend

if TYPE_CHECKING:
    from node_agent.types import ModelConfig, TensorSpec

log = logging.getLogger(__name__)

_V2_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
    "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64,
    "BF16": torch.bfloat16,
}  # fmt: skip


def torch_dtype(datatype: str) -> torch.dtype:
    """The torch dtype of a KServe v2 datatype; `InvalidModel` for BYTES (no tensor form)."""
    try:
        return _V2_TO_TORCH[datatype]
    except KeyError:
        raise InvalidModel(f"datatype {datatype!r} has no torch tensor type") from None


def example_batch(
    specs: tuple[TensorSpec, ...],
    batch: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Zeros for each input at batch size `batch`; dynamic dims (-1) become 1."""
    return {
        s.name: torch.zeros(
            (batch, *(d if d > 0 else 1 for d in s.shape)), dtype=torch_dtype(s.datatype), device=device
        )
        for s in specs
    }


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storages counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TorchScriptBackend(Backend):
    """One TorchScript model on one device. `run` is safe to call from several threads."""

    def __init__(
        self,
        config: ModelConfig,
        module: torch.jit.ScriptModule,
        device: torch.device,
        param_bytes: int,
    ) -> None:
        self.config = config
        self.device = device
        self._module: torch.jit.ScriptModule | None = module
        self._input_names = tuple(s.name for s in config.inputs)
        self._input_set = frozenset(self._input_names)
        self._cuda = device.type == "cuda"
        self._output_names = tuple(s.name for s in config.outputs)
        self._lock = threading.Lock()
        self.param_bytes = param_bytes
        """Bytes of parameters and buffers (of the module as loaded: a frozen one has none)."""
        self.warmup_bytes = 0
        """Measured memory of one warm-up batch at max_batch_size (see module docstring)."""
        self.warmup_error: str | None = None
        self._memory_bytes = self.param_bytes

    @classmethod
    def load(cls, config: ModelConfig, version_dir: Path, device: str) -> TorchScriptBackend:
        """Load `version_dir/config.artifact` onto `device` and measure its memory."""
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {device!r} requested but CUDA is not available")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.type != "cpu":
            raise ValueError(f"device {device!r}: the TorchScript backend runs on cpu or cuda")
        path = Path(version_dir) / config.artifact
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            with jit_deprecations_silenced():
                module = torch.jit.load(str(path), map_location=dev)
        except FileNotFoundError:
            raise InvalidModel(f"{config.id}: artifact {path} is missing") from None
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidModel(f"{config.id}: {path} is not a TorchScript archive: {first}") from e
        module.eval()
        param_bytes = tensor_bytes([*module.parameters(), *module.buffers()])
        if optimize_requested(config):
            module = optimized(module, dev, str(config.id))
        backend = cls(config, module, dev, param_bytes)
        if dev.type == "cuda":
            backend._warm_up()
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev) - before
            backend.warmup_bytes = max(0, peak - backend.param_bytes)
            backend._memory_bytes = max(peak, backend.param_bytes)
        else:
            rss_before = rss_bytes()
            outputs = backend._warm_up()
            backend.warmup_bytes = max(0, rss_bytes() - rss_before)
            del outputs
            backend._memory_bytes = backend.param_bytes + backend.warmup_bytes
        log.debug(
            "loaded %s on %s: %d bytes (params %d, warm-up %d)",
            config.id,
            dev,
            backend._memory_bytes,
            backend.param_bytes,
            backend.warmup_bytes,
        )
        return backend

    def _warm_up(self) -> dict[str, torch.Tensor] | None:
        batch = example_batch(self.config.inputs, self.config.max_batch_size, self.device)
        try:
            return self.run(batch)
        except InferenceFailed as e:
            self.warmup_error = str(e)
            log.warning(
                "%s: warm-up batch failed (the model loaded, but may fail at inference): %s",
                self.config.id,
                e,
            )
            return None

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    def run(
        self,
        inputs: dict[str, torch.Tensor],
        stream: object | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run one batch; returns when the outputs are ready (the stream is synchronized)."""
        module = self._module
        if module is None:
            raise ShuttingDown(f"{self.config.id} is unloaded")
        if inputs.keys() != self._input_set:
            missing = sorted(self._input_set - inputs.keys())
            unexpected = sorted(inputs.keys() - self._input_set)
            raise InvalidInput(
                f"{self.config.id}: inputs must be {list(self._input_names)}; "
                f"missing {missing}, unexpected {unexpected}"
            )
        if stream is not None and not isinstance(stream, torch.cuda.Stream):
            raise TypeError(f"stream must be a torch.cuda.Stream or None, got {type(stream)}")
        args = [inputs[n] for n in self._input_names]
        if not self._cuda:  # the lean path: on a worker, after a batch, each step runs cold
            with torch.inference_mode():
                if not all(t.is_cpu for t in args):
                    args = [t.cpu() for t in args]
                return self._name_outputs(self._forward(module, args))
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx, torch.inference_mode():
            if stream is not None:
                # inputs may have been produced on the default stream
                stream.wait_stream(torch.cuda.default_stream(self.device))
            # (`.to` releases the GIL even when it has nothing to do: skip it then)
            dev = self.device
            args = [t if t.device == dev else t.to(dev, non_blocking=True) for t in args]
            outputs = self._name_outputs(self._forward(module, args))
            (stream or torch.cuda.current_stream(self.device)).synchronize()
        return outputs

    def _forward(self, module: torch.jit.ScriptModule, args: list[torch.Tensor]) -> object:
        try:
            return module(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            raise InferenceFailed(f"{self.config.id}: the model raised {short_message(e)}") from e

    def _name_outputs(self, result: object) -> dict[str, torch.Tensor]:
        names = self._output_names
        if type(result) is torch.Tensor and len(names) == 1:  # the usual: one output
            return {names[0]: result}
        if isinstance(result, torch.Tensor):
            values: list[object] = [result]
        elif isinstance(result, tuple | list):
            values = list(result)
        elif isinstance(result, dict):
            if set(result) != set(names):
                raise InferenceFailed(
                    f"{self.config.id}: the model returned outputs "
                    f"{sorted(result)}, model.yaml declares {list(names)}"
                )
            values = [result[n] for n in names]
        else:
            raise InferenceFailed(
                f"{self.config.id}: the model returned a {type(result).__name__}, not tensors"
            )
        if len(values) != len(names) or not all(isinstance(v, torch.Tensor) for v in values):
            raise InferenceFailed(
                f"{self.config.id}: the model returned {len(values)} value(s), "
                f"model.yaml declares {len(names)} output tensor(s)"
            )
        return dict(zip(names, values, strict=True))  # type: ignore[arg-type]

    def unload(self) -> None:
        with self._lock:
            if self._module is None:
                return
            self._module = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        log.debug("unloaded %s", self.config.id)


@contextlib.contextmanager
def jit_deprecations_silenced() -> Iterator[None]:
    """torch.jit's FutureWarnings ("deprecated, use torch.export / torch.compile") silenced:
    TorchScript is the format this backend serves."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit")
        yield


OPTIMIZE_PARAMETER = "optimize"


def optimize_requested(config: ModelConfig) -> bool:
    """model.yaml `parameters.optimize`: true (default) or false; `InvalidModel` otherwise."""
    raw = config.parameters.get(OPTIMIZE_PARAMETER, "true")
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise InvalidModel(f"{config.id}: parameters.{OPTIMIZE_PARAMETER} must be true or false, got {raw!r}")
    return value == "true"


def optimized(module: torch.jit.ScriptModule, device: torch.device, model_id: str) -> torch.jit.ScriptModule:
    """`module` frozen, and on CPU optimized for inference; `module` itself when that fails."""
    try:
        with jit_deprecations_silenced():
            frozen = torch.jit.freeze(module)
            if device.type == "cpu":
                frozen = torch.jit.optimize_for_inference(frozen)
    except Exception as e:  # TorchScript passes raise RuntimeError and others alike
        log.warning("%s: served as loaded: freezing/optimizing it failed: %s", model_id, short_message(e))
        return module
    return frozen


def short_message(e: BaseException) -> str:
    """'<ExceptionType>: <message>' on one line. For errors raised inside TorchScript
    (torch.jit.Error, whose text is an interpreter traceback) it is the original Python
    exception's type and message, e.g. 'RuntimeError: ...'."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = re.match(r"^(?:builtins\.)?([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$", ln)
        if m:
            return f"{m.group(1)}: {m.group(2)}"
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
