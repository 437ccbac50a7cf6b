"""timerfd through ctypes and ResumeWatch: a real fd, armed and re-armed; the resume logic
through its seams (a real CANCEL_ON_SET cancellation needs root to set the clock)."""

from __future__ import annotations

import ctypes
import errno
import os
import selectors
import time

import pytest

from vmem_guest._linux import timerfd as tfd


def test_itimerspec_layout_is_the_kernels() -> None:
    # struct timespec is two longs; struct itimerspec two timespecs (x86-64: 16 and 32).
    assert ctypes.sizeof(tfd.Timespec) == 2 * ctypes.sizeof(ctypes.c_long)
    assert ctypes.sizeof(tfd.Itimerspec) == 4 * ctypes.sizeof(ctypes.c_long)
    assert tfd.Itimerspec.it_value.offset == ctypes.sizeof(tfd.Timespec)


def test_constants_are_the_uapis() -> None:
    assert (tfd.TFD_TIMER_ABSTIME, tfd.TFD_TIMER_CANCEL_ON_SET) == (1, 2)
    assert tfd.TFD_CLOEXEC == os.O_CLOEXEC and tfd.TFD_NONBLOCK == os.O_NONBLOCK


def test_clock_set_timer_is_a_real_armed_non_blocking_cloexec_fd() -> None:
    with tfd.ClockSetTimer() as timer:
        assert not os.get_inheritable(timer.fileno())
        left = tfd.timerfd_gettime(timer.fileno()).it_value
        # Armed at 2^32 s after the epoch: that far away, give or take now.
        assert left.tv_sec == pytest.approx(tfd.FAR_FUTURE_SECONDS - time.time(), abs=5)
        assert not timer.was_cancelled()  # EAGAIN: nothing happened, and no blocking
        with selectors.DefaultSelector() as selector:
            selector.register(timer, selectors.EVENT_READ)
            assert selector.select(0) == []  # not readable: the agent would sleep on it
        tfd.timerfd_settime(timer.fileno(), 0, tfd.Itimerspec())  # disarm
        assert tfd.timerfd_gettime(timer.fileno()).it_value.tv_sec == 0
        timer.arm()
        assert tfd.timerfd_gettime(timer.fileno()).it_value.tv_sec > 1 << 30
    assert timer.fd == -1


def test_an_expired_timer_is_re_armed_and_is_no_clock_set() -> None:
    with tfd.ClockSetTimer() as timer:
        soon = tfd.Itimerspec(it_value=tfd.Timespec(0, 1_000_000))  # relative, 1 ms
        tfd.timerfd_settime(timer.fileno(), 0, soon)
        time.sleep(0.01)
        assert not timer.was_cancelled()
        assert tfd.timerfd_gettime(timer.fileno()).it_value.tv_sec > 1 << 30


def test_timerfd_errors_carry_the_errno() -> None:
    with pytest.raises(OSError) as info:
        tfd.timerfd_create(12345, 0)  # no such clock
    assert info.value.errno == errno.EINVAL


class FakeTimer:
    """Cancelled when told to; counts how often it was armed."""

    def __init__(self) -> None:
        self.cancelled = False
        self.armed = 0
        self.closed = False

    def fileno(self) -> int:
        return 99

    def arm(self) -> None:
        self.armed += 1
        self.cancelled = False

    def was_cancelled(self) -> bool:
        return self.cancelled

    def close(self) -> None:
        self.closed = True


def test_resume_watch_measures_the_sleep_and_re_arms() -> None:
    timer = FakeTimer()
    slept = [100.0]
    watch = tfd.ResumeWatch(timer, sleep_clock=lambda: slept[0])
    assert watch.fileno() == 99
    assert watch.check() is None  # nothing happened
    assert timer.armed == 0
    slept[0] += 42.5  # the guest was suspended for 42.5 s, then the kernel cancelled
    timer.cancelled = True
    event = watch.check()
    assert event == tfd.ClockEvent(42.5) and event.suspended
    assert timer.armed == 1 and not timer.cancelled
    timer.cancelled = True  # a settimeofday: BOOTTIME - MONOTONIC did not move
    event = watch.check()
    assert event == tfd.ClockEvent(0.0) and not event.suspended
    assert timer.armed == 2
    watch.close()
    assert timer.closed


def test_suspended_seconds_is_boottime_minus_monotonic() -> None:
    before = time.clock_gettime(time.CLOCK_BOOTTIME) - time.clock_gettime(time.CLOCK_MONOTONIC)
    assert tfd.suspended_seconds() == pytest.approx(before, abs=tfd.SLEEP_JITTER)
    assert tfd.suspended_seconds() >= 0.0
