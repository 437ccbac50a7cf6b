"""Virtual to physical addresses through ``/proc/self/pagemap``.

Linux ``Documentation/admin-guide/mm/pagemap.rst``: one little-endian u64 per
virtual page; bit 63 "page present", bit 62 "swapped", bits 0-54 the page
frame number. Without CAP_SYS_ADMIN the kernel reports PFN 0, which is
treated as an error (a zero bus address would be silently wrong).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from vmem_guest._linux.procfs import PROC_ROOT
from vmem_guest.errors import TransportError

PAGEMAP = PROC_ROOT / "self/pagemap"
PM_ENTRY_BYTES = 8
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_PFN_MASK = (1 << 55) - 1


def pfn_of_entry(entry: int, vaddr: int) -> int:
    """The PFN in one pagemap entry; TransportError if absent or hidden."""
    if not entry & PM_PRESENT:
        raise TransportError(f"page at {vaddr:#x} is not present", vaddr=vaddr, entry=entry)
    if entry & PM_SWAPPED:
        raise TransportError(f"page at {vaddr:#x} is swapped out", vaddr=vaddr, entry=entry)
    pfn = entry & PM_PFN_MASK
    if pfn == 0:
        raise TransportError(
            f"pagemap hides the PFN of {vaddr:#x} (needs CAP_SYS_ADMIN)", vaddr=vaddr
        )
    return pfn


def physical_address(vaddr: int, *, path: Path = PAGEMAP, page_size: int = mmap.PAGESIZE) -> int:
    """The physical address backing ``vaddr`` in this process, right now.

    Pages can migrate (compaction, memory offlining): the answer is only valid
    until then; callers re-check (see ``transport.dma``).
    """
    page, offset_in_page = divmod(vaddr, page_size)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TransportError(f"cannot open {path}: {exc.strerror}", path=str(path)) from None
    try:
        raw = os.pread(fd, PM_ENTRY_BYTES, page * PM_ENTRY_BYTES)
    except OSError as exc:
        raise TransportError(f"cannot read {path}: {exc.strerror}", path=str(path)) from None
    finally:
        os.close(fd)
    if len(raw) != PM_ENTRY_BYTES:
        raise TransportError(f"short read from {path} for {vaddr:#x}", vaddr=vaddr)
    pfn = pfn_of_entry(int.from_bytes(raw, "little"), vaddr)
    return pfn * page_size + offset_in_page
