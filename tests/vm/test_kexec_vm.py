"""kexec and kdump after the agent shrinks a device (issue 22, item 4; docs/kexec.md).

The agent grows a 4 GiB device to 1 GiB and shrinks it to 0 in a guest booted with
``crashkernel=128M`` (scripts/kexec_show.py). The memmap entries and plain "System
RAM" resources that probe created stay after the shrink, with every block offline
and unplugged; kexec-tools 2.0.25 loads the guest's kernel as a kexec image and as a
crash kernel and reads them as RAM; doctor reports it, and the agent warns at start
when an image is loaded. 38 s on the default pair (part of ``make test``): every
read is one guest process, since each one forks off the 9p root under TCG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import kexec_show
import pytest
from vmharness import TestVM, VMConfig
from vmharness.kexec_tools import kexec_tools_root

BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]
BLOCKS = kexec_show.GROWN // kexec_show.MEMORY_BLOCK


@pytest.fixture(scope="module")
def shown(boot_vm: BootVM) -> Iterator[kexec_show.Shown]:
    root = kexec_tools_root()
    with boot_vm(kexec_show.config()) as vm:
        yield kexec_show.show(vm, root)


def grown_blocks(shown: kexec_show.Shown) -> list[tuple[int, int]]:
    start = shown.region[0]
    size = kexec_show.MEMORY_BLOCK
    return [(start + i * size, start + (i + 1) * size - 1) for i in range(BLOCKS)]


def test_probe_entries_outlive_the_shrink(shown: kexec_show.Shown) -> None:
    start, end = shown.region
    assert shown.phases["boot"].in_region(start, end) == ([], [])
    for phase in ("grown", "shrunk"):
        memmap, iomem = shown.phases[phase].in_region(start, end)
        assert [kexec_show._range_of(line) for line in memmap] == grown_blocks(shown), phase
        assert [kexec_show._range_of(line) for line in iomem] == grown_blocks(shown), phase
        assert all(line.endswith(" System RAM") for line in memmap + iomem), phase
    states = shown.states.splitlines()
    assert len(states) == BLOCKS and all(line.endswith(" offline") for line in states)


def test_kexec_tools_takes_unplugged_device_memory_as_ram(shown: kexec_show.Shown) -> None:
    assert shown.device_ranges(shown.kexec_ranges) == grown_blocks(shown)
    assert shown.device_ranges(shown.crash_ranges) == grown_blocks(shown)


def test_doctor_and_the_agent_say_so(shown: kexec_show.Shown) -> None:
    assert shown.doctor["status"] == "missing"
    assert "8 /sys/firmware/memmap RAM entries (1GiB)" in shown.doctor["detail"]
    assert "a kexec image and a crash kernel loaded" in shown.doctor["detail"]
    assert "WARNING" in shown.warning
    assert "a kexec image and a crash kernel loaded: memory the agent adds" in shown.warning
