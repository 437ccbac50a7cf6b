"""relief.py: refusal windows that end once their cause is gone.

Relief on its own against fake signals, ProcMemorySignals against files of the
test's own, and the driver core (the rigs of test_driver.py and
test_driver_subblocks.py): a refused block or subblock is tried again within
RECHECK_SECONDS of MemAvailable rising or of its refused page being freed, not
when its window ends; and not before its window ends while neither happens.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from test_driver import MB0, MIB, Rig, opened
from test_driver_subblocks import PagesRig, top_subblock

from vmem_guest import planner
from vmem_guest.driver import DeviceDriver, Outcome, StepResult
from vmem_guest.relief import RECHECK_SECONDS, RISE_BYTES, USE_FLAGS, ProcMemorySignals, Relief
from vmem_guest.retry import DEFAULT_REFUSAL_BACKOFF
from vmem_guest.sim.runner import VirtualClock

KPF_LRU, KPF_REFERENCED, KPF_ACTIVE, KPF_BUDDY, KPF_ANON = 5, 2, 6, 10, 12
IN_USE = 1 << KPF_LRU | 1 << KPF_ANON


@dataclasses.dataclass
class FakeSignals:
    """MemorySignals the test sets: MemAvailable, and each page's use flags (the
    default: ``use_of``, IN_USE unless said otherwise)."""

    available: int | None = 300 * MIB
    use: dict[int, int | None] = dataclasses.field(default_factory=dict)
    use_of: Callable[[int], int | None] = lambda pfn: IN_USE
    meminfo_reads: int = 0
    page_reads: int = 0

    def mem_available(self) -> int | None:
        self.meminfo_reads += 1
        return self.available

    def page_flags(self, pfns: Sequence[int]) -> list[int | None]:
        self.page_reads += len(pfns)
        return [self.use[pfn] if pfn in self.use else self.use_of(pfn) for pfn in pfns]


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


# --- Relief on its own ---------------------------------------------------------------


def test_memavailable_risen_by_a_block_since_the_refusal_ends_every_window(
    clock: VirtualClock,
) -> None:
    signals = FakeSignals()
    relief = Relief(signals, clock)
    relief.refused()
    clock.advance(RECHECK_SECONDS)
    signals.available = 300 * MIB + RISE_BYTES - 1
    assert relief.check(clock.now) is None
    clock.advance(RECHECK_SECONDS)
    signals.available = 300 * MIB + RISE_BYTES
    relieved = relief.check(clock.now)
    assert relieved is not None and relieved.everything
    assert relieved.why == f"MemAvailable rose by {RISE_BYTES >> 20} MiB"
    # Measured from the new level on: no second relief without a second rise.
    clock.advance(RECHECK_SECONDS)
    assert relief.check(clock.now) is None


def test_signs_are_read_at_most_once_per_interval(clock: VirtualClock) -> None:
    signals = FakeSignals()
    relief = Relief(signals, clock)
    relief.refused((7,), pfn=0x1000)
    reads = signals.meminfo_reads
    for _ in range(10):
        clock.advance(RECHECK_SECONDS / 10 - 1e-9)
        assert relief.check(clock.now) is None
    assert signals.meminfo_reads == reads
    clock.advance(RECHECK_SECONDS)
    assert relief.check(clock.now) is None
    assert signals.meminfo_reads == reads + 1


def test_the_level_is_that_of_the_last_refusal(clock: VirtualClock) -> None:
    """A later refusal at a higher MemAvailable moves the level up: the rise that
    counts is the one after the last 'no'."""
    signals = FakeSignals()
    relief = Relief(signals, clock)
    relief.refused()
    signals.available += RISE_BYTES
    relief.refused()  # refused again although the memory came: not enough after all
    clock.advance(RECHECK_SECONDS)
    assert relief.check(clock.now) is None
    assert relief.baseline == 300 * MIB + RISE_BYTES


def test_unreadable_memavailable_never_ends_a_window(clock: VirtualClock) -> None:
    signals = FakeSignals(available=None)
    relief = Relief(signals, clock)
    relief.refused()
    signals.available = 4 << 30
    clock.advance(RECHECK_SECONDS)
    assert relief.check(clock.now) is None


def test_a_refused_page_that_changes_use_ends_its_subblocks_windows_only(
    clock: VirtualClock,
) -> None:
    signals = FakeSignals()
    relief = Relief(signals, clock)
    relief.refused(range(10, 12), pfn=0x5000)
    relief.refused((20,), pfn=0x6000)
    relief.refused((30,), pfn=0x7000)
    # Page aging (referenced, active) is not a change of use; a page gone unreadable is
    # not either.
    signals.use[0x5000] = IN_USE | 1 << KPF_REFERENCED | 1 << KPF_ACTIVE
    signals.use[0x7000] = None
    clock.advance(RECHECK_SECONDS)
    assert relief.check(clock.now) is None
    signals.use[0x6000] = 1 << KPF_BUDDY  # freed
    clock.advance(RECHECK_SECONDS)
    relieved = relief.check(clock.now)
    assert relieved is not None and not relieved.everything
    assert relieved.subblocks == {20}
    assert "0x6000" in relieved.why
    assert set(relief.pages) == {10, 11, 30}


def test_forget_and_clear_stop_watching(clock: VirtualClock) -> None:
    signals = FakeSignals()
    relief = Relief(signals, clock)
    relief.refused((1, 2), pfn=0x10)
    relief.forget((1,))
    assert set(relief.pages) == {2}
    relief.clear()
    assert relief.pages == {} and relief.baseline is None
    signals.available = 4 << 30
    clock.advance(RECHECK_SECONDS)
    assert relief.check(clock.now) is None


# --- ProcMemorySignals over files ----------------------------------------------------


def test_proc_signals_read_memavailable_and_masked_page_flags(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  2048000 kB\nMemAvailable:  307200 kB\n")
    kpageflags = tmp_path / "kpageflags"
    flags = [IN_USE | 1 << KPF_REFERENCED, 1 << KPF_BUDDY, 0]
    kpageflags.write_bytes(b"".join(struct.pack("=Q", f) for f in flags))
    signals = ProcMemorySignals(meminfo=meminfo, kpageflags=kpageflags)
    assert signals.mem_available() == 300 * MIB
    assert signals.page_flags([0, 1, 2, 3]) == [*flags, None]
    assert IN_USE & USE_FLAGS == IN_USE and not USE_FLAGS & 1 << KPF_REFERENCED


def test_proc_signals_without_the_files_read_nothing(tmp_path: Path) -> None:
    signals = ProcMemorySignals(meminfo=tmp_path / "no", kpageflags=tmp_path / "none")
    assert signals.mem_available() is None
    assert signals.page_flags([1, 2]) == [None, None]


# --- the driver core -----------------------------------------------------------------


def with_relief(driver: DeviceDriver, signals: FakeSignals, clock: VirtualClock) -> None:
    driver.relief = Relief(signals, clock)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from opened(Rig(tmp_path))


def step_until_progress(rig: Rig, limit: float) -> tuple[StepResult, list[float]]:
    """Step, advancing the clock through WAITs, until a PROGRESS; the waits taken."""
    assert rig.driver is not None
    waits: list[float] = []
    while rig.clock.now < limit:
        result = rig.driver.step()
        if result.outcome is not Outcome.WAIT:
            return result, waits
        waits.append(result.wait_seconds)
        rig.clock.advance(result.wait_seconds)
    pytest.fail(f"no progress before {limit} s")


def refuse_the_only_block(rig: Rig, signals: FakeSignals) -> DeviceDriver:
    """One block online, its offline refused: the shrink to 0 is blocked."""
    rig.model.resize(128 * MIB)
    rig.converge()
    driver = rig.driver
    assert driver is not None
    with_relief(driver, signals, rig.clock)
    rig.kernel.refuse_offline.add(MB0)
    rig.model.resize(0)
    assert driver.step().step == planner.OfflineStep(MB0)
    assert MB0 in driver.refused_blocks
    return driver


def test_a_refused_offline_is_tried_again_once_memavailable_rises(rig: Rig) -> None:
    signals = FakeSignals()
    driver = refuse_the_only_block(rig, signals)
    until = driver.refused_blocks.until[MB0]
    assert until - rig.clock.now >= DEFAULT_REFUSAL_BACKOFF.initial
    blocked = driver.step()
    assert blocked.outcome is Outcome.WAIT and blocked.step == planner.Done(0, 0, blocked=True)
    # The wait is the next look at the signs, not the window's end.
    assert blocked.wait_seconds == pytest.approx(RECHECK_SECONDS)
    rig.clock.advance(blocked.wait_seconds)
    rig.kernel.refuse_offline.clear()  # the workload ended ...
    signals.available += 2 * RISE_BYTES  # ... and its memory is free
    result, waits = step_until_progress(rig, until)
    assert result.step == planner.OfflineStep(MB0)
    assert rig.clock.now < until - 3.0
    assert waits == []
    rig.converge()
    assert rig.model.plugged_size == 0
    # The count stays: a refusal now would wait twice as long (as after expiry).
    assert MB0 not in driver.refused_blocks.in_a_row


def test_without_a_sign_the_block_waits_its_whole_window(rig: Rig) -> None:
    signals = FakeSignals()
    driver = refuse_the_only_block(rig, signals)
    until = driver.refused_blocks.until[MB0]
    attempts = rig.kernel.offline_refusals
    result, waits = step_until_progress(rig, until + 60.0)
    # Looked at once a RECHECK_SECONDS; tried again only when the window ended.
    assert rig.clock.now == pytest.approx(until)
    assert len(waits) >= int((until - 0.5) / RECHECK_SECONDS) - 1
    assert max(waits) <= RECHECK_SECONDS + 1e-9
    assert result.step == planner.OfflineStep(MB0)
    assert rig.kernel.offline_refusals == attempts + 1


def test_a_rise_ends_nothing_when_no_window_is_open(rig: Rig) -> None:
    """Converged, nothing refused: the signs are not read at all (the idle agent sleeps)."""
    signals = FakeSignals()
    rig.model.resize(128 * MIB)
    rig.converge()
    assert rig.driver is not None
    with_relief(rig.driver, signals, rig.clock)
    rig.clock.advance(10.0)
    assert rig.driver.step().outcome is Outcome.DONE
    assert signals.meminfo_reads == 0


def test_a_config_change_forgets_what_the_relief_watched(rig: Rig) -> None:
    signals = FakeSignals()
    driver = refuse_the_only_block(rig, signals)
    assert driver.relief is not None and driver.relief.baseline is not None
    rig.model.resize(128 * MIB)
    assert driver.relief.baseline is None
    assert not driver.refused_blocks


@pytest.fixture
def pages_rig(tmp_path: Path) -> Iterator[PagesRig]:
    yield from opened(PagesRig(tmp_path))


def test_a_subblock_is_taken_once_its_pinned_page_is_freed(pages_rig: PagesRig) -> None:
    """The block's offline is refused, and so is the take of its top subblock (a pinned
    page) and of every other (pinned too): blocked. The pin of the top subblock's page
    goes and the page is freed: that subblock alone is taken within RECHECK_SECONDS."""
    rig = pages_rig
    rig.resize(128 * MIB)
    rig.converge()
    driver = rig.driver
    assert driver is not None
    top = top_subblock(MB0)
    pins = {sb: rig.pfns(sb)[7] for sb in range(top - 63, top + 1)}
    rig.pages.pinned.update(pins.values())
    signals = FakeSignals(use_of=lambda pfn: IN_USE if pfn in rig.pages.pinned else 0)
    with_relief(driver, signals, rig.clock)
    rig.kernel.refuse_offline.add(MB0)
    rig.resize(126 * MIB)
    for _ in range(200):
        result = driver.step()
        if result.outcome is Outcome.WAIT:
            break
        assert result.outcome is Outcome.PROGRESS
    assert result.step == planner.Done(2 * MIB, 0, blocked=True) or (
        isinstance(result.step, planner.Done) and result.step.blocked
    )
    assert top in driver.refused_subblocks
    until = driver.refused_subblocks.until[top]
    rig.pages.pinned.discard(pins[top])  # the pin goes; the page is freed
    rig.clock.advance(result.wait_seconds)
    result, _ = step_until_progress(rig, until)
    assert isinstance(result.step, planner.TakeStep)
    assert rig.clock.now <= until - 3.0
    rig.converge()
    assert rig.model.plugged_size == 126 * MIB
    assert rig.holes() == [top]
    rig.check_holes_poisoned()
