"""Pinned DMA buffers and the bus addresses the device uses for them.

docs/design.md section 7 and docs/protocol.md section 3:

* type1 (:class:`IovaBuffer`): the buffer is mapped into the container's
  IOMMU domain at an IOVA we choose; VFIO pins the pages (and long-term pins
  move them out of ZONE_MOVABLE), the device sees the IOVA.
* no-IOMMU (:class:`PhysBuffer`): the device sees physical addresses, read
  from ``/proc/self/pagemap``. ``MAP_LOCKED`` keeps the pages resident but does
  not stop migration (compaction, memory offlining), so :meth:`PhysBuffer.check_outside`
  re-reads them before every request, and :func:`no_unevictable_compaction` turns
  off compaction of locked pages while the driver runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from vmem_guest import requirements
from vmem_guest._linux import pagemap, secretmem
from vmem_guest._linux.mman import map_locked
from vmem_guest._linux.procfs import PROC_ROOT
from vmem_guest.errors import SafetyError, TransportError
from vmem_guest.kernel_setting import changed_setting
from vmem_guest.transport.vfio import VfioContainer

PAGE_SIZE = mmap.PAGESIZE
COMPACT_UNEVICTABLE = PROC_ROOT / "sys/vm/compact_unevictable_allowed"
#: Anonymous allocations tried before giving up on placing a no-IOMMU buffer.
DEFAULT_PLACEMENT_ATTEMPTS = 256

log = logging.getLogger(__name__)


class DmaBuffer:
    """A page-aligned, locked, zeroed anonymous mapping, not inherited by children.

    :attr:`address` is its virtual address (for ctypes ``from_address``);
    :meth:`bus_addr` is what the device must be told. Subclasses fill
    :attr:`bus_pages` with one bus address per page.
    """

    def __init__(self, size: int, *, secret_fd: int | None = None) -> None:
        """``secret_fd``: back the buffer with this memfd_secret file (it is closed)."""
        if size <= 0:
            raise ValueError(f"DMA buffer size {size}")
        self.size = -(-size // PAGE_SIZE) * PAGE_SIZE
        #: memfd_secret memory (while any exists, Linux offers no hibernation).
        self.secret = secret_fd is not None
        try:
            if secret_fd is None:
                fd, flags = -1, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            else:
                os.ftruncate(secret_fd, self.size)
                fd, flags = secret_fd, mmap.MAP_SHARED  # secretmem maps shared only
            self._mapping = mmap.mmap(
                fd,
                self.size,
                flags=flags | mmap.MAP_POPULATE | map_locked(),
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError as exc:
            raise TransportError(
                f"cannot allocate {self.size} locked bytes: {exc.strerror} (RLIMIT_MEMLOCK?)",
                size=self.size,
            ) from None
        finally:
            if secret_fd is not None:
                os.close(secret_fd)  # the mapping keeps the memory
        # No copy-on-write after a fork (the parent's next store would move the page
        # away from the address the device has) and no THP collapse (which migrates).
        try:
            self._mapping.madvise(mmap.MADV_DONTFORK)
            with contextlib.suppress(OSError):  # EINVAL: a kernel without THP
                self._mapping.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError as exc:
            self._mapping.close()
            raise TransportError(f"madvise(MADV_DONTFORK) failed: {exc.strerror}") from None
        self._anchor: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * self.size).from_buffer(
            self._mapping
        )
        self.address = ctypes.addressof(self._anchor)
        # MAP_POPULATE is a GUP, which secretmem refuses: fault each page in by hand.
        for offset in range(0, self.size, PAGE_SIZE):
            self._mapping[offset] = 0
        self.bus_pages: list[int] = []

    def bus_addr(self, offset: int, length: int = 1) -> int:
        """The bus address of ``[offset, offset + length)``, which must be bus-contiguous."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ValueError(f"range {offset:#x}+{length:#x} outside a {self.size:#x} buffer")
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        base = self.bus_pages[first]
        for page in range(first + 1, last + 1):
            if self.bus_pages[page] != base + (page - first) * PAGE_SIZE:
                raise TransportError(
                    f"DMA range {offset:#x}+{length:#x} is not contiguous on the bus",
                    offset=offset,
                )
        return base + offset % PAGE_SIZE

    def check_outside(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Before each request: the buffer is still where the device expects it.

        Nothing to do for an IOVA (the IOMMU translates, VFIO pins); see
        :meth:`PhysBuffer.check_outside`.
        """

    def close(self) -> None:
        if self._anchor is not None:
            self._anchor = None
            self._mapping.close()


class IovaBuffer(DmaBuffer):
    """A buffer mapped with VFIO_IOMMU_MAP_DMA at ``iova`` in ``container`` (type1)."""

    def __init__(self, size: int, container: VfioContainer, iova: int) -> None:
        if iova % PAGE_SIZE:
            raise ValueError(f"IOVA {iova:#x} is not page-aligned")
        super().__init__(size)
        try:
            container.map_dma(self.address, iova, self.size)
        except BaseException:
            super().close()
            raise
        self.container = container
        self.iova = iova
        self.bus_pages = [iova + i * PAGE_SIZE for i in range(self.size // PAGE_SIZE)]

    def close(self) -> None:
        if self._anchor is not None and self.container.fd >= 0:
            self.container.unmap_dma(self.iova)
        super().close()


class PhysBuffer(DmaBuffer):
    """A buffer whose bus addresses are its physical addresses (no-IOMMU)."""

    def __init__(
        self, size: int, *, pagemap_path: Path = pagemap.PAGEMAP, secret_fd: int | None = None
    ) -> None:
        super().__init__(size, secret_fd=secret_fd)
        self.pagemap_path = pagemap_path
        try:
            self.bus_pages = self._read_physical()
        except BaseException:
            super().close()
            raise

    def _read_physical(self) -> list[int]:
        """Every page's physical address, in one open and one read of pagemap;
        PagemapRefused when the kernel cannot serve them now."""
        return pagemap.physical_pages(self.address, self.size // PAGE_SIZE, path=self.pagemap_path)

    @classmethod
    def outside(
        cls,
        size: int,
        avoid: Iterable[tuple[int, int]],
        *,
        pagemap_path: Path = pagemap.PAGEMAP,
        attempts: int = DEFAULT_PLACEMENT_ATTEMPTS,
        secret: bool = True,
    ) -> PhysBuffer:
        """A buffer whose pages lie outside every ``[start, end)`` of ``avoid``.

        Memory a virtio-mem device added may be unplugged (after offlining, which
        migrates pages): the device would then DMA into memory the guest gave
        back. memfd_secret memory is never in ZONE_MOVABLE and never migrates, so
        it is tried first; else anonymous pages are allocated until one lands
        outside (the misplaced ones are held meanwhile so the next try differs).
        ``secret=False`` skips memfd_secret (before a hibernation: docs/lifecycle.md).
        """
        spans = list(avoid)
        rejects: list[PhysBuffer] = []
        secret_fd = secretmem.memfd_secret() if secret else None
        if secret and secret_fd is None:
            log.warning(requirements.SECRETMEM.refusal("memfd_secret(2) is not available"))
        try:
            if secret_fd is not None:
                buffer = cls(size, pagemap_path=pagemap_path, secret_fd=secret_fd)
                if buffer.misplaced(spans) is None:
                    log.info("no-IOMMU DMA memory: memfd_secret page(s) at %s", buffer.where())
                    return buffer
                rejects.append(buffer)
            for _ in range(attempts):
                buffer = cls(size, pagemap_path=pagemap_path)
                if buffer.misplaced(spans) is None:
                    log.info("no-IOMMU DMA memory: anonymous page(s) at %s", buffer.where())
                    return buffer
                rejects.append(buffer)
        finally:
            for reject in rejects:
                reject.close()
        raise SafetyError(
            f"no DMA page outside the virtio-mem regions in {attempts} tries;"
            f" fix: {requirements.SECRETMEM.fix}, or give the VM a vIOMMU",
            attempts=attempts,
        )

    def where(self) -> str:
        return ", ".join(f"{page:#x}" for page in self.bus_pages)

    def misplaced(self, ranges: Iterable[tuple[int, int]]) -> tuple[int, int, int] | None:
        """(page, start, end) of the first page inside a range, or None."""
        spans = list(ranges)
        for phys in self.bus_pages:
            for start, end in spans:
                if phys < end and start < phys + PAGE_SIZE:
                    return phys, start, end
        return None

    def check_outside(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Re-read the physical pages: unmoved, and outside every ``[start, end)`` range.

        A page that moved means the device would DMA into someone else's
        memory: TransportError, stop. A page inside a virtio-mem region could
        be unplugged under us: SafetyError. A pagemap the kernel cannot read now
        (PagemapRefused: an allocation of its own failed) says nothing about the
        pages; the caller sends nothing and checks again later.
        """
        now = self._read_physical()
        if now != self.bus_pages:
            raise TransportError(
                "a no-IOMMU DMA page moved since the device was told its address",
                before=[hex(p) for p in self.bus_pages],
                after=[hex(p) for p in now],
            )
        found = self.misplaced(ranges)
        if found is not None:
            phys, start, end = found
            raise SafetyError(
                f"DMA page {phys:#x} lies in virtio-mem region {start:#x}-{end:#x}",
                phys=phys,
                start=start,
                end=end,
            )


@contextlib.contextmanager
def no_unevictable_compaction(state_dir: Path, path: Path = COMPACT_UNEVICTABLE) -> Iterator[bool]:
    """Hold ``vm.compact_unevictable_allowed`` at 0 while the block runs, then restore it.

    Compaction would otherwise migrate our locked (no-IOMMU) DMA pages: Linux
    ``mm/compaction.c`` ``isolate_migratepages()`` scans the unevictable (mlocked)
    pages too (ISOLATE_UNEVICTABLE) unless the knob is 0. The original is recorded
    in ``state_dir`` first, so a SIGKILLed agent's next start still restores it
    (:func:`vmem_guest.kernel_setting.changed_setting`). Yields False where the
    knob is absent (no CONFIG_COMPACTION: nothing to turn off) or cannot be
    written: the driver then still re-checks its pages before every request
    (:meth:`PhysBuffer.check_outside`), and a type1 IOMMU pins them anyway.
    """
    with changed_setting(path, "0", state_dir, log) as applied:
        yield applied
