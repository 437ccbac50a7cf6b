"""timerfd(2) through ctypes, and ResumeWatch: learn of a resume from suspend without polling.

Python has ``os.timerfd_create`` only from 3.13; the agent runs on 3.11, so the
two calls come from libc. The constants are the uapi's
(``include/uapi/linux/timerfd.h``: ``TFD_TIMER_ABSTIME`` 1 << 0,
``TFD_TIMER_CANCEL_ON_SET`` 1 << 1, ``TFD_CLOEXEC`` = ``O_CLOEXEC``,
``TFD_NONBLOCK`` = ``O_NONBLOCK``).

How a resume becomes readable (Linux, ``fs/timerfd.c`` and
``kernel/time/timekeeping.c``): a CLOCK_REALTIME timerfd armed with
``TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET`` is cancelled whenever the
realtime clock is set (``timerfd_clock_was_set``): the fd turns readable and
``read`` fails with ECANCELED. ``timekeeping_resume()`` calls
``timerfd_resume()``, which does exactly that on every resume from suspend
(S3 and s2idle), from a workqueue that runs before user tasks are thawed, so
the agent finds the fd readable before it takes another step. A plain
``settimeofday`` cancels it too; what tells the two apart is
CLOCK_BOOTTIME - CLOCK_MONOTONIC, which grows by the time spent suspended
(``timekeeping_inject_sleeptime``) and by nothing else.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Protocol

from vmem_guest._linux.lifetime import Closing, close_fd

TFD_TIMER_ABSTIME = 1
TFD_TIMER_CANCEL_ON_SET = 2
TFD_CLOEXEC = os.O_CLOEXEC
TFD_NONBLOCK = os.O_NONBLOCK
CLOCK_REALTIME = time.CLOCK_REALTIME

#: Where the timer is armed, in seconds since the epoch: 2^32 s is the year 2106,
#: far enough never to expire while the agent runs.
FAR_FUTURE_SECONDS = 1 << 32

log = logging.getLogger("vmem_guest.resume")


class Timespec(ctypes.Structure):
    """``struct timespec`` (``include/uapi/linux/time_types.h``: two longs on 64-bit)."""

    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class Itimerspec(ctypes.Structure):
    """``struct itimerspec``: interval, then first expiry (``timerfd_settime(2)``)."""

    _fields_ = (("it_interval", Timespec), ("it_value", Timespec))


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.timerfd_create.restype = ctypes.c_int
    libc.timerfd_settime.argtypes = (
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(Itimerspec),
        ctypes.POINTER(Itimerspec),
    )
    libc.timerfd_settime.restype = ctypes.c_int
    libc.timerfd_gettime.argtypes = (ctypes.c_int, ctypes.POINTER(Itimerspec))
    libc.timerfd_gettime.restype = ctypes.c_int
    return libc


def _check(result: int, call: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), call)
    return result


def timerfd_create(clockid: int, flags: int) -> int:
    """``timerfd_create(2)``: a new timer fd (OSError on failure)."""
    return _check(_libc().timerfd_create(clockid, flags), "timerfd_create")


def timerfd_settime(fd: int, flags: int, value: Itimerspec) -> None:
    """``timerfd_settime(2)`` (the old value is not asked for)."""
    _check(_libc().timerfd_settime(fd, flags, ctypes.byref(value), None), "timerfd_settime")


def timerfd_gettime(fd: int) -> Itimerspec:
    """``timerfd_gettime(2)``: the time left until expiry (zero: disarmed)."""
    current = Itimerspec()
    _check(_libc().timerfd_gettime(fd, ctypes.byref(current)), "timerfd_gettime")
    return current


class ClockSetTimer(Closing):
    """A non-blocking CLOCK_REALTIME timerfd that becomes readable when the clock is set.

    It is armed at an absolute time decades away with ``TFD_TIMER_CANCEL_ON_SET``,
    so it never expires: it only ever wakes a selector by being cancelled.
    """

    def __init__(self) -> None:
        self.fd = timerfd_create(CLOCK_REALTIME, TFD_CLOEXEC | TFD_NONBLOCK)
        try:
            self.arm()
        except BaseException:
            self.fd = close_fd(self.fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def arm(self) -> None:
        """(Re-)arm at :data:`FAR_FUTURE_SECONDS` on CLOCK_REALTIME, cancel on set."""
        value = Itimerspec(it_value=Timespec(FAR_FUTURE_SECONDS, 0))
        timerfd_settime(self.fd, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, value)

    def was_cancelled(self) -> bool:
        """Read the fd: True when the clock was set since the last read (ECANCELED),
        False when nothing happened (EAGAIN) or the timer expired (then it is re-armed)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.ECANCELED:
                return True
            raise
        self.arm()  # expired: the clock reads 2106 (or was set past it); keep watching
        return False

    def close(self) -> None:
        self.fd = close_fd(self.fd)


class Timer(Protocol):
    """What :class:`ResumeWatch` needs of a timer (:class:`ClockSetTimer`, or a fake)."""

    def fileno(self) -> int: ...

    def arm(self) -> None: ...

    def was_cancelled(self) -> bool: ...

    def close(self) -> None: ...


def suspended_seconds() -> float:
    """Seconds this boot spent suspended so far: CLOCK_BOOTTIME - CLOCK_MONOTONIC
    (both count from boot; only BOOTTIME counts suspend, ``clock_gettime(2)``).

    MONOTONIC is read first, so the read-out delay can only add to the result,
    never make it negative."""
    monotonic = time.clock_gettime(time.CLOCK_MONOTONIC)
    return time.clock_gettime(time.CLOCK_BOOTTIME) - monotonic


#: Growth of :func:`suspended_seconds` below this is read-out jitter (the two
#: clocks are read one after the other), not a suspend.
SLEEP_JITTER = 0.001


@dataclasses.dataclass(frozen=True)
class ClockEvent:
    """The realtime clock was set: ``slept`` seconds of suspend since the last event.

    ``slept`` is 0 for a plain clock set, and can be 0 after a very short suspend
    too: without a clocksource that runs in suspend the kernel measures the sleep
    with the RTC, in whole seconds (``timekeeping_resume``,
    ``read_persistent_clock64``). So the caller also asks the devices whether
    their transport was reset (QEMU resets virtio-pci at S3 wake-up).
    """

    slept: float

    @property
    def suspended(self) -> bool:
        return self.slept >= SLEEP_JITTER


class ResumeWatch(Closing):
    """The fd to select on for "the clock was set, maybe by a resume", and what it meant.

    ``timer`` and ``sleep_clock`` are seams: the real ones are
    :class:`ClockSetTimer` and :func:`suspended_seconds`.
    """

    def __init__(
        self,
        timer: Timer | None = None,
        *,
        sleep_clock: Callable[[], float] = suspended_seconds,
    ) -> None:
        self.timer = timer if timer is not None else ClockSetTimer()
        self.sleep_clock = sleep_clock
        self._slept_so_far = sleep_clock()

    def fileno(self) -> int:
        return self.timer.fileno()

    def check(self) -> ClockEvent | None:
        """Non-blocking: None when the clock was not set since the last call; else
        re-arm the timer first (nothing is missed in between) and say how long the
        guest was suspended meanwhile."""
        if not self.timer.was_cancelled():
            return None
        self.timer.arm()
        now = self.sleep_clock()
        slept, self._slept_so_far = now - self._slept_so_far, now
        event = ClockEvent(max(0.0, slept))
        log.info(
            "realtime clock was set; CLOCK_BOOTTIME - CLOCK_MONOTONIC grew by %.3f s: %s",
            event.slept,
            "resumed from suspend" if event.suspended else "no suspend measured",
        )
        return event

    def close(self) -> None:
        self.timer.close()
