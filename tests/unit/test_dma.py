"""DMA buffers (locked anonymous memory) and the no-IOMMU safety checks."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import pytest

from vmem_guest._linux import pagemap
from vmem_guest.errors import SafetyError, TransportError
from vmem_guest.transport import dma


class FakePagemap:
    """A pagemap file covering the buffer's pages, with PFNs we choose."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, buffer: dma.DmaBuffer, pfns: list[int]) -> None:
        first = buffer.address // dma.PAGE_SIZE
        data = b"".join(struct.pack("<Q", pagemap.PM_PRESENT | pfn) for pfn in pfns)
        with open(self.path, "wb") as f:  # a sparse file: only the buffer's entries
            f.seek(8 * first)
            f.write(data)


class PresetPhysBuffer(dma.PhysBuffer):
    """PhysBuffer whose pagemap is written before the first read."""

    def __init__(self, size: int, fake: FakePagemap, pfns: list[int]) -> None:
        self._fake, self._pfns = fake, pfns
        super().__init__(size, pagemap_path=fake.path)

    def _read_physical(self) -> list[int]:
        if self._pfns:
            self._fake.set(self, self._pfns)
            self._pfns = []
        return super()._read_physical()


def test_buffer_is_page_aligned_locked_and_zeroed() -> None:
    buf = dma.DmaBuffer(100)
    try:
        assert buf.size == dma.PAGE_SIZE
        assert buf.address % dma.PAGE_SIZE == 0
        assert ctypes.string_at(buf.address, 16) == bytes(16)
        ctypes.memset(buf.address, 0xAB, buf.size)
    finally:
        buf.close()
    buf.close()  # idempotent


def test_buffer_is_not_inherited_across_fork() -> None:
    import os

    buf = dma.DmaBuffer(dma.PAGE_SIZE)
    try:
        ctypes.memset(buf.address, 0x5A, 1)
        pid = os.fork()
        if pid == 0:  # child: the page must not be mapped (MADV_DONTFORK)
            code = 0
            try:
                with open("/proc/self/maps") as maps:
                    start = f"{buf.address:x}-"
                    code = 1 if any(line.startswith(start) for line in maps) else 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert ctypes.string_at(buf.address, 1) == b"\x5a"
    finally:
        buf.close()


def test_phys_buffer_bus_addresses_and_check_outside(tmp_path: Path) -> None:
    fake = FakePagemap(tmp_path / "pagemap")
    buf = PresetPhysBuffer(2 * dma.PAGE_SIZE, fake, [0x1000, 0x1001])
    try:
        assert buf.bus_addr(0x10) == 0x1000 * dma.PAGE_SIZE + 0x10
        assert buf.bus_addr(dma.PAGE_SIZE - 8, 16) == 0x1000 * dma.PAGE_SIZE + dma.PAGE_SIZE - 8
        region = (0x1_0000_0000, 0x2_0000_0000)
        buf.check_outside([region])  # 16 MiB is far below the region
        with pytest.raises(SafetyError, match="lies in virtio-mem region"):
            buf.check_outside([(0x1001 * dma.PAGE_SIZE, 0x1002 * dma.PAGE_SIZE)])
        fake.set(buf, [0x1000, 0x2000])  # the second page migrated
        with pytest.raises(TransportError, match="moved"):
            buf.check_outside([region])
    finally:
        buf.close()


def test_non_contiguous_pages_cannot_hold_one_structure(tmp_path: Path) -> None:
    fake = FakePagemap(tmp_path / "pagemap")
    buf = PresetPhysBuffer(2 * dma.PAGE_SIZE, fake, [0x1000, 0x5000])
    try:
        assert buf.bus_addr(dma.PAGE_SIZE) == 0x5000 * dma.PAGE_SIZE
        with pytest.raises(TransportError, match="not contiguous"):
            buf.bus_addr(dma.PAGE_SIZE - 8, 16)
        with pytest.raises(ValueError):
            buf.bus_addr(2 * dma.PAGE_SIZE)
    finally:
        buf.close()


def test_real_pagemap_as_root_or_hidden() -> None:
    buf = dma.DmaBuffer(dma.PAGE_SIZE)
    try:
        try:
            phys = pagemap.physical_address(buf.address)
        except TransportError as exc:
            assert "CAP_SYS_ADMIN" in str(exc)
        else:
            assert phys % dma.PAGE_SIZE == 0 and phys > 0
    finally:
        buf.close()


def test_compaction_knob_set_and_restored(tmp_path: Path) -> None:
    knob = tmp_path / "compact_unevictable_allowed"
    knob.write_text("1\n")
    state = tmp_path / "state"
    with dma.no_unevictable_compaction(state, knob) as applied:
        assert applied
        assert knob.read_text() == "0"
    assert knob.read_text() == "1"
    with pytest.raises(RuntimeError), dma.no_unevictable_compaction(state, knob):
        raise RuntimeError("agent died")
    assert knob.read_text() == "1"
    assert not list(state.glob("*.setting"))


def test_compaction_knob_missing(tmp_path: Path) -> None:
    with dma.no_unevictable_compaction(tmp_path / "state", tmp_path / "absent") as applied:
        assert not applied


class FakeContainer:
    def __init__(self) -> None:
        self.fd = 3
        self.maps: dict[int, tuple[int, int]] = {}

    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        self.maps[iova] = (vaddr, size)

    def unmap_dma(self, iova: int) -> None:
        del self.maps[iova]


def test_iova_buffer_maps_and_unmaps() -> None:
    container = FakeContainer()
    buf = dma.IovaBuffer(3 * dma.PAGE_SIZE, container, 0x1000_0000)  # type: ignore[arg-type]
    assert container.maps[0x1000_0000] == (buf.address, 3 * dma.PAGE_SIZE)
    assert buf.bus_addr(dma.PAGE_SIZE + 4, 2 * dma.PAGE_SIZE - 4) == 0x1000_1004
    buf.check_outside([(0, 1 << 64)])  # the IOMMU translates: nothing to check
    buf.close()
    assert container.maps == {}
    with pytest.raises(ValueError):
        dma.IovaBuffer(dma.PAGE_SIZE, container, 0x123)  # type: ignore[arg-type]
