"""The kernel refuses to probe or online a unit the driver just plugged (ENOMEM, as
Linux's fault injection makes it in the test VM: ``make faults``): the unit goes back
to the device at once, is not plugged again before the refusal's window ends, and is
plugged and onlined once the kernel takes it (docs/design.md 5.4 and 5.6)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_driver import MB0, MEMORY_BLOCK, MIB, Rig, online_blocks, opened, unit

from vmem_guest import planner
from vmem_guest.blocks import Zone
from vmem_guest.driver import Outcome
from vmem_guest.errors import KernelError
from vmem_guest.hotplug import KernelBlockState
from vmem_guest.sim.kernel import FakeKernelMemory
from vmem_guest.spec import RequestType


class RefusingKernel(FakeKernelMemory):
    """A fake kernel that refuses probes, onlines or state reads of chosen blocks with
    ENOMEM, the way an allocation that fails inside the write (or the read) does."""

    def __init__(self) -> None:
        super().__init__(MEMORY_BLOCK)
        self.refuse_probe: set[int] = set()
        self.refuse_online: set[int] = set()
        self.refuse_state: set[int] = set()

    def probe(self, phys_addr: int) -> bool:
        index = phys_addr // self.memory_block_size
        if index in self.refuse_probe:
            raise KernelError("probe", index, errno.ENOMEM)
        return super().probe(phys_addr)

    def online(self, index: int, zone: Zone) -> None:
        if index in self.refuse_online:
            raise KernelError("online", index, errno.ENOMEM)
        super().online(index, zone)

    def state(self, index: int) -> KernelBlockState:
        if index in self.refuse_state:
            raise KernelError(f"read memory{index}/state", index, errno.ENOMEM)
        return super().state(index)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from opened(Rig(tmp_path, RefusingKernel()))


def kernel(rig: Rig) -> RefusingKernel:
    assert isinstance(rig.kernel, RefusingKernel)
    return rig.kernel


def grow_until_refused(rig: Rig, mb: int) -> None:
    """Step until the online (or probe) of ``mb`` was refused."""
    assert rig.driver is not None
    for _ in range(20):
        result = rig.driver.step()
        if result.step == planner.OnlineStep(mb, Zone.MOVABLE) and "ENOMEM" in result.detail:
            return
    pytest.fail(f"memory{mb} was never refused")


@pytest.mark.parametrize("refusal", ["probe", "online"])
def test_a_unit_the_kernel_refuses_goes_back_and_waits_for_its_window(
    rig: Rig, refusal: str
) -> None:
    refused = getattr(kernel(rig), f"refuse_{refusal}")
    refused.add(MB0 + 1)
    rig.model.resize(256 * MIB)
    grow_until_refused(rig, MB0 + 1)
    # Given back in the same step: nothing plugged that the guest cannot use.
    assert rig.model.plugged_blocks() == set(unit(0))
    assert rig.channel.sent[-1].type is RequestType.UNPLUG
    assert rig.driver is not None
    held = rig.driver.step()
    assert held.outcome is Outcome.WAIT and held.detail == "held"
    assert isinstance(held.step, planner.PlugStep)
    assert rig.model.plugged_blocks() == set(unit(0))  # not plugged again meanwhile
    rig.check_consistent()
    refused.clear()
    rig.clock.advance(held.wait_seconds)
    results = rig.converge()
    assert results[-1].outcome is Outcome.DONE
    assert online_blocks(rig) == {MB0, MB0 + 1}
    assert rig.model.plugged_blocks() == {*unit(0), *unit(1)}
    rig.check_consistent()


def test_a_refused_unit_is_refused_for_longer_each_time_and_never_left_plugged(
    rig: Rig,
) -> None:
    kernel(rig).refuse_online.add(MB0)
    rig.model.resize(128 * MIB)
    waits = []
    assert rig.driver is not None
    for _ in range(3):
        grow_until_refused(rig, MB0)
        assert rig.model.plugged_blocks() == set()
        held = rig.driver.step()
        assert held.outcome is Outcome.WAIT
        waits.append(held.wait_seconds)
        rig.clock.advance(held.wait_seconds)
    assert waits[0] < waits[1] < waits[2]
    kernel(rig).refuse_online.clear()
    rig.converge()
    assert online_blocks(rig) == {MB0}
    rig.check_consistent()


def test_a_unit_whose_state_sysfs_will_not_tell_stays_plugged_and_is_onlined_later(
    rig: Rig,
) -> None:
    # The online is refused and the read of the block's state too: the kernel may
    # have onlined it after all, so nothing of it is unplugged.
    kernel(rig).refuse_online.add(MB0)
    kernel(rig).refuse_state.add(MB0)
    rig.model.resize(128 * MIB)
    grow_until_refused(rig, MB0)
    assert rig.model.plugged_blocks() == set(unit(0))
    assert RequestType.UNPLUG not in rig.channel.types()
    kernel(rig).refuse_online.clear()
    kernel(rig).refuse_state.clear()
    assert rig.driver is not None
    rig.clock.advance(60.0)
    rig.converge()
    assert online_blocks(rig) == {MB0}
    rig.check_consistent()
