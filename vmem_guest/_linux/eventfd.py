"""eventfd(2) counters: how VFIO delivers interrupts to userspace."""

from __future__ import annotations

import os
import select

from vmem_guest._linux.lifetime import Closing, close_fd


class EventFd(Closing):
    """A non-blocking, close-on-exec eventfd (``os.eventfd``).

    The kernel adds to the counter (an interrupt); :meth:`wait` blocks in
    ``poll(2)`` until it is non-zero, :meth:`drain` reads and resets it.
    """

    def __init__(self) -> None:
        self.fd: int = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> int:
        """Read and reset the counter; 0 when nothing was signalled."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def signal(self, value: int = 1) -> None:
        """Add ``value`` to the counter (wakes whoever polls it)."""
        os.eventfd_write(self.fd, value)

    def wait(self, timeout: float | None) -> bool:
        """Block until signalled or ``timeout`` seconds pass; True when signalled.

        The counter is not consumed: call :meth:`drain` afterwards.
        """
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        millis = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        return bool(poller.poll(millis))

    def close(self) -> None:
        self.fd = close_fd(self.fd)
