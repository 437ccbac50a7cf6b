"""_linux.procfs: the one /proc/meminfo parser, against files of our own."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmem_guest._linux import procfs

MEMINFO = """\
MemTotal:        4030712 kB
MemFree:         3211004 kB
MemAvailable:    3550112 kB
HardwareCorrupted:     8 kB
HugePages_Total:       0
"""


@pytest.fixture
def meminfo(tmp_path: Path) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    return path


@pytest.mark.parametrize(
    ("field", "kib"),
    [("MemTotal", 4030712), ("MemAvailable", 3550112), ("HardwareCorrupted", 8)],
)
def test_meminfo_bytes(meminfo: Path, field: str, kib: int) -> None:
    assert procfs.meminfo_bytes(field, meminfo) == kib * 1024


def test_meminfo_bytes_matches_the_whole_name(meminfo: Path) -> None:
    assert procfs.meminfo_bytes("Mem", meminfo) is None
    assert procfs.meminfo_bytes("Hugepagesize", meminfo) is None  # absent


def test_meminfo_bytes_none_when_unreadable_or_malformed(tmp_path: Path) -> None:
    assert procfs.meminfo_bytes("MemTotal", tmp_path / "absent") is None
    bad = tmp_path / "meminfo"
    bad.write_text("MemTotal: lots kB\nMemAvailable:\n")
    assert procfs.meminfo_bytes("MemTotal", bad) is None
    assert procfs.meminfo_bytes("MemAvailable", bad) is None
    bad.write_bytes(b"MemTotal: \xff kB\n")
    assert procfs.meminfo_bytes("MemTotal", bad) is None


def test_memtotal_bytes(meminfo: Path, tmp_path: Path) -> None:
    assert procfs.memtotal_bytes(meminfo) == 4030712 * 1024
    assert procfs.memtotal_bytes(tmp_path / "absent") == 0


def test_roots() -> None:
    assert Path("/proc") == procfs.PROC_ROOT
    assert Path("/proc/meminfo") == procfs.MEMINFO
