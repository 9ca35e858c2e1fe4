"""Wire conventions: quantities as Kubernetes reads them, milliseconds, times, conditions."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes.utils.quantity import parse_quantity as kubernetes_quantity

from edgefleet_api import wire
from edgefleet_api.conditions import Condition, conditions_equal, next_condition
from edgefleet_api.sla import SlaWindow


@pytest.mark.parametrize(
    "text", ["512Mi", "1G", "1.5Gi", "100m", "1e3", "1E-2", "1024", "0.5k", "2Ei", "+3M", ".5Ki", "7n"]
)
def test_quantities_read_as_kubernetes_reads_them(text: str) -> None:
    assert wire.parse_quantity(text) == math.ceil(Decimal(kubernetes_quantity(text)))


@pytest.mark.parametrize("bad", ["", "1KB", "Mi", "1.2.3", "1 Gi", "ten", "1K"])
def test_malformed_quantities_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        wire.parse_quantity(bad)


def test_numbers_and_none_as_quantities() -> None:
    assert wire.parse_quantity(None) == 0
    assert wire.parse_quantity(1024) == 1024
    assert wire.parse_quantity(1.2) == 2


@given(st.decimals(min_value=Decimal("0.1"), max_value=Decimal("600000"), places=3))
def test_milliseconds_survive_the_trip_through_seconds(ms: Decimal) -> None:
    assert wire.s_to_ms(wire.ms_to_s(float(ms))) == float(ms)


def test_times_round_trip_in_whole_seconds() -> None:
    assert wire.rfc3339(wire.parse_time("2026-01-02T03:04:05Z") or 0) == "2026-01-02T03:04:05Z"
    assert wire.parse_time("2026-01-02T03:04:05.250000Z") == pytest.approx(1767323045.25)
    assert wire.parse_time("") is None and wire.parse_time(None) is None


def test_an_unreportable_window_writes_nothing() -> None:
    window = SlaWindow(p95_latency_s=float("nan"), throughput_rps=float("inf"), requests=-1)
    assert window.to_obj() == {}
    assert SlaWindow(p99_latency_s=0.0123456, error_rate=0.1234567).to_obj() == {
        "p99LatencyMs": 12.346,
        "errorRate": 0.12346,
    }


def test_a_condition_keeps_its_transition_time_while_its_status_holds() -> None:
    old = (Condition("Ready", "True", "AllModelsReady", "2 ready", 1, "2026-01-01T00:00:00Z"),)
    same = next_condition("Ready", True, "AllModelsReady", "3 ready", 2, old, "2026-01-02T00:00:00Z")
    assert same.last_transition_time == "2026-01-01T00:00:00Z" and same.message == "3 ready"
    flipped = next_condition("Ready", False, "ModelFailed", "x", 2, old, "2026-01-02T00:00:00Z")
    assert flipped.last_transition_time == "2026-01-02T00:00:00Z"
    new = next_condition("SLAViolated", "False", "NoViolation", "", 2, old, "2026-01-02T00:00:00Z")
    assert new.last_transition_time == "2026-01-02T00:00:00Z"
    assert conditions_equal([same], [Condition("Ready", "True", "AllModelsReady", "3 ready", 2, "later")])
    assert not conditions_equal([same], [flipped])
    with pytest.raises(ValueError, match="status"):
        Condition("Ready", "Maybe")
