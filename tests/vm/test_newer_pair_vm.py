"""The bounded run on the newest pair: QEMU 10.0 (backports) with a Linux 6.12 guest.

``make test`` runs the whole VM suite on the default pair (the host's QEMU 7.2, Linux
6.1) and this module on the other end of the matrix, so every submission proves both:

* the agent follows resizes on two devices whose interrupts arrive on MSI-X (QEMU 10.0
  gives ``virtio-mem-pci`` two vectors; 7.2 has INTx only), with the kernel onlining
  new memory by itself inside the probe (``memhp_default_state=online_movable``; with
  Debian 6.12's ``online`` the kernel may pin a new ZONE_NORMAL block before the agent
  takes it back, see README "Supported QEMU and kernel versions");
* the conformance fuzzer finds QEMU 10.0's device equal to the model;
* the agent, SIGKILLed at random moments, keeps every invariant and recovers.

``make test-matrix`` runs the full suites on all four pairs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import chaos
import pytest
from test_agent_vm import BLOCK_SIZES, run_sequence, two_devices
from test_chaos_vm import check_chaos
from test_conformance_vm import check_qemu_conforms, fuzz_config
from vmharness import NEWER_PAIR, Pair, TestVM, VMConfig
from vmharness.config import userspace_driver_config
from vmharness.guest_agent import AGENT_PID, device_bdfs, status

BootVM = Callable[[VMConfig, Pair], AbstractContextManager[TestVM]]
#: Resizes in test_agent_vm's sequence, each one config interrupt per device.
RESIZES = 4
KILLS = 3
SEED = 20261202
#: How long the idle agent is watched, and the CPU it may use meanwhile (clock ticks
#: of /proc/PID/stat, 100 per second): a loop that polled would use far more.
IDLE_SECONDS = 10.0
IDLE_TICKS_ALLOWED = 5


@pytest.fixture(scope="module")
def msix_vm(boot_vm: BootVM) -> Iterator[TestVM]:
    cfg = userspace_driver_config(
        "newer-agent",
        *two_devices(iommu=False),
        numa_nodes=2,
        # The kernel onlines hot-added memory inside the probe, as Debian's 6.12 does.
        extra_cmdline=("memhp_default_state=online_movable",),
    )
    with boot_vm(cfg, NEWER_PAIR) as vm:
        yield vm


def msix_counts(vm: TestVM) -> dict[str, dict[str, int]]:
    """``{bdf: {"msix0": n, "msix1": n, "intx": n}}`` from the guest's /proc/interrupts."""
    counts: dict[str, dict[str, int]] = {}
    for line in vm.read("/proc/interrupts").splitlines():
        found = re.search(r"vfio-(msix\[(\d)\]|intx)\(([0-9a-f:.]+)\)", line)
        if not found:
            continue
        fields = line.split()
        total = sum(int(word) for word in fields[1:] if word.isdigit())
        name = f"msix{found.group(2)}" if found.group(2) is not None else "intx"
        counts.setdefault(found.group(3), {})[name] = total
    return counts


def cpu_ticks(vm: TestVM, pid: str) -> int:
    """utime + stime of ``pid`` in clock ticks (proc(5): fields 14 and 15)."""
    fields = vm.read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_the_agent_follows_resizes_with_msix_interrupts(msix_vm: TestVM) -> None:
    vm = msix_vm
    assert vm.qemu_version.startswith("10.0")
    assert vm.sh("uname -r").startswith("6.12")
    assert vm.read("/sys/devices/system/memory/auto_online_blocks").strip() == "online_movable"
    run_sequence(vm, "--noiommu", after=lambda: check_msix(vm))


def check_msix(vm: TestVM) -> None:
    """Called with the agent still running, converged on the last size (0)."""
    bdfs = device_bdfs(vm)
    counts = msix_counts(vm)
    for dev_id in BLOCK_SIZES:
        bdf = bdfs[dev_id]
        seen = counts.get(bdf, {})
        assert "intx" not in seen, counts
        # Vector 0 carries the config changes: one per resize of the sequence.
        assert seen.get("msix0", 0) >= RESIZES, counts
        assert seen.get("msix1", 0) >= 1, counts
    devices = status(vm)
    for bdf in bdfs.values():
        assert devices[bdf]["interrupts"] == "MSI-X"
        assert "UNPLUGGED_INACCESSIBLE" in devices[bdf]["device_features"]
    pid = vm.read(AGENT_PID).strip()
    before = cpu_ticks(vm, pid)
    time.sleep(IDLE_SECONDS)
    used = cpu_ticks(vm, pid) - before
    assert used <= IDLE_TICKS_ALLOWED, f"the idle agent used {used} ticks in {IDLE_SECONDS} s"


@pytest.fixture(scope="module")
def fuzz_vm(boot_vm: BootVM) -> Iterator[TestVM]:
    with boot_vm(fuzz_config("newer-conformance"), NEWER_PAIR) as vm:
        yield vm


def test_qemu_10_conforms_to_the_model(fuzz_vm: TestVM) -> None:
    assert fuzz_vm.qemu_version.startswith("10.0")
    check_qemu_conforms(fuzz_vm)


@pytest.fixture(scope="module")
def chaos_vm(boot_vm: BootVM) -> Iterator[TestVM]:
    with boot_vm(chaos.chaos_config(devices=1, name="newer-chaos"), NEWER_PAIR) as booted:
        yield booted


def test_sigkill_on_qemu_10_keeps_invariants_and_recovers(chaos_vm: TestVM) -> None:
    check_chaos(chaos_vm, SEED, KILLS, resets=0)
