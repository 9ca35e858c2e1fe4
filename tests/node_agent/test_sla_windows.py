"""Measurement windows (fake clock): sliding, slot by slot; queue vs compute time;
late data; bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet_api.types import ModelId
from node_agent.control.sla_monitor import SlaSettings
from node_agent.control.sla_windows import ModelStats


def stats_for(window_s: float, settings: SlaSettings | None = None, now: float = 0.0) -> ModelStats:
    return ModelStats(ModelId("m", "1"), window_s, settings or SlaSettings(), now)


def test_windows_slide_with_the_clock() -> None:
    s = stats_for(30)
    for t in range(10):  # 10 s of 20 requests at 10 ms (4 ms compute, 6 ms queue)
        s.record_batch(t + 0.5, 20, 0.004, [0.010] * 20)
    s.record_outcomes(5.5, failed=2, expired=1, refused=4)
    w = s.window(9.9)
    assert (w.completed, w.failed, w.expired, w.refused) == (200, 2, 1, 4)
    assert w.requests == 203 and w.errors == 3
    assert w.error_rate == pytest.approx(3 / 203)
    assert w.batches == 10 and w.rows == 200
    assert w.p95_s == pytest.approx(0.010, rel=0.01)
    assert w.queue_mean_s == pytest.approx(0.006) and w.compute_mean_s == pytest.approx(0.004)
    assert w.compute_p95_s == pytest.approx(0.004, rel=0.01)
    assert w.window_s == pytest.approx(9.9)  # tracked for 9.9 s: throughput over that
    assert w.throughput_rps == pytest.approx(200 / 9.9)

    for t in range(40, 45):  # later, slower traffic
        s.record_batch(t + 0.5, 10, 0.05, [0.1] * 10)
    w = s.window(44.9)  # the reporting window (30 s) holds only the new seconds
    assert w.completed == 50 and w.failed == 0
    assert w.p50_s == pytest.approx(0.1, rel=0.01)
    assert w.window_s == 30
    assert w.throughput_rps == pytest.approx(50 / 30)
    assert s.window(25.0).completed == 200  # the older window, read at an older time
    c = s.window(44.9, control=True)  # 10 s control window
    assert c.completed == 50 and c.window_s == 10
    assert [s.window(t).completed for t in (69.0, 70.0, 73.0)] == [50, 40, 10]  # slot by slot
    assert s.window(74.0).completed == 0
    assert s.window(74.0).p95_s is None


def test_long_window_uses_coarser_slots_and_still_slides() -> None:
    settings = SlaSettings(report_slots=60)
    s = stats_for(600, settings)  # 10 s slots
    s.record_batch(5.0, 1, 0.001, [0.002])
    s.record_batch(300.0, 1, 0.001, [0.003])
    assert s.window(400.0).completed == 2
    assert s.window(605.0).completed == 1  # the slot holding t=5 left the window
    assert s.window(905.0).completed == 0


def test_late_records_older_than_the_ring_are_dropped_from_windows_only() -> None:
    s = stats_for(10)
    s.record_batch(100.5, 1, 0.001, [0.002])
    s.window(100.9)
    s.record_batch(50.5, 1, 0.001, [0.002])  # 50 s late: its slot was reused
    assert s.window(100.9).completed == 1
    assert s.histograms()["latency"].count == 2  # the lifetime histogram keeps it


def test_window_memory_is_bounded() -> None:
    settings = SlaSettings(control_window_s=10)
    s = stats_for(3600, settings)
    rng = np.random.default_rng(0)
    for t in range(0, 20_000, 37):  # 5.5 h of wide-spread latencies, every 37 s
        s.record_batch(float(t), 64, 0.01, (10 ** rng.uniform(-4, 2, 64)).tolist())
    s.window(20_000.0)
    slots = 10 + 60  # control ring (1 s) + reporting ring (60 s slots)
    bound = slots * 3 * settings.mapping.max_buckets * 8
    assert s.memory_bytes() <= bound
    assert s.memory_bytes() < 3_000_000
    assert s.histograms()["latency"].count == 64 * len(range(0, 20_000, 37))


def test_pending_batches_are_folded_inline_when_nobody_reads() -> None:
    s = ModelStats(ModelId("m", "1"), 60, SlaSettings(), 0.0, max_pending=100)
    for i in range(1000):
        s.record_batch(i * 0.001, 1, 0.001, [0.002])
    assert len(s._pending) < 100  # bounded without a reader
    assert s.histograms()["latency"].count == 1000


def test_windows_share_one_ring_when_their_slots_agree() -> None:
    s = stats_for(5)  # 1 s slots, shorter than the 10 s control window: one ring for both
    assert len(s._rings) == 1
    for t in range(8):
        s.record_batch(t + 0.5, 1, 0.001, [0.002])
    assert s.window(7.9).completed == 5 and s.window(7.9, control=True).completed == 8
    s.set_window(30)  # still 1 s slots: the shared ring grows and keeps its data
    assert len(s._rings) == 1 and s._rings[0].nslots == 30
    assert s.window(7.9).completed == 8 and s.window(7.9, control=True).completed == 8
    s.record_batch(35.5, 1, 0.001, [0.002])
    assert s.window(35.9).completed == 3  # t=6.5, 7.5 and 35.5: the last 30 slots
    assert s.window(35.9, control=True).completed == 1
    s.set_window(600)  # 10 s slots: a reporting ring of its own, starting empty
    assert len(s._rings) == 2
    assert s.window(35.9).completed == 0 and s.window(35.9, control=True).completed == 1
    with pytest.raises(ValueError):
        s.set_window(0.5)
