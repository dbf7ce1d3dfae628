"""The circuit breaker's state machine (difforge.serving.breaker) with a fake clock, and the
policy table of difforge.serving.fallback."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from difforge.serving.breaker import Breaker, BreakerConfig, p95
from difforge.serving.config import Limits, ServiceConfig
from difforge.serving.fallback import Fallback
from difforge.serving.metrics import ServiceMetrics


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(**overrides) -> tuple[Breaker, Clock, list]:
    cfg = {
        "latency_slo_s": 1.0,
        "window_s": 10.0,
        "min_samples": 5,
        "cooldown_s": 3.0,
        "probes": 2,
        "close_ratio": 0.5,
        **overrides,
    }
    clock, changes = Clock(), []
    breaker = Breaker(BreakerConfig(**cfg), clock, on_change=lambda s, r: changes.append((s, r)))
    return breaker, clock, changes


def feed(breaker: Breaker, clock: Clock, latency: float, n: int, queue_wait: float = 0.0) -> None:
    for _ in range(n):
        clock.t += 0.1
        breaker.record(breaker.admit(True), queue_wait, latency)


def test_p95_is_the_nearest_rank():
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([3.0, 1.0, 2.0]) == 3.0
    assert p95([0.5]) == 0.5


def test_it_stays_closed_within_the_slo_and_below_min_samples():
    b, clock, changes = make()
    feed(b, clock, 5.0, 4)  # four slow requests: under min_samples, no verdict yet
    assert b.state == "closed"
    b, clock, changes = make()
    feed(b, clock, 0.9, 50)
    assert b.state == "closed" and changes == []
    assert b.admit(True) == "normal"


def test_the_window_p95_over_the_slo_opens_it():
    b, clock, changes = make()
    feed(b, clock, 0.2, 18)
    feed(b, clock, 2.0, 1)  # 1 of 19 slow: p95 (nearest rank 19th of 19) is the slow one
    assert b.state == "open" and changes == [("open", "latency")]
    assert b.admit(True) == "degraded"
    assert b.admit(False) == "normal"  # a request that does not allow it keeps its route


def test_one_slow_request_in_twenty_is_within_p95():
    b, clock, _ = make()
    feed(b, clock, 0.2, 19)
    clock.t += 0.1
    b.record("normal", 0.0, 0.2)
    b.record("normal", 0.0, 2.0)  # 1 of 21 over the SLO: the p95 (20th of 21) is 0.2
    assert b.state == "closed"


def test_old_samples_leave_the_window():
    b, clock, _ = make()
    feed(b, clock, 5.0, 4)
    clock.t += 11.0  # past window_s: the slow ones are forgotten
    feed(b, clock, 0.2, 5)
    assert b.state == "closed"
    assert b.window()["samples"] == 5


def test_queue_wait_slo_opens_it_with_its_reason():
    b, clock, changes = make(queue_wait_slo_s=0.5)
    feed(b, clock, 0.8, 10, queue_wait=0.7)  # latency within its SLO, the queue wait is not
    assert b.state == "open" and b.reason == "queue_wait"
    assert changes == [("open", "queue_wait")]


def test_cooldown_then_probes_close_it_when_load_fell():
    b, clock, changes = make()
    feed(b, clock, 3.0, 5)
    assert b.state == "open"
    clock.t += 2.9
    assert b.state == "open"
    clock.t += 0.2
    assert b.state == "half_open" and b.reason == "latency"
    routes = [b.admit(True) for _ in range(4)]
    assert routes == ["probe", "probe", "degraded", "degraded"]  # probes=2
    b.record("degraded", 0.0, 0.1)
    b.record("probe", 0.0, 0.4)  # 0.4 <= 0.5 x 1.0: calm
    b.record("probe", 0.1, 0.3)
    assert b.state == "half_open"  # 3 of min_samples 5 finished in the trial
    b.record("degraded", 0.0, 0.1)
    b.record("normal", 0.0, 0.45)
    assert b.state == "closed" and b.reason is None
    assert [s for s, _ in changes] == ["open", "half_open", "closed"]
    assert b.window()["samples"] == 0  # the overload's window is forgotten
    assert b.admit(True) == "normal"


def test_requests_queued_behind_the_probes_keep_it_open():
    b, clock, _ = make()
    feed(b, clock, 3.0, 5)
    clock.t += 3.0
    assert [b.admit(True) for _ in range(2)] == ["probe", "probe"]
    b.record("probe", 0.0, 0.4)
    b.record("probe", 0.0, 0.4)  # both calm, but the cheap requests behind them were not:
    for _ in range(3):
        b.record("degraded", 0.5, 0.9)
    assert b.state == "open" and b.reason == "latency"  # trial p95 0.9 > 0.5 x SLO


def test_a_slow_or_failed_probe_reopens_it_and_the_cooldown_doubles():
    b, clock, changes = make(max_cooldown_s=10.0)
    feed(b, clock, 3.0, 5)
    clock.t += 3.0
    assert b.admit(True) == "probe"
    b.record("probe", 0.0, 1.5)  # over the SLO
    assert b.state == "open" and b.cooldown_s == 6.0
    clock.t += 5.9
    assert b.state == "open"  # a new, doubled cool-down began at the reopen
    clock.t += 0.1
    assert b.admit(True) == "probe"
    b.record("probe", 0.1, 0.1, ok=False)  # failed (e.g. its deadline passed)
    assert b.state == "open" and b.cooldown_s == 10.0  # 12, capped at max_cooldown_s
    assert [s for s, _ in changes] == ["open", "half_open", "open", "half_open", "open"]
    clock.t += 10.0
    for _ in range(2):
        assert b.admit(True) == "probe"
    for i in range(5):
        b.record("probe" if i < 2 else "degraded", 0.0, 0.1)
    assert b.state == "closed" and b.cooldown_s == 3.0  # a close resets the cool-down


def test_requests_that_may_not_be_degraded_are_probes_too():
    b, clock, _ = make()  # e.g. degrade "never": no request is degradable, nothing is probed
    for _ in range(5):
        clock.t += 0.1
        b.record(b.admit(False), 0.0, 3.0)
    assert b.state == "open"
    clock.t += 3.0
    assert b.state == "half_open" and b.admit(False) == "normal"
    b.record("normal", 0.0, 2.0)  # still overloaded: reopen
    assert b.state == "open"
    clock.t += 6.0
    for _ in range(5):
        b.record(b.admit(False), 0.0, 0.2)
    assert b.state == "closed"


def test_no_probe_is_sent_into_a_queue_and_a_queue_that_never_empties_reopens_it():
    b, clock, changes = make()
    feed(b, clock, 3.0, 5)
    clock.t += 3.0
    assert b.state == "half_open"
    assert [b.admit(True, queued=4) for _ in range(5)] == ["degraded"] * 5
    for _ in range(4):
        b.record("degraded", 0.5, 0.3)
    assert b.state == "half_open"
    b.record("degraded", 0.5, 0.3)  # min_samples finished, no probe could run
    assert b.state == "open" and b.cooldown_s == 6.0
    clock.t += 6.0
    assert b.admit(True, queued=0) == "probe"  # the queue emptied: probe now
    assert [s for s, _ in changes] == ["open", "half_open", "open", "half_open"]


def test_an_idle_breaker_closes_after_a_window_without_traffic():
    b, clock, changes = make()
    feed(b, clock, 3.0, 5)
    clock.t += 9.0
    assert b.state == "half_open"
    clock.t += 1.5  # 10.5 s since the last request finished: idle for longer than window_s
    assert b.state == "closed" and b.window()["samples"] == 0
    assert [s for s, _ in changes] == ["open", "half_open", "closed"]


def test_hysteresis_a_probe_under_the_slo_but_not_calm_keeps_it_open():
    b, clock, _ = make()
    feed(b, clock, 3.0, 5)
    clock.t += 3.0
    assert b.admit(True) == "probe"
    b.record("probe", 0.0, 0.8)  # within the 1.0 SLO, above 0.5 x SLO: load has not fallen
    assert b.state == "open"


def test_a_released_probe_frees_its_slot():
    b, clock, _ = make(probes=1)
    feed(b, clock, 3.0, 5)
    clock.t += 3.0
    assert b.admit(True) == "probe"
    assert b.admit(True) == "degraded"  # the only probe is out
    b.release("probe")  # its client left
    assert b.admit(True) == "probe"


def test_degraded_samples_do_not_count_towards_opening():
    b, _, _ = make()
    for _ in range(20):
        b.record("degraded", 0.0, 5.0)
    assert b.state == "closed"


@pytest.mark.parametrize(
    ("policy", "allow", "expected"),
    [
        ("never", True, False),
        ("never", None, False),
        ("allowed", True, True),
        ("allowed", None, False),
        ("allowed", False, False),
        ("always_when_open", True, True),
        ("always_when_open", None, True),
        ("always_when_open", False, False),
    ],
)
def test_the_degrade_policy_table(policy, allow, expected):
    fallback = Fallback(BreakerConfig(degrade=policy), ServiceMetrics())
    assert fallback.degradable(allow) is expected


def test_the_config_names_bad_choices():
    with pytest.raises(ValidationError, match="always_when_open"):
        BreakerConfig(degrade="sometimes")
    with pytest.raises(ValidationError, match="max_cooldown_s"):
        BreakerConfig(cooldown_s=10, max_cooldown_s=5)
    with pytest.raises(ValidationError, match="degraded_sampler"):
        BreakerConfig(degraded_sampler="nope")
    with pytest.raises(ValidationError, match="allowed_samplers"):
        ServiceConfig(
            limits=Limits(allowed_samplers=("euler",)), breaker={"degraded_sampler": "heun"}
        )
