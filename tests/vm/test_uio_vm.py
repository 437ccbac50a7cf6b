"""The agent through UIO (docs/uio.md): a guest whose VFIO cannot take the device
(no IOMMU, no no-IOMMU mode), the function handed to uio_pci_generic with
``vmem-guest bind --uio``, the host's resizes followed through INTx on /dev/uioN.

The default pair (QEMU 7.2, INTx only; Linux 6.1). After each resize QEMU's
plugged size, the tracker, MemTotal and STATE requests must agree, the interrupts
must have come through uio_pci_generic's handler (/proc/interrupts), and
``status`` must say ``uio``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig
from vmharness.guest_agent import (
    agent_running,
    cli,
    cli_json,
    cli_result,
    online_size_for,
    state_mismatches,
    status,
    target,
)
from vmharness.guest_agent import (
    settled as agent_settled,
)

BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]
DEVICE = "vm0"
BLOCK = 2 * MiB
GROW, SHRINK = 1 * GiB, 256 * MiB


@pytest.fixture(scope="module")
def uio_vm(boot_vm: BootVM) -> Iterator[TestVM]:
    cfg = VMConfig(
        name="agent-uio",
        devices=(MemDevice(DEVICE, size=2 * GiB, block_size=BLOCK),),
        in_kernel_driver=False,
        # No vIOMMU and VFIO's no-IOMMU mode left off: vfio-pci cannot take the device.
        noiommu=False,
        extra_cmdline=("secretmem.enable=1",),
    )
    with boot_vm(cfg) as vm:
        yield vm


def uio_interrupts(vm: TestVM) -> int:
    """INTx interrupts uio_pci_generic's handler took, summed over the CPUs."""
    line = vm.sh("grep uio_pci_generic /proc/interrupts || true").strip()
    assert line, vm.sh("cat /proc/interrupts")
    return sum(int(word) for word in line.split()[1:] if word.isdigit())


def converge(vm: TestVM, bdf: str, requested: int, previous: int, base_memtotal: int) -> int:
    """Resize, wait until QEMU and the tracker agree on the target, check the rest."""
    vm.resize(DEVICE, requested)
    expected = target(requested, BLOCK, shrinking=requested < previous)
    online = online_size_for(expected, BLOCK, previous)
    vm.wait_until(lambda: vm.plugged(DEVICE) == expected, timeout=120, what=f"{expected} plugged")

    def settled() -> dict[str, object] | None:
        dev = status(vm)[bdf]
        done = dev["plugged_size"] == expected and dev["online_size"] == online
        return dev if done and agent_settled(dev) else None

    dev = vm.wait_until(settled, timeout=60, what="the tracker to settle")
    assert (dev["binding"], dev["interrupts"]) == ("uio", "INTx")
    assert dev["requested_size"] == requested and dev["broken"] is False
    assert vm.mem_total() - base_memtotal == online
    assert state_mismatches(vm, bdf, dev) == []
    return expected


def test_agent_follows_host_through_uio(uio_vm: TestVM) -> None:
    vm = uio_vm
    (bdf,) = [dev["bdf"] for dev in cli_json(vm, "devices")]
    # VFIO cannot take it: run without --uio would refuse (no IOMMU, no --noiommu).
    rc, _, err = cli_result(vm, f"run --device {bdf}")
    assert rc == 2 and "not behind an IOMMU" in err, err

    out = cli(vm, f"bind --uio {bdf}")
    assert f"{bdf} bound to uio_pci_generic (/dev/uio" in out, out
    assert [dev["driver"] for dev in cli_json(vm, "devices")] == ["uio_pci_generic"]
    checks = {c["name"]: c for c in json.loads(cli_result(vm, "doctor --json")[1])["checks"]}
    assert checks["uio_pci_generic"]["status"] == "ok", checks["uio_pci_generic"]
    assert bdf in checks["uio_pci_generic"]["detail"]
    assert checks["vfio-pci"]["status"] == "not needed"
    assert checks["iommu"]["status"] == "ok" and f"{bdf}: uio" in checks["iommu"]["detail"]

    base_memtotal = vm.mem_total()
    before = uio_interrupts(vm)
    with agent_running(vm, ""):
        plugged = converge(vm, bdf, GROW, 0, base_memtotal)
        grown = uio_interrupts(vm)
        assert grown > before  # the config change and the answers came through uio
        converge(vm, bdf, SHRINK, plugged, base_memtotal)
        assert uio_interrupts(vm) > grown
        rc, text, _ = cli_result(vm, "status")
        assert rc == 0 and "uio, INTx interrupts" in text, text
        # Held by the agent: unbinding is refused, the device stays with UIO.
        rc, _, err = cli_result(vm, f"unbind {bdf}")
        assert rc != 0 and "in use" in err, err
    assert cli(vm, f"unbind {bdf}").strip() == f"{bdf} now bound to virtio-pci"
