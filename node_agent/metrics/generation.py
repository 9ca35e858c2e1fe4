"""Prometheus metrics of text generation (the v2 generate extension), declared once
(`GENERATION_METRICS`) on a passed-in `CollectorRegistry`.

Read at scrape time, never pushed from the engine's loop: `GenerationCollector` maps the
`GenerationStats` snapshot each running generator keeps (taken after every engine step).
Per model version (labels `model`, `version`), in base units (`node_agent.metrics.agent`' naming):

- time to first token and time per output token: histograms in seconds (the engine counts
  its buckets, `generation.TTFT_BUCKETS_S` and `TPOT_BUCKETS_S`);
- running and waiting sequences, KV cache blocks used and free: gauges;
- preemptions, prompt and output tokens, finished requests: counters.

A generator's counters start at zero when it starts (as a process's would); a stopped one's
series disappear. Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from edgefleet_api.types import ModelId
from node_agent.metrics.agent import MetricSpec, family

if TYPE_CHECKING:
    from node_agent.generation.engine import GenerationStats

__all__ = ["GENERATION_METRICS", "GenerationCollector", "GenerationSource", "register_generation_metrics"]

_M = ("model", "version")

GENERATION_METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        MetricSpec(
            "edgefleet_generation_time_to_first_token_seconds",
            "histogram",
            "Time from a generate request's arrival to its first output token.",
            _M,
        ),
        MetricSpec(
            "edgefleet_generation_time_per_output_token_seconds",
            "histogram",
            "Time between consecutive output tokens of a sequence (one decode step, or more "
            "when it was preempted).",
            _M,
        ),
        MetricSpec(
            "edgefleet_generation_running_sequences",
            "gauge",
            "Sequences holding KV blocks and decoding (continuous batch size).",
            _M,
        ),
        MetricSpec(
            "edgefleet_generation_waiting_sequences",
            "gauge",
            "Sequences queued for prefill (new, or preempted for recompute).",
            _M,
        ),
        MetricSpec("edgefleet_generation_kv_used_blocks", "gauge", "KV cache blocks in use.", _M),
        MetricSpec(
            "edgefleet_generation_kv_free_blocks",
            "gauge",
            "KV cache blocks free (including cached prefix blocks kept for reuse until evicted).",
            _M,
        ),
        MetricSpec(
            "edgefleet_generation_preemptions_total",
            "counter",
            "Sequences preempted (their blocks freed, recomputed later) because KV blocks ran out.",
            _M,
        ),
        MetricSpec("edgefleet_generation_prompt_tokens_total", "counter", "Prompt tokens admitted.", _M),
        MetricSpec("edgefleet_generation_output_tokens_total", "counter", "Tokens generated.", _M),
        MetricSpec(
            "edgefleet_generation_requests_finished_total",
            "counter",
            "Generate requests that finished (stop token or max tokens).",
            _M,
        ),
    )
}
"""Every generation metric, by name."""

GenerationSource = Callable[[], Iterable[tuple[ModelId, "GenerationStats"]]]
"""() -> (model version, its generator's latest stats) for each running generator."""


class GenerationCollector(Collector):
    """Builds the generation metrics from `source()` at scrape time; nothing when no
    generator runs."""

    def __init__(self, source: GenerationSource) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        """Empty families of every metric (lets the registry check names)."""
        return [family(spec) for spec in GENERATION_METRICS.values()]

    def collect(self) -> Iterable[Metric]:
        fams = {name: family(spec) for name, spec in GENERATION_METRICS.items()}
        seen = False
        for model_id, s in self.source():
            seen = True
            lv = [model_id.name, model_id.version]
            _histogram(fams["edgefleet_generation_time_to_first_token_seconds"], lv, s.ttft_buckets_s,
                       s.ttft_bucket_counts, s.ttft_s_sum)  # fmt: skip
            _histogram(fams["edgefleet_generation_time_per_output_token_seconds"], lv, s.tpot_buckets_s,
                       s.tpot_bucket_counts, s.tpot_s_sum)  # fmt: skip
            for name, value in (
                ("edgefleet_generation_running_sequences", s.running),
                ("edgefleet_generation_waiting_sequences", s.waiting),
                ("edgefleet_generation_kv_used_blocks", s.kv_blocks_used),
                ("edgefleet_generation_kv_free_blocks", s.kv_blocks_free),
                ("edgefleet_generation_preemptions_total", s.preemptions),
                ("edgefleet_generation_prompt_tokens_total", s.prompt_tokens),
                ("edgefleet_generation_output_tokens_total", s.generation_tokens),
                ("edgefleet_generation_requests_finished_total", s.requests_finished),
            ):
                fams[name].add_metric(lv, value)
        return list(fams.values()) if seen else []


def _histogram(family: object, labels: list[str], bounds: tuple[float, ...], counts: tuple[int, ...],
               total: float) -> None:  # fmt: skip
    """Add one histogram from per-bucket (not cumulative) counts; the last is above `bounds`."""
    assert len(counts) == len(bounds) + 1, "one count per bucket plus +Inf"
    cumulative, buckets = 0, []
    for le, n in zip((*bounds, float("inf")), counts, strict=True):
        cumulative += n
        buckets.append((floatToGoString(le), float(cumulative)))
    family.add_metric(labels, buckets, total)  # type: ignore[attr-defined]


def register_generation_metrics(registry: CollectorRegistry, source: GenerationSource) -> GenerationCollector:
    """Register a `GenerationCollector` reading `source` on `registry`; returns it."""
    collector = GenerationCollector(source)
    registry.register(collector)
    return collector
