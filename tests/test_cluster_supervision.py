"""The supervisor's restart decisions and the client's failover schedule (pure logic)."""

from __future__ import annotations

import pytest
from ultrakv.client.client import RetryPolicy, _Failover
from ultrakv.client.supervision import RestartBudget, RestartPolicy


def test_restart_waits_double_up_to_the_cap_then_the_budget_runs_out() -> None:
    budget = RestartBudget(RestartPolicy(initial_backoff_s=0.5, max_backoff_s=2.0,
                                         max_restarts=4, window_s=60))
    assert [budget.next_delay(t) for t in (0, 1, 2, 3)] == [0.5, 1.0, 2.0, 2.0]
    assert budget.next_delay(4) is None  # a fifth crash within the window: give up
    # crashes older than the window stop counting: a child that ran well starts afresh
    assert budget.next_delay(100) == 0.5 and budget.used == 1


def test_restart_policy_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="max_restarts must be >= 1, got 0"):
        RestartPolicy(max_restarts=0)
    with pytest.raises(ValueError, match="initial_backoff_s must be in"):
        RestartPolicy(initial_backoff_s=5, max_backoff_s=1)


def test_failover_tries_every_address_before_waiting() -> None:
    failover = _Failover(2, RetryPolicy(attempts=3, initial_s=1.0, max_s=2.0, jitter_s=0.0))
    waits = []
    for attempt in range(6):
        index = failover.current
        waits.append((index, failover.failed(attempt, index)))
    assert waits == [(0, 0.0), (1, 1.0), (0, 0.0), (1, 2.0), (0, 0.0), (1, None)]


def test_a_calls_timeout_covers_its_retries() -> None:
    """The waits stop where the call's time is spent: ``ultrakv health --timeout 1`` on a
    dead address answered after 11 s (the policy's whole schedule) before."""
    failover = _Failover(1, RetryPolicy(attempts=10, initial_s=0.1, max_s=2.0, jitter_s=0.0))
    remaining, waits = 1.0, []
    for attempt in range(10):
        wait = failover.failed(attempt, 0, remaining)
        waits.append(wait)
        if wait is None:
            break
        remaining -= wait
    assert waits == [0.1, 0.2, 0.4, None]  # 0.8 more would pass the remaining 0.3 s
    assert failover.failed(0, 0) == 0.1  # no deadline: the policy's schedule alone


def test_concurrent_failures_on_one_address_move_on_once() -> None:
    failover = _Failover(2, RetryPolicy())
    failover.failed(0, 0)
    failover.failed(0, 0)  # a second call that also failed on address 0
    assert failover.current == 1
