"""_linux.sysfs: read a value, write a word, follow a link, against a fake tree."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from vmem_guest._linux import sysfs


def test_read_value_strips_the_newline(tmp_path: Path) -> None:
    (tmp_path / "vendor").write_text("0x1af4\n")
    assert sysfs.read_value(tmp_path / "vendor") == "0x1af4"
    assert sysfs.read_value(str(tmp_path / "vendor")) == "0x1af4"


def test_read_value_reads_one_page_at_most(tmp_path: Path) -> None:
    (tmp_path / "big").write_text("x" * (sysfs.ATTRIBUTE_MAX_BYTES + 10))
    assert len(sysfs.read_value(tmp_path / "big")) == sysfs.ATTRIBUTE_MAX_BYTES


def test_read_value_raises_the_kernels_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sysfs.read_value(tmp_path / "absent")
    with pytest.raises(IsADirectoryError):
        sysfs.read_value(tmp_path)


def test_read_value_or_none(tmp_path: Path) -> None:
    (tmp_path / "name").write_text("vfio-noiommu\n")
    assert sysfs.read_value_or_none(tmp_path / "name") == "vfio-noiommu"
    assert sysfs.read_value_or_none(tmp_path / "absent") is None
    assert sysfs.read_value_or_none(tmp_path) is None


def test_write_word_is_one_write(tmp_path: Path, writes: list[bytes]) -> None:
    state = tmp_path / "state"
    state.write_text("online\n")
    assert sysfs.write_word(state, "offline") == 7
    assert sysfs.write_word(str(state), "on") == 2
    assert writes == [b"offline", b"on"]
    assert state.read_text() == "onfline"  # a store, not a replaced file


def test_write_word_truncating_replaces_the_value(tmp_path: Path, writes: list[bytes]) -> None:
    attr = tmp_path / "driver_override"
    attr.write_text("(null)\n")
    assert sysfs.write_word(attr, "\n", truncate=True) == 1
    assert attr.read_text() == "\n"  # as `echo > attr` leaves it
    assert sysfs.write_word(str(attr), "vfio-pci", truncate=True) == 8
    assert attr.read_text() == "vfio-pci"
    assert writes == [b"\n", b"vfio-pci"]


def test_write_word_raises_the_kernels_error(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        sysfs.write_word(tmp_path / "absent", "1")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(OSError) as info:
        sysfs.write_word(tmp_path, "1")
    assert info.value.errno == errno.EISDIR


def test_link_name(tmp_path: Path) -> None:
    (tmp_path / "drivers/virtio-pci").mkdir(parents=True)
    (tmp_path / "driver").symlink_to("drivers/virtio-pci")
    (tmp_path / "dangling").symlink_to("kernel/iommu_groups/7")
    (tmp_path / "file").write_text("")
    assert sysfs.link_name(tmp_path / "driver") == "virtio-pci"
    assert sysfs.link_name(str(tmp_path / "dangling")) == "7"
    assert sysfs.link_name(tmp_path / "file") is None  # not a link
    assert sysfs.link_name(tmp_path / "absent") is None


def test_root_default() -> None:
    assert Path("/sys") == sysfs.SYSFS_ROOT
