"""Lifetimes of what the agent holds open: file descriptors, mappings, devices.

One place for the ``with obj:`` protocol, so that every holder of an OS
resource only says how it lets go (``close``), and for the "-1 is closed"
convention of raw descriptors (``os.close`` twice on one number could close a
descriptor opened since by someone else).
"""

from __future__ import annotations

import os
import types
from typing import Self


class Closing:
    """Mixin: ``with obj:`` gives ``obj`` and calls ``obj.close()`` on the way out.

    A subclass defines :meth:`close`; it must be safe to call more than once
    (callers close explicitly and ``with`` closes again).
    """

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()


def close_fd(fd: int) -> int:
    """Close ``fd`` when it is open (>= 0); returns -1, the closed marker, to store back."""
    if fd >= 0:
        os.close(fd)
    return -1
