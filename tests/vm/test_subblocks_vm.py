"""Subblocks of online blocks in a real guest: exact shrink, holes, give-back.

The agent shrinks to sizes that are not whole 128 MiB memory blocks by taking
single 2 MiB (or 4 MiB) subblocks of an online block out of use (soft offline,
checked in /proc/kpageflags) and unplugging them; it gives them back on re-plug.
What a user would check (docs/design.md, "Subblocks of online blocks"):

* QEMU's ``size`` ends exactly on the request;
* every unplugged subblock under an online block has every page HWPOISON and
  STATE says UNPLUGGED; a process holding memory there keeps its data;
* giving back: ``HardwareCorrupted`` and MemTotal are as before;
* with 4 MiB blocks, the seed's sizes end exactly on target at every shrink.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig, userspace_driver_config
from vmharness.guest_agent import (
    VMEM_GUEST,
    settled,
    start_agent,
    state,
    status_devices,
    stop_agent,
)

BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]
DEV = "vm0"
PAGE = 4096
KPF_HWPOISON = 19
GUEST_PYTHON = VMEM_GUEST.rsplit("/", 1)[0] + "/python"
HOLDER = Path(__file__).resolve().parents[2] / "scripts" / "vmharness" / "page_holder.py"
HOLD_DIR = "/run/tmp/holder"


@pytest.fixture(scope="module")
def vm(boot_vm: BootVM) -> Iterator[TestVM]:
    cfg = userspace_driver_config("subblocks", MemDevice(DEV, size=4 * GiB, block_size=2 * MiB))
    with boot_vm(cfg) as booted:
        start_agent(booted)
        yield booted
        stop_agent(booted)


def the_device(vm: TestVM) -> dict[str, Any]:
    (dev,) = status_devices(vm)
    assert isinstance(dev, dict)
    return dev


def converge(vm: TestVM, device: str, size: int, plugged: int, timeout: float = 300) -> None:
    """Resize ``device`` and wait for QEMU's size to reach ``plugged`` and the tracker to settle."""
    vm.resize(device, size)
    vm.wait_until(
        lambda: vm.plugged(device) == plugged, timeout=timeout, what=f"{device} size {plugged}"
    )
    vm.wait_until(
        lambda: all(settled(d) for d in status_devices(vm)),
        timeout=60,
        what="the tracker to settle",
    )


def meminfo(vm: TestVM, key: str) -> int:
    """A /proc/meminfo figure of the guest, in bytes."""
    return vm.meminfo()[key]


def poisoned_pages(vm: TestVM, ranges: list[tuple[int, int]]) -> list[int]:
    """For each (first pfn, count): how many of those pages the guest kernel shows
    HWPOISON. One guest process for all of them (a Python start-up costs seconds
    under TCG)."""
    script = (
        "import json,os,struct,sys;"
        "fd=os.open('/proc/kpageflags',os.O_RDONLY);"
        f"print(json.dumps([sum(v>>{KPF_HWPOISON}&1 for (v,) in"
        " struct.iter_unpack('=Q',os.pread(fd,c*8,f*8))) for f,c in json.loads(sys.argv[1])]))"
    )
    out = vm.sh(f"{GUEST_PYTHON} -c {shlex.quote(script)} {shlex.quote(json.dumps(ranges))}")
    counts = json.loads(out.strip())
    assert isinstance(counts, list) and len(counts) == len(ranges), out
    return [int(count) for count in counts]


def start_holder(vm: TestVM, mib: int) -> list[int]:
    """A guest process holding ``mib`` MiB with a pattern; the frames it sits on."""
    vm.sh(f"rm -rf {HOLD_DIR} && mkdir -p {HOLD_DIR}")
    vm.sh(
        f"setsid {GUEST_PYTHON} {HOLDER} {mib} {HOLD_DIR}/h </dev/null >{HOLD_DIR}/log 2>&1 &"
        f" echo $! >{HOLD_DIR}/pid"
    )
    vm.wait_until(
        lambda: vm.guest(f"test -e {HOLD_DIR}/h.ready")[0] == 0, timeout=120, what="holder"
    )
    pfns = json.loads(vm.read(f"{HOLD_DIR}/h.pfns"))
    assert isinstance(pfns, list)
    return pfns


def check_holder(vm: TestVM) -> dict[str, Any]:
    vm.sh(f"rm -f {HOLD_DIR}/h.check; kill -USR1 $(cat {HOLD_DIR}/pid)")
    vm.wait_until(
        lambda: vm.guest(f"test -e {HOLD_DIR}/h.check")[0] == 0, timeout=120, what="check"
    )
    result = json.loads(vm.read(f"{HOLD_DIR}/h.check"))
    assert isinstance(result, dict)
    return result


def hole_subblocks(dev: dict[str, Any]) -> list[tuple[int, int]]:
    """(memory block, subblock index inside it) of every hole the tracker shows."""
    return [
        (entry["index"], offset)
        for entry in dev["holed_blocks"]
        for offset, glyph in enumerate(entry["subblocks"])
        if glyph == "."
    ]


def test_shrink_to_1000m_is_exact_and_every_hole_is_poisoned_and_unplugged(vm: TestVM) -> None:
    converge(vm, DEV, 3 * GiB, 3 * GiB)
    before_total = meminfo(vm, "MemTotal")
    before_corrupted = meminfo(vm, "HardwareCorrupted")
    # Fill most of the device memory that will stay online, so that the subblocks
    # to be taken hold the process's pages: 3G -> 1G (whole blocks), then 1010 MiB
    # (the allocator fills the 1 GiB of device memory from its lowest pages up).
    converge(vm, DEV, 1 * GiB, 1 * GiB)
    held = start_holder(vm, 1010)

    converge(vm, DEV, 1000 * MiB, 1000 * MiB)
    assert vm.plugged(DEV) == 1000 * MiB  # QEMU's size: exactly what the host asked

    dev = the_device(vm)
    block_size, memory_block = dev["block_size"], dev["memory_block_size"]
    assert dev["plugged_size"] == 1000 * MiB
    assert dev["hole_bytes"] == 24 * MiB
    holes = hole_subblocks(dev)
    assert len(holes) == 12
    region_first_sb_addr = dev["addr"]
    pages_per_subblock = block_size // PAGE
    hole_pfns: set[int] = set()
    addrs = [mb * memory_block + offset * block_size for mb, offset in holes]
    # Every page of every hole is poisoned: the kernel never hands it out.
    poisoned = poisoned_pages(vm, [(addr // PAGE, pages_per_subblock) for addr in addrs])
    assert poisoned == [pages_per_subblock] * len(holes), poisoned
    for addr in addrs:
        # And the device says it is unplugged.
        assert state(vm, dev["device"], addr, 1) == "UNPLUGGED"
        assert addr >= region_first_sb_addr
        first_pfn = addr // PAGE
        hole_pfns.update(range(first_pfn, first_pfn + pages_per_subblock))

    # HardwareCorrupted rises by the holes; MemTotal does not fall for them.
    assert meminfo(vm, "HardwareCorrupted") - before_corrupted == 24 * MiB
    # 3G -> 1000M offlined 16 whole blocks (2 GiB); the 8th block stays online.
    after_total = meminfo(vm, "MemTotal")
    assert before_total - after_total == 16 * 128 * MiB, (before_total, after_total)

    # The process kept every byte, and none of its pages sits in a hole.
    result = check_holder(vm)
    assert result["bad"] == 0
    assert not hole_pfns.intersection(result["pfns"])
    moved = sum(1 for old, new in zip(held, result["pfns"], strict=True) if old != new)
    were_in_holes = len(hole_pfns & set(held))
    print(f"holder: {len(held)} pages, {moved} moved, {were_in_holes} were in the holes")
    assert were_in_holes > 0, "the process held no page of the subblocks taken: nothing proven"

    # Give back: 1000M -> 1G fills the holes (PLUG, then unpoison).
    converge(vm, DEV, 1 * GiB, 1 * GiB)
    dev = the_device(vm)
    assert dev["hole_bytes"] == 0
    assert meminfo(vm, "HardwareCorrupted") == before_corrupted
    assert meminfo(vm, "MemTotal") == after_total
    assert check_holder(vm)["bad"] == 0
    vm.sh(f"kill $(cat {HOLD_DIR}/pid)")
    converge(vm, DEV, 0, 0)


@pytest.fixture(scope="module")
def big_vm(boot_vm: BootVM, vm: TestVM) -> Iterator[TestVM]:
    """The seed's example at its own scale: 4 MiB blocks in a 64 GiB region.

    Depends on ``vm`` so the two guests of this module never run side by side.
    """
    cfg = VMConfig(
        name="subblocks-4m",
        memory=2 * GiB,  # the memmap of 40 GiB online takes 640 MiB of it
        in_kernel_driver=False,
        noiommu=True,
        devices=(MemDevice(DEV, size=64 * GiB, block_size=4 * MiB, reserve=False),),
    )
    stop_agent(vm)
    with boot_vm(cfg) as booted:
        start_agent(booted)
        yield booted
        stop_agent(booted)


#: (requested, QEMU size the agent ends on): growth adds whole 128 MiB blocks (4160M
#: is 32.5 of them), every shrink ends exactly on the request (4 MiB subblocks).
SEED_STEPS = [
    (4160 * MiB, 4096 * MiB),
    (40960 * MiB, 40960 * MiB),
    (1024 * MiB, 1024 * MiB),
    (1000 * MiB, 1000 * MiB),
    (4160 * MiB, 4096 * MiB),  # the 6 holes come back first, then 24 whole blocks
    (2 * GiB - 4 * MiB, 2 * GiB - 4 * MiB),
]


def test_the_seeds_sizes_with_4m_blocks_end_exactly_on_every_shrink(big_vm: TestVM) -> None:
    for requested, expected in SEED_STEPS:
        converge(big_vm, DEV, requested, expected, timeout=900)
        dev = the_device(big_vm)
        assert dev["plugged_size"] == expected
        assert dev["remainder"] == requested - expected
        assert dev["hole_bytes"] == dev["online_size"] - expected
        print(
            f"requested {requested // MiB}M -> QEMU {big_vm.plugged(DEV) // MiB}M,"
            f" holes {dev['hole_bytes'] // MiB}M, remainder {dev['remainder'] // MiB}M"
        )
    converge(big_vm, DEV, 0, 0, timeout=900)
