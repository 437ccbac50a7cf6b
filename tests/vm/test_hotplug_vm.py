"""A virtio-mem device hot-plugged behind a PCIe root port, served, emptied and
hot-unplugged while the agent runs (QEMU 10.0 + Linux 6.12).

The agent runs without ``--device`` (every virtio-mem device, those added later too).
QMP ``object-add`` + ``device_add`` put a second ``virtio-mem-pci`` behind a
``pcie-root-port``; the guest's PCIe hotplug driver adds the function, the kernel's
``add`` uevent reaches the agent (vmem_guest/pci_events.py), which binds it to
vfio-pci, attaches it and follows its resizes. Taken back to 0, it is ``device_del``'d:
QEMU lets a virtio-mem device go only with nothing plugged; the guest removes the
function, and vfio-pci's removal waits until userspace gives the device back, asking
through VFIO's request index; the agent closes the tracker and the device, the removal
completes, and the first device is still served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
from vmharness import NEWER_PAIR, GiB, MemDevice, MiB, Pair, TestVM, VMConfig
from vmharness.config import userspace_driver_config
from vmharness.guest_agent import AGENT_LOG, agent_died, agent_running, cli_json, status

BootVM = Callable[[VMConfig, Pair], AbstractContextManager[TestVM]]
HOTPLUG_ID = "hp0"
HOTPLUG_SIZE = 1 * GiB
BLOCK = 2 * MiB


def hotplug_config() -> VMConfig:
    cfg = userspace_driver_config("hotplug", MemDevice("vm0", size=1 * GiB, block_size=BLOCK))
    return VMConfig(
        **{
            **cfg.__dict__,
            # Room for the device added later, plus QEMU's 1 GiB of alignment slack.
            "maxmem": cfg.memory + 1 * GiB + HOTPLUG_SIZE + 1 * GiB,
            # q35 hot-plugs through ACPI by default; off, the guest's native PCIe hotplug
            # driver (pciehp, CONFIG_HOTPLUG_PCI_PCIE) gets the slot from _OSC.
            "extra_qemu_args": (
                *("-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"),
                *("-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1"),
            ),
        }
    )


@pytest.fixture(scope="module")
def vm(boot_vm: BootVM) -> Iterator[TestVM]:
    with boot_vm(hotplug_config(), NEWER_PAIR) as booted:
        yield booted


def devices(vm: TestVM) -> dict[str, dict[str, Any]]:
    """``vmem-guest status --json`` (every tracker in the state directory) by BDF."""
    return status(vm)


def pci_functions(vm: TestVM) -> set[str]:
    """``vmem-guest devices --json``: the virtio-mem PCI functions the guest has."""
    return {dev["bdf"] for dev in cli_json(vm, "devices")}


def peripherals(vm: TestVM) -> set[str]:
    return {item["name"] for item in vm.qmp("qom-list", path="/machine/peripheral")}


def hotplug(vm: TestVM) -> str:
    """object-add + device_add behind the root port; the new BDF once the agent serves it."""
    before = set(devices(vm))
    vm.qmp(
        "object-add", **{"qom-type": "memory-backend-ram", "id": "mem-hp0", "size": HOTPLUG_SIZE}
    )
    vm.qmp(
        "device_add",
        driver="virtio-mem-pci",
        id=HOTPLUG_ID,
        memdev="mem-hp0",
        bus="rp1",
        **{"block-size": BLOCK, "requested-size": 0},
    )
    vm.wait_until(lambda: len(devices(vm)) == len(before) + 1, timeout=120, what="the new device")
    (bdf,) = set(devices(vm)) - before
    return bdf


def test_a_hot_plugged_device_is_served_and_released(vm: TestVM) -> None:
    vm.resize("vm0", 0)
    with agent_running(vm, "--noiommu"):
        bdf = hotplug(vm)
        assert f"{bdf}: virtio-mem device hot-plugged" in vm.read(AGENT_LOG)
        assert devices(vm)[bdf]["interrupts"] == "MSI-X"
        vm.resize(HOTPLUG_ID, 256 * MiB)
        vm.wait_until(lambda: vm.plugged(HOTPLUG_ID) == 256 * MiB, timeout=120, what="the plug")
        vm.resize(HOTPLUG_ID, 0)
        vm.wait_until(lambda: vm.plugged(HOTPLUG_ID) == 0, timeout=120, what="the unplug")
        vm.wait_until(lambda: devices(vm)[bdf]["online_size"] == 0, timeout=60, what="offline")
        vm.qmp("device_del", id=HOTPLUG_ID)
        # pciehp waits 5 s after the attention button; vfio-pci then waits for us.
        vm.wait_until(lambda: HOTPLUG_ID not in peripherals(vm), timeout=120, what="device_del")
        log = vm.read(AGENT_LOG)
        assert f"{bdf}: device released (hot-unplug); 1 device(s) served" in log
        assert "still plugged" not in log
        assert not agent_died(vm)
        assert bdf not in pci_functions(vm)
        assert vm.guest(f"test -e /sys/bus/pci/devices/{bdf}")[0] != 0
        assert devices(vm)[bdf]["plugged_size"] == 0  # its tracker, closed, says so
        # The first device is served as before.
        vm.resize("vm0", 256 * MiB)
        vm.wait_until(lambda: vm.plugged("vm0") == 256 * MiB, timeout=120, what="vm0's plug")
