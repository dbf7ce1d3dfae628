"""should_rollback: when a canary's window is worse than production's by more than the margins."""

from __future__ import annotations

import pytest

from difforge.registry import RollbackMargins, WindowStats, should_rollback

PROD = WindowStats(requests=1000, errors=10, p95_latency_s=0.200)  # 1% errors


def test_a_canary_like_production_stays():
    assert should_rollback(PROD, WindowStats(100, 1, 0.210)) is None


def test_too_few_requests_are_not_judged():
    assert should_rollback(PROD, WindowStats(10, 10, 9.0)) is None


def test_error_rate_over_the_margin_rolls_back():
    reason = should_rollback(PROD, WindowStats(100, 5, 0.2))
    assert (
        reason == "canary error rate 5.0% (5/100) exceeds production's 1.0% by 4.0% (margin 2.0%)"
    )
    assert should_rollback(PROD, WindowStats(100, 5, 0.2), RollbackMargins(error_rate=0.05)) is None


def test_latency_over_ratio_and_floor_rolls_back():
    reason = should_rollback(PROD, WindowStats(100, 0, 0.500))
    assert reason == "canary p95 latency 500 ms is 2.50x production's 200 ms (margin 1.50x)"
    fast = WindowStats(1000, 0, 0.001)
    assert should_rollback(fast, WindowStats(100, 0, 0.010)) is None  # 10x, but only 9 ms slower


def test_window_stats_from_latencies():
    s = WindowStats.from_latencies([0.01 * i for i in range(1, 101)], errors=3)
    assert (s.requests, s.errors, s.error_rate) == (100, 3, 0.03)
    assert s.p95_latency_s == pytest.approx(0.95)
    assert WindowStats.from_latencies([], 0) == WindowStats(0, 0, None)
