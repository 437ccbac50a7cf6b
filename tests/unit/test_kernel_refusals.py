"""The kernel says no: every memory operation refused with ENOMEM or EBUSY.

A kernel short of memory or busy refuses a probe, an online, an offline, a soft
offline or an unpoison at any time (sim/kernel.py ``KernelOp``). Checked here,
against the fake kernel and the device model (docs/design.md section 5): the
agent never onlines unplugged memory, gives back what it plugged and could not
online (manual path) or keeps it until the kernel agrees (step loop), avoids the
refused block or subblock for a window that a config change clears, and
converges once the refusals stop.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_driver import ADDR, GEOMETRY, MB0, MEMORY_BLOCK, MIB, PER_UNIT, Rig, online_blocks, opened
from test_driver_subblocks import PAGES_PER_SUBBLOCK, PagesRig, top_subblock

from vmem_guest import manual, planner
from vmem_guest.driver import DeviceDriver, Outcome, StepResult
from vmem_guest.errors import KernelError, OfflineRefused, PageRefused
from vmem_guest.hotplug import KernelBlockState
from vmem_guest.sim.kernel import BLOCK_OPS, FakeKernelMemory, KernelOp
from vmem_guest.sim.pages import PAGE_OPS, FakePages
from vmem_guest.spec import RequestType

ERRNOS = [errno.ENOMEM, errno.EBUSY]
PAGE = 4096


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from opened(Rig(tmp_path))


@pytest.fixture
def pages_rig(tmp_path: Path) -> Iterator[PagesRig]:
    yield from opened(PagesRig(tmp_path))


def steps_until_wait(driver: DeviceDriver, limit: int = 50) -> list[StepResult]:
    results: list[StepResult] = []
    for _ in range(limit):
        results.append(driver.step())
        if results[-1].outcome is not Outcome.PROGRESS:
            return results
    pytest.fail(f"still making progress after {limit} steps: {results[-1]}")


def no_sleep(seconds: float) -> None:
    raise AssertionError(f"slept {seconds} s: nothing here is BUSY")


# --- the fake kernel itself ----------------------------------------------------------


@pytest.mark.parametrize("err", ERRNOS)
def test_the_fake_kernel_refuses_each_block_operation_and_changes_nothing(err: int) -> None:
    kernel = FakeKernelMemory(MEMORY_BLOCK)
    kernel.refuse(KernelOp.PROBE, err)
    with pytest.raises(KernelError) as probe:
        kernel.probe(MB0 * MEMORY_BLOCK)
    assert (probe.value.op, probe.value.errno) == ("probe", err)
    assert kernel.state(MB0) is KernelBlockState.ABSENT and kernel.probes == []
    kernel.stop_refusing()
    assert kernel.probe(MB0 * MEMORY_BLOCK)
    kernel.refuse(KernelOp.ONLINE, err)
    with pytest.raises(KernelError) as online:
        kernel.online(MB0, planner.Zone.MOVABLE)
    assert (online.value.op, online.value.errno) == ("online", err)
    assert kernel.state(MB0) is KernelBlockState.OFFLINE
    kernel.stop_refusing()
    kernel.online(MB0, planner.Zone.MOVABLE)
    kernel.refuse(KernelOp.OFFLINE, err)
    with pytest.raises(OfflineRefused) as offline:
        kernel.offline(MB0)
    assert offline.value.errno == err
    assert kernel.state(MB0) is KernelBlockState.ONLINE
    assert kernel.refused == {KernelOp.PROBE: 1, KernelOp.ONLINE: 1, KernelOp.OFFLINE: 1}
    with pytest.raises(ValueError, match="page operation"):
        kernel.refuse(KernelOp.UNPOISON, err)


@pytest.mark.parametrize("err", ERRNOS)
def test_the_fake_pages_refuse_soft_offline_and_unpoison_and_change_nothing(err: int) -> None:
    pages = FakePages(page_size=PAGE, in_use_rate=0.0)
    pages.refuse(KernelOp.SOFT_OFFLINE, err)
    with pytest.raises(PageRefused) as soft:
        pages.soft_offline(100)
    assert (soft.value.pfn, soft.value.errno) == (100, err)
    assert not pages.is_poisoned(100)
    pages.stop_refusing()
    pages.soft_offline(100)
    pages.refuse(KernelOp.UNPOISON, err)
    with pytest.raises(KernelError) as unpoison:
        pages.unpoison(100)
    assert (unpoison.value.op, unpoison.value.errno) == ("unpoison", err)
    assert pages.is_poisoned(100)
    assert pages.refused == {KernelOp.SOFT_OFFLINE: 1, KernelOp.UNPOISON: 1}
    assert set(KernelOp) == PAGE_OPS | BLOCK_OPS


# --- probe and online refused -------------------------------------------------------


@pytest.mark.parametrize("op", [KernelOp.PROBE, KernelOp.ONLINE])
@pytest.mark.parametrize("err", ERRNOS)
def test_a_refused_probe_or_online_gives_the_memory_back_until_the_kernel_agrees(
    rig: Rig, op: KernelOp, err: int
) -> None:
    """The step loop: the PLUG was ACKed, the kernel will not take the blocks; each is
    avoided for its window and its unit UNPLUGged in the same step, so nothing stays
    plugged unused while the kernel refuses, and once the kernel agrees the memory is
    plugged again and comes online (docs/design.md 5.4, 5.6)."""
    driver = rig.driver
    assert driver is not None
    rig.kernel.refuse(op, err)
    rig.model.resize(256 * MIB)
    results = steps_until_wait(driver)
    assert results[0].step == planner.PlugStep(ADDR, 2 * PER_UNIT)
    refused = [r for r in results if isinstance(r.step, planner.OnlineStep)]
    assert [r.step.memory_block for r in refused] == [MB0, MB0 + 1]  # type: ignore[union-attr]
    assert all(f"{op.value} memory" in r.detail for r in refused)
    assert all(errno.errorcode[err] in r.detail for r in refused)
    assert results[-1].outcome is Outcome.WAIT
    assert {MB0, MB0 + 1} <= driver.refused_blocks.keys()
    assert online_blocks(rig) == set()
    assert rig.model.plugged_size == 0  # given back, not left plugged and unused
    assert RequestType.UNPLUG in [s.type for s in rig.channel.sent]
    assert rig.kernel.refused[op] == 2
    rig.check_consistent()
    rig.kernel.stop_refusing()
    assert rig.converge()[-1].outcome is Outcome.DONE
    assert online_blocks(rig) == {MB0, MB0 + 1}
    rig.check_consistent()


@pytest.mark.parametrize("op", [KernelOp.PROBE, KernelOp.ONLINE])
@pytest.mark.parametrize("err", ERRNOS)
def test_manual_plug_gives_the_unit_back_when_the_kernel_refuses_it(
    rig: Rig, op: KernelOp, err: int
) -> None:
    """``vmem-guest plug``: a unit whose block the kernel will not add or online is
    UNPLUGged again at once (docs/design.md 5.4, ``DeviceDriver.plug_unit``), and the
    refusal names the operation and the errno."""
    driver = rig.driver
    assert driver is not None
    rig.model.resize(256 * MIB)
    rig.kernel.refuse(op, err)
    sent = len(rig.channel.sent)
    with pytest.raises(KernelError) as info:
        manual.ManualOps(driver, sleep=no_sleep).plug_range(ADDR, MEMORY_BLOCK)
    assert (info.value.op, info.value.errno) == (op.value, err)
    assert [s.type for s in rig.channel.sent[sent:]] == [RequestType.PLUG, RequestType.UNPLUG]
    assert rig.model.plugged_size == 0
    assert online_blocks(rig) == set()
    rig.check_consistent()


# --- offline refused, and the windows a config change clears ------------------------


@pytest.mark.parametrize("err", ERRNOS)
def test_a_config_change_clears_the_windows_of_refused_offlines(rig: Rig, err: int) -> None:
    """Every offline refused: each block waits for its window; a config change
    forgets the windows, and the next step tries the highest block again at once
    (docs/design.md 5.6)."""
    driver = rig.driver
    assert driver is not None
    rig.model.resize(512 * MIB)
    rig.converge()
    rig.kernel.refuse(KernelOp.OFFLINE, err)
    rig.model.resize(256 * MIB)
    results = steps_until_wait(driver)
    assert results[-1].outcome is Outcome.WAIT
    assert driver.refused_blocks.keys() == {MB0 + i for i in range(4)}
    now, refusals = rig.clock.now, rig.kernel.refused[KernelOp.OFFLINE]
    assert driver.step().outcome is Outcome.WAIT  # nothing tried inside the windows
    assert rig.kernel.refused[KernelOp.OFFLINE] == refusals
    rig.model.resize(128 * MIB)  # config interrupt
    assert not driver.refused_blocks
    result = driver.step()
    assert result.step == planner.OfflineStep(MB0 + 3)
    assert rig.kernel.refused[KernelOp.OFFLINE] == refusals + 1
    assert rig.clock.now == now
    rig.kernel.stop_refusing()
    assert rig.converge()[-1].outcome is Outcome.DONE
    assert len(online_blocks(rig)) == 1
    rig.check_consistent()


# --- soft offline and unpoison refused ----------------------------------------------


@pytest.mark.parametrize("err", ERRNOS)
def test_a_refused_soft_offline_gives_the_pages_back_and_avoids_the_subblock(
    pages_rig: PagesRig, err: int
) -> None:
    rig = pages_rig
    driver = rig.driver
    assert driver is not None
    rig.resize(1024 * MIB)
    rig.converge()
    rig.pages.refuse(KernelOp.SOFT_OFFLINE, err)
    rig.resize(1022 * MIB)
    results = steps_until_wait(driver, limit=GEOMETRY.nr_subblocks + 10)  # each one tried
    top = top_subblock(MB0 + 7)
    assert isinstance(results[0].step, planner.TakeStep)
    assert errno.errorcode[err] in results[0].detail
    takes = [r for r in results if isinstance(r.step, planner.TakeStep)]
    assert len(takes) == rig.pages.refused[KernelOp.SOFT_OFFLINE] == GEOMETRY.nr_subblocks
    assert driver.refused_subblocks.keys() == set(range(GEOMETRY.nr_subblocks))
    assert rig.model.plugged_size == 1024 * MIB  # nothing unplugged
    assert rig.holes() == [] and rig.poisoned_pages(top) == 0
    assert results[-1].outcome is Outcome.WAIT
    refusals = rig.pages.refused[KernelOp.SOFT_OFFLINE]
    rig.resize(1020 * MIB)  # a config change forgets the subblocks' windows (5.6)
    assert not driver.refused_subblocks
    assert isinstance(driver.step().step, planner.TakeStep)
    assert rig.pages.refused[KernelOp.SOFT_OFFLINE] == refusals + 1
    rig.pages.stop_refusing()
    assert rig.converge()[-1].outcome is Outcome.DONE
    assert rig.model.plugged_size == 1020 * MIB
    assert len(rig.holes()) == 2
    assert all(rig.poisoned_pages(sb) == PAGES_PER_SUBBLOCK for sb in rig.holes())
    rig.check_holes_poisoned()
    assert rig.tracker_plugged() == rig.model.plugged_blocks()


@pytest.mark.parametrize("err", ERRNOS)
def test_a_refused_unpoison_keeps_the_subblock_taken_until_the_kernel_agrees(
    pages_rig: PagesRig, err: int
) -> None:
    """Growing back over holes: the PLUG is ACKed but the pages stay poisoned; the
    subblocks stay taken (counted, never handed out) and are given back later."""
    rig = pages_rig
    driver = rig.driver
    assert driver is not None and rig.tracker is not None
    rig.resize(1024 * MIB)
    rig.converge()
    rig.resize(1000 * MIB)
    rig.converge()
    holes = rig.holes()
    assert len(holes) == 12
    rig.pages.refuse(KernelOp.UNPOISON, err)
    rig.resize(1024 * MIB)
    results = steps_until_wait(driver)
    assert any(isinstance(r.step, planner.GiveBackStep) for r in results)
    assert any(errno.errorcode[err] in r.detail for r in results)
    assert rig.model.plugged_size == 1024 * MIB
    state = rig.tracker.state
    assert all(state.is_taken(sb) and state.is_plugged(sb) for sb in holes)
    assert all(rig.poisoned_pages(sb) == PAGES_PER_SUBBLOCK for sb in holes)
    rig.pages.stop_refusing()
    assert rig.converge()[-1].outcome is Outcome.DONE
    assert rig.holes() == [] and not any(state.is_taken(sb) for sb in holes)
    assert all(rig.poisoned_pages(sb) == 0 for sb in holes)
    rig.check_consistent()


# --- what sysfs says after a refused write; the manual path's all or nothing ----------


def test_a_block_onlined_behind_the_agents_back_is_recorded_as_sysfs_says(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A udev rule onlines each new block as soon as it is added: the agent's own
    online write is refused (EINVAL, already online); it asks sysfs, records the
    block ONLINE in the zone the kernel chose, and writes nothing more
    (docs/design.md 5.3, ``_after_refused_online``)."""
    kernel = rig.kernel
    real_probe = kernel.probe

    def probe_then_udev_onlines(phys_addr: int) -> bool:
        added = real_probe(phys_addr)
        kernel.online(phys_addr // MEMORY_BLOCK, planner.Zone.KERNEL)
        return added

    monkeypatch.setattr(kernel, "probe", probe_then_udev_onlines)
    rig.model.resize(128 * MIB)
    assert rig.converge()[-1].outcome is Outcome.DONE
    assert rig.tracker is not None
    assert rig.tracker.block(MB0).zone is planner.Zone.KERNEL
    assert kernel.probes == [MB0 * MEMORY_BLOCK]  # one probe: nothing added twice
    rig.check_consistent()


def test_manual_unplug_all_onlines_again_what_it_offlined_when_an_offline_is_refused(
    rig: Rig,
) -> None:
    """``vmem-guest unplug-all`` is all or nothing (docs/design.md 5.4,
    ``DeviceDriver.offline_all``): memory35..33 go offline, memory32 refuses; the
    three are onlined again in their zones, no UNPLUG_ALL is sent, and the error
    names memory32."""
    driver = rig.driver
    assert driver is not None
    rig.model.resize(512 * MIB)
    rig.converge()
    rig.kernel.refuse_offline.add(MB0)
    sent = len(rig.channel.sent)
    with pytest.raises(OfflineRefused, match="memory32") as info:
        manual.ManualOps(driver, sleep=no_sleep).unplug_all()
    assert info.value.errno == errno.EBUSY
    assert online_blocks(rig) == {MB0 + i for i in range(4)}
    assert all(rig.kernel.block(MB0 + i).zone is planner.Zone.MOVABLE for i in range(4))
    assert rig.channel.sent[sent:] == []
    assert rig.model.plugged_size == 512 * MIB
    rig.check_consistent()
