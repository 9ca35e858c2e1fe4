"""The inference engine: validated requests -> per-model adaptive batchers -> stream pool.

`Engine.infer(model, version, inputs, priority, timeout_s)` is what the API layer calls:
1. the model's config comes from the repository (cached; `version=None` means the
   newest version, re-resolved at most every `latest_ttl_s`);
2. the inputs are validated against the config's TensorSpecs (names, datatype, shape
   with the batch dimension first, -1 dims free, the same row count in every input);
   a mismatch raises `InvalidInput` naming the input and what was expected, before
   anything is queued, so a malformed request fails alone;
3. the request goes to the model version's batcher (created on first use), which
   acquires the model from the scheduler once per batch (the lease is released when
   the batch is done) and runs batches on the stream pool.

Tensors in and out: inputs may be numpy arrays or torch tensors; outputs are numpy
arrays (`dict[str, np.ndarray]`, batch dimension first). Numpy is what the API layer
encodes (JSON lists, binary data) and what the batcher slices cheaply (a numpy view
costs ~0.5 us, a torch view 1.5-3.5 us: a large share of the per-request budget).
Output arrays are views of the batch's output and own no separate copy; BF16 travels
as uint16 arrays holding the raw bits, both ways.

Errors a caller may get: `ModelNotFound`, `InvalidModel`, `InvalidInput`, `Overloaded`
(admission refused or displaced; has `retry_after_s`), `DeadlineExceeded` (not run),
`InsufficientMemory`, `InferenceFailed`, `ShuttingDown`.

Ownership: the engine owns its batchers; the repository, scheduler and pool are passed
in and are started and stopped by whoever created them (`stop()` leaves them running).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import numpy as np

from edgefleet_api.types import ModelId, Priority
from node_agent.errors import DeadlineExceeded, InvalidInput, ShuttingDown
from node_agent.runtime.batch_ticket import Lease
from node_agent.runtime.batcher import Batcher
from node_agent.runtime.batcher_settings import BatcherSettings
from node_agent.runtime.batching_policy import BatchingPolicy, policy_for
from node_agent.types import V2_TO_NUMPY, ModelConfig, TensorSpec

if TYPE_CHECKING:
    from node_agent.runtime.stream_pool import StreamPool

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class ConfigSource(Protocol):
    """The part of `ModelRepository` the engine uses."""

    def config(self, name: str, version: str | None = None) -> ModelConfig: ...


class LeaseSource(Protocol):
    """The part of `ModelScheduler` the engine uses."""

    async def acquire(self, config: ModelConfig) -> Lease: ...


PolicyFactory = Callable[[ModelConfig], BatchingPolicy]
AdmissionCheck = Callable[[ModelId, Priority], None]
"""Raises `Overloaded` when a request of that class may not enter (e.g.
`mitigation.Controls.check_admission`: classes an SLA mitigation sheds)."""


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Engine-wide knobs; per-model numbers come from each model's config."""

    max_queue_rows: int = 4096
    """Hard cap on one model's queued rows (memory), whatever its SLO would admit."""
    latest_ttl_s: float = 5.0
    """How long `version=None` keeps resolving to the same newest version (a directory
    listing per request would cost more than the inference of a small model)."""
    pipeline_depth: int | None = None
    """Batches per model queued at the pool or running; None: pool workers + 1."""

    def __post_init__(self) -> None:
        if self.max_queue_rows < 1:
            raise ValueError(f"max_queue_rows must be >= 1, got {self.max_queue_rows!r}")
        if not self.latest_ttl_s >= 0:
            raise ValueError(f"latest_ttl_s must be >= 0, got {self.latest_ttl_s!r}")


def _numpy_dtype(datatype: str) -> np.dtype[Any] | None:
    """The numpy dtype a request carries for a v2 datatype (None: not carried)."""
    if datatype == "BF16":
        return np.dtype(np.uint16)
    name = V2_TO_NUMPY.get(datatype)
    if name is None or name == "object":
        return None
    return np.dtype(name)


class InputValidator:
    """Checks one request's tensors against a model's input specs; pure, precomputed.

    `validate` returns (numpy arrays in spec order, rows) or raises `InvalidInput`
    with a message naming the input and what was expected.
    """

    __slots__ = ("_checks", "_model", "_names", "_specs")

    def __init__(self, config: ModelConfig) -> None:
        self._model = str(config.id)
        self._specs: tuple[TensorSpec, ...] = config.inputs
        self._names = frozenset(s.name for s in config.inputs)
        # per input: (name, carried dtype, fixed shape or None if it has -1 dims, spec)
        self._checks = tuple(
            (s.name, _numpy_dtype(s.datatype), None if -1 in s.shape else s.shape, s) for s in config.inputs
        )

    def validate(self, inputs: Mapping[str, Any]) -> tuple[Arrays, int]:
        if type(inputs) is not dict and not isinstance(inputs, Mapping):  # (an ABC check: slow)
            raise InvalidInput(f"{self._model}: inputs must be a mapping of name -> tensor")
        if len(inputs) != len(self._names):
            self._names_error(inputs)
        arrays: Arrays = {}
        rows = -1
        try:
            for name, dtype, fixed, spec in self._checks:
                value = inputs[name]  # (KeyError: as many names as specs, but other ones)
                if type(value) is not np.ndarray and not isinstance(value, np.ndarray):
                    value = self._to_numpy(spec, value)
                if value.dtype is not dtype and value.dtype != dtype:
                    self._dtype_error(spec, value, dtype)
                got = value.shape
                if fixed is None or not got or got[1:] != fixed or 0 in got:
                    self._check_shape(spec, got)
                if rows < 0:
                    rows = got[0]
                elif got[0] != rows:
                    raise InvalidInput(
                        f"{self._model}: input {name!r} has {got[0]} rows, but "
                        f"{self._specs[0].name!r} has {rows}; every input needs the same batch size"
                    )
                arrays[name] = value
        except (KeyError, InvalidInput):
            if inputs.keys() != self._names:  # (wrong names are what is reported)
                self._names_error(inputs)
            raise
        return arrays, rows

    def _dtype_error(self, spec: TensorSpec, value: np.ndarray, dtype: np.dtype[Any] | None) -> None:
        if dtype is None:
            raise InvalidInput(
                f"{self._model}: input {spec.name!r} is {spec.datatype}, which the "
                "batcher cannot carry (numeric tensors only)"
            )
        raise InvalidInput(
            f"{self._model}: input {spec.name!r} has dtype {value.dtype}, expected {spec.datatype} ({dtype})"
        )

    def _check_shape(self, spec: TensorSpec, got: tuple[int, ...]) -> None:
        shape = spec.shape
        if len(got) != len(shape) + 1 or any(
            want != -1 and want != dim for want, dim in zip(shape, got[1:], strict=False)
        ):
            raise InvalidInput(
                f"{self._model}: input {spec.name!r} has shape {list(got)}, expected "
                f"{[-1, *shape]} (batch dimension first; -1: any size)"
            )
        if 0 in got:
            raise InvalidInput(f"{self._model}: input {spec.name!r} has an empty dimension: {list(got)}")

    def _names_error(self, inputs: Mapping[str, Any]) -> NoReturn:
        given = set(inputs)
        missing = sorted(self._names - given)
        extra = sorted(str(n) for n in given - self._names)
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(repr(n) for n in missing)}")
        if extra:
            parts.append(f"unexpected input(s) {', '.join(repr(n) for n in extra)}")
        expected = ", ".join(repr(s.name) for s in self._specs)
        raise InvalidInput(f"{self._model}: {'; '.join(parts)}; the model takes {expected}")

    def _to_numpy(self, spec: TensorSpec, value: Any) -> np.ndarray:
        import torch

        if not isinstance(value, torch.Tensor):
            raise InvalidInput(
                f"{self._model}: input {spec.name!r} is a {type(value).__name__}; expected a "
                "numpy array or a torch tensor"
            )
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        try:
            return t.numpy()
        except (TypeError, RuntimeError) as e:
            raise InvalidInput(f"{self._model}: input {spec.name!r}: {e}") from None


@dataclass(slots=True)
class _Entry:
    config: ModelConfig
    validator: InputValidator
    batcher: Batcher
    model_id: ModelId
    """`config.id`, made once (the property builds a new one at each read)."""
    validate: Callable[[Mapping[str, Any]], tuple[Arrays, int]]
    submit: Callable[..., asyncio.Future[Arrays]]
    """`validator.validate` and `batcher.submit`, bound once (`infer` calls them per request)."""


class Engine:
    """Serves `infer` calls for every model of a repository (see the module docstring).

    Use on one asyncio event loop; `stop()` explicitly.
    """

    def __init__(
        self,
        repository: ConfigSource,
        scheduler: LeaseSource,
        pool: StreamPool,
        settings: EngineSettings | None = None,
        *,
        policy_factory: PolicyFactory | None = None,
        admission: AdmissionCheck | None = None,
    ) -> None:
        """`policy_factory`: each model version's batching policy (default `policy_for`);
        `admission`: called with the resolved model version and the request's class before
        a request is queued."""
        self.repository = repository
        self.scheduler = scheduler
        self.pool = pool
        self.settings = settings or EngineSettings()
        self._policy_factory = policy_factory
        self._admission = admission
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._latest: dict[str, tuple[str, float]] = {}
        self._stopping = False

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray | Any],
        priority: Priority | str | int = Priority.NORMAL,
        timeout_s: float | None = None,
    ) -> Arrays:
        """Run one request (rows along dim 0 of every input); outputs as numpy arrays.

        `timeout_s`: the caller's deadline. A request that has not started by then, or
        is predicted to end after it, is dropped (`DeadlineExceeded`), never run; one that
        started completes and returns its result.
        """
        if self._stopping:
            raise ShuttingDown("the inference engine is stopping")
        if type(priority) is not Priority:
            try:
                priority = Priority.parse(priority)
            except (ValueError, TypeError) as e:
                raise InvalidInput(str(e)) from None
        deadline_s = None
        if timeout_s is not None:
            if not timeout_s > 0:  # also NaN
                if isinstance(timeout_s, float) and math.isnan(timeout_s):
                    raise InvalidInput("timeout_s must be a positive number of seconds")
                raise DeadlineExceeded(f"{model}: timeout_s={timeout_s} leaves no time to run")
            deadline_s = time.monotonic() + timeout_s
        entry = self._entries.get((model, version)) if version is not None else None
        if entry is None:
            entry = self._entry(model, version)
        if self._admission is not None:
            self._admission(entry.model_id, priority)
        arrays, rows = entry.validate(inputs)
        return await entry.submit(arrays, rows, priority, deadline_s)

    def config(self, model: str, version: str | None = None) -> ModelConfig:
        """The config `infer` would use for (model, version)."""
        return self._entry(model, version).config

    def batcher(self, model: str, version: str | None = None) -> Batcher:
        """The batcher serving (model, version), created if needed (stats, tests)."""
        return self._entry(model, version).batcher

    def made_batcher(self, model: str, version: str) -> Batcher | None:
        """The batcher serving (model, version) if one was made; never makes one (statistics)."""
        entry = self._entries.get((model, version))
        return None if entry is None else entry.batcher

    def busy(self, model: str) -> bool:
        """Whether any version of `model` has requests queued or batches running."""
        return any(
            e.batcher.batches_out or e.batcher.queued_rows()
            for (name, _), e in self._entries.items()
            if name == model
        )

    def invalidate(self, model: str | None = None) -> None:
        """Forget resolved 'newest' versions (all, or one model's), e.g. after a new
        version was written. Batchers of versions already served stay."""
        if model is None:
            self._latest.clear()
        else:
            self._latest.pop(model, None)

    async def stop(self) -> None:
        """Refuse new requests; fail queued ones with ShuttingDown; wait for running
        batches (bounded). The pool, scheduler and repository are left as they are."""
        self._stopping = True
        batchers = [e.batcher for e in self._entries.values()]
        await asyncio.gather(*(b.stop() for b in batchers))

    # --- internals -----------------------------------------------------------

    def _entry(self, model: str, version: str | None) -> _Entry:
        if version is None:
            latest = self._latest.get(model)
            if latest is not None and time.monotonic() < latest[1]:
                version = latest[0]
            else:
                config = self.repository.config(model, None)
                version = config.version
                self._latest[model] = (version, time.monotonic() + self.settings.latest_ttl_s)
        entry = self._entries.get((model, version))
        if entry is None:
            entry = self._create(self.repository.config(model, version))
        return entry

    def _create(self, config: ModelConfig) -> _Entry:
        if self._stopping:
            raise ShuttingDown("the inference engine is stopping")
        s = self.settings
        pool = self.pool
        if self._policy_factory is not None:
            policy = self._policy_factory(config)
        else:
            policy = policy_for(config, workers=pool.num_workers, max_queue_rows=s.max_queue_rows)
        batcher_settings = BatcherSettings(
            max_batch_size=max(1, config.max_batch_size),
            pipeline_depth=s.pipeline_depth,
            dynamic_shapes=any(-1 in spec.shape for spec in config.inputs),
            bf16_inputs=frozenset(t.name for t in config.inputs if t.datatype == "BF16"),
        )
        acquire = functools.partial(self.scheduler.acquire, config)
        # a concurrency gate's slots are the regular workers': urgent tickets pass it by
        urgent = getattr(self.scheduler, "acquire_urgent", None)
        acquire_urgent = functools.partial(urgent, config) if urgent is not None else None
        batcher = Batcher(
            str(config.id), pool, acquire, policy, batcher_settings, acquire_urgent=acquire_urgent
        )
        validator = InputValidator(config)
        entry = _Entry(config, validator, batcher, config.id, validator.validate, batcher.submit)
        self._entries[(config.name, config.version)] = entry
        log.debug("engine: batcher for %s (max batch %d)", config.id, config.max_batch_size)
        return entry
