"""The harness proven with the in-kernel virtio_mem driver: two devices on two NUMA
nodes, host-side resizes followed on both sides, and system_reset unplugging all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from vmharness import (
    REBOOT_MEMTOTAL_MARGIN,
    GiB,
    GuestCommandError,
    MemDevice,
    MiB,
    TestVM,
    VMConfig,
)

CONFIG = VMConfig(
    name="inkernel-numa",
    cpus=2,
    memory=1 * GiB,
    numa_nodes=2,
    in_kernel_driver=True,
    devices=(
        MemDevice("vm0", size=4 * GiB, block_size=2 * MiB, node=0),
        MemDevice("vm1", size=3 * GiB, block_size=4 * MiB, node=1),
    ),
)
STEPS = (1 * GiB, 2560 * MiB, 512 * MiB, 0)
TIMEOUT = 90.0  # TCG; the in-kernel driver needs well under a second per GiB


BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]


@pytest.fixture(scope="module")
def vm(boot_vm: BootVM) -> Iterator[TestVM]:
    with boot_vm(CONFIG) as v:
        yield v


@pytest.fixture(scope="module")
def base_total(vm: TestVM) -> int:
    """MemTotal with nothing plugged."""
    assert all(d["size"] == 0 for d in vm.query().values())
    return vm.mem_total()


def node_total(vm: TestVM, node: int) -> int:
    """MemTotal of one NUMA node in bytes."""
    for line in vm.read(f"/sys/devices/system/node/node{node}/meminfo").splitlines():
        if "MemTotal:" in line:
            return int(line.split()[-2]) * 1024
    raise AssertionError(f"no MemTotal for node {node}")


def test_boot_sees_two_nodes_and_devices(vm: TestVM) -> None:
    q = vm.query()
    assert {k: (v["type"], v["node"], v["size"]) for k, v in q.items()} == {
        "vm0": ("virtio-mem", 0, 0),
        "vm1": ("virtio-mem", 1, 0),
    }
    assert vm.sh("ls -d /sys/devices/system/node/node*").split() == [
        "/sys/devices/system/node/node0",
        "/sys/devices/system/node/node1",
    ]
    # The in-kernel driver is bound to both devices.
    out = vm.sh("ls /sys/bus/virtio/drivers/virtio_mem/")
    assert out.count("virtio") >= 2, out


@pytest.mark.parametrize("dev,node", [("vm0", 0), ("vm1", 1)])
def test_resize_followed_by_qemu_and_guest(
    vm: TestVM, base_total: int, dev: str, node: int
) -> None:
    base_node = node_total(vm, node)
    for target in STEPS:
        vm.resize(dev, target)
        vm.wait_until(lambda t=target: vm.plugged(dev) == t, TIMEOUT, what=f"{dev} size {target}")
        assert vm.query()[dev]["requested-size"] == target
        vm.wait_until(
            lambda t=target: vm.mem_total() == base_total + t,
            TIMEOUT,
            what=f"guest MemTotal = base + {target >> 20} MiB",
        )
        # The in-kernel driver honours the device's node.
        assert node_total(vm, node) == base_node + target


def test_guest_command_failure_shows_console(vm: TestVM) -> None:
    with pytest.raises(GuestCommandError) as ei:
        vm.sh("echo oops >&2; exit 3")
    msg = str(ei.value)
    assert "rc=3" in msg and "oops" in msg
    assert "guest console (tail)" in msg and "guest_runner: serving" in msg


def test_background_daemon_and_share(vm: TestVM) -> None:
    assert vm.paths is not None
    share = vm.paths.share
    vm.sh(
        "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/ticks; sleep 0.1; done'"
        " >/run/ticker.log 2>&1 </dev/null &"
    )

    def ticks() -> int:
        rc, out = vm.guest("cat /run/ticks 2>/dev/null")
        return int(out.strip()) if rc == 0 and out.strip() else 0

    vm.wait_until(lambda: ticks() >= 3, 30, what="the background ticker")
    vm.sh(f"cp /run/ticks {share}/ticks")
    assert int((share / "ticks").read_text()) >= 3
    vm.sh("pkill -f 'echo \\$i > /run/ticks' || true")


def test_checkout_venv_python_runs_in_guest(vm: TestVM) -> None:
    from vmharness import paths

    py = paths.REPO_ROOT / ".venv" / "bin" / "python"
    if not py.exists():
        pytest.skip("no .venv in the checkout (make venv)")
    out = vm.sh(f"{py} -c 'import sys, click, pyudev; print(sys.prefix)'", timeout=120)
    assert out.strip() == str(paths.REPO_ROOT / ".venv")


def test_system_reset_unplugs_everything(vm: TestVM, base_total: int) -> None:
    vm.resize("vm0", 1 * GiB)
    vm.resize("vm1", 512 * MiB)
    vm.wait_until(lambda: vm.plugged("vm0") == 1 * GiB and vm.plugged("vm1") == 512 * MiB, TIMEOUT)
    old_boot = vm.boot_id
    # Stop the vCPUs so the guest cannot re-plug before we look: QEMU's side only.
    vm.qmp("stop")
    vm.qmp("system_reset")
    vm.wait_until(
        lambda: all(d["size"] == 0 for d in vm.query().values()),
        30,
        what="all sizes 0 after system_reset",
    )
    q = vm.query()
    assert q["vm0"]["requested-size"] == 1 * GiB  # the request survives the reset
    vm.qmp("cont")
    vm.boot_id = vm.wait_ready(120, not_boot=old_boot)
    assert vm.boot_id != old_boot
    # The new boot's in-kernel driver plugs the still-requested sizes again.
    vm.wait_until(lambda: vm.plugged("vm0") == 1 * GiB and vm.plugged("vm1") == 512 * MiB, TIMEOUT)
    # A new boot: its own reservations may differ from the first boot's by a few KiB.
    expected_total = base_total + 1536 * MiB
    vm.wait_until(
        lambda: abs(vm.mem_total() - expected_total) <= REBOOT_MEMTOTAL_MARGIN,
        TIMEOUT,
        what=f"MemTotal within {REBOOT_MEMTOTAL_MARGIN // MiB} MiB of {expected_total}",
    )
    # reset() (the method) does the same and waits for the new boot.
    vm.resize("vm0", 0)
    vm.resize("vm1", 0)
    vm.wait_until(lambda: vm.plugged("vm0") == 0 and vm.plugged("vm1") == 0, TIMEOUT)
    vm.reset()
    assert vm.boot_id not in ("", old_boot)
    assert abs(vm.mem_total() - base_total) <= REBOOT_MEMTOTAL_MARGIN  # another new boot
