"""TensorRT backend: a serialized engine (the artifact, 'model.plan') on one CUDA device.

Uses the name-based tensor API of TensorRT 10+: I/O tensors are found with
`num_io_tensors`/`get_tensor_name`/`get_tensor_mode`, each batch sets its input shapes with
`set_input_shape`, binds torch-allocated CUDA buffers with `set_tensor_address` and runs
with `execute_async_v3` on the caller's CUDA stream (torch.cuda.Stream). `tensorrt` is
imported on first load, so the agent runs without it where no model needs it.

Invariants checked at load (an `InvalidModel` otherwise): the engine's input and output
names are exactly model.yaml's, their dtypes match, and the engine's optimization profile 0
admits a batch of `max_batch_size`.

One execution context per loaded engine, guarded by a lock: concurrent `run`s of the same
model are serialized (different models still run concurrently on their own streams).

Measured memory (`memory_bytes`), taken at load: the larger of (a) the drop in the
device's free memory (`torch.cuda.mem_get_info`) across deserializing the engine and
creating its execution context, and (b) the engine's own figure, `device_memory_size_v2`
(activation memory of a context; `device_memory_size` before TensorRT 10.1) plus the
serialized engine size as a bound on its weights; plus the torch allocator's peak during
a warm-up batch at `max_batch_size` (the I/O buffers).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from node_agent.errors import InferenceFailed, InvalidInput, InvalidModel, ShuttingDown
from node_agent.runtime.backends.base import Backend
from node_agent.runtime.backends.torchscript import example_batch, short_message, torch_dtype

if TYPE_CHECKING:
    from node_agent.types import ModelConfig

log = logging.getLogger(__name__)


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise InvalidModel(
            "format 'tensorrt' needs the tensorrt package (>= 10): pip install 'edgefleet[gpu]'"
        ) from e
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise InvalidModel(f"tensorrt {trt.__version__} found; the agent needs TensorRT >= 10")
    return trt


def _torch_dtype_of(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
        trt.int8: torch.int8, trt.bool: torch.bool, trt.uint8: torch.uint8,
    }  # fmt: skip
    for name, tdt in (("int64", torch.int64), ("bfloat16", torch.bfloat16)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = tdt
    try:
        return table[dtype]
    except KeyError:
        raise InvalidModel(f"engine tensor dtype {dtype} has no torch equivalent") from None


class TensorRTBackend(Backend):
    """One TensorRT engine on one CUDA device."""

    def __init__(
        self, config: ModelConfig, trt: Any, engine: Any, context: Any, device: torch.device
    ) -> None:
        self.config = config
        self.device = device
        self._trt = trt
        self._engine: Any = engine
        self._context: Any = context
        self._runtime: Any = None
        self._lock = threading.Lock()
        self._inputs = {s.name: torch_dtype(s.datatype) for s in config.inputs}
        self._outputs = {s.name: torch_dtype(s.datatype) for s in config.outputs}
        self.engine_bytes = 0
        """The engine's own figure: context device memory + serialized engine size."""
        self.load_bytes = 0
        """Measured drop of the device's free memory across deserialize + context creation."""
        self.io_bytes = 0
        """Torch allocator peak of one warm-up batch at max_batch_size (the I/O buffers)."""

    @classmethod
    def load(cls, config: ModelConfig, version_dir: Path, device: str) -> TensorRTBackend:
        """Deserialize `version_dir/config.artifact` on `device` (cuda) and measure it."""
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"device {device!r}: TensorRT engines run on CUDA devices only")
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        trt = _import_tensorrt()
        path = Path(version_dir) / config.artifact
        try:
            plan = path.read_bytes()
        except FileNotFoundError:
            raise InvalidModel(f"{config.id}: artifact {path} is missing") from None
        with torch.cuda.device(dev):
            torch.cuda.synchronize(dev)
            free_before, _ = torch.cuda.mem_get_info(dev)
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise InvalidModel(
                    f"{config.id}: {path} is not a TensorRT engine this "
                    f"TensorRT ({trt.__version__}) can deserialize"
                )
            context = engine.create_execution_context()
            if context is None:
                raise InvalidModel(f"{config.id}: could not create an execution context")
            torch.cuda.synchronize(dev)
            free_after, _ = torch.cuda.mem_get_info(dev)
        backend = cls(config, trt, engine, context, dev)
        backend._runtime = runtime  # the runtime must outlive its engine
        backend._check_engine()
        backend.load_bytes = max(0, free_before - free_after)
        context_bytes = getattr(engine, "device_memory_size_v2", None)
        if context_bytes is None:
            context_bytes = engine.device_memory_size
        backend.engine_bytes = int(context_bytes) + len(plan)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        backend.run(example_batch(config.inputs, config.max_batch_size, dev))
        backend.io_bytes = max(0, torch.cuda.max_memory_allocated(dev) - before)
        log.debug(
            "loaded %s on %s: %d bytes (load %d, engine %d, io %d)",
            config.id,
            dev,
            backend.memory_bytes,
            backend.load_bytes,
            backend.engine_bytes,
            backend.io_bytes,
        )
        return backend

    def _io_names(self) -> tuple[dict[str, Any], dict[str, Any]]:
        trt, engine = self._trt, self._engine
        inputs: dict[str, Any] = {}
        outputs: dict[str, Any] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            (inputs if mode == trt.TensorIOMode.INPUT else outputs)[name] = engine.get_tensor_dtype(name)
        return inputs, outputs

    def _check_engine(self) -> None:
        cid, trt = self.config.id, self._trt
        inputs, outputs = self._io_names()
        for kind, engine_side, declared in (
            ("inputs", inputs, self._inputs),
            ("outputs", outputs, self._outputs),
        ):
            if set(engine_side) != set(declared):
                raise InvalidModel(
                    f"{cid}: the engine's {kind} are {sorted(engine_side)}, "
                    f"model.yaml declares {sorted(declared)}"
                )
            for name, trt_dtype in engine_side.items():
                if _torch_dtype_of(trt, trt_dtype) != declared[name]:
                    raise InvalidModel(
                        f"{cid}: engine tensor {name!r} is {trt_dtype}, model.yaml declares {declared[name]}"
                    )
        for name in inputs:
            shape = tuple(self._engine.get_tensor_shape(name))
            if shape and shape[0] == -1:
                _, _, max_shape = self._engine.get_tensor_profile_shape(name, 0)
                if max_shape[0] < self.config.max_batch_size:
                    raise InvalidModel(
                        f"{cid}: the engine's profile admits batches up to "
                        f"{max_shape[0]} for {name!r}, max_batch_size is "
                        f"{self.config.max_batch_size}"
                    )
            elif shape and shape[0] < self.config.max_batch_size:
                raise InvalidModel(
                    f"{cid}: input {name!r} has a fixed batch of {shape[0]}, "
                    f"max_batch_size is {self.config.max_batch_size}"
                )

    @property
    def memory_bytes(self) -> int:
        return max(self.load_bytes, self.engine_bytes) + self.io_bytes

    def run(
        self,
        inputs: dict[str, torch.Tensor],
        stream: object | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run one batch on `stream` (default: the current stream); returns when done."""
        if inputs.keys() != self._inputs.keys():
            raise InvalidInput(f"{self.config.id}: inputs must be {list(self._inputs)}, got {sorted(inputs)}")
        if stream is not None and not isinstance(stream, torch.cuda.Stream):
            raise TypeError(f"stream must be a torch.cuda.Stream or None, got {type(stream)}")
        with self._lock:
            context = self._context
            if context is None:
                raise ShuttingDown(f"{self.config.id} is unloaded")
            cuda_stream = stream or torch.cuda.current_stream(self.device)
            with torch.cuda.stream(cuda_stream), torch.inference_mode():
                cuda_stream.wait_stream(torch.cuda.default_stream(self.device))
                bound: dict[str, torch.Tensor] = {}
                for name, dtype in self._inputs.items():
                    t = inputs[name].to(self.device, dtype, non_blocking=True).contiguous()
                    if not context.set_input_shape(name, tuple(t.shape)):
                        raise InvalidInput(
                            f"{self.config.id}: input {name!r} shape "
                            f"{tuple(t.shape)} is outside the engine's profile"
                        )
                    context.set_tensor_address(name, t.data_ptr())
                    bound[name] = t
                outputs: dict[str, torch.Tensor] = {}
                for name, dtype in self._outputs.items():
                    shape = tuple(context.get_tensor_shape(name))
                    if any(d < 0 for d in shape):
                        raise InferenceFailed(
                            f"{self.config.id}: output {name!r} shape {shape} is unresolved"
                        )
                    out = torch.empty(shape, dtype=dtype, device=self.device)
                    context.set_tensor_address(name, out.data_ptr())
                    outputs[name] = out
                try:
                    ok = context.execute_async_v3(cuda_stream.cuda_stream)
                except Exception as e:
                    raise InferenceFailed(f"{self.config.id}: TensorRT raised {short_message(e)}") from e
                if not ok:
                    raise InferenceFailed(f"{self.config.id}: execute_async_v3 failed")
            cuda_stream.synchronize()
            del bound
        return outputs

    def unload(self) -> None:
        with self._lock:
            if self._context is None:
                return
            self._context = None
            self._engine = None
            self._runtime = None
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        log.debug("unloaded %s", self.config.id)
