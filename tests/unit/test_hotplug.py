"""The kernel memory view: SysfsMemory over a fake sysfs tree."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vmem_guest import hotplug
from vmem_guest.blocks import Zone
from vmem_guest.errors import KernelError, OfflineRefused
from vmem_guest.hotplug import KernelBlock, KernelBlockState, SysfsMemory

MiB = 1 << 20
MB = 128 * MiB  # block_size_bytes "8000000"


def make_block(
    root: Path, index: int, state: str, valid_zones: str = "Normal Movable", node: int | None = 0
) -> Path:
    """A ``memoryN`` directory as Linux lays it out."""
    block = root / f"memory{index}"
    block.mkdir()
    (block / "state").write_text(f"{state}\n")
    (block / "valid_zones").write_text(f"{valid_zones}\n")
    (block / "phys_index").write_text(f"{index:08x}\n")
    (block / "phys_device").write_text("0\n")
    if node is not None:
        (block / f"node{node}").symlink_to(root.parent / "node" / f"node{node}")
    return block


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """A tree laid out like /sys/devices/system (memory/ and node/)."""
    for node in (0, 1):
        (tmp_path / "node" / f"node{node}").mkdir(parents=True)
    root = tmp_path / "memory"
    root.mkdir()
    (root / "block_size_bytes").write_text("8000000\n")
    (root / "auto_online_blocks").write_text("offline\n")
    (root / "probe").write_text("")
    make_block(root, 0, "online", "Normal")  # boot memory
    make_block(root, 32, "offline")
    make_block(root, 33, "online", "Movable", node=1)
    make_block(root, 34, "online", "Normal")
    return root


@pytest.fixture
def mem(sysfs: Path) -> SysfsMemory:
    meminfo = sysfs.parent / "meminfo"
    meminfo.write_text("MemTotal:  4194304 kB\nMemAvailable:  2097152 kB\n")
    return SysfsMemory(sysfs, meminfo=meminfo)


def written(path: Path) -> str:
    return path.read_text()


def fail_writes(
    monkeypatch: pytest.MonkeyPatch, suffix: str, err: int
) -> Callable[[int, bytes], int]:
    """Make os.write raise ``err`` for fds open on a path ending with ``suffix``."""
    real_write = os.write

    def fake_write(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
            raise OSError(err, os.strerror(err))
        return real_write(fd, data)

    monkeypatch.setattr(hotplug.os, "write", fake_write)
    return fake_write


# --- SysfsMemory: reads -------------------------------------------------------------


def test_block_size_parses_hex(mem: SysfsMemory) -> None:
    assert mem.block_size() == MB


@pytest.mark.parametrize("text", ["80000000", "0x8000000", "1000\n"])
def test_block_size_other_powers_of_two(sysfs: Path, text: str) -> None:
    (sysfs / "block_size_bytes").write_text(text)
    assert SysfsMemory(sysfs).block_size() == int(text, 16)


@pytest.mark.parametrize("text", ["", "garbage", "12G", "6000000", "0", "-8000000", "8000001"])
def test_block_size_rejects_garbage_and_non_powers_of_two(sysfs: Path, text: str) -> None:
    (sysfs / "block_size_bytes").write_text(text)
    with pytest.raises(KernelError) as info:
        SysfsMemory(sysfs).block_size()
    assert info.value.errno == errno.EINVAL


def test_missing_block_size_is_a_kernel_error(sysfs: Path) -> None:
    (sysfs / "block_size_bytes").unlink()
    with pytest.raises(KernelError) as info:
        SysfsMemory(sysfs).block_size()
    assert info.value.errno == errno.ENOENT


def test_auto_online_blocks(sysfs: Path, mem: SysfsMemory) -> None:
    assert mem.auto_online_blocks() == "offline"
    (sysfs / "auto_online_blocks").write_text("online_movable\n")
    assert mem.auto_online_blocks() == "online_movable"


def test_has_probe(sysfs: Path, mem: SysfsMemory) -> None:
    assert mem.has_probe()
    (sysfs / "probe").unlink()
    assert not mem.has_probe()


def test_absent_block(mem: SysfsMemory) -> None:
    assert mem.block(40) == KernelBlock(40, KernelBlockState.ABSENT, Zone.NONE, -1)


def test_offline_block_has_no_zone_but_a_node(mem: SysfsMemory) -> None:
    assert mem.block(32) == KernelBlock(32, KernelBlockState.OFFLINE, Zone.NONE, 0)


def test_online_movable_block(mem: SysfsMemory) -> None:
    assert mem.block(33) == KernelBlock(33, KernelBlockState.ONLINE, Zone.MOVABLE, 1)


def test_online_normal_block_is_kernel_zone(mem: SysfsMemory) -> None:
    assert mem.block(34) == KernelBlock(34, KernelBlockState.ONLINE, Zone.KERNEL, 0)


@pytest.mark.parametrize(("zones", "zone"), [("DMA32", Zone.KERNEL), ("none", Zone.AUTO)])
def test_other_zone_names(sysfs: Path, zones: str, zone: Zone) -> None:
    make_block(sysfs, 40, "online", zones)
    assert SysfsMemory(sysfs).block(40).zone is zone


def test_block_without_node_link(sysfs: Path) -> None:
    make_block(sysfs, 41, "offline", node=None)
    assert SysfsMemory(sysfs).block(41).node == -1


def test_unreadable_state_is_a_kernel_error(sysfs: Path) -> None:
    (sysfs / "memory32" / "state").unlink()
    with pytest.raises(KernelError) as info:
        SysfsMemory(sysfs).block(32)
    assert info.value.block == 32
    assert info.value.errno == errno.ENOENT


def test_online_blocks(mem: SysfsMemory) -> None:
    assert sorted(mem.online_blocks()) == [0, 33, 34]


# --- SysfsMemory: writes --------------------------------------------------------------


def test_probe_writes_hex_address(sysfs: Path, mem: SysfsMemory) -> None:
    assert mem.probe(0x1_0800_0000) is True
    assert written(sysfs / "probe") == "0x108000000"


def test_probe_eexist_returns_false(monkeypatch: pytest.MonkeyPatch, mem: SysfsMemory) -> None:
    fail_writes(monkeypatch, "/probe", errno.EEXIST)
    assert mem.probe(0x1_0000_0000) is False


def test_probe_other_errors_raise(monkeypatch: pytest.MonkeyPatch, mem: SysfsMemory) -> None:
    fail_writes(monkeypatch, "/probe", errno.EINVAL)
    with pytest.raises(KernelError) as info:
        mem.probe(0x1_0000_0000)
    assert not isinstance(info.value, OfflineRefused)
    assert (info.value.op, info.value.block, info.value.errno) == ("probe", 32, errno.EINVAL)


def test_probe_without_probe_file(sysfs: Path, mem: SysfsMemory) -> None:
    (sysfs / "probe").unlink()
    with pytest.raises(KernelError) as info:
        mem.probe(0x1_0000_0000)
    assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize(
    ("zone", "word"),
    [(Zone.MOVABLE, "online_movable"), (Zone.KERNEL, "online_kernel"), (Zone.AUTO, "online")],
)
def test_online_writes_the_zone_word(sysfs: Path, mem: SysfsMemory, zone: Zone, word: str) -> None:
    state = sysfs / "memory32" / "state"
    state.write_text("")
    mem.online(32, zone)
    assert written(state) == word


def test_offline_writes_offline(sysfs: Path, mem: SysfsMemory) -> None:
    state = sysfs / "memory33" / "state"
    state.write_text("")
    mem.offline(33)
    assert written(state) == "offline"


def test_each_write_is_one_write_call(writes: list[bytes], mem: SysfsMemory) -> None:
    mem.online(32, Zone.MOVABLE)
    assert writes == [b"online_movable"]


@pytest.mark.parametrize("err", [errno.EBUSY, errno.EAGAIN, errno.ENOMEM])
def test_offline_refusal_maps_to_offline_refused(
    monkeypatch: pytest.MonkeyPatch, mem: SysfsMemory, err: int
) -> None:
    fail_writes(monkeypatch, "memory33/state", err)
    with pytest.raises(OfflineRefused) as info:
        mem.offline(33)
    assert (info.value.op, info.value.block, info.value.errno) == ("offline", 33, err)


def test_offline_einval_is_not_a_refusal(monkeypatch: pytest.MonkeyPatch, mem: SysfsMemory) -> None:
    fail_writes(monkeypatch, "memory32/state", errno.EINVAL)
    with pytest.raises(KernelError) as info:
        mem.offline(32)
    assert not isinstance(info.value, OfflineRefused)


def test_online_ebusy_is_not_an_offline_refusal(
    monkeypatch: pytest.MonkeyPatch, mem: SysfsMemory
) -> None:
    fail_writes(monkeypatch, "memory32/state", errno.EBUSY)
    with pytest.raises(KernelError) as info:
        mem.online(32, Zone.MOVABLE)
    assert not isinstance(info.value, OfflineRefused)
    assert (info.value.op, info.value.errno) == ("online", errno.EBUSY)


@pytest.mark.parametrize(
    ("err", "refused"),
    [(errno.EBUSY, True), (errno.ETIMEDOUT, True), (errno.EINVAL, False), (errno.EIO, False)],
)
def test_offline_error(err: int, refused: bool) -> None:
    error = hotplug.offline_error(33, err)
    assert isinstance(error, OfflineRefused) is refused
    assert (error.op, error.block, error.errno) == ("offline", 33, err)


def test_directory_in_place_of_state_file(sysfs: Path, mem: SysfsMemory) -> None:
    state = sysfs / "memory33" / "state"
    state.unlink()
    state.mkdir()
    with pytest.raises(KernelError) as info:
        mem.offline(33)
    assert info.value.errno == errno.EISDIR
    assert not isinstance(info.value, OfflineRefused)


def test_write_to_absent_block_fails(mem: SysfsMemory) -> None:
    with pytest.raises(KernelError) as info:
        mem.online(40, Zone.MOVABLE)
    assert (info.value.block, info.value.errno) == (40, errno.ENOENT)


def test_online_blocks_in_a_region(tmp_path: Path) -> None:
    (tmp_path / "block_size_bytes").write_text(f"{128 << 20:x}\n")
    for index, state in ((32, "online"), (33, "offline"), (40, "online")):
        (tmp_path / f"memory{index}").mkdir()
        (tmp_path / f"memory{index}" / "state").write_text(f"{state}\n")
    memory = hotplug.SysfsMemory(root=tmp_path)
    # Blocks 32..39 cover [4 GiB, 5 GiB); 34..39 are absent, 40 is outside.
    assert memory.online_blocks_in(4 << 30, 1 << 30) == [32]
    assert memory.online_blocks_in(4 << 30, (1 << 30) + 1) == [32, 40]
