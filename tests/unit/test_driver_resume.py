"""DeviceDriver.after_resume against the device model: QEMU 10.0's wake-up (blocks kept)
and QEMU 7.2's (a system reset: everything unplugged), with and without online memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_driver import GEOMETRY, MB0, MIB, Rig, opened

from vmem_guest import planner
from vmem_guest.blocks import MemoryBlockState
from vmem_guest.driver import Outcome
from vmem_guest.hotplug import KernelBlockState
from vmem_guest.spec import RequestType


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from opened(Rig(tmp_path))


def grown(rig: Rig, size: int) -> None:
    rig.model.resize(size)
    assert rig.converge()[-1].outcome is Outcome.DONE


def test_blocks_kept_across_the_wake_up_are_checked_and_kept(rig: Rig) -> None:
    grown(rig, 512 * MIB)
    before = rig.tracker_plugged()
    rig.model.device_reset()  # QEMU 10.0: the transport resets, the blocks stay
    rig.channel.sent.clear()
    assert rig.driver is not None
    rig.driver.after_resume(persistent=True, slept=12.0)
    assert rig.driver.broken_reason is None
    # One STATE over the one run of plugged blocks, nothing else.
    assert rig.channel.types() == [RequestType.STATE]
    assert rig.channel.sent[0].addr == GEOMETRY.addr and rig.channel.sent[0].nb_blocks == 256
    assert rig.tracker_plugged() == before
    grown(rig, 768 * MIB)  # and it carries on following requested_size
    assert rig.model.plugged_size == 768 * MIB
    rig.check_consistent()


def test_memory_lost_under_online_blocks_marks_the_device_broken(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    grown(rig, 512 * MIB)
    rig.model.system_reset()  # QEMU 7.2: the S3 wake-up is a system reset
    rig.channel.sent.clear()
    assert rig.driver is not None
    with caplog.at_level("ERROR"):
        rig.driver.after_resume(persistent=False, slept=3.0)
    reason = rig.driver.broken_reason
    assert reason is not None
    assert "memory lost in suspend: 256 of 256 plugged device blocks (512MiB)" in reason
    assert f"4 online memory blocks (memory{MB0}..memory{MB0 + 3})" in reason
    assert "no PERSISTENT_SUSPEND" in reason and "reboot the guest" in reason
    assert reason in caplog.text  # logged at ERROR, whole
    assert rig.channel.types() == [RequestType.STATE]  # asked, and answered UNPLUGGED
    # It stops touching the device: no step sends anything, memory is left as it is.
    rig.channel.sent.clear()
    assert rig.driver.step().outcome is Outcome.BROKEN
    assert rig.channel.sent == []
    assert rig.kernel.state(MB0) is KernelBlockState.ONLINE


def test_a_broken_promise_is_named(rig: Rig) -> None:
    grown(rig, 256 * MIB)
    rig.model.system_reset()
    assert rig.driver is not None
    rig.driver.after_resume(persistent=True, slept=1.0)
    assert "broke its PERSISTENT_SUSPEND promise" in (rig.driver.broken_reason or "")


def test_nothing_plugged_nothing_asked_and_it_carries_on(rig: Rig) -> None:
    rig.model.system_reset()
    rig.channel.sent.clear()
    assert rig.driver is not None
    rig.driver.after_resume(persistent=False, slept=5.0)
    assert rig.driver.broken_reason is None
    assert rig.channel.sent == []
    grown(rig, 256 * MIB)
    assert rig.model.plugged_size == 256 * MIB


def test_memory_lost_under_offline_blocks_only_is_rebuilt_from_state(rig: Rig) -> None:
    rig.model.resize(512 * MIB)
    assert rig.driver is not None
    assert isinstance(rig.driver.step().step, planner.PlugStep)  # plugged, not onlined yet
    assert rig.tracker is not None
    assert rig.tracker.state.block_state(MB0) is MemoryBlockState.PLUGGED
    rig.model.system_reset()
    rig.driver.after_resume(persistent=False, slept=2.0)
    assert rig.driver.broken_reason is None
    assert rig.tracker_plugged() == set()  # the tracker learnt the truth
    assert rig.converge()[-1].outcome is Outcome.DONE  # and plugs again
    assert rig.model.plugged_size == 512 * MIB
    rig.check_consistent()


def test_a_device_whose_region_moved_while_asleep_is_not_trusted(rig: Rig) -> None:
    grown(rig, 256 * MIB)
    rig.model._block_size = 4 * MIB  # type: ignore[attr-defined]  # a lying device
    rig.model._config = None  # type: ignore[attr-defined]
    assert rig.driver is not None
    rig.driver.after_resume(persistent=True, slept=1.0)
    assert "after resume from suspend: device region changed" in (rig.driver.broken_reason or "")
