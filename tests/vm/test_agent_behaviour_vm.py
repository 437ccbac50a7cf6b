"""The agent in a real guest: recovery, manual mode, idleness, memory pressure.

One VM (no-IOMMU, one 4 GiB device with 2 MiB blocks) serves every test of this
module; each test leaves the device unplugged and the agent stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig, userspace_driver_config
from vmharness.guest_agent import (
    AGENT_LOG,
    AGENT_PID,
    VMEM_GUEST,
    agent_died,
    agent_log,
    cli,
    cli_results,
    start_agent,
    status,
    stop_agent,
)
from vmharness.guest_agent import (
    settled as agent_settled,
)

GUEST_PYTHON = VMEM_GUEST.rsplit("/", 1)[0] + "/python"
BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]
DEV = "vm0"
#: Ticks (1/100 s) of CPU an idle agent may use in IDLE_SECONDS: "close to zero".
IDLE_SECONDS = 30
IDLE_TICKS_ALLOWED = 10


@pytest.fixture(scope="module")
def vm(boot_vm: BootVM) -> Iterator[TestVM]:
    cfg = userspace_driver_config(
        "agent-behaviour", MemDevice(DEV, size=4 * GiB, block_size=2 * MiB)
    )
    with boot_vm(cfg) as booted:
        yield booted


@pytest.fixture
def clean(vm: TestVM) -> Iterator[TestVM]:
    """Start from nothing plugged; stop whatever agent the test left and unplug."""
    yield vm
    if not agent_died(vm):
        stop_agent(vm)
    vm.resize(DEV, 0)
    start_agent(vm)
    vm.wait_until(lambda: vm.plugged(DEV) == 0, timeout=240, what="cleanup to unplug")
    stop_agent(vm)


def region_addr(vm: TestVM) -> int:
    return int(vm.query()[DEV]["memaddr"])


def the_device(vm: TestVM) -> dict[str, object]:
    (dev,) = status(vm).values()
    return dev


def converge(vm: TestVM, size: int, timeout: float = 240) -> dict[str, object]:
    """Resize and wait until QEMU and the tracker both show ``size`` plugged and online."""
    vm.resize(DEV, size)
    vm.wait_until(lambda: vm.plugged(DEV) == size, timeout=timeout, what=f"QEMU size {size}")

    def settled() -> dict[str, object] | None:
        dev = the_device(vm)
        return dev if dev["online_size"] == size and agent_settled(dev) else None

    return vm.wait_until(settled, timeout=60, what="the tracker to settle")


def test_restart_with_plugged_memory_and_nothing_online_unplugs_all(clean: TestVM) -> None:
    vm = clean
    start_agent(vm)
    dev = converge(vm, 512 * MiB)
    stop_agent(vm, "KILL")  # no chance to tidy up
    for block in dev["online_blocks"]:  # type: ignore[attr-defined]
        vm.sh(f"echo offline > /sys/devices/system/memory/memory{block['index']}/state")
    vm.sh("rm -f /run/vmem-guest/*.state")
    assert vm.plugged(DEV) == 512 * MiB  # plugged, and nobody uses it
    start_agent(vm)
    vm.wait_until(lambda: "UNPLUG_ALL" in vm.read(AGENT_LOG), timeout=60, what="UNPLUG_ALL")
    dev = converge(vm, 512 * MiB)  # and then it follows the host again
    assert dev["plugged_size"] == 512 * MiB
    stop_agent(vm)


def test_manual_mode_and_direct_commands(clean: TestVM) -> None:
    vm = clean
    base = region_addr(vm)
    vm.resize(DEV, 1 * GiB)  # the device NACKs plugs beyond requested-size
    start_agent(vm, "--noiommu --manual")
    cli(vm, "plug 256M")
    assert vm.plugged(DEV) == 256 * MiB
    # The agent's answers, each command through the CLI's entry point, in one process.
    states = cli_results(
        vm,
        [
            f"state --addr {base:#x} --blocks 128",
            f"state --addr {base + 256 * MiB:#x} --blocks 64",
            f"state --addr {base + 128 * MiB:#x} --blocks 128",
        ],
    )
    assert states == [(0, f"{state}\n", "") for state in ("PLUGGED", "UNPLUGGED", "MIXED")]
    assert vm.plugged(DEV) == 256 * MiB  # manual mode: the agent ignored requested-size
    (unplugged, plugged, emptied) = cli_results(
        vm,
        [
            "unplug 256M --json",
            f"plug --addr {base + 512 * MiB:#x} --blocks 64 --json",
            "unplug-all",
        ],
    )
    assert (unplugged[0], plugged[0], emptied[0]) == (0, 0, 0), (unplugged, plugged, emptied)
    assert json.loads(unplugged[1])["plugged_size"] == 0
    result = json.loads(plugged[1])
    assert result["plugged_size"] == result["online_size"] == 128 * MiB
    assert vm.plugged(DEV) == 0
    stop_agent(vm)
    # No agent: the commands take the device lock and act directly.
    cli(vm, "plug 128M --noiommu")
    assert vm.plugged(DEV) == 128 * MiB
    assert the_device(vm)["online_size"] == 128 * MiB
    rc, out = vm.guest(f"{VMEM_GUEST} plug 12Q")
    assert rc == 2 and out.strip().count("\n") == 0, out
    cli(vm, "unplug-all --noiommu")
    assert vm.plugged(DEV) == 0


def agent_cpu_ticks(vm: TestVM) -> int:
    fields = vm.read(f"/proc/{vm.read(AGENT_PID).strip()}/stat").rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


def test_idle_agent_uses_no_cpu(clean: TestVM) -> None:
    vm = clean
    start_agent(vm)
    converge(vm, 256 * MiB)
    before = agent_cpu_ticks(vm)
    vm.sh(f"sleep {IDLE_SECONDS}", timeout=IDLE_SECONDS + 30)
    used = agent_cpu_ticks(vm) - before
    assert used <= IDLE_TICKS_ALLOWED, f"idle agent used {used} ticks in {IDLE_SECONDS} s"
    stop_agent(vm)


#: A guest process that holds memory the kernel cannot migrate: every page it
#: vmsplices into a pipe nobody reads keeps an extra reference, so offlining the
#: memory block under it retries migration until the agent's deadline.
HOG = """
import ctypes, fcntl, mmap, os, signal
size, stride = {size}, {stride}
memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for offset in range(0, size, 4096):
    memory[offset] = 1
reader, writer = os.pipe()
fcntl.fcntl(writer, 1031, size // stride * 4096)  # F_SETPIPE_SZ: one slot per page
libc = ctypes.CDLL(None, use_errno=True)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
for offset in range(0, size, stride):
    if libc.vmsplice(writer, ctypes.byref(iovec(base + offset, 4096)), 1, 0) != 4096:
        raise OSError(ctypes.get_errno(), "vmsplice")
open("/run/hog.ready", "w").close()
signal.pause()
"""


def test_shrink_while_a_process_holds_memory_converges_as_far_as_the_guest_allows(
    clean: TestVM,
) -> None:
    vm = clean
    start_agent(vm, "--noiommu --offline-timeout 2")
    converge(vm, 2 * GiB)
    vm.sh(f"cat > /run/hog.py <<'EOF'\n{HOG.format(size=768 * MiB, stride=2 * MiB)}EOF")
    vm.sh(
        f"setsid {GUEST_PYTHON} /run/hog.py >/run/hog.log 2>&1 </dev/null & echo $! >/run/hog.pid"
    )
    vm.wait_until(lambda: vm.guest("test -e /run/hog.ready")[0] == 0, timeout=300, what="hog")
    try:
        shrink_around_the_hog(vm)
    finally:
        vm.guest("kill $(cat /run/hog.pid)")  # the cleanup can unplug everything only then
    vm.wait_until(lambda: vm.plugged(DEV) == 0, timeout=300, what="full shrink after the hog")
    # Blocks that refused to offline gave their subblocks one by one; once only holes,
    # they stay online (never offlined while holding poisoned pages), every subblock
    # of them a hole: online memory is exactly the holes.
    vm.wait_until(
        lambda: (dev := the_device(vm))["online_size"] == dev["hole_bytes"],
        timeout=300,
        what="only blocks of holes online",
    )
    stop_agent(vm)


def shrink_around_the_hog(vm: TestVM) -> None:
    """Shrink to 0 while the hog holds its pages: only what the kernel lets go goes."""
    vm.resize(DEV, 0)
    # Blocks without held pages go; the others refuse (deadline) and are retried
    # with backoff; nothing the device would refuse is ever sent.
    vm.wait_until(lambda: the_device(vm)["retries"] >= 4, timeout=300, what="refusals")

    def settled() -> dict[str, object] | None:
        """The agent has gone as far as the guest allows: QEMU's size and the tracker
        agree and stay put (subblocks with a held page refuse, one by one)."""
        first = the_device(vm)
        if first["intent"] is not None or vm.plugged(DEV) != first["plugged_size"]:
            return None
        again = the_device(vm)
        return again if again["plugged_size"] == first["plugged_size"] else None

    dev = vm.wait_until(settled, timeout=600, what="the agent to settle around the hog")
    assert dev["broken"] is False
    assert 0 < vm.plugged(DEV) == dev["plugged_size"] < 2 * GiB
    # Nothing plugged and left unused, but the one block between offline and unplug.
    assert dev["plugged_size"] - dev["online_size"] <= 128 * MiB
    assert "ETIMEDOUT" in vm.read(AGENT_LOG)
    assert not agent_died(vm), agent_log(vm)
