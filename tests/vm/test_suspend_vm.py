"""Suspend to RAM and wake-up, with memory plugged, on both ends of the matrix.

The guest writes ``mem`` to /sys/power/state (the one thing userspace cannot veto),
QEMU reports ``suspended``, and QMP ``system_wakeup`` wakes it. Then:

* QEMU 10.0 offers VIRTIO_MEM_F_PERSISTENT_SUSPEND and keeps every block across the
  wake-up, but resets the virtio-pci transport: the agent notices the resume without
  polling (a CANCEL_ON_SET timerfd), re-initialises the transport, keeps its blocks
  and follows the next resize.
* QEMU 7.2 has no such feature and unplugs everything at wake-up: the agent finds the
  memory under its online blocks gone (STATE), marks the device broken and says to
  reboot, and never touches the device again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from vmharness import NEWER_PAIR, GiB, MemDevice, MiB, Pair, TestVM, VMConfig
from vmharness.config import userspace_driver_config
from vmharness.guest_agent import AGENT_LOG, agent_log, cli_json, start_agent, stop_agent

BootVM = Callable[[VMConfig, Pair], AbstractContextManager[TestVM]]
PLUGGED = 512 * MiB
#: Seconds the guest stays suspended: long enough for the RTC to measure the sleep.
ASLEEP_SECONDS = 3.0


def suspend_config(name: str) -> VMConfig:
    cfg = userspace_driver_config(name, MemDevice("vm0", size=2 * GiB, block_size=2 * MiB))
    # S3 on q35 is offered through the ICH9 LPC's ACPI (disable_s3=0).
    return VMConfig(**{**cfg.__dict__, "extra_qemu_args": ("-global", "ICH9-LPC.disable_s3=0")})


@pytest.fixture(scope="module", params=[Pair(), NEWER_PAIR], ids=lambda p: p.label())
def vm(request: pytest.FixtureRequest, boot_vm: BootVM) -> Iterator[TestVM]:
    with boot_vm(suspend_config("suspend"), request.param) as booted:
        yield booted


def suspend_and_wake(vm: TestVM) -> None:
    """``echo mem > /sys/power/state`` in the guest (detached: the runner is frozen
    too), wait for QEMU to say suspended, sleep, ``system_wakeup``."""
    assert "mem" in vm.read("/sys/power/state").split()
    vm.sh("setsid sh -c 'sleep 0.5; echo mem > /sys/power/state' >/dev/null 2>&1 &")
    vm.wait_until(lambda: vm.qmp("query-status")["status"] == "suspended", timeout=60, what="S3")
    time.sleep(ASLEEP_SECONDS)
    vm.qmp("system_wakeup")
    vm.wait_until(lambda: vm.qmp("query-status")["status"] == "running", timeout=60)
    vm.wait_until(lambda: vm.guest("true", timeout=10)[0] == 0, timeout=120, what="the guest")


def full_log(vm: TestVM) -> str:
    """The whole agent log (agent_log is its tail)."""
    return vm.read(AGENT_LOG)


def device_status(vm: TestVM) -> dict[str, object]:
    (dev,) = cli_json(vm, "status")
    return dict(dev)


def test_memory_plugged_across_suspend_and_resume(vm: TestVM) -> None:
    newer = vm.qemu_version.startswith("10.")
    vm.resize("vm0", 0)
    start_agent(vm)
    try:
        vm.resize("vm0", PLUGGED)
        vm.wait_until(lambda: vm.plugged("vm0") == PLUGGED, timeout=120, what="the plug")
        features = device_status(vm)["device_features"]
        assert ("PERSISTENT_SUSPEND" in features) is newer  # type: ignore[operator]
        suspend_and_wake(vm)
        if newer:
            check_kept(vm)
        else:
            check_lost(vm)
    except Exception:
        print(agent_log(vm))
        raise
    finally:
        stop_agent(vm)


def check_kept(vm: TestVM) -> None:
    """QEMU 10.0 with PERSISTENT_SUSPEND: nothing lost, the transport rebuilt, and the
    agent follows the next resize through the re-routed interrupts."""
    vm.wait_until(lambda: "transport re-initialised" in full_log(vm), timeout=60, what="the resume")
    assert vm.plugged("vm0") == PLUGGED
    dev = device_status(vm)
    assert dev["broken"] is False and dev["plugged_size"] == PLUGGED
    vm.resize("vm0", 2 * PLUGGED)
    vm.wait_until(lambda: vm.plugged("vm0") == 2 * PLUGGED, timeout=120, what="the next plug")


def check_lost(vm: TestVM) -> None:
    """QEMU 7.2: the wake-up unplugged everything; the agent says so and stops."""
    assert vm.plugged("vm0") == 0
    vm.wait_until(lambda: device_status(vm)["broken"], timeout=60, what="the verdict")
    reason = str(device_status(vm)["broken_reason"])
    log = full_log(vm)
    assert "memory lost in suspend" in log and "reboot the guest" in log, reason
    requests = device_status(vm)["requests"]
    vm.resize("vm0", 2 * PLUGGED)
    time.sleep(5)
    assert vm.plugged("vm0") == 0  # a broken device is never touched again
    assert device_status(vm)["requests"] == requests
