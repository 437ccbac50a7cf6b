"""``vmem-guest fuzz`` in a real guest: QEMU's virtio-mem device against the model.

A bounded run (30 examples) of the conformance fuzzer against QEMU's device,
bound through no-IOMMU VFIO with the in-kernel driver blacklisted. The host
sets requested-size first; the guest cannot resize the host, so the fuzzer
works within that size. ``make conformance`` is the deep run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from conformance import HostResizer
from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig, userspace_driver_config
from vmharness.guest_agent import VMEM_GUEST, cli, start_agent, stop_agent

BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]

EXAMPLES = 30
REQUESTED = 512 * MiB


def fuzz_config(name: str) -> VMConfig:
    """One 4 GiB device with 2 MiB blocks, left to VFIO in no-IOMMU mode."""
    return userspace_driver_config(name, MemDevice("vm0", size=4 * GiB, block_size=2 * MiB))


@pytest.fixture(scope="module")
def fuzz_vm(boot_vm: BootVM) -> Iterator[TestVM]:
    with boot_vm(fuzz_config("conformance")) as vm:
        yield vm


def test_qemu_conforms_to_the_model(fuzz_vm: TestVM) -> None:
    check_qemu_conforms(fuzz_vm)


def check_qemu_conforms(vm: TestVM) -> None:
    """A bounded fuzz run against the device at REQUESTED: 0 mismatches, nothing left plugged."""
    vm.resize("vm0", REQUESTED)
    rc, out = vm.guest(f"{VMEM_GUEST} fuzz --noiommu --examples {EXAMPLES} --json", timeout=600)
    report = json.loads(out.strip().splitlines()[-1])
    print(
        f"conformance on QEMU {vm.qemu_version}: {report['examples']} examples,"
        f" {report['requests_compared']} requests compared,"
        f" {report['model_only_requests']} model-only, {report['mismatches']} mismatches;"
        f" answers {report['answers']}"
    )
    assert report["mismatch"] is None, json.dumps(report["mismatch"], indent=2)
    assert (rc, report["mismatches"]) == (0, 0)
    assert report["requests_compared"] > 0
    assert report["geometry"]["requested_size"] == REQUESTED
    assert vm.plugged("vm0") == 0
    assert vm.query()["vm0"]["requested-size"] == REQUESTED


def test_qemu_conforms_with_host_resizes(fuzz_vm: TestVM) -> None:
    """The same, with resizes: the host serves the guest fuzzer's --host-resize requests."""
    vm = fuzz_vm
    vm.resize("vm0", REQUESTED)
    assert vm.paths is not None
    with HostResizer(vm, "vm0", vm.paths.share / "resize-requests") as resizer:
        rc, out = vm.guest(
            f"{VMEM_GUEST} fuzz --noiommu --examples 20 --max-steps 20 --json"
            f" --host-resize {resizer.directory}",
            timeout=600,
        )
    report = json.loads(out.strip().splitlines()[-1])
    print(
        f"conformance with resizes: {report['examples']} examples, "
        f"{report['requests_compared']} requests compared, {report['resizes']} resizes, "
        f"{report['mismatches']} mismatches"
    )
    assert report["mismatch"] is None, json.dumps(report["mismatch"], indent=2)
    assert (rc, report["mismatches"]) == (0, 0)
    assert report["resizes"] > 0 and resizer.count >= report["resizes"]
    assert vm.plugged("vm0") == 0
    assert vm.query()["vm0"]["requested-size"] == REQUESTED


def test_fuzz_refuses_while_the_agent_owns_the_device(fuzz_vm: TestVM) -> None:
    vm = fuzz_vm
    vm.resize("vm0", 0)
    start_agent(vm, "--noiommu")
    try:
        rc, out = vm.guest(f"{VMEM_GUEST} fuzz --noiommu --examples 1", timeout=120)
    finally:
        stop_agent(vm)
    assert rc == 2, out
    assert "owned by another vmem-guest process" in out
    assert vm.plugged("vm0") == 0


def test_fuzz_refuses_a_device_with_memory_online(fuzz_vm: TestVM) -> None:
    vm = fuzz_vm
    vm.resize("vm0", 256 * MiB)
    cli(vm, "plug --noiommu 128M --json", timeout=180)  # no agent: attaches directly
    try:
        assert vm.plugged("vm0") == 128 * MiB
        rc, out = vm.guest(f"{VMEM_GUEST} fuzz --noiommu --examples 1", timeout=120)
        assert rc == 2, out
        assert "are online" in out
        assert vm.plugged("vm0") == 128 * MiB
    finally:
        cli(vm, "unplug-all --noiommu --json", timeout=180)
    assert vm.plugged("vm0") == 0
