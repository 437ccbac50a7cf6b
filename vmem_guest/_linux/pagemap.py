"""Virtual to physical addresses through ``/proc/self/pagemap``.

Linux ``Documentation/admin-guide/mm/pagemap.rst``: one little-endian u64 per
virtual page; bit 63 "page present", bit 62 "swapped", bits 0-54 the page
frame number. Without CAP_SYS_ADMIN the kernel reports PFN 0, which is
treated as an error (a zero bus address would be silently wrong).

Reading it can fail for a while without anything being wrong with the pages:
the open allocates a ``struct file`` (``__alloc_file``, fs/file_table.c) and
``pagemap_read`` allocates its buffer with ``kmalloc`` on every read, returning
ENOMEM when that fails (fs/proc/task_mmu.c; docs/safety.md, "Kernel faults").
Such a refusal is :class:`~vmem_guest.errors.PagemapRefused`: try again later.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from vmem_guest._linux.procfs import PROC_ROOT
from vmem_guest.errors import PagemapRefused, TransportError

PAGEMAP = PROC_ROOT / "self/pagemap"
PM_ENTRY_BYTES = 8
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_PFN_MASK = (1 << 55) - 1
#: errnos of an open or a read of pagemap that say "not now", not "never": an
#: allocation the kernel could not make (ENOMEM; EAGAIN from allocators that do not
#: wait) or a signal (EINTR, which Python retries itself unless a handler raised).
TRANSIENT_ERRNOS = frozenset({errno.ENOMEM, errno.EAGAIN, errno.EINTR})


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
    page_start = vaddr - vaddr % page_size
    return physical_pages(page_start, 1, path=path, page_size=page_size)[0] + vaddr % page_size


def physical_pages(
    first_vaddr: int, count: int, *, path: Path = PAGEMAP, page_size: int = mmap.PAGESIZE
) -> list[int]:
    """The physical addresses of ``count`` pages from page-aligned ``first_vaddr``.

    One open and one read for them all: the kernel allocates a file at the open and
    a buffer at every read (fs/proc/task_mmu.c ``pagemap_read``), so each is a
    chance for it to refuse. PagemapRefused when it does for want of memory (try
    again later); TransportError for anything else.
    """
    if first_vaddr % page_size or count <= 0:
        raise ValueError(f"{count} pages from {first_vaddr:#x}: not whole pages")
    first_page = first_vaddr // page_size
    raw = _read_entries(path, first_page * PM_ENTRY_BYTES, count * PM_ENTRY_BYTES)
    if len(raw) != count * PM_ENTRY_BYTES:
        raise TransportError(
            f"short read from {path} for {count} pages from {first_vaddr:#x}", vaddr=first_vaddr
        )
    addresses = []
    for index in range(count):
        entry = int.from_bytes(raw[index * PM_ENTRY_BYTES : (index + 1) * PM_ENTRY_BYTES], "little")
        vaddr = first_vaddr + index * page_size
        addresses.append(pfn_of_entry(entry, vaddr) * page_size)
    return addresses


def _read_entries(path: Path, offset: int, length: int) -> bytes:
    """``length`` bytes of pagemap from ``offset``, through one file descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _refusal("open", path, exc) from None
    try:
        return os.pread(fd, length, offset)
    except OSError as exc:
        raise _refusal("read", path, exc) from None
    finally:
        os.close(fd)


def _refusal(op: str, path: Path, exc: OSError) -> TransportError:
    """The error for a failed ``op`` of pagemap: PagemapRefused when it is transient."""
    if exc.errno in TRANSIENT_ERRNOS:
        return PagemapRefused(op, exc.errno, str(path))
    return TransportError(f"cannot {op} {path}: {exc.strerror}", path=str(path), errno=exc.errno)
