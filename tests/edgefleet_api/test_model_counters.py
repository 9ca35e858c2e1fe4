"""EdgeNode status.models[].counters: the typed value, its wire form and its checks."""

from __future__ import annotations

import pytest

from edgefleet_api.edge_node import ModelCounters, ModelStatus


def test_counters_round_trip_in_milliseconds_and_are_optional() -> None:
    c = ModelCounters("18ee-ab12", requests=1_000_000_007, errors=3, slow=40, slo_latency_s=0.0125)
    wire = c.to_obj()
    assert wire == {
        "epoch": "18ee-ab12",
        "requests": 1_000_000_007,
        "errors": 3,
        "slow": 40,
        "sloLatencyMs": 12.5,
    }
    assert ModelCounters.from_obj(wire) == c
    assert ModelCounters.from_obj({"epoch": "e"}) == ModelCounters("e")  # missing counts are 0
    entry = {"model": "m", "version": "1", "state": "Ready", "counters": wire}
    assert ModelStatus.from_obj(entry).counters == c
    assert ModelStatus.from_obj(entry).to_obj()["counters"] == wire
    assert "counters" not in ModelStatus.from_obj({**entry, "counters": None}).to_obj()


def test_counters_need_an_epoch_and_never_go_negative() -> None:
    with pytest.raises(ValueError, match="epoch"):
        ModelCounters.from_obj({"requests": 3})
    with pytest.raises(ValueError, match="epoch"):
        ModelCounters("")
    with pytest.raises(ValueError, match=">= 0"):
        ModelCounters("e", requests=-1)
