"""Admission by predicted wait (`node_agent.runtime.admission`): pure, exact results."""

from __future__ import annotations

import dataclasses
import math

import pytest

from node_agent.runtime.admission import (
    PLAN_SHARE,
    UNMEASURED_RETRY_S,
    AdmissionRequest,
    DrainRate,
    Verdict,
    decide,
)

BASE = AdmissionRequest(
    rows=1,
    ahead_rows=0,
    budget_s=1.0,
    deadline=False,
    service_s=0.01,
    running_s=0.0,
    rows_per_s=100.0,
    max_rows=4096,
    batch_rows=16,
    unmeasured_rows=64,
)


def req(**changes: object) -> AdmissionRequest:
    return dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]


def test_admits_while_the_predicted_wait_fits_the_planned_share_of_the_budget() -> None:
    got = decide(req(ahead_rows=70))  # 0.7 s of queue + 0.01 s of its own
    assert got.admitted and got.predicted_s == pytest.approx(0.71)
    assert PLAN_SHARE == 0.8 and decide(req(ahead_rows=79)).admitted
    assert not decide(req(ahead_rows=80)).admitted


def test_refuses_past_the_budget_with_retry_after_the_excess_drains() -> None:
    got = decide(req(ahead_rows=330))  # 3.3 s + 0.01 s: 2.51 s past the planned 0.8 s
    assert got.verdict is Verdict.LATE
    assert got.retry_after_s == pytest.approx(2.51)  # (HTTP rounds it up to whole seconds)
    slightly = decide(req(ahead_rows=80))  # just past: a floor
    assert slightly.verdict is Verdict.LATE and slightly.retry_after_s == pytest.approx(0.01)


def test_the_batch_running_now_counts_in_the_wait() -> None:
    assert decide(req(ahead_rows=60)).admitted
    got = decide(req(ahead_rows=60, running_s=0.3))
    assert got.verdict is Verdict.LATE and got.predicted_s == pytest.approx(0.91)


def test_a_deadline_tighter_than_the_slo_refuses_earlier_and_is_planned_to_in_full() -> None:
    assert decide(req(ahead_rows=30, budget_s=1.0)).admitted
    assert decide(req(ahead_rows=30, budget_s=0.3, deadline=True)).verdict is Verdict.LATE
    # a deadline is enforced after admission (doomed work is dropped before it runs): no margin
    assert decide(req(ahead_rows=85, deadline=True)).admitted
    assert not decide(req(ahead_rows=85)).admitted


def test_alone_in_an_empty_queue_is_admitted_even_if_its_batch_is_slower_than_the_budget() -> None:
    assert decide(req(rows=16, service_s=2.0, budget_s=1.0)).admitted
    # but behind others it waits for the queue to empty: Retry-After is the queue's time
    late = decide(req(rows=16, service_s=2.0, budget_s=1.0, ahead_rows=250))
    assert late.verdict is Verdict.LATE and late.retry_after_s == pytest.approx(2.5)  # the queue's


def test_past_the_hard_cap_is_too_large_with_the_cap_as_limit() -> None:
    got = decide(req(rows=5000))
    assert got.verdict is Verdict.TOO_LARGE and got.limit_rows == 4096
    assert decide(req(rows=5000, rows_per_s=None)).verdict is Verdict.TOO_LARGE


def test_more_rows_than_the_model_serves_within_the_budget_is_too_large() -> None:
    got = decide(req(rows=500))  # 5 s of work on an idle model, 1 s budget
    assert got.verdict is Verdict.TOO_LARGE and got.limit_rows == 100
    assert decide(req(rows=90)).admitted  # split in batches, it fits
    # the limit never goes under one batch: a single batch is not "too large"
    assert decide(req(rows=16, rows_per_s=5.0)).admitted


def test_before_any_measurement_a_modest_bound_applies() -> None:
    assert decide(req(rows_per_s=None, ahead_rows=60, rows=4)).admitted
    late = decide(req(rows_per_s=None, ahead_rows=61, rows=4))
    assert late.verdict is Verdict.LATE and late.retry_after_s == UNMEASURED_RETRY_S
    assert decide(req(rows_per_s=None, ahead_rows=0, rows=500)).admitted  # an empty queue


def test_drain_rate_is_the_lower_of_a_slow_and_a_fast_average() -> None:
    rate = DrainRate(halflife_s=1.0, fast_halflife_s=0.1)
    assert rate.rows_per_s is None
    rate.observe(0.0, 16, 0.1)
    assert rate.rows_per_s == pytest.approx(160.0)
    rate.observe(0.0, 0, 0.2)  # no rows: no sample
    rate.observe(0.1, 16, 0.4)  # 4x slower: the fast average has mostly forgotten the fast batch
    slow = (16 * 0.5**0.1 + 16) / (0.1 * 0.5**0.1 + 0.4)
    fast = (16 * 0.5 + 16) / (0.1 * 0.5 + 0.4)
    assert fast < slow and rate.rows_per_s == pytest.approx(fast)
    rate.observe(20.0, 16, 0.1)  # much later: the old samples weigh nothing
    assert rate.rows_per_s == pytest.approx(160.0, rel=0.01)
    with pytest.raises(ValueError, match="halflife_s"):
        DrainRate(0)


def test_no_latency_objective_admits_up_to_the_cap() -> None:
    assert decide(req(budget_s=math.inf, ahead_rows=4000, rows_per_s=None)).admitted
    assert decide(req(budget_s=math.inf, rows=5000)).verdict is Verdict.TOO_LARGE
