"""retry.py: the device's backoff and the kernel's per-block refusal windows."""

from __future__ import annotations

import pytest

from vmem_guest.retry import COST_FACTOR, Backoff, BackoffPolicy, Refusals

POLICY = BackoffPolicy(initial=0.05, maximum=30.0, factor=2.0)


def test_policy_delay_doubles_per_attempt_up_to_the_maximum() -> None:
    assert [POLICY.delay(n) for n in (1, 2, 3)] == [0.05, 0.1, 0.2]
    assert POLICY.delay(40) == 30.0


def test_backoff_doubles_and_resets() -> None:
    backoff = Backoff(POLICY)
    assert [backoff.next_delay() for _ in range(3)] == [0.05, 0.1, 0.2]
    backoff.reset()
    assert backoff.next_delay() == 0.05


def test_each_key_doubles_with_its_own_refusals() -> None:
    refusals = Refusals(POLICY)
    assert refusals.refuse((7,), now=10.0, cost=0.0) == pytest.approx(10.05)
    assert refusals.refuse((7,), now=11.0, cost=0.0) == pytest.approx(11.1)
    assert refusals.refuse((8,), now=11.0, cost=0.0) == pytest.approx(11.05)
    assert refusals.in_a_row == {7: 2, 8: 1}


def test_a_costly_refusal_is_avoided_for_a_multiple_of_its_cost() -> None:
    refusals = Refusals(POLICY)
    until = refusals.refuse((3,), now=0.0, cost=2.0)
    assert until == pytest.approx(COST_FACTOR * 2.0)
    assert COST_FACTOR > 1.0  # longer than the attempt itself: the others go first


def test_expiry_keeps_the_count_and_success_forgets_it() -> None:
    refusals = Refusals(POLICY)
    refusals.refuse((1, 2), now=0.0, cost=0.0)
    assert 1 in refusals and 2 in refusals and refusals.earliest() == pytest.approx(0.05)
    refusals.expire(1.0)
    assert not refusals and refusals.earliest() is None
    # A key refused as part of a run takes the run's longest count.
    assert refusals.refuse((2, 3), now=1.0, cost=0.0) == pytest.approx(1.1)
    refusals.succeeded((2,))
    assert refusals.in_a_row == {1: 1, 3: 2}
    assert refusals.keys() == frozenset({3})
    refusals.clear()
    assert not refusals.in_a_row and not refusals


def test_a_costly_window_doubles_too_and_is_capped_no_lower_than_itself() -> None:
    refusals = Refusals(POLICY)
    windows = [refusals.refuse((5,), now=0.0, cost=2.0) for _ in range(6)]
    assert windows == pytest.approx([4.0, 8.0, 16.0, 30.0, 30.0, 30.0])
    # A first window beyond the maximum is kept, not cut to it.
    assert Refusals(POLICY).refuse((6,), now=0.0, cost=20.0) == pytest.approx(40.0)


def test_lift_ends_windows_early_and_keeps_the_counts() -> None:
    refusals = Refusals(POLICY)
    refusals.refuse((1, 2), now=0.0, cost=0.0)
    refusals.refuse((3,), now=0.0, cost=0.0)
    assert refusals.lift((2, 9)) == [2]
    assert refusals.keys() == {1, 3}
    assert refusals.lift() == [1, 3]
    assert not refusals
    assert refusals.in_a_row == {1: 1, 2: 1, 3: 1}
