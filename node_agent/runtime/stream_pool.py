"""Stream pool: runs jobs on N worker threads, one CUDA stream per worker on a GPU.

Jobs wait in an `UrgencyQueue` (`urgency_queue`): strict priority classes (critical
first), earliest deadline first within a class, arrival order among equal deadlines. The
queue is bounded; past the bound an arrival is refused at once (a `Refusal`, which callers
turn into `Overloaded`) unless it is of a more urgent class than queued work, in
which case the least urgent queued jobs are displaced (their callers are told
`Overloaded`). A job whose deadline has passed is dropped before it runs, and its
caller is told `DeadlineExceeded`.

Every submitted job gets exactly one call of its `on_done(result, error)`: from a
worker thread after it ran (or was dropped), or from the thread that called
`submit`/`stop` when it was displaced or refused at shutdown.

Jobs that run in steps (a batcher's ticket runs batch after batch while its model has
work) call `should_yield(owner)` between steps: it is true as soon as a job of another
owner waits for a worker, so a stepping job holds its worker for one more step at most
(scheduling among owners is per step, as if every step were a job of its own), and each
step counts as one service time in the estimate behind Retry-After.

CPU threads: torch's intra-op thread count is process-wide. With N workers each
running torch ops, N x intra-op threads plus the event loop's thread (which runs the
per-request Python while a batch computes) must not exceed the cores, or they
oversubscribe them. Measured on 2 shared cores: one matmul loop ran 3x slower with 2
intra-op threads than with 1, and the served classifier reached 0.66 of its bare
throughput with 2 intra-op threads against 0.93 with 1 (bench/served_throughput).
`PoolSettings.torch_threads` therefore defaults to max(1, (cores - 1) // workers),
applied with `torch.set_num_threads` at `start()`.

The urgent lane: `PoolSettings.urgent_workers` more workers (default 1) take only jobs of
class HIGH or more urgent (`URGENT`), so urgent work never waits for a normal batch that is
already running: the regular workers take every class, most urgent first, but a batch that
has started runs to its end. On a GPU the urgent workers' streams have the device's highest
stream priority, so their kernels are scheduled ahead of the other streams' (at kernel
boundaries); on CPU the lane is a thread that is idle unless urgent work runs, and while it
runs it shares the cores with the batch already running. Batchers issue a separate ticket for
urgent requests (see batcher), which is what puts them on the lane.

Inline jobs (`run_inline`): on CPU, a job predicted to take less than a hand-off to a worker
and back runs on the calling thread instead, when no job is queued, so nothing more urgent is
overtaken (a job that runs in steps, a batcher's ticket, keeps their predicted time in all
within the bound). The hand-off (two thread wake-ups, GIL switches, the completion's trip back through
the loop) measured 90-230 us of CPU per batch on this 2-core machine (bench/dispatch: worker
path vs inline). It is off by default (`inline_max_s=0`): an inline batch also stops the
loop from taking requests while it runs, which for models near the bound serialises intake
and compute that a worker overlaps (the adaptive batcher's test saw batches stay at 1 under a
closed loop, even with a 50 us bound). Turn it on for tiny models (a few dense layers, a
tabular model) where the hand-off dominates.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgefleet_api.types import Priority
from node_agent.errors import DeadlineExceeded, Overloaded, ShuttingDown
from node_agent.runtime.urgency_queue import UrgencyQueue

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

URGENT = Priority.HIGH
"""The least urgent class the urgent lane serves: CRITICAL and HIGH."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Admission refused for lack of room: a capacity shortfall, returned (not raised)."""

    reason: str
    retry_after_s: float

    def error(self) -> Overloaded:
        return Overloaded(self.reason, retry_after_s=self.retry_after_s)


Done = Callable[[Any, BaseException | None], None]


class _Job:
    __slots__ = ("deadline_s", "fn", "on_done", "owner", "priority")

    def __init__(
        self,
        fn: Callable[[Any], Any],
        on_done: Done,
        priority: Priority,
        deadline_s: float | None,
        owner: object = None,
    ) -> None:
        self.fn = fn
        self.on_done = on_done
        self.priority = priority
        self.deadline_s = deadline_s
        self.owner = owner


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Stream pool settings; validated at construction."""

    num_workers: int = 1
    """Worker threads, one CUDA stream each on a GPU. On CPU, 1-2: torch ops already
    use intra-op threads, and more workers only split the same cores."""
    max_queued_jobs: int = 64
    """Jobs (batches) waiting for a worker before arrivals are refused. Batchers keep
    few batches in flight each, so this bound is a safety net shared by all models."""
    device: str = "cpu"
    """'cpu' or 'cuda[:n]'. On CUDA every worker gets its own torch.cuda.Stream."""
    torch_threads: int | None = None
    """Intra-op threads for torch on CPU; None: max(1, (cores - 1) // num_workers), one core
    being left to the event loop; 0: leave torch's setting as it is."""
    inline_max_s: float = 0.0
    """On CPU, jobs predicted to take at most this long may run on the submitting thread
    (`run_inline`; e.g. 50e-6 for tiny models); 0 (default): never. Ignored on CUDA."""
    urgent_workers: int = 1
    """Workers (streams, at the highest stream priority on a GPU) that take only jobs of class
    `URGENT` or more urgent: the urgent lane (see the module docstring). 0: none."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {self.num_workers!r}")
        if not isinstance(self.urgent_workers, int) or self.urgent_workers < 0:
            raise ValueError(f"urgent_workers must be an integer >= 0, got {self.urgent_workers!r}")
        if not isinstance(self.max_queued_jobs, int) or self.max_queued_jobs < 1:
            raise ValueError(f"max_queued_jobs must be an integer >= 1, got {self.max_queued_jobs!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        if self.torch_threads is not None and self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads!r}")
        if not self.inline_max_s >= 0:
            raise ValueError(f"inline_max_s must be >= 0, got {self.inline_max_s!r}")


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not on every OS)
        return os.cpu_count() or 1


class StreamPool:
    """N worker threads running jobs in urgency order, and an urgent lane of workers that run
    only CRITICAL and HIGH jobs; one CUDA stream per worker on GPU.

    `submit(fn, on_done, priority, deadline_s)` queues `fn(stream)`; a worker runs it
    under `torch.cuda.stream(stream)` and synchronises the stream before calling
    `on_done(result, None)` (or `on_done(None, error)`). On CPU `stream` is None.
    Start and stop explicitly (`start()`, `stop()`), or use it as a context manager.
    """

    def __init__(
        self, settings: PoolSettings | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings or PoolSettings()
        self._clock = clock
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._urgent_work = threading.Condition(self._lock)
        self._queue: UrgencyQueue[_Job] = UrgencyQueue(self.settings.max_queued_jobs)
        self._threads: list[threading.Thread] = []
        self._streams: list[Any] = []
        self._idle = 0
        self._urgent_idle = 0
        self._busy = 0
        self._running = False
        self._stopping = False
        self._service_ewma_s = 0.0
        self._step = threading.local()
        """Per running thread: `since`, when its job's current step began (pool clock)."""
        self._steps: dict[int, float] = {}
        """Thread id -> when the step it runs began, for every thread running a job (`stuck`)."""
        self.spare_core = self.settings.device != "cpu"
        """Whether the event loop's thread has a core to itself, one the workers' torch
        threads leave free (always on CUDA; on CPU set at `start()`)."""
        self.completed = 0
        self.inline = 0
        """Jobs of `completed` that ran on the submitting thread (`run_inline`)."""
        self.expired = 0
        self.refused = 0
        self.displaced = 0

    @property
    def num_workers(self) -> int:
        """Regular workers (the urgent lane's are `urgent_workers`)."""
        return self.settings.num_workers

    @property
    def urgent_workers(self) -> int:
        return self.settings.urgent_workers

    @property
    def device(self) -> str:
        return self.settings.device

    @property
    def streams(self) -> list[Any]:
        """The workers' CUDA streams (empty on CPU)."""
        return list(self._streams)

    def start(self) -> StreamPool:
        """Create the streams (on GPU), set torch's CPU threads, start the workers."""
        import torch

        with self._lock:
            if self._running or self._stopping:
                raise RuntimeError("StreamPool.start() called twice")
            self._running = True
        s = self.settings
        lanes = [False] * s.num_workers + [True] * s.urgent_workers
        if s.device.startswith("cuda"):
            device = torch.device(s.device)
            # a priority past the device's range maps to its highest (torch.cuda.Stream)
            self._streams = [
                torch.cuda.Stream(device=device, priority=-100 if urgent else 0) for urgent in lanes
            ]
        else:
            cores = _usable_cores()
            threads = s.torch_threads
            if threads is None:
                threads = max(1, (cores - 1) // s.num_workers)
            if threads > 0:
                torch.set_num_threads(threads)
            self.spare_core = s.num_workers * (threads or torch.get_num_threads()) < cores
        for i, urgent in enumerate(lanes):
            stream = self._streams[i] if self._streams else None
            name = f"stream-pool-urgent-{i - s.num_workers}" if urgent else f"stream-pool-{i}"
            t = threading.Thread(target=self._worker, args=(stream, urgent), name=name, daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def __enter__(self) -> StreamPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def submit(
        self,
        fn: Callable[[Any], Any],
        on_done: Done,
        *,
        priority: Priority = Priority.NORMAL,
        deadline_s: float | None = None,
        owner: object = None,
    ) -> Refusal | None:
        """Queue `fn(stream)`. Returns None when admitted, a `Refusal` when not.

        `deadline_s` is on this pool's clock (time.monotonic by default): a job not
        started by then is dropped and told `DeadlineExceeded`. Displaced jobs'
        `on_done` run in the calling thread, after the lock is released. `owner` (e.g. a
        batcher): a running job of that owner need not yield to this one (`should_yield`).
        """
        job = _Job(fn, on_done, priority, deadline_s, owner)
        retry = 0.0
        with self._lock:
            if not self._running or self._stopping:
                raise ShuttingDown("stream pool is not running")
            offer = self._queue.offer((job,), (1.0,), priority, deadline_s, self._clock())
            if offer.admitted:  # an idle regular worker first: the lane is for when none is
                if self._idle:
                    self._work.notify()
                elif priority <= URGENT and self._urgent_idle:
                    self._urgent_work.notify()
            else:
                self.refused += 1
                retry = self._retry_after_locked()
            self.displaced += len(offer.displaced)
            self.expired += len(offer.expired)
        self._fail(list(offer.expired), DeadlineExceeded, "job expired in the stream pool queue")
        if offer.displaced:
            err = Overloaded("displaced by a more urgent job", self.retry_after_s())
            for victim in offer.displaced:
                self._call(victim, None, err)
        if offer.admitted:
            return None
        return Refusal(f"stream pool queue full ({self.settings.max_queued_jobs} jobs)", retry)

    @property
    def inline_max_s(self) -> float:
        """The longest a job may be predicted to take and run inline (`run_inline`)."""
        return self.settings.inline_max_s

    @property
    def runs_inline(self) -> bool:
        """Whether `run_inline` may ever run a job (CPU, a bound above 0)."""
        return self.settings.inline_max_s > 0 and not self._streams

    def run_inline(self, fn: Callable[[Any], Any], on_done: Done, predicted_s: float) -> bool:
        """Run `fn(None)` now, on this thread, if that is cheaper than a hand-off: on CPU,
        `predicted_s` in (0, inline_max_s] (0 means not yet measured), no job queued. True
        when it ran (`on_done` was called here); False: `submit` it."""
        if not (self.runs_inline and 0 < predicted_s <= self.settings.inline_max_s):
            return False
        with self._lock:
            if self._queue or not self._running or self._stopping:
                return False
            self._busy += 1
            self.inline += 1
        self._run(_Job(fn, on_done, Priority.NORMAL, None), None)
        return True

    def should_yield(self, owner: object = None) -> bool:
        """Called by a running job between two of its steps, on the thread running it: True
        when a job of an owner other than `owner` waits for a worker, or an urgent job (class
        `URGENT` or above) does and the urgent lane has no idle worker to take it, or the pool
        is stopping: the job should return rather than take its next step. Ends a step:
        the time since the job started, or since its last call, counts as one job's service
        time for Retry-After."""
        now = self._clock()
        step = self._step
        since: float | None = getattr(step, "since", None)  # None: not on a job's thread
        step.since = now
        with self._lock:
            if since is not None:
                self._steps[threading.get_ident()] = now
                self._service_ewma_s += 0.2 * (now - since - self._service_ewma_s)
            if self._stopping:
                return True
            if not self._queue:
                return False
            lane_busy = self.settings.urgent_workers > 0 and not self._urgent_idle
            return owner is None or any(
                job.owner is not owner or (lane_busy and job.priority <= URGENT)
                for job in self._queue.items()
            )

    def retry_after_s(self) -> float:
        """Estimated time for the queue ahead to drain (for Retry-After)."""
        with self._lock:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> float:
        pending = len(self._queue) + self._busy
        return max(0.001, pending * self._service_ewma_s / self.settings.num_workers)

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def stuck(self, after_s: float) -> int:
        """Threads whose current job step has run longer than `after_s` (health: a batch that
        never returns, a hung CUDA call). A busy pool is not stuck: steps end and start."""
        limit = self._clock() - after_s
        with self._lock:
            return sum(1 for since in self._steps.values() if since < limit)

    def stop(self, timeout_s: float | None = 10.0) -> None:
        """Fail queued jobs with ShuttingDown, let running jobs finish, join the workers."""
        with self._lock:
            if not self._running:
                return
            self._stopping = True
            pending = self._queue.drain()
            self._work.notify_all()
            self._urgent_work.notify_all()
        self._fail(pending, ShuttingDown, "stream pool stopped")
        for t in self._threads:
            t.join(timeout_s)
        with self._lock:
            self._running = False

    # --- worker side -------------------------------------------------------

    def _worker(self, stream: torch.cuda.Stream | None, urgent: bool) -> None:
        """A regular worker takes the most urgent job; an urgent one only CRITICAL and HIGH."""
        queue = self._queue
        while True:
            with self._lock:
                if urgent:
                    self._urgent_idle += 1
                    while not self._stopping and not queue.holds_up_to(URGENT):
                        self._urgent_work.wait()
                    self._urgent_idle -= 1
                else:
                    self._idle += 1
                    while not queue and not self._stopping:
                        self._work.wait()
                    self._idle -= 1
                if self._stopping:
                    return
                expired = queue.pop_expired(self._clock())
                job = queue.pop() if not urgent or queue.holds_up_to(URGENT) else None
                self.expired += len(expired)
                if job is not None:
                    self._busy += 1
            self._fail(expired, DeadlineExceeded, "job expired before a worker was free")
            if job is not None:
                self._run(job, stream)

    def _run(self, job: _Job, stream: torch.cuda.Stream | None) -> None:
        step = self._step
        step.since = self._clock()
        ident = threading.get_ident()
        self._steps[ident] = step.since  # one dict store: atomic, no lock on the hot path
        result: Any = None
        error: BaseException | None = None
        try:
            if stream is None:
                result = job.fn(None)
            else:
                import torch

                with torch.cuda.stream(stream):
                    result = job.fn(stream)
                stream.synchronize()
        except BaseException as exc:
            error = exc
        took = self._clock() - step.since  # the whole job, or its last step
        with self._lock:
            del self._steps[ident]
            self._busy -= 1
            self.completed += 1
            self._service_ewma_s += 0.2 * (took - self._service_ewma_s)
        self._call(job, result, error)

    def _fail(self, jobs: list[_Job], kind: type[Exception], message: str) -> None:
        for job in jobs:
            self._call(job, None, kind(message))

    @staticmethod
    def _call(job: _Job, result: Any, error: BaseException | None) -> None:
        try:
            job.on_done(result, error)
        except Exception:
            log.exception("stream pool: on_done callback raised")
