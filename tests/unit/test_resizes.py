"""Timing converged resizes: from the config change that began one to the planner's
Done, one record (and one log line) per resize, none when nothing was resized."""

from __future__ import annotations

import pytest

from vmem_guest.planner import Done
from vmem_guest.resizes import Resize, ResizeTimer

MIB = 1 << 20
BDF = "0000:00:03.0"


def test_a_resize_runs_from_the_config_change_to_convergence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    timer = ResizeTimer(BDF)
    timer.config_changed(10.0)
    timer.stepping(10.1)
    timer.stepped()
    with caplog.at_level("INFO", logger="vmem_guest.resizes"):
        done = timer.converged(12.5, Done(384 * MIB, 2 * MIB))
    assert done == Resize(BDF, 386 * MIB, 384 * MIB, 2 * MIB, 2.5, True)
    assert timer.last == done
    assert [r.getMessage() for r in caplog.records] == [
        f"{BDF}: resize done: requested 386MiB, plugged 384MiB, remainder 2MiB,"
        " 2.500 s after the config change"
    ]


def test_a_change_in_the_middle_extends_the_resize_it_joins() -> None:
    timer = ResizeTimer(BDF)
    timer.config_changed(1.0)
    timer.stepped()
    timer.config_changed(3.0)
    done = timer.converged(4.0, Done(0, 0))
    assert done is not None and done.seconds == 3.0


def test_a_change_after_a_start_is_timed_from_the_change() -> None:
    timer = ResizeTimer(BDF)
    timer.stepping(1.0)  # the agent took the device up
    timer.stepped()
    timer.config_changed(5.0)
    done = timer.converged(6.0, Done(0, 0))
    assert done is not None and (done.seconds, done.config_change) == (1.0, True)


def test_nothing_to_do_at_start_is_no_resize(caplog: pytest.LogCaptureFixture) -> None:
    timer = ResizeTimer(BDF)
    timer.stepping(1.0)
    with caplog.at_level("INFO", logger="vmem_guest.resizes"):
        assert timer.converged(1.0, Done(0, 0)) is None
    assert timer.last is None and caplog.records == []


def test_steps_at_start_are_a_resize_of_their_own() -> None:
    timer = ResizeTimer(BDF)
    timer.stepping(2.0)
    timer.stepped()
    done = timer.converged(2.25, Done(128 * MIB, 0))
    assert done == Resize(BDF, 128 * MIB, 128 * MIB, 0, 0.25, False)


def test_the_next_resize_starts_afresh_and_a_broken_device_abandons_one() -> None:
    timer = ResizeTimer(BDF)
    timer.config_changed(1.0)
    first = timer.converged(2.0, Done(0, 0))
    timer.config_changed(10.0)
    timer.abandon()  # the device broke mid-way
    assert timer.converged(11.0, Done(0, 0)) is None
    assert timer.last == first
