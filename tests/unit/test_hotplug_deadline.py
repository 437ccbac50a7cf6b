"""SysfsMemory.offline gives up after its deadline (Linux retries migration forever)."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from vmem_guest import hotplug
from vmem_guest.errors import OfflineRefused


def _tree(root: Path, state: str) -> None:
    (root / "memory40").mkdir(parents=True)
    (root / "memory40" / "state").write_text(state + "\n")
    (root / "memory40" / "valid_zones").write_text("Movable\n")
    (root / "block_size_bytes").write_text("8000000\n")


def test_offline_that_never_returns_is_refused_with_etimedout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(tmp_path, "online")

    def stuck_write(fd: int, data: bytes) -> int:
        time.sleep(30)  # the kernel migrating pages with nowhere to put them
        return len(data)

    monkeypatch.setattr(hotplug.os, "write", stuck_write)
    memory = hotplug.SysfsMemory(tmp_path, offline_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(OfflineRefused) as err:
        memory.offline(40)
    assert err.value.errno == errno.ETIMEDOUT
    assert err.value.block == 40
    assert time.monotonic() - started < 5


def test_alarm_racing_a_successful_offline_is_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(tmp_path, "online")

    def slow_but_done(fd: int, data: bytes) -> int:
        (tmp_path / "memory40" / "state").write_text("offline\n")
        time.sleep(30)
        return len(data)

    monkeypatch.setattr(hotplug.os, "write", slow_but_done)
    hotplug.SysfsMemory(tmp_path, offline_timeout=0.2).offline(40)


def _meminfo(tmp_path: Path, available_kib: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(
        f"MemTotal:  4194304 kB\nMemFree:  1024 kB\nMemAvailable:  {available_kib} kB\n"
    )
    return path


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every sysfs write, captured instead of made."""
    captured: list[bytes] = []
    monkeypatch.setattr(hotplug.os, "write", lambda fd, data: captured.append(data) or len(data))
    return captured


def test_offline_with_no_room_for_the_block_is_not_even_tried(
    tmp_path: Path, writes: list[bytes]
) -> None:
    """128 MiB block + 64 MiB reserve > 150 MiB available: refused (ENOMEM), nothing written."""
    _tree(tmp_path, "online")
    memory = hotplug.SysfsMemory(tmp_path, meminfo=_meminfo(tmp_path, 150 * 1024))
    with pytest.raises(OfflineRefused, match="MemAvailable 150 MiB < block \\+ reserve 192 MiB"):
        memory.offline(40)
    assert writes == []


def test_offline_with_room_for_the_block_writes_offline(
    tmp_path: Path, writes: list[bytes]
) -> None:
    _tree(tmp_path, "online")
    hotplug.SysfsMemory(tmp_path, meminfo=_meminfo(tmp_path, 192 * 1024)).offline(40)
    assert writes == [b"offline"]


def test_offline_without_a_readable_meminfo_is_tried(tmp_path: Path, writes: list[bytes]) -> None:
    _tree(tmp_path, "online")
    hotplug.SysfsMemory(tmp_path, meminfo=tmp_path / "missing").offline(40)
    assert writes == [b"offline"]
