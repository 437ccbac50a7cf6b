"""pagemap decoding, eventfds and IOMMU group discovery against fake trees."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from vmem_guest._linux import pagemap
from vmem_guest._linux.eventfd import EventFd
from vmem_guest.errors import PagemapRefused, TransportError
from vmem_guest.transport.vfio import choose_iova, find_group, group_node, parse_iova_ranges

PAGE = 4096


def _fake_pagemap(tmp_path: Path, entries: dict[int, int]) -> Path:
    path = tmp_path / "pagemap"
    data = bytearray(8 * (max(entries) + 1))
    for page, entry in entries.items():
        struct.pack_into("<Q", data, 8 * page, entry)
    path.write_bytes(bytes(data))
    return path


def test_physical_address_from_pagemap(tmp_path: Path) -> None:
    path = _fake_pagemap(tmp_path, {5: pagemap.PM_PRESENT | 0x1234})
    assert pagemap.physical_address(5 * PAGE + 0x10, path=path, page_size=PAGE) == (
        0x1234 * PAGE + 0x10
    )


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        (0x1234, "not present"),
        (pagemap.PM_PRESENT, "CAP_SYS_ADMIN"),
        (pagemap.PM_PRESENT | pagemap.PM_SWAPPED | 7, "swapped"),
    ],
)
def test_pagemap_refuses_unusable_entries(tmp_path: Path, entry: int, why: str) -> None:
    path = _fake_pagemap(tmp_path, {2: entry})
    with pytest.raises(TransportError, match=why):
        pagemap.physical_address(2 * PAGE, path=path, page_size=PAGE)


def test_pagemap_pfn_uses_bits_0_to_54() -> None:
    entry = pagemap.PM_PRESENT | (1 << 55) | ((1 << 55) - 1)
    assert pagemap.pfn_of_entry(entry, 0) == (1 << 55) - 1


def test_pagemap_short_file(tmp_path: Path) -> None:
    path = _fake_pagemap(tmp_path, {0: pagemap.PM_PRESENT | 1})
    with pytest.raises(TransportError, match="short read"):
        pagemap.physical_address(9 * PAGE, path=path, page_size=PAGE)


class PagemapFaults:
    """``os.open`` and ``os.pread`` of one pagemap file, failing with an errno the
    next few times they are called (other files are left alone)."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = str(path)
        self.failures = {"open": 0, "read": 0}
        self.err = errno.ENOMEM
        self.calls = {"open": 0, "read": 0}
        self.fds: set[int] = set()
        real_open, real_pread = os.open, os.pread

        def fake_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
            if str(path) != self.path:
                return real_open(path, flags, mode, **kw)
            self._maybe_fail("open")
            fd = real_open(path, flags, mode, **kw)
            self.fds.add(fd)
            return fd

        def fake_pread(fd: int, length: int, offset: int) -> bytes:
            if fd in self.fds:
                self._maybe_fail("read")
            return real_pread(fd, length, offset)

        monkeypatch.setattr(pagemap.os, "open", fake_open)
        monkeypatch.setattr(pagemap.os, "pread", fake_pread)

    def fail(self, op: str, times: int, err: int = errno.ENOMEM) -> None:
        self.failures[op], self.err = times, err

    def _maybe_fail(self, op: str) -> None:
        self.calls[op] += 1
        if self.failures[op]:
            self.failures[op] -= 1
            raise OSError(self.err, os.strerror(self.err))


def test_all_pages_are_read_through_one_open_and_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel allocates at every open and every read of pagemap: a buffer of
    several pages costs one of each, not one per page."""
    path = _fake_pagemap(tmp_path, {5: pagemap.PM_PRESENT | 0x10, 6: pagemap.PM_PRESENT | 0x22})
    faults = PagemapFaults(path, monkeypatch)
    assert pagemap.physical_pages(5 * PAGE, 2, path=path, page_size=PAGE) == [
        0x10 * PAGE,
        0x22 * PAGE,
    ]
    assert faults.calls == {"open": 1, "read": 1}


@pytest.mark.parametrize("op", ["open", "read"])
@pytest.mark.parametrize("err", [errno.ENOMEM, errno.EAGAIN, errno.EINTR])
def test_a_pagemap_the_kernel_cannot_serve_now_is_a_refusal_to_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, err: int
) -> None:
    path = _fake_pagemap(tmp_path, {2: pagemap.PM_PRESENT | 7})
    faults = PagemapFaults(path, monkeypatch)
    faults.fail(op, 1, err)
    with pytest.raises(PagemapRefused) as caught:
        pagemap.physical_address(2 * PAGE, path=path, page_size=PAGE)
    assert caught.value.fields == {"op": op, "errno": err, "path": str(path)}
    assert pagemap.physical_address(2 * PAGE, path=path, page_size=PAGE) == 7 * PAGE


@pytest.mark.parametrize("op", ["open", "read"])
def test_a_pagemap_that_cannot_be_read_at_all_is_no_refusal_to_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    path = _fake_pagemap(tmp_path, {2: pagemap.PM_PRESENT | 7})
    PagemapFaults(path, monkeypatch).fail(op, 1, errno.EACCES)
    with pytest.raises(TransportError, match=f"cannot {op}") as caught:
        pagemap.physical_address(2 * PAGE, path=path, page_size=PAGE)
    assert not isinstance(caught.value, PagemapRefused)


def test_eventfd_wait_and_drain() -> None:
    with EventFd() as efd:
        assert not efd.wait(0)
        assert efd.drain() == 0
        efd.signal(2)
        assert efd.wait(0.5)
        assert efd.drain() == 2
        assert not efd.wait(0.01)
    assert efd.fd == -1


def _fake_sysfs(tmp_path: Path, bdf: str, group: int, name: str | None) -> tuple[Path, Path]:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    group_dir = sysfs / "kernel/iommu_groups" / str(group)
    group_dir.mkdir(parents=True)
    if name is not None:
        (group_dir / "name").write_text(name + "\n")
    device = sysfs / "bus/pci/devices" / bdf
    device.mkdir(parents=True)
    os.symlink(f"../../../../kernel/iommu_groups/{group}", device / "iommu_group")
    (dev / "vfio").mkdir(parents=True)
    return sysfs, dev


def test_find_group_type1(tmp_path: Path) -> None:
    sysfs, dev = _fake_sysfs(tmp_path, "0000:00:03.0", 7, None)
    group = find_group("0000:00:03.0", sysfs_root=sysfs, dev_root=dev)
    assert (group.number, group.noiommu, group.dev_path) == (7, False, dev / "vfio/7")


def test_find_group_noiommu_by_name(tmp_path: Path) -> None:
    sysfs, dev = _fake_sysfs(tmp_path, "0000:00:03.0", 0, "vfio-noiommu")
    group = find_group("0000:00:03.0", sysfs_root=sysfs, dev_root=dev)
    assert (group.noiommu, group.dev_path) == (True, dev / "vfio/noiommu-0")


def test_find_group_noiommu_by_node(tmp_path: Path) -> None:
    sysfs, dev = _fake_sysfs(tmp_path, "0000:00:04.0", 3, None)
    (dev / "vfio/noiommu-3").touch()
    assert find_group("0000:00:04.0", sysfs_root=sysfs, dev_root=dev).noiommu


def test_group_node(tmp_path: Path) -> None:
    assert group_node(7, "type1", tmp_path) == tmp_path / "vfio/7"
    assert group_node(0, "noiommu", tmp_path) == tmp_path / "vfio/noiommu-0"
    assert group_node(3, "type1") == Path("/dev/vfio/3")


def test_find_group_without_link(tmp_path: Path) -> None:
    (tmp_path / "bus/pci/devices/0000:00:03.0").mkdir(parents=True)
    with pytest.raises(TransportError, match="no IOMMU group"):
        find_group("0000:00:03.0", sysfs_root=tmp_path, dev_root=tmp_path)


def _iommu_info(ranges: list[tuple[int, int]], *, next_offset: int = 0) -> bytes:
    """A VFIO_IOMMU_GET_INFO answer laid out like the kernel's (head 24 bytes, cap at 24)."""
    cap = struct.pack("<HHIII", 1, 1, next_offset, len(ranges), 0)
    cap += b"".join(struct.pack("<QQ", start, end) for start, end in ranges)
    size = 24 + len(cap)
    head = struct.pack("<IIQI4x", size, 3, 0x40201000, 24)
    return head + cap


def test_parse_iova_ranges() -> None:
    info = _iommu_info([(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)])
    assert parse_iova_ranges(info) == [(0, 0xFEE00000), (0xFEF00000, 1 << 48)]


def test_parse_iova_ranges_refuses_a_loop_and_overruns() -> None:
    with pytest.raises(TransportError, match="bad VFIO capability offset"):
        parse_iova_ranges(_iommu_info([(0, 0xFFFF)], next_offset=24))
    info = bytearray(_iommu_info([(0, 0xFFFF)]))
    struct.pack_into("<I", info, 24 + 8, 1000)  # nr_iovas
    with pytest.raises(TransportError, match="overrun"):
        parse_iova_ranges(bytes(info))


def test_choose_iova() -> None:
    ranges = [(0, 0xFEE00000), (0xFEF00000, 1 << 48)]
    assert choose_iova(ranges, 0x1000, 0x1000_0000, 0x1000) == 0x1000_0000
    assert choose_iova([], 0x1000, 0x1000_0000, 0x1000) == 0x1000_0000
    assert choose_iova([(0x2000_0000, 0x3000_0000)], 0x1000, 0x1000_0000, 0x1000) == 0x2000_0000
    assert choose_iova([(0x10, 0x10000)], 0x1000, 0x1000_0000, 0x1000) == 0x1000
    with pytest.raises(TransportError):
        choose_iova([(0, 0x1000)], 0x2000, 0x1000_0000, 0x1000)
