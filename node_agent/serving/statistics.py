"""Triton's statistics extension: per model version inference counts and durations, from what
the agent already measures (pure; no I/O).

Sources: the SLA monitor's lifetime histograms (`sla_windows.ModelStats.histograms`: per
completed request its latency, queue and compute time; per batch its rows) and the model's
batcher counters (requests that ended without outputs). Nothing new is counted on the hot path
but the time of the last inference.

Meanings (Triton's fields): `success` counts requests answered with outputs and their total
time from admission to result; `fail` counts requests the model's queue took and did not answer
with outputs (failed, past their deadline, refused by a full queue, displaced), with no duration
(ns 0: the agent does not time them); `queue` and `compute_infer` split the successes' time;
`inference_count` is rows run (a batch of n rows counts n), `execution_count` batches run.
Invariant: every count is monotone over an agent's life (a version forgotten and tracked again
goes on from its counts, as the SLA monitor keeps them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from node_agent.control.sla_monitor import OutcomeCounters

NS_PER_S = 1_000_000_000


class Summed(Protocol):
    """A histogram's count and sum (`sketch.BucketCounts`), in seconds (rows for batch sizes)."""

    count: int
    sum: float


@dataclass(frozen=True, slots=True)
class Duration:
    """How many, and their total time in nanoseconds (Triton's `StatisticDuration`)."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    """One model version's statistics (Triton's `ModelStatistics`, durations per request)."""

    name: str
    version: str
    last_inference_ms: int = 0
    """Milliseconds since the epoch of the last request answered with outputs (0: none)."""
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_infer: Duration = Duration()


def duration(summed: Summed | None) -> Duration:
    if summed is None:
        return Duration()
    return Duration(int(summed.count), round(summed.sum * NS_PER_S))


def model_statistics(
    name: str,
    version: str,
    histograms: Mapping[str, Summed] | None,
    counters: OutcomeCounters | None,
    last_inference_s: float | None,
) -> ModelStatistics:
    """The statistics of one version from its SLA histograms ('latency', 'queue', 'compute',
    'batch_rows'; None: never tracked) and its batcher's counters (None: no batcher yet)."""
    h = histograms or {}
    rows = h.get("batch_rows")
    failed = 0
    if counters is not None:
        failed = counters.failed + counters.expired + counters.refused + counters.displaced
    return ModelStatistics(
        name=name,
        version=version,
        last_inference_ms=0 if last_inference_s is None else int(last_inference_s * 1000),
        inference_count=0 if rows is None else round(rows.sum),
        execution_count=0 if rows is None else int(rows.count),
        success=duration(h.get("latency")),
        fail=Duration(failed, 0),
        queue=duration(h.get("queue")),
        compute_infer=duration(h.get("compute")),
    )


def _duration_json(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics_json(stats: Sequence[ModelStatistics]) -> dict[str, Any]:
    """Triton's HTTP statistics document (`GET /v2/models[/{m}[/versions/{v}]]/stats`)."""
    zero = _duration_json(Duration())
    return {
        "model_stats": [
            {
                "name": s.name,
                "version": s.version,
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": _duration_json(s.success),
                    "fail": _duration_json(s.fail),
                    "queue": _duration_json(s.queue),
                    "compute_input": zero,
                    "compute_infer": _duration_json(s.compute_infer),
                    "compute_output": zero,
                    "cache_hit": zero,
                    "cache_miss": zero,
                },
                "batch_stats": [],
            }
            for s in stats
        ]
    }
