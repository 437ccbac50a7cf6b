"""The driver core taking single subblocks of online blocks out of use, and back.

The rig of test_driver.py, with fake pages behind the fake kernel (onlining a
block wipes its poison, as Linux's online_pages does). Checked: shrinking ends
exactly, every hole's pages are poisoned, refused pages are given back and
skipped, every page is checked again right before the UNPLUG, crashes in
between are resolved at restart, and growing gives the holes back.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from test_driver import GEOMETRY, MB0, MEMORY_BLOCK, MIB, NAME, Rig, opened

from vmem_guest import manual, planner
from vmem_guest.device import VirtioMemDevice
from vmem_guest.driver import DeviceDriver, Outcome
from vmem_guest.errors import HolesKeepBlockOnline
from vmem_guest.hotplug import KernelBlockState
from vmem_guest.sim.kernel import FakeKernelMemory
from vmem_guest.sim.pages import FakePages
from vmem_guest.spec import RequestType
from vmem_guest.tracker import Tracker, TrackerIdentity
from vmem_guest.tracker.layout import GENERATION, GENERATION_OFFSET

PAGE = 4096
PAGES_PER_SUBBLOCK = GEOMETRY.block_size // PAGE


class PagesRig(Rig):
    """A Rig whose driver may take subblocks: FakePages over the fake kernel."""

    def __init__(self, state_dir: Path, *, unavailable: str | None = None) -> None:
        super().__init__(state_dir, FakeKernelMemory(MEMORY_BLOCK))
        kernel = self.kernel

        def online(pfn: int) -> bool:
            return kernel.state(pfn * PAGE // MEMORY_BLOCK) is KernelBlockState.ONLINE

        self.pages = FakePages(
            rng=random.Random(1), page_size=PAGE, online=online, unavailable=unavailable
        )
        kernel.on_online = lambda addr, size: self.pages.block_onlined(addr // PAGE, size // PAGE)

    def open(self, *, start: bool = True, wire: bool = True) -> DeviceDriver:
        self.tracker = Tracker.open(self.state_dir, TrackerIdentity(NAME, GEOMETRY))
        device = VirtioMemDevice(self.channel, NAME)
        self.driver = DeviceDriver(
            device, self.tracker, self.kernel, clock=self.clock, pages=self.pages
        )
        if start:
            self.driver.start()
        if wire:
            self.model.on_config_change = self.driver.config_changed
        return self.driver

    def resize(self, size: int) -> None:
        self.model.resize(size)

    def pfns(self, sb: int) -> range:
        first = GEOMETRY.subblock_addr(sb) // PAGE
        return range(first, first + PAGES_PER_SUBBLOCK)

    def poisoned_pages(self, sb: int) -> int:
        return sum(1 for pfn in self.pfns(sb) if self.pages.is_poisoned(pfn))

    def holes(self) -> list[int]:
        assert self.tracker is not None
        state = self.tracker.state
        return [
            sb
            for sb in range(GEOMETRY.nr_subblocks)
            if state.is_taken(sb) and not state.is_plugged(sb)
        ]

    def check_holes_poisoned(self) -> None:
        """Invariant 5.1: every unplugged subblock of an online block is all poisoned."""
        for mb in GEOMETRY.memory_blocks():
            if self.kernel.state(mb) is not KernelBlockState.ONLINE:
                continue
            for sb in GEOMETRY.subblocks_of(mb):
                if not self.model.is_plugged(sb):
                    assert self.poisoned_pages(sb) == PAGES_PER_SUBBLOCK, f"subblock {sb}"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[PagesRig]:
    yield from opened(PagesRig(tmp_path))


def top_subblock(mb: int) -> int:
    return GEOMETRY.subblocks_of(mb)[-1]


def one_block_less_a_subblock(rig: PagesRig) -> None:
    """Grow to 1 GiB (eight whole memory blocks) and ask for 2 MiB less: the driver's
    next step takes the top subblock of the last block."""
    rig.resize(1024 * MIB)
    rig.converge()
    rig.resize(1022 * MIB)


def test_a_shrink_to_a_part_of_a_block_ends_exactly_with_poisoned_holes(rig: PagesRig) -> None:
    rig.resize(1024 * MIB)
    rig.converge()
    rig.resize(1000 * MIB)
    results = rig.converge()
    assert results[-1].outcome is Outcome.DONE
    assert rig.model.plugged_size == 1000 * MIB
    assert rig.holes() == list(range(top_subblock(MB0 + 7) - 11, top_subblock(MB0 + 7) + 1))
    assert all(rig.kernel.state(MB0 + i) is KernelBlockState.ONLINE for i in range(8))
    rig.check_holes_poisoned()
    # One take of the run, then one UNPLUG of it after one kpageflags read of the run.
    unplugs = [s for s in rig.channel.sent if s.type is RequestType.UNPLUG]
    assert [s.nb_blocks for s in unplugs] == [12]


def test_holes_are_filled_back_rather_than_deepened_into_a_block_of_holes_only(
    rig: PagesRig,
) -> None:
    """make demo's path 1024M -> 1000M -> 512M -> 0: at 512M the top block's 52
    subblocks in use would all be taken, leaving it online as holes only (never
    offlined: stranded at 0). One more whole block goes instead and the 12 holes are
    filled back; at 0 every block goes whole and no hole is left."""
    rig.resize(1024 * MIB)
    rig.converge()
    base = rig.pages.hardware_corrupted_bytes()
    rig.resize(1000 * MIB)
    rig.converge()
    assert len(rig.holes()) == 12
    rig.resize(512 * MIB)
    rig.converge()
    assert rig.model.plugged_size == 512 * MIB
    assert rig.holes() == []
    online = [mb for mb in range(MB0, MB0 + 8) if rig.kernel.state(mb) is KernelBlockState.ONLINE]
    assert len(online) == 4 and MB0 + 7 in online
    rig.resize(0)
    rig.converge()
    assert rig.model.plugged_size == 0
    assert not any(rig.kernel.state(MB0 + i) is KernelBlockState.ONLINE for i in range(8))
    assert rig.pages.hardware_corrupted_bytes() == base


def test_a_refused_subblock_inside_a_run_splits_it_and_the_rest_is_taken_below_it(
    rig: PagesRig,
) -> None:
    """Those above the refused subblock stay taken and go back in one UNPLUG; the refused
    one and those below it are given back untouched, and the next take starts below the
    refused one, which stays whole."""
    rig.resize(1024 * MIB)
    rig.converge()
    top = top_subblock(MB0 + 7)
    rig.pages.pinned.add(rig.pfns(top - 2)[100])
    rig.resize(1008 * MIB)  # 8 subblocks
    rig.converge()
    assert rig.model.plugged_size == 1008 * MIB
    assert rig.holes() == [*range(top - 8, top - 2), top - 1, top]
    assert rig.poisoned_pages(top - 2) == 0 and rig.model.is_plugged(top - 2)
    unplugs = [s for s in rig.channel.sent if s.type is RequestType.UNPLUG]
    assert [s.nb_blocks for s in unplugs] == [2, 6]
    rig.check_holes_poisoned()


def test_a_take_that_runs_long_stops_after_the_subblock_at_hand(rig: PagesRig) -> None:
    """TAKE_STEP_SECONDS bounds a step: the subblocks not reached are given back
    untouched, the taken ones are UNPLUGged, and the next take goes on below."""
    rig.resize(1024 * MIB)
    rig.converge()
    clock, write = rig.clock, rig.pages.soft_offline_pages

    def slow(pfns: Sequence[int]) -> None:
        write(pfns)
        clock.advance(0.2)  # a subblock of pages under migration

    rig.pages.soft_offline_pages = slow  # type: ignore[method-assign]
    rig.resize(1000 * MIB)  # 12 subblocks
    assert rig.driver is not None
    first = rig.driver.step()
    assert isinstance(first.step, planner.TakeStep) and first.step.nb_blocks == 12
    top = top_subblock(MB0 + 7)
    state = rig.tracker.state if rig.tracker is not None else None
    assert state is not None
    assert [sb for sb in range(top - 11, top + 1) if state.is_taken(sb)] == [top - 2, top - 1, top]
    rig.converge()
    assert rig.model.plugged_size == 1000 * MIB
    assert rig.holes() == list(range(top - 11, top + 1))
    unplugs = [s for s in rig.channel.sent if s.type is RequestType.UNPLUG]
    assert [s.nb_blocks for s in unplugs] == [3, 3, 3, 3]
    rig.check_holes_poisoned()


def test_a_page_the_kernel_will_not_give_up_makes_the_take_go_back_and_try_another(
    rig: PagesRig,
) -> None:
    rig.resize(1024 * MIB)
    rig.converge()
    highest = top_subblock(MB0 + 7)
    rig.pages.pinned.add(rig.pfns(highest)[300])
    rig.resize(1022 * MIB)
    rig.converge()
    assert rig.model.plugged_size == 1022 * MIB
    assert rig.holes() == [highest - 1]
    # What the refused take poisoned went back: the pinned subblock is whole again.
    assert rig.poisoned_pages(highest) == 0
    assert rig.model.is_plugged(highest)
    assert rig.tracker is not None and rig.tracker.retries >= 1
    rig.check_holes_poisoned()


def test_a_subblock_holding_an_unmovable_page_is_not_started_on(rig: PagesRig) -> None:
    """The census (one kpageflags read of the run) sees the slab page: not one of the
    subblock's pages is soft-offlined (and then given back), and the next one down
    goes instead."""
    rig.resize(1024 * MIB)
    rig.converge()
    top = top_subblock(MB0 + 7)
    rig.pages.unmovable.add(rig.pfns(top)[400])
    writes, unpoisons = rig.pages.soft_offline_writes, rig.pages.unpoison_writes
    rig.resize(1022 * MIB)
    rig.converge()
    assert rig.model.plugged_size == 1022 * MIB
    assert rig.holes() == [top - 1]
    assert rig.pages.soft_offline_writes - writes == PAGES_PER_SUBBLOCK
    assert rig.pages.unpoison_writes == unpoisons
    assert rig.poisoned_pages(top) == 0


def test_every_page_is_checked_again_right_before_the_unplug(rig: PagesRig) -> None:
    one_block_less_a_subblock(rig)
    assert rig.driver is not None
    take = rig.driver.step()
    assert type(take.step).__name__ == "TakeStep"
    sb = top_subblock(MB0 + 7)
    assert rig.poisoned_pages(sb) == PAGES_PER_SUBBLOCK
    # Someone gives one page back behind the agent's back (root, debugfs).
    rig.pages.unpoison(rig.pfns(sb)[7])
    writes = rig.pages.soft_offline_writes
    unplug = rig.driver.step()
    assert type(unplug.step).__name__ == "UnplugStep"
    assert rig.pages.soft_offline_writes == writes + 1  # that page, taken again
    assert not rig.model.is_plugged(sb)
    rig.check_holes_poisoned()


def test_a_crash_between_the_take_and_the_unplug_is_finished_at_restart(
    rig: PagesRig,
) -> None:
    one_block_less_a_subblock(rig)
    assert rig.driver is not None
    rig.driver.step()  # the take: poisoned, still plugged
    rig.crash()
    rig.open()
    rig.converge()
    sb = top_subblock(MB0 + 7)
    assert rig.model.plugged_size == 1022 * MIB
    assert rig.holes() == [sb]
    rig.check_holes_poisoned()


def test_at_restart_an_unplugged_subblock_with_a_usable_page_gets_its_block_offlined(
    rig: PagesRig,
) -> None:
    one_block_less_a_subblock(rig)
    rig.converge()
    sb = top_subblock(MB0 + 7)
    rig.crash()
    rig.pages.unpoison(rig.pfns(sb)[0])  # the hole now has a page the kernel may hand out
    rig.open()
    assert rig.kernel.state(MB0 + 7) is KernelBlockState.OFFLINE
    results = rig.converge()
    rig.check_holes_poisoned()
    # Its 63 plugged subblocks cannot be onlined again (one is missing, and plugging
    # it would pass the request): they are given back; growth is whole blocks.
    assert rig.model.plugged_size == 896 * MIB
    assert results[-1].step == planner.Done(896 * MIB, 126 * MIB)


def test_growing_gives_the_holes_back_first(rig: PagesRig) -> None:
    rig.resize(1024 * MIB)
    rig.converge()
    corrupted_before = rig.pages.hardware_corrupted_bytes()
    rig.resize(1000 * MIB)
    rig.converge()
    assert rig.pages.hardware_corrupted_bytes() == corrupted_before + 24 * MIB
    probes = len(rig.kernel.probes)
    rig.resize(1024 * MIB)
    rig.converge()
    assert rig.model.plugged_size == 1024 * MIB
    assert rig.holes() == []
    assert len(rig.kernel.probes) == probes  # no new block: the holes were filled
    assert rig.pages.hardware_corrupted_bytes() == corrupted_before
    assert rig.tracker is not None and not rig.tracker.state.taken_subblocks


def test_where_the_kernel_cannot_the_agent_shrinks_in_whole_blocks(tmp_path: Path) -> None:
    rig = PagesRig(tmp_path, unavailable="debugfs is not mounted")
    driver = rig.open()
    assert driver.subblocks_off_reason == "debugfs is not mounted"
    rig.resize(1024 * MIB)
    rig.converge()
    rig.resize(1000 * MIB)
    rig.converge()
    assert rig.model.plugged_size == 896 * MIB
    assert rig.pages.soft_offline_writes == 0
    rig.close()


def test_a_block_emptied_to_holes_only_stays_online_and_comes_back_whole(
    rig: PagesRig,
) -> None:
    """Never offlined while it holds poisoned pages (docs/design.md, "Subblocks of
    online blocks"): HardwareCorrupted says what is unplugged, and growth gives it all
    back without a probe or an online."""
    rig.resize(128 * MIB)
    rig.converge()
    rig.resize(124 * MIB)
    rig.converge()
    rig.resize(0)
    rig.converge()
    assert rig.model.plugged_size == 0
    assert rig.kernel.state(MB0) is KernelBlockState.ONLINE
    assert len(rig.holes()) == MEMORY_BLOCK // GEOMETRY.block_size
    rig.check_holes_poisoned()
    assert rig.pages.hardware_corrupted_bytes() == MEMORY_BLOCK
    probes, onlined = len(rig.kernel.probes), []
    wipe = rig.kernel.on_online
    assert wipe is not None
    rig.kernel.on_online = lambda addr, size: (onlined.append(addr), wipe(addr, size))
    rig.resize(128 * MIB)
    rig.converge()
    assert rig.model.plugged_size == 128 * MIB
    assert rig.holes() == []
    assert rig.pages.hardware_corrupted_bytes() == 0
    assert (len(rig.kernel.probes), onlined) == (probes, [])


def test_a_crash_inside_a_tracker_write_during_a_give_back_is_found_at_restart(
    rig: PagesRig,
) -> None:
    """A write cut short leaves the generation odd: the file is set aside, its taken
    bits with it. The restart must still find the poisoned pages under the plugged
    subblock (chaos found one: killed inside the write of a hole's PLUG, before the
    pages went back)."""
    one_block_less_a_subblock(rig)
    rig.converge()
    sb = top_subblock(MB0 + 7)
    assert rig.holes() == [sb]
    rig.resize(1024 * MIB)
    assert rig.driver is not None and rig.tracker is not None
    result = rig.driver.step()  # the hole's PLUG: plugged again, pages still poisoned
    assert isinstance(result.step, planner.PlugStep)
    assert rig.poisoned_pages(sb) == PAGES_PER_SUBBLOCK
    path = rig.tracker.path
    rig.crash()
    with open(path, "r+b") as tracker_file:  # as if killed inside a write section
        tracker_file.seek(GENERATION_OFFSET)
        generation = GENERATION.unpack(tracker_file.read(GENERATION.size))[0]
        tracker_file.seek(GENERATION_OFFSET)
        tracker_file.write(GENERATION.pack(generation | 1))
    rig.open()
    assert rig.tracker is not None and rig.tracker.discarded_reason is not None
    rig.converge()
    assert rig.model.plugged_size == 1024 * MIB
    assert rig.holes() == []
    state = rig.tracker.state
    in_use_poisoned = [
        s
        for s in range(GEOMETRY.nr_subblocks)
        if state.is_plugged(s) and not state.is_taken(s) and rig.poisoned_pages(s)
    ]
    assert in_use_poisoned == []


# --- the rule in one place: a block with holes is never offlined -----------------------


def holes_then(rig: PagesRig, *sizes: int) -> None:
    """1 GiB, then the sizes in turn: at 132 MiB memory33 holds 2 subblocks in use and
    62 holes; at 0 it holds holes only (no full unit is left to go instead)."""
    for size in (1024 * MIB, *sizes):
        rig.resize(size)
        assert rig.converge()[-1].outcome is Outcome.DONE


def assert_untouched(rig: PagesRig, online: list[int], sent: int, before: object) -> None:
    assert rig.tracker is not None
    assert [mb for mb in GEOMETRY.memory_blocks() if rig.kernel.state(mb).name == "ONLINE"] == (
        online
    )
    assert len(rig.channel.sent) == sent, rig.channel.sent[sent:]
    assert rig.tracker.snapshot() == before
    rig.check_holes_poisoned()


def test_manual_unplug_all_refuses_a_block_of_holes_only_before_touching_anything(
    rig: PagesRig,
) -> None:
    """``vmem-guest unplug-all`` goes through the driver's offline, which asks the
    tracker first: memory33 (holes only) stays online, nothing is offlined, no
    UNPLUG_ALL is sent, and the error says which block and why."""
    holes_then(rig, 132 * MIB, 0)
    assert rig.tracker is not None and rig.driver is not None
    assert rig.holes() == list(GEOMETRY.subblocks_of(MB0 + 1))
    sent, before = len(rig.channel.sent), rig.tracker.snapshot()
    with pytest.raises(HolesKeepBlockOnline, match="memory33 holds only holes") as info:
        manual.ManualOps(rig.driver, sleep=no_sleep).unplug_all()
    assert info.value.as_dict()["error"] == "HolesKeepBlockOnline"
    assert (info.value.fields["taken"], info.value.fields["plugged"]) == (64, 0)
    assert_untouched(rig, [MB0 + 1], sent, before)


def test_manual_unplug_all_refuses_a_holed_block_and_offlines_no_other(rig: PagesRig) -> None:
    """memory33 holds holes and memory in use, memory32 is whole: offline_all is all
    or nothing, so the refusal comes before memory32 (or memory33) is offlined."""
    holes_then(rig, 132 * MIB)
    assert rig.driver is not None and rig.tracker is not None
    sent, before = len(rig.channel.sent), rig.tracker.snapshot()
    ops = manual.ManualOps(rig.driver, sleep=no_sleep)
    with pytest.raises(HolesKeepBlockOnline, match="memory33 holds 62 taken subblocks and 2"):
        ops.unplug_all()
    assert_untouched(rig, [MB0, MB0 + 1], sent, before)
    unit_bytes = MEMORY_BLOCK
    with pytest.raises(HolesKeepBlockOnline, match="memory33"):
        ops.unplug_range(GEOMETRY.memory_block_addr(MB0 + 1), unit_bytes)
    assert_untouched(rig, [MB0, MB0 + 1], sent, before)


def test_manual_unplug_all_refuses_before_offlining_a_block_above_a_holed_one(
    rig: PagesRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """memory39's pages are unmovable, so the shrink's hole lands in memory38: the
    highest block (offlined first) could go, but unplug-all could not finish, so it is
    refused before the kernel is asked for any offline."""
    rig.resize(1024 * MIB)
    rig.converge()
    rig.pages.unmovable.update(rig.pfns(sb)[0] for sb in GEOMETRY.subblocks_of(MB0 + 7))
    rig.resize(1022 * MIB)
    assert rig.converge()[-1].outcome is Outcome.DONE
    assert rig.holes() == [top_subblock(MB0 + 6)]
    assert rig.driver is not None and rig.tracker is not None
    offlines: list[int] = []
    monkeypatch.setattr(rig.kernel, "offline", offlines.append)
    sent, before = len(rig.channel.sent), rig.tracker.snapshot()
    with pytest.raises(HolesKeepBlockOnline, match="memory38 holds 1 taken subblocks"):
        manual.ManualOps(rig.driver, sleep=no_sleep).unplug_all()
    assert offlines == []
    assert_untouched(rig, list(GEOMETRY.memory_blocks()), sent, before)


def test_the_driver_refuses_to_offline_a_block_of_holes_before_the_kernel_write(
    rig: PagesRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule does not rest on the planner: a plan that offlines memory33 (holes
    only) is refused by the driver's one offline before ``offline`` is written; the
    device is marked broken (a plan that breaks a rule is a bug) and the block stays."""
    holes_then(rig, 132 * MIB, 0)
    assert rig.driver is not None and rig.tracker is not None
    offlines: list[int] = []
    monkeypatch.setattr(rig.kernel, "offline", offlines.append)
    monkeypatch.setattr(planner, "next_step", lambda inp: planner.OfflineStep(MB0 + 1))
    before = rig.tracker.snapshot()
    result = rig.driver.step()
    assert result.outcome is Outcome.BROKEN
    assert "memory33 holds only holes" in result.detail
    assert offlines == []
    assert rig.kernel.state(MB0 + 1) is KernelBlockState.ONLINE
    after = rig.tracker.snapshot()
    assert after.block(MB0 + 1) == before.block(MB0 + 1) and after.taken == before.taken


def no_sleep(seconds: float) -> None:
    raise AssertionError(f"slept {seconds} s: nothing here is BUSY")
