"""Taking single pages out of use, and giving them back: the memory-failure seam.

Userspace cannot do what the in-kernel driver does to unplug a subblock of an
online memory block (``alloc_contig_range`` + ``PageOffline``). The nearest
equivalent is the kernel's memory-failure machinery (docs/protocol.md section 6,
"Taking single subblocks out of an online block"):

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

import errno
import mmap
import os
import struct
from pathlib import Path
from typing import Protocol

from vmem_guest import requirements
from vmem_guest._linux.lifetime import Closing
from vmem_guest._linux.procfs import MEMINFO, PROC_ROOT, meminfo_bytes
from vmem_guest._linux.sysfs import SYSFS_ROOT
from vmem_guest.errors import KernelError, PageRefused
from vmem_guest.hotplug import SYSFS_MEMORY

#: Bit of /proc/kpageflags set for a poisoned page (Linux uapi kernel-page-flags.h).
KPF_HWPOISON = 19

KPAGEFLAGS = PROC_ROOT / "kpageflags"
DEBUGFS = SYSFS_ROOT / "kernel/debug"
LOCKDOWN = SYSFS_ROOT / "kernel/security/lockdown"
#: The soft-offline file in the sysfs memory directory (CONFIG_MEMORY_FAILURE).
SOFT_OFFLINE_PAGE = "soft_offline_page"
#: The unpoison file under debugfs (CONFIG_HWPOISON_INJECT, module hwpoison_inject).
UNPOISON_PFN = "hwpoison/unpoison-pfn"
#: Bytes of /proc/kpageflags per page frame: one native-endian u64.
KPAGEFLAGS_ENTRY = 8
#: Page frames read with one pread of /proc/kpageflags (one 2 MiB subblock of 4 KiB pages).
FLAG_READ_BATCH = 512
#: Rounds of soft offline a take tries before it gives up (see :func:`take`).
TAKE_ROUNDS = 8
#: Linux's EHWPOISON (asm-generic/errno.h); Python's errno module does not name it.
EHWPOISON: int = getattr(errno, "EHWPOISON", 133)
#: A missing piece of the page-level interface: the requirement and what was seen.
Missing = tuple[requirements.Requirement, str]
#: errnos with which soft_offline_page refuses one page (docs/protocol.md section 6):
#: the page stays in use, and the caller decides what to do with the range.
SOFT_OFFLINE_REFUSALS = frozenset(
    {errno.EBUSY, errno.EAGAIN, errno.EIO, errno.ENOMEM, EHWPOISON, errno.ENXIO}
)


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


def soft_offline_error(pfn: int, err: int) -> KernelError:
    """The error for a soft_offline_page write that failed with ``err``.

    The kernel's refusals of one page (busy, unmovable, no such or no online pfn,
    no memory to migrate to) are :class:`PageRefused`; anything else (EPERM, or
    EOPNOTSUPP when soft offline is switched off) says the interface itself is
    unusable, a plain :class:`KernelError`.
    """
    if err in SOFT_OFFLINE_REFUSALS:
        return PageRefused(pfn, err)
    return KernelError("soft offline", None, err, f"pfn {pfn:#x}")


class ProcPages(Closing):
    """PageControl over sysfs, procfs and debugfs (any paths, so tests can use a tree).

    The two files written or read per page (``soft_offline_page`` and
    ``/proc/kpageflags``, and ``unpoison-pfn``) are opened once and kept: taking a
    2 MiB subblock is 512 writes, and reopening would triple the system calls.
    Counters of the system calls made (``soft_offline_writes``, ``flag_reads``,
    ``unpoison_writes``) let tests and benchmarks see the cost.
    """

    def __init__(
        self,
        memory_root: Path = SYSFS_MEMORY,
        kpageflags: Path = KPAGEFLAGS,
        debugfs: Path = DEBUGFS,
        lockdown: Path = LOCKDOWN,
        meminfo: Path = MEMINFO,
        page_size: int = mmap.PAGESIZE,
    ) -> None:
        self.soft_offline_page = memory_root / SOFT_OFFLINE_PAGE
        self.kpageflags = kpageflags
        self.debugfs = debugfs
        self.unpoison_pfn = debugfs / UNPOISON_PFN
        self.lockdown = lockdown
        self.meminfo = meminfo
        self.page_size = page_size
        self.soft_offline_writes = 0
        self.flag_reads = 0
        self.unpoison_writes = 0
        self._fds: dict[Path, int] = {}  # kept open until close()

    def close(self) -> None:
        """Close the kept file descriptors (a later call opens them again)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def _fd(self, path: Path, flags: int, op: str) -> int:
        """The kept descriptor of ``path``, opened on first use."""
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, flags | os.O_CLOEXEC)
            except OSError as exc:
                raise KernelError(op, None, exc.errno or errno.EIO, f"open {path}") from exc
            self._fds[path] = fd
        return fd

    def soft_offline(self, pfn: int) -> None:
        """Write the page's byte address, in one write(2): sysfs acts per write, and
        ``soft_offline_page_store`` parses an address, not a pfn (docs/protocol.md
        section 6). Success does not mean the page is poisoned: :func:`take` checks."""
        fd = self._fd(self.soft_offline_page, os.O_WRONLY, "soft offline")
        address = f"{pfn * self.page_size:#x}".encode()
        self.soft_offline_writes += 1
        try:
            written = os.pwrite(fd, address, 0)
        except OSError as exc:
            raise soft_offline_error(pfn, exc.errno or errno.EIO) from exc
        if written != len(address):
            detail = f"pfn {pfn:#x}: wrote {written} of {len(address)} bytes"
            raise KernelError("soft offline", None, errno.EIO, detail)

    def poisoned(self, first_pfn: int, count: int) -> list[bool]:
        """Bit KPF_HWPOISON of each page's /proc/kpageflags entry, read in batches
        of FLAG_READ_BATCH pages, one pread each."""
        fd = self._fd(self.kpageflags, os.O_RDONLY, "read kpageflags")
        end = first_pfn + count
        answer: list[bool] = []
        for start in range(first_pfn, end, FLAG_READ_BATCH):
            answer.extend(self._read_poison_bits(fd, start, min(FLAG_READ_BATCH, end - start)))
        return answer

    def _read_poison_bits(self, fd: int, first_pfn: int, count: int) -> list[bool]:
        size = count * KPAGEFLAGS_ENTRY
        self.flag_reads += 1
        try:
            data = os.pread(fd, size, first_pfn * KPAGEFLAGS_ENTRY)
        except OSError as exc:
            raise KernelError("read kpageflags", None, exc.errno or errno.EIO) from exc
        if len(data) != size:
            # The kernel stops at max_pfn: a short read means pfns it does not know.
            detail = f"pfn {first_pfn:#x}: read {len(data)} of {size} bytes"
            raise KernelError("read kpageflags", None, errno.EIO, detail)
        # /proc/kpageflags holds u64s in the kernel's byte order (put_user).
        return [bool(flags >> KPF_HWPOISON & 1) for (flags,) in struct.iter_unpack("=Q", data)]

    def unpoison(self, pfn: int) -> None:
        """Write the pfn in decimal (a debugfs simple attribute, parsed with base 0,
        so no leading zeros) in one write. EBUSY answers a page that is not poisoned
        or still referenced; EOPNOTSUPP a kernel that saw a real memory failure."""
        fd = self._fd(self.unpoison_pfn, os.O_WRONLY, "unpoison")
        text = f"{pfn}".encode()
        self.unpoison_writes += 1
        try:
            # write(2), not pwrite: debugfs attributes are opened nonseekable (pwrite
            # answers ESPIPE, measured in the test VM); each write is parsed whole.
            os.write(fd, text)
        except OSError as exc:
            raise KernelError("unpoison", None, exc.errno or errno.EIO, f"pfn {pfn:#x}") from exc

    def hardware_corrupted_bytes(self) -> int | None:
        return meminfo_bytes("HardwareCorrupted", self.meminfo)

    def unavailable_reason(self) -> str | None:
        """The first missing piece, with what it costs and the fix (the words of
        :mod:`vmem_guest.requirements`, as ``vmem-guest doctor`` prints them)."""
        missing = self.missing()
        if not missing:
            return None
        requirement, detail = missing[0]
        return requirement.refusal(detail)

    def missing(self) -> list[Missing]:
        """Every missing piece, in the order they are needed: the requirement and what
        was seen (``vmem-guest doctor`` lists them all)."""
        found = [
            self.soft_offline_missing(),
            self.kpageflags_unreadable(),
            self.locked_down(),
            self.unpoison_missing(),
        ]
        return [item for item in found if item is not None]

    def soft_offline_missing(self) -> Missing | None:
        if _exists(self.soft_offline_page):
            return None
        return (
            requirements.SOFT_OFFLINE,
            f"{self.soft_offline_page} does not exist (the kernel was built without "
            "CONFIG_MEMORY_FAILURE)",
        )

    def kpageflags_unreadable(self) -> Missing | None:
        try:
            os.close(os.open(self.kpageflags, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            detail = (
                f"{self.kpageflags} does not exist (the kernel was built without "
                "CONFIG_PROC_PAGE_MONITOR)"
            )
        except PermissionError:
            detail = f"{self.kpageflags} is not readable: page flags need root (CAP_SYS_ADMIN)"
        except OSError as exc:
            detail = f"{self.kpageflags} cannot be read: {os.strerror(exc.errno or errno.EIO)}"
        else:
            return None
        return requirements.KPAGEFLAGS, detail

    def locked_down(self) -> Missing | None:
        """Lockdown (integrity or confidentiality) refuses writes to debugfs, so no
        page could be given back; the file is missing without the lockdown LSM."""
        try:
            text = self.lockdown.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            detail = f"{self.lockdown} cannot be read: {os.strerror(exc.errno or errno.EIO)}"
            return requirements.LOCKDOWN, detail
        selected = _selected_word(text)
        if selected in (None, "none"):
            return None
        return (
            requirements.LOCKDOWN,
            f"the kernel is locked down ({selected}), and lockdown refuses debugfs writes "
            f"({UNPOISON_PFN})",
        )

    def unpoison_missing(self) -> Missing | None:
        if _exists(self.unpoison_pfn):
            return None
        try:
            mounted = bool(os.listdir(self.debugfs))
        except FileNotFoundError:
            mounted = False
        except OSError as exc:
            detail = f"{self.debugfs} cannot be read: {os.strerror(exc.errno or errno.EIO)}"
            return requirements.DEBUGFS, detail
        if not mounted:
            return requirements.DEBUGFS, f"debugfs is not mounted at {self.debugfs}"
        return (
            requirements.HWPOISON_INJECT,
            f"{self.unpoison_pfn} does not exist (the hwpoison_inject module is not loaded)",
        )


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a directory we may not search counts as missing."""
    try:
        os.stat(path)
    except OSError:
        return False
    return True


def _selected_word(text: str) -> str | None:
    """The ``[word]`` of a sysfs choice list such as ``none [integrity] confidentiality``."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def take(pages: PageControl, first_pfn: int, count: int, *, rounds: int = TAKE_ROUNDS) -> int:
    """Soft-offline every page of ``first_pfn .. first_pfn+count-1`` until each shows
    PG_hwpoison; the number of soft-offline writes made.

    A PageRefused from a write propagates at once, with the pages taken so far still
    poisoned: the caller decides whether to give them back. Pages still unpoisoned
    after ``rounds`` rounds are a PageRefused (EBUSY) for the first of them.
    """
    # Only /proc/kpageflags decides (docs/protocol.md section 6): a write's success
    # alone is not trusted (on 6.1 a lost race answers 0 without poisoning), a page
    # migrated away can land on another page of the same range, and pages freed
    # between writes can be allocated again. So: read, write what is not poisoned,
    # read again, until the whole range is poisoned.
    writes = 0
    flags = pages.poisoned(first_pfn, count)
    for _ in range(rounds):
        waiting = _unpoisoned_pfns(first_pfn, flags)
        if not waiting:
            return writes
        for pfn in waiting:
            pages.soft_offline(pfn)
            writes += 1
        flags = pages.poisoned(first_pfn, count)
    waiting = _unpoisoned_pfns(first_pfn, flags)
    if waiting:
        raise PageRefused(waiting[0], errno.EBUSY, f"still in use after {rounds} rounds")
    return writes


def give_back(pages: PageControl, first_pfn: int, count: int) -> int:
    """Unpoison every poisoned page of ``first_pfn .. first_pfn+count-1``; the number of
    pages unpoisoned.

    This does not decide whether giving back is safe: the caller guarantees that the
    device ACKed the plug of this range, so the guest may use the memory again (an
    unpoisoned page goes straight to the page allocator). Once the kernel has seen a
    real memory failure, unpoison is refused for the rest of the boot
    (docs/protocol.md section 6): the KernelError propagates.
    """
    given = 0
    for pfn in _poisoned_pfns(first_pfn, pages.poisoned(first_pfn, count)):
        pages.unpoison(pfn)
        given += 1
    still = _poisoned_pfns(first_pfn, pages.poisoned(first_pfn, count))
    if still:
        detail = f"pfn {still[0]:#x} and {len(still) - 1} more still poisoned after unpoison"
        raise KernelError("unpoison", None, errno.EBUSY, detail)
    return given


def all_poisoned(pages: PageControl, first_pfn: int, count: int) -> bool:
    """Whether every page of the range is PG_hwpoison (taken out of use)."""
    return all(pages.poisoned(first_pfn, count))


def poisoned_count(pages: PageControl, first_pfn: int, count: int) -> int:
    """How many pages of the range are PG_hwpoison."""
    return sum(pages.poisoned(first_pfn, count))


def _unpoisoned_pfns(first_pfn: int, flags: list[bool]) -> list[int]:
    return [first_pfn + offset for offset, poisoned in enumerate(flags) if not poisoned]


def _poisoned_pfns(first_pfn: int, flags: list[bool]) -> list[int]:
    return [first_pfn + offset for offset, poisoned in enumerate(flags) if poisoned]
