"""kexec_exposure against fake /sys/firmware/memmap, /proc/iomem and kexec flags, and
the doctor's "kexec and kdump" check over them."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmem_guest import kexec_exposure
from vmem_guest.kexec_exposure import LoadedImages, Span

GIB = 1 << 30
MIB = 1 << 20
#: A device region as in the test VM: 4 GiB at 4 GiB.
REGION = Span(4 * GIB, 8 * GIB - 1)
BOOT = (0x100000, 0x7FFDFFFF, "System RAM")


def write_memmap(sys_root: Path, entries: list[tuple[int, int, str]]) -> None:
    """/sys/firmware/memmap/N/{start,end,type} as drivers/firmware/memmap.c shows them
    (``0x%llx``, end inclusive)."""
    root = sys_root / "firmware/memmap"
    root.mkdir(parents=True, exist_ok=True)
    first = len(list(root.iterdir()))
    for index, (start, end, kind) in enumerate(entries, start=first):
        entry = root / str(index)
        entry.mkdir()
        (entry / "start").write_text(f"{start:#x}\n")
        (entry / "end").write_text(f"{end:#x}\n")
        (entry / "type").write_text(f"{kind}\n")


def write_iomem(proc_root: Path, entries: list[tuple[int, int, str]], indent: str = "") -> None:
    """Lines of /proc/iomem (``%0*llx-%0*llx : name``, children indented), appended."""
    proc_root.mkdir(parents=True, exist_ok=True)
    with (proc_root / "iomem").open("a") as out:
        for start, end, name in entries:
            out.write(f"{indent}{start:08x}-{end:08x} : {name}\n")


def write_loaded(sys_root: Path, *, kexec: bool, crash: bool) -> None:
    kernel = sys_root / "kernel"
    kernel.mkdir(parents=True, exist_ok=True)
    (kernel / "kexec_loaded").write_text(f"{int(kexec)}\n")
    (kernel / "kexec_crash_loaded").write_text(f"{int(crash)}\n")


def block(index: int) -> tuple[int, int, str]:
    """The ``index``-th 128 MiB memory block of REGION as probe adds it."""
    start = REGION.start + index * 128 * MIB
    return (start, start + 128 * MIB - 1, "System RAM")


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    sys_root, proc_root = tmp_path / "sys", tmp_path / "proc"
    write_memmap(sys_root, [BOOT, (0xFFFC0000, 0xFFFFFFFF, "Reserved")])
    write_iomem(proc_root, [(0, 0xFFF, "Reserved"), BOOT])
    write_iomem(proc_root, [(0x1000000, 0x1FFFFFF, "Kernel code")], indent="  ")
    return sys_root, proc_root


def test_memmap_ram_reads_ram_entries_sorted_with_inclusive_ends(
    roots: tuple[Path, Path],
) -> None:
    sys_root, _ = roots
    write_memmap(sys_root, [block(1), block(0)])
    assert kexec_exposure.memmap_ram(sys_root) == [
        Span(0x100000, 0x7FFDFFFF),
        Span(*block(0)[:2]),
        Span(*block(1)[:2]),
    ]
    assert Span(*block(0)[:2]).size == 128 * MIB


def test_memmap_ram_is_none_without_the_directory(tmp_path: Path) -> None:
    assert kexec_exposure.memmap_ram(tmp_path) is None


def test_iomem_matches_plain_system_ram_only_nested_or_not(roots: tuple[Path, Path]) -> None:
    _, proc_root = roots
    write_iomem(proc_root, [block(0), (block(1)[0], block(1)[1], "System RAM (virtio_mem)")])
    write_iomem(proc_root, [block(2)], indent="  ")
    assert kexec_exposure.iomem_plain_ram(proc_root) == [
        Span(0x100000, 0x7FFDFFFF),
        Span(*block(0)[:2]),
        Span(*block(2)[:2]),
    ]


def test_iomem_read_without_privilege_tells_nothing(tmp_path: Path) -> None:
    write_iomem(tmp_path, [(0, 0, "System RAM"), (0, 0, "System RAM")])
    assert kexec_exposure.iomem_plain_ram(tmp_path) is None
    assert kexec_exposure.iomem_plain_ram(tmp_path / "absent") is None


def test_boot_memory_alone_is_not_exposed(roots: tuple[Path, Path]) -> None:
    exposure = kexec_exposure.examine([REGION], *roots)
    assert exposure is not None
    assert not exposure.exposed
    assert exposure.summary().startswith("no memmap entry")


def test_probed_blocks_stay_exposed_in_memmap_and_iomem(roots: tuple[Path, Path]) -> None:
    sys_root, proc_root = roots
    write_memmap(sys_root, [block(0), block(1)])
    write_iomem(proc_root, [block(0), block(1)])
    exposure = kexec_exposure.examine([REGION], sys_root, proc_root)
    assert exposure is not None and exposure.exposed
    assert exposure.memmap == exposure.iomem == (Span(*block(0)[:2]), Span(*block(1)[:2]))
    summary = exposure.summary()
    assert "2 /sys/firmware/memmap RAM entries (256MiB)" in summary
    assert "2 plain 'System RAM' ranges in /proc/iomem (256MiB)" in summary
    assert "a kexec'd kernel would boot with them as RAM" in summary


def test_driver_managed_ram_is_not_counted(roots: tuple[Path, Path]) -> None:
    sys_root, proc_root = roots
    write_iomem(proc_root, [(block(0)[0], block(0)[1], "System RAM (virtio_mem)")])
    exposure = kexec_exposure.examine([REGION], sys_root, proc_root)
    assert exposure is not None and not exposure.exposed


def test_a_loaded_crash_kernel_is_named_stale_when_exposed(roots: tuple[Path, Path]) -> None:
    sys_root, proc_root = roots
    write_memmap(sys_root, [block(0)])
    write_loaded(sys_root, kexec=False, crash=True)
    exposure = kexec_exposure.examine([REGION], sys_root, proc_root)
    assert exposure is not None
    assert exposure.images == LoadedImages(kexec=False, crash=True)
    assert "a crash kernel loaded (its memory map may name memory unplugged since)" in (
        exposure.summary()
    )


def test_nothing_readable_is_none(tmp_path: Path) -> None:
    assert kexec_exposure.examine([REGION], tmp_path / "sys", tmp_path / "proc") is None


@pytest.mark.parametrize(
    ("kexec", "crash", "named"),
    [(True, False, "a kexec image loaded"), (False, True, "a crash kernel loaded")],
)
def test_the_agent_warns_at_start_when_an_image_is_loaded(
    tmp_path: Path, kexec: bool, crash: bool, named: str
) -> None:
    write_loaded(tmp_path, kexec=kexec, crash=crash)
    (warning,) = kexec_exposure.startup_warnings(tmp_path)
    assert warning.startswith(named)
    assert "reboot rather than kexec" in warning


def test_no_warning_when_nothing_is_loaded(tmp_path: Path) -> None:
    write_loaded(tmp_path, kexec=False, crash=False)
    assert kexec_exposure.startup_warnings(tmp_path) == []
    assert kexec_exposure.startup_warnings(tmp_path / "no-kexec") == []
