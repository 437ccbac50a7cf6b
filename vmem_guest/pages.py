"""Taking single pages out of use, and giving them back: the memory-failure seam.

Userspace cannot do what the in-kernel driver does to unplug a subblock of an
online memory block (``alloc_contig_range`` + ``PageOffline``). The nearest
equivalent is the kernel's memory-failure machinery (docs/protocol.md,
"Subblocks of online blocks"):

* ``/sys/devices/system/memory/soft_offline_page`` takes one page (a byte
  address) out of use: a free page leaves the free lists, an in-use movable
  page is migrated first; the page is then PG_hwpoison and never handed out again;
* ``/proc/kpageflags`` (bit 19, KPF_HWPOISON) verifies it: the write's success
  alone is not trusted (a lost race can answer 0 without poisoning);
* debugfs ``hwpoison/unpoison-pfn`` gives a page back to the allocator.

:class:`PageControl` is the seam (like ``hotplug.KernelMemory``); the real one
is :class:`ProcPages`, the simulator's ``sim.pages.FakePages``. :func:`take`
and :func:`give_back` are the algorithms over it that the driver calls.
"""

from __future__ import annotations

from typing import Protocol

#: Bit of /proc/kpageflags set for a poisoned page (Linux uapi kernel-page-flags.h).
KPF_HWPOISON = 19


class PageControl(Protocol):
    """The kernel's page-level interface; pages are named by page frame number."""

    page_size: int

    def unavailable_reason(self) -> str | None:
        """Why single pages cannot be taken and given back here, None if they can."""

    def soft_offline(self, pfn: int) -> None:
        """Take page ``pfn`` out of use; PageRefused when the kernel says no."""

    def poisoned(self, first_pfn: int, count: int) -> list[bool]:
        """Whether each page of ``first_pfn .. first_pfn+count-1`` is PG_hwpoison."""

    def unpoison(self, pfn: int) -> None:
        """Give poisoned page ``pfn`` back to the allocator; KernelError if refused."""

    def hardware_corrupted_bytes(self) -> int | None:
        """``HardwareCorrupted`` of /proc/meminfo in bytes (None if unreadable)."""
