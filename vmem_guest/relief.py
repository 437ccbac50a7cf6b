"""Ending refusal windows once their cause is gone.

A block whose offline the kernel refused, or a subblock whose pages it would not
give up, waits out a window (:class:`~vmem_guest.retry.Refusals`: 5 s, doubling up
to 30 s). The window guesses how long the cause lasts; when the cause goes away
sooner, the wait is for nothing. Under ``make pressure`` the workload's end freed
GiBs within a second, and the agent then sat out windows of up to 30 s.

Besides a config change (the host asked for something else: every window ends,
``DeviceDriver.config_changed``), :class:`Relief` ends windows on two signs, looked
at no more often than every :data:`RECHECK_SECONDS`, and only while a window is
open: an agent with nothing refused never looks, and a converged agent still
sleeps with no timeout.

* **MemAvailable has risen** by :data:`RISE_BYTES` (one memory block) since the
  last refusal: every window ends. An offline and a take migrate pages, which
  needs free memory elsewhere: ``hotplug.SysfsMemory.offline`` does not even try
  below a block plus a reserve (ENOMEM), a migration that finds no room runs into
  its deadline (ETIMEDOUT) or answers EBUSY/ENOMEM. A rise of a whole block means
  at least one more block's pages now fit.
* **The refused page changed**: the page a take stopped at (``PageRefused.pfn``)
  shows other use flags in ``/proc/kpageflags`` than when it was refused. A page
  whose last pin and mapping went is freed (LRU, anon, mmap, unevictable gone;
  buddy set, or no flag at all on a per-CPU free list): that subblock's window
  ends. A pin alone is not visible from userspace (it raises the refcount, which
  no interface reports), so a page that stays mapped keeps its window.

Why not a PSI trigger (``/proc/pressure/memory``): its triggers fire when stall
time rises above a threshold, never when pressure ends; the signs here are two
reads of files the kernel answers from counters and the page's flags.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from vmem_guest._linux.procfs import MEMINFO, PROC_ROOT, meminfo_bytes

__all__ = ["RECHECK_SECONDS", "RISE_BYTES", "MemorySignals", "ProcMemorySignals", "Relief"]

#: While a window is open, the signs are looked at this often (a read of
#: /proc/meminfo and one pread of /proc/kpageflags per refused page).
RECHECK_SECONDS = 1.0
#: MemAvailable must rise this much above its level at the last refusal: one memory
#: block, what one more offline needs (x86-64 memory blocks are 128 MiB).
RISE_BYTES = 128 << 20
#: Bits of /proc/kpageflags that say what a page is used for (Linux uapi
#: kernel-page-flags.h): LRU 5, SLAB 7, BUDDY 10, MMAP 11, ANON 12, UNEVICTABLE 18
#: (mlocked pages), HWPOISON 19, OFFLINE 23, PGTABLE 26. Not REFERENCED or ACTIVE:
#: page aging flips them on pages nobody freed.
USE_FLAGS = sum(1 << bit for bit in (5, 7, 10, 11, 12, 18, 19, 23, 26))
KPAGEFLAGS = PROC_ROOT / "kpageflags"
#: Bytes of /proc/kpageflags per page frame: one native-endian u64.
ENTRY = 8


class MemorySignals(Protocol):
    """The guest's memory as :class:`Relief` reads it (a seam: tests use a fake)."""

    def mem_available(self) -> int | None:
        """MemAvailable in bytes; None when it cannot be read."""

    def page_flags(self, pfns: Sequence[int]) -> list[int | None]:
        """Each page's /proc/kpageflags entry (None: unreadable)."""


@dataclasses.dataclass(frozen=True)
class ProcMemorySignals:
    """MemorySignals from /proc (any paths, so tests can use files of their own)."""

    meminfo: Path = MEMINFO
    kpageflags: Path = KPAGEFLAGS

    def mem_available(self) -> int | None:
        return meminfo_bytes("MemAvailable", self.meminfo)

    def page_flags(self, pfns: Sequence[int]) -> list[int | None]:
        """One pread per page; opened per call (at most once a RECHECK_SECONDS)."""
        try:
            fd = os.open(self.kpageflags, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return [None] * len(pfns)
        try:
            return [_flags_at(fd, pfn) for pfn in pfns]
        finally:
            os.close(fd)


def _flags_at(fd: int, pfn: int) -> int | None:
    try:
        data = os.pread(fd, ENTRY, pfn * ENTRY)
    except OSError:
        return None
    if len(data) != ENTRY:
        return None  # past max_pfn
    return int.from_bytes(data, sys.byteorder)


@dataclasses.dataclass(frozen=True)
class Relieved:
    """What :meth:`Relief.check` found: every window ends (``everything``), or those of
    ``subblocks`` only; ``why`` says which sign, for the log."""

    everything: bool
    subblocks: frozenset[int]
    why: str


class Relief:
    """Watches the signs that end refusal windows early; the driver core asks it.

    :meth:`refused` is told of each refusal (the level MemAvailable is measured
    from, and the page a take stopped at); :meth:`check` says what has ended,
    at most once per :data:`RECHECK_SECONDS`; :meth:`forget` drops what is watched
    for keys that succeeded or whose windows ended.
    """

    def __init__(
        self,
        signals: MemorySignals,
        clock: Callable[[], float],
        *,
        rise: int = RISE_BYTES,
        interval: float = RECHECK_SECONDS,
    ) -> None:
        self.signals = signals
        self.clock = clock
        self.rise = rise
        self.interval = interval
        #: MemAvailable at the last refusal (None: unknown, or nothing refused since).
        self.baseline: int | None = None
        #: Subblock -> (the page its take stopped at, that page's use flags then).
        self.pages: dict[int, tuple[int, int]] = {}
        self.next_check = 0.0

    def refused(self, subblocks: Iterable[int] = (), pfn: int | None = None) -> None:
        """A refusal now: MemAvailable is measured from here on; when a take stopped
        at page ``pfn``, its ``subblocks`` end their window once that page changes."""
        self.baseline = self.signals.mem_available()
        self.next_check = self.clock() + self.interval
        if pfn is None:
            return
        (use,) = self._use((pfn,))
        if use is None:
            return
        for sb in subblocks:
            self.pages[sb] = (pfn, use)

    def forget(self, subblocks: Iterable[int]) -> None:
        """``subblocks`` are no longer watched (taken, given back, or ended)."""
        for sb in subblocks:
            self.pages.pop(sb, None)

    def clear(self) -> None:
        """Nothing is refused any more (a config change ended every window)."""
        self.baseline = None
        self.pages.clear()

    def check(self, now: float) -> Relieved | None:
        """What has ended since the last refusal (None: nothing, or not due yet)."""
        if now < self.next_check:
            return None
        self.next_check = now + self.interval
        risen = self._risen()
        if risen is not None:
            self.pages.clear()
            return Relieved(True, frozenset(), f"MemAvailable rose by {risen >> 20} MiB")
        return self._changed_pages()

    def _risen(self) -> int | None:
        """How far MemAvailable rose since the last refusal, if by ``rise`` or more (the
        level it rose to is the new baseline)."""
        available = self.signals.mem_available()
        if self.baseline is None or available is None or available - self.baseline < self.rise:
            return None
        risen, self.baseline = available - self.baseline, available
        return risen

    def _use(self, pfns: Sequence[int]) -> list[int | None]:
        """What each page is used for: its flags masked with USE_FLAGS."""
        return [None if f is None else f & USE_FLAGS for f in self.signals.page_flags(pfns)]

    def _changed_pages(self) -> Relieved | None:
        if not self.pages:
            return None
        pfns = sorted({pfn for pfn, _ in self.pages.values()})
        now_use = dict(zip(pfns, self._use(pfns), strict=True))
        ended = frozenset(
            sb for sb, (pfn, use) in self.pages.items() if now_use[pfn] not in (None, use)
        )
        if not ended:
            return None
        changed = sorted({self.pages[sb][0] for sb in ended})
        self.forget(ended)
        shown = ", ".join(f"{pfn:#x}" for pfn in changed[:4])
        return Relieved(False, ended, f"refused page(s) {shown} no longer in the same use")
