"""The memory-failure seam: ProcPages over a fake tree, take/give_back over FakePages."""

from __future__ import annotations

import errno
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from vmem_guest import pages as pages_mod
from vmem_guest import requirements
from vmem_guest.errors import KernelError, PageRefused
from vmem_guest.pages import (
    FLAG_READ_BATCH,
    KPF_HWPOISON,
    TAKE_ROUNDS,
    PageControl,
    ProcPages,
    all_poisoned,
    give_back,
    poisoned_count,
    soft_offline_error,
    take,
)
from vmem_guest.sim.pages import FakePages, PageState

PAGE = 4096
SUBBLOCK = 512  # pages of 2 MiB
KPAGEFLAGS_PFNS = 2048
#: Flags of pages that are not poisoned but have neighbouring bits set (18 KPF_HWPOISON-1...).
OTHER_FLAGS = (1 << (KPF_HWPOISON - 1)) | (1 << (KPF_HWPOISON + 1)) | 1


def write_kpageflags(path: Path, poisoned: set[int], pfns: int = KPAGEFLAGS_PFNS) -> None:
    """/proc/kpageflags as the kernel lays it out: one u64 per pfn, the kernel's byte order
    (little-endian on x86-64); every unpoisoned pfn gets other bits set."""
    entries = [1 << KPF_HWPOISON if pfn in poisoned else OTHER_FLAGS for pfn in range(pfns)]
    path.write_bytes(struct.pack(f"={pfns}Q", *entries))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """sys/devices/system/memory, proc, sys/kernel/debug and securityfs, all present."""
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "soft_offline_page").write_bytes(b"")
    (tmp_path / "debug" / "hwpoison").mkdir(parents=True)
    (tmp_path / "debug" / "hwpoison" / "unpoison-pfn").write_bytes(b"")
    (tmp_path / "security").mkdir()
    (tmp_path / "security" / "lockdown").write_text("[none] integrity confidentiality\n")
    (tmp_path / "meminfo").write_text(
        "MemTotal:        4030712 kB\nHardwareCorrupted:    8 kB\nAnonHugePages:  0 kB\n"
    )
    write_kpageflags(tmp_path / "kpageflags", set())
    return tmp_path


def proc_pages(tree: Path, page_size: int = PAGE) -> ProcPages:
    return ProcPages(
        memory_root=tree / "memory",
        kpageflags=tree / "kpageflags",
        debugfs=tree / "debug",
        lockdown=tree / "security" / "lockdown",
        meminfo=tree / "meminfo",
        page_size=page_size,
    )


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --- ProcPages: soft offline ---------------------------------------------------------


def test_soft_offline_writes_the_byte_address_in_hex(tree: Path) -> None:
    with proc_pages(tree) as pages:
        pages.soft_offline(0x12345)
    assert (tree / "memory" / "soft_offline_page").read_bytes() == b"0x12345000"
    assert pages.soft_offline_writes == 1


def test_soft_offline_address_follows_the_page_size(tree: Path) -> None:
    with proc_pages(tree, page_size=64 << 10) as pages:
        pages.soft_offline(3)
    assert (tree / "memory" / "soft_offline_page").read_bytes() == b"0x30000"


def test_soft_offline_keeps_its_file_open(tree: Path) -> None:
    target = tree / "memory" / "soft_offline_page"
    with proc_pages(tree) as pages:
        pages.soft_offline(0x100000)
        target.rename(tree / "memory" / "moved")  # a reopen would now fail with ENOENT
        pages.soft_offline(0x200000)
        assert pages.soft_offline_writes == 2
    # Each write at offset 0 replaces the previous word (same length here).
    assert (tree / "memory" / "moved").read_bytes() == b"0x200000000"


def test_soft_offline_that_cannot_open_is_a_kernel_error_not_a_refusal(tree: Path) -> None:
    target = tree / "memory" / "soft_offline_page"
    target.unlink()
    target.mkdir()  # open(O_WRONLY) of a directory: EISDIR
    with proc_pages(tree) as pages, pytest.raises(KernelError) as caught:
        pages.soft_offline(1)
    assert not isinstance(caught.value, PageRefused)
    assert caught.value.errno == errno.EISDIR
    assert caught.value.op == "soft offline"


@pytest.mark.parametrize(
    "err",
    [errno.EBUSY, errno.EAGAIN, errno.EIO, errno.ENOMEM, pages_mod.EHWPOISON, errno.ENXIO],
)
def test_soft_offline_refusals_are_page_refused(err: int) -> None:
    error = soft_offline_error(0xABC, err)
    assert isinstance(error, PageRefused)
    assert (error.pfn, error.errno, error.fields["pfn"]) == (0xABC, err, 0xABC)


@pytest.mark.parametrize("err", [errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT])
def test_other_soft_offline_errors_are_plain_kernel_errors(err: int) -> None:
    error = soft_offline_error(0xABC, err)
    assert type(error) is KernelError
    assert (error.op, error.errno) == ("soft offline", err)
    assert "0xabc" in str(error)


def test_ehwpoison_is_linux_133_on_x86() -> None:
    assert pages_mod.EHWPOISON == 133


# --- ProcPages: kpageflags ---------------------------------------------------------


def test_poisoned_reads_bit_19_of_each_entry(tree: Path) -> None:
    chosen = {100, 101, 611, 612, 1023, 1399}
    write_kpageflags(tree / "kpageflags", chosen)
    with proc_pages(tree) as pages:
        answer = pages.poisoned(100, 1300)
    assert len(answer) == 1300
    assert {100 + offset for offset, bad in enumerate(answer) if bad} == chosen


def test_a_range_of_1300_pfns_costs_three_preads(tree: Path) -> None:
    with proc_pages(tree) as pages:
        pages.poisoned(7, 1300)  # 512 + 512 + 276
        assert pages.flag_reads == 3
        pages.poisoned(0, FLAG_READ_BATCH)
        assert pages.flag_reads == 4
        assert pages.poisoned(5, 0) == []
        assert pages.flag_reads == 4


def test_poisoned_keeps_kpageflags_open(tree: Path) -> None:
    write_kpageflags(tree / "kpageflags", {3})
    with proc_pages(tree) as pages:
        assert pages.poisoned(3, 1) == [True]
        (tree / "kpageflags").rename(tree / "gone")
        assert pages.poisoned(2, 2) == [False, True]


def test_poisoned_short_read_is_a_kernel_error(tree: Path) -> None:
    with proc_pages(tree) as pages, pytest.raises(KernelError) as caught:
        pages.poisoned(KPAGEFLAGS_PFNS - 10, 20)  # beyond the last pfn: the kernel's max_pfn
    assert caught.value.errno == errno.EIO
    assert "read 80 of 160 bytes" in str(caught.value)


def test_poisoned_of_an_unreadable_file_is_a_kernel_error(tree: Path) -> None:
    (tree / "kpageflags").unlink()
    (tree / "kpageflags").mkdir()  # opens, but pread answers EISDIR
    with proc_pages(tree) as pages, pytest.raises(KernelError) as caught:
        pages.poisoned(0, 1)
    assert caught.value.errno == errno.EISDIR


# --- ProcPages: unpoison, meminfo, close -------------------------------------------


def test_unpoison_writes_the_pfn_in_decimal(tree: Path) -> None:
    with proc_pages(tree) as pages:
        pages.unpoison(1234567)
        assert pages.unpoison_writes == 1
    assert (tree / "debug" / "hwpoison" / "unpoison-pfn").read_bytes() == b"1234567"


def test_unpoison_failure_is_a_kernel_error(tree: Path) -> None:
    target = tree / "debug" / "hwpoison" / "unpoison-pfn"
    target.unlink()
    target.mkdir()
    with proc_pages(tree) as pages, pytest.raises(KernelError) as caught:
        pages.unpoison(42)
    assert (caught.value.op, caught.value.errno) == ("unpoison", errno.EISDIR)


def test_hardware_corrupted_bytes(tree: Path) -> None:
    pages = proc_pages(tree)
    assert pages.hardware_corrupted_bytes() == 8 * 1024
    (tree / "meminfo").write_text("MemTotal:        4030712 kB\n")
    assert pages.hardware_corrupted_bytes() is None
    (tree / "meminfo").write_text("HardwareCorrupted: lots kB\n")
    assert pages.hardware_corrupted_bytes() is None
    (tree / "meminfo").unlink()
    assert pages.hardware_corrupted_bytes() is None


def test_close_closes_the_kept_files(tree: Path) -> None:
    before = open_fds()
    with proc_pages(tree) as pages:
        pages.soft_offline(1)
        pages.poisoned(0, 1)
        pages.unpoison(1)
        assert len(open_fds() - before) == 3
    assert open_fds() == before
    pages.close()  # closing twice is harmless


def test_proc_pages_is_a_page_control(tree: Path) -> None:
    control: PageControl = proc_pages(tree)
    assert control.page_size == PAGE


# --- ProcPages: unavailable_reason -------------------------------------------------


def test_available_when_every_piece_is_there(tree: Path) -> None:
    assert proc_pages(tree).unavailable_reason() is None


def test_available_without_the_lockdown_lsm(tree: Path) -> None:
    (tree / "security" / "lockdown").unlink()
    assert proc_pages(tree).unavailable_reason() is None


def test_unavailable_without_memory_failure(tree: Path) -> None:
    (tree / "memory" / "soft_offline_page").unlink()
    reason = proc_pages(tree).unavailable_reason()
    assert reason is not None and "CONFIG_MEMORY_FAILURE" in reason
    assert "soft_offline_page" in reason


def test_unavailable_without_kpageflags(tree: Path) -> None:
    (tree / "kpageflags").unlink()
    reason = proc_pages(tree).unavailable_reason()
    assert reason is not None and "CONFIG_PROC_PAGE_MONITOR" in reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000")
def test_unavailable_when_kpageflags_is_not_readable(tree: Path) -> None:
    (tree / "kpageflags").chmod(0)
    reason = proc_pages(tree).unavailable_reason()
    assert reason is not None and "root" in reason


def test_unavailable_when_debugfs_is_not_mounted(tree: Path) -> None:
    (tree / "debug" / "hwpoison" / "unpoison-pfn").unlink()
    (tree / "debug" / "hwpoison").rmdir()  # an empty mount point
    debugfs = tree / "debug"
    expected = requirements.DEBUGFS.refusal(f"debugfs is not mounted at {debugfs}")
    assert proc_pages(tree).unavailable_reason() == expected
    assert expected.endswith("; fix: mount -t debugfs none /sys/kernel/debug (CONFIG_DEBUG_FS=y)")
    debugfs.rmdir()
    assert proc_pages(tree).unavailable_reason() == expected


def test_unavailable_without_hwpoison_inject(tree: Path) -> None:
    (tree / "debug" / "hwpoison" / "unpoison-pfn").unlink()
    reason = proc_pages(tree).unavailable_reason()
    assert reason is not None
    assert "CONFIG_HWPOISON_INJECT" in reason and "hwpoison_inject" in reason
    assert "not mounted" not in reason


@pytest.mark.parametrize("mode", ["integrity", "confidentiality"])
def test_unavailable_under_lockdown(tree: Path, mode: str) -> None:
    words = ["none", "integrity", "confidentiality"]
    text = " ".join(f"[{word}]" if word == mode else word for word in words)
    (tree / "security" / "lockdown").write_text(f"{text}\n")
    reason = proc_pages(tree).unavailable_reason()
    assert reason is not None
    assert f"locked down ({mode})" in reason and "debugfs" in reason


def test_the_first_missing_piece_is_named(tree: Path) -> None:
    (tree / "memory" / "soft_offline_page").unlink()
    (tree / "kpageflags").unlink()
    reason = proc_pages(tree).unavailable_reason()
    assert reason is not None and "CONFIG_MEMORY_FAILURE" in reason


# --- take --------------------------------------------------------------------------


def fake(**kwargs: Any) -> FakePages:
    return FakePages(rng=random.Random(7), **kwargs)


def test_clean_take_poisons_every_page_in_one_round() -> None:
    pages = fake()
    writes = take(pages, 4096, SUBBLOCK)
    assert writes == SUBBLOCK
    assert pages.poisoned_set() == set(range(4096, 4096 + SUBBLOCK))
    assert pages.flag_reads == 2  # before and after the one round
    assert pages.hardware_corrupted_bytes() == SUBBLOCK * PAGE


def test_take_skips_pages_already_poisoned() -> None:
    pages = fake()
    take(pages, 100, 10)
    assert take(pages, 96, 20) == 10
    assert pages.soft_offline_writes == 20
    assert all_poisoned(pages, 96, 20)


def test_lost_races_need_more_rounds_but_end_all_poisoned() -> None:
    pages = fake(lost_race_rate=0.25)
    writes = take(pages, 0, SUBBLOCK)
    assert pages.lost_races > 0
    assert writes == SUBBLOCK + pages.lost_races
    assert pages.flag_reads > 2  # more than one round
    assert all_poisoned(pages, 0, SUBBLOCK)


def test_migration_into_the_range_ends_all_poisoned() -> None:
    """A target that lands on a free page ahead in the range is written later in the
    same round (it was unpoisoned in the round's read) and migrated in turn."""
    pages = fake(migration_in_range_rate=1.0)
    writes = take(pages, 0, SUBBLOCK)
    assert pages.migrations_in_range > 0
    assert writes == SUBBLOCK
    assert all_poisoned(pages, 0, SUBBLOCK)


@pytest.mark.parametrize(
    ("race", "counter"),
    [
        ({"migration_in_range_rate": 1.0, "lost_race_rate": 0.2}, "migrations_in_range"),
        ({"reallocate_rate": 0.5, "lost_race_rate": 0.1}, "reallocations"),
    ],
    ids=["migration", "reallocation"],
)
def test_lost_races_need_later_rounds(race: dict[str, float], counter: str) -> None:
    """A page whose write was lost stays unpoisoned and can receive a migrated (or
    reallocated) page; only a later read shows it, and a later round takes it."""
    pages = fake(**race)
    writes = take(pages, 0, SUBBLOCK)
    assert getattr(pages, counter) > 0 and pages.lost_races > 0
    assert writes > SUBBLOCK and pages.flag_reads > 2
    assert all_poisoned(pages, 0, SUBBLOCK)


def test_reallocation_between_writes_ends_all_poisoned() -> None:
    """A page allocated after the round's read is written in turn, and migrated."""
    pages = fake(reallocate_rate=0.5)
    assert take(pages, 0, SUBBLOCK) == SUBBLOCK
    assert pages.reallocations > 0
    assert all_poisoned(pages, 0, SUBBLOCK)


def test_a_pinned_page_is_refused_with_ebusy_and_its_pfn() -> None:
    pages = fake(pinned={1030})
    with pytest.raises(PageRefused) as caught:
        take(pages, 1024, SUBBLOCK)
    assert (caught.value.pfn, caught.value.errno) == (1030, errno.EBUSY)
    # The refusal came at once: the pages before it are taken and stay taken.
    assert pages.soft_offline_writes == 7
    assert pages.poisoned_set() == set(range(1024, 1030))


def test_an_unmovable_page_is_refused_with_eio() -> None:
    pages = fake(unmovable={2000})
    with pytest.raises(PageRefused) as caught:
        take(pages, 1536, SUBBLOCK)
    assert (caught.value.pfn, caught.value.errno) == (2000, errno.EIO)


def test_a_page_outside_online_memory_is_refused_with_eio() -> None:
    pages = fake(online=lambda pfn: pfn < 1000)
    with pytest.raises(PageRefused) as caught:
        take(pages, 996, 8)
    assert (caught.value.pfn, caught.value.errno) == (1000, errno.EIO)
    assert pages.poisoned_set() == {996, 997, 998, 999}


def test_take_gives_up_after_its_rounds() -> None:
    pages = fake(lost_race_rate=1.0)
    with pytest.raises(PageRefused) as caught:
        take(pages, 512, 16)
    assert caught.value.pfn == 512
    assert caught.value.errno == errno.EBUSY
    assert f"still in use after {TAKE_ROUNDS} rounds" in str(caught.value)
    assert pages.soft_offline_writes == TAKE_ROUNDS * 16
    assert pages.poisoned_set() == set()


def test_take_rounds_is_a_parameter() -> None:
    pages = fake(lost_race_rate=1.0)
    with pytest.raises(PageRefused, match="still in use after 3 rounds"):
        take(pages, 0, 4, rounds=3)
    assert pages.soft_offline_writes == 12


def test_take_on_proc_pages_writes_only_unpoisoned_pages(tree: Path) -> None:
    """The real class under the algorithm: the fake tree never poisons, so every round
    writes the same pages, and the give-up names the first of them."""
    write_kpageflags(tree / "kpageflags", {10, 12})
    with proc_pages(tree) as pages, pytest.raises(PageRefused) as caught:
        take(pages, 10, 4, rounds=2)
    assert caught.value.pfn == 11
    assert pages.soft_offline_writes == 4  # pfns 11 and 13, twice
    assert pages.flag_reads == 3
    assert (tree / "memory" / "soft_offline_page").read_bytes() == b"0xd000"


# --- give_back ---------------------------------------------------------------------


def test_give_back_frees_every_poisoned_page() -> None:
    pages = fake()
    take(pages, 0, SUBBLOCK)
    assert give_back(pages, 0, SUBBLOCK) == SUBBLOCK
    assert pages.unpoisoned == SUBBLOCK
    assert pages.poisoned_set() == set()
    assert pages.hardware_corrupted_bytes() == 0
    assert all(pages.state(pfn) is PageState.FREE for pfn in range(SUBBLOCK))


def test_give_back_counts_only_poisoned_pages() -> None:
    pages = fake()
    take(pages, 10, 5)
    assert poisoned_count(pages, 0, 32) == 5
    assert give_back(pages, 0, 32) == 5
    assert pages.unpoison_writes == 5
    assert poisoned_count(pages, 0, 32) == 0


class StuckUnpoison(FakePages):
    """A kernel that answers an unpoison of ``stuck`` with 0 and leaves it poisoned."""

    stuck = 21

    def unpoison(self, pfn: int) -> None:
        if pfn != self.stuck:
            super().unpoison(pfn)


def test_give_back_checks_that_pages_left_poison() -> None:
    pages = StuckUnpoison(rng=random.Random(1))
    take(pages, 16, 16)
    with pytest.raises(KernelError) as caught:
        give_back(pages, 16, 16)
    assert (caught.value.op, caught.value.errno) == ("unpoison", errno.EBUSY)
    assert "0x15" in str(caught.value)
    assert pages.poisoned_set() == {21}


def test_fake_unpoison_refuses_a_page_that_is_not_poisoned() -> None:
    pages = fake()
    with pytest.raises(KernelError) as caught:
        pages.unpoison(5)
    assert caught.value.errno == errno.EBUSY
    assert pages.unpoison_writes == 1 and pages.unpoisoned == 0


# --- FakePages: blocks, state, determinism -----------------------------------------


def test_onlining_wipes_poison_but_hardware_corrupted_stays() -> None:
    pages = fake()
    take(pages, 0, 2 * SUBBLOCK)
    pages.block_offlined(0, 2 * SUBBLOCK)
    assert pages.poisoned_set() == set(range(2 * SUBBLOCK))  # offline keeps the flags
    pages.block_onlined(0, 2 * SUBBLOCK)
    assert poisoned_count(pages, 0, 2 * SUBBLOCK) == 0
    assert pages.leaked == 2 * SUBBLOCK
    assert pages.hardware_corrupted_bytes() == 2 * SUBBLOCK * PAGE
    assert pages.state(3) is PageState.FREE
    with pytest.raises(KernelError):
        pages.unpoison(3)
    take(pages, 0, SUBBLOCK)
    assert pages.hardware_corrupted_bytes() == 3 * SUBBLOCK * PAGE


def test_onlining_a_range_that_cuts_groups_wipes_only_the_range() -> None:
    pages = fake()
    take(pages, 0, 3 * SUBBLOCK)
    pages.block_onlined(100, SUBBLOCK + 200)
    assert pages.poisoned_set() == set(range(100)) | set(range(SUBBLOCK + 300, 3 * SUBBLOCK))
    assert pages.leaked == SUBBLOCK + 200


def test_onlined_pages_are_free_without_drawing() -> None:
    pages = fake(in_use_rate=1.0)
    assert pages.state(SUBBLOCK + 1) is PageState.IN_USE
    pages.block_onlined(SUBBLOCK, SUBBLOCK)
    state = pages.rng.getstate()
    assert {pages.state(pfn) for pfn in range(SUBBLOCK, 2 * SUBBLOCK)} == {PageState.FREE}
    assert pages.rng.getstate() == state


def test_states_are_drawn_lazily_at_the_in_use_rate() -> None:
    pages = fake(in_use_rate=0.5)
    huge = 1 << 40  # a pfn of 4 PiB: nothing is allocated for the region below it
    assert pages.poisoned(huge, 4) == [False] * 4
    assert pages.poisoned_set() == set()
    in_use = sum(pages.state(pfn) is PageState.IN_USE for pfn in range(huge, huge + 4000))
    assert 1700 < in_use < 2300
    assert pages.state(huge + 5) is pages.state(huge + 5)  # drawn once, then kept


def test_fake_states_of_refused_pages() -> None:
    pages = fake(unmovable={1}, pinned={2})
    assert pages.state(1) is PageState.UNMOVABLE
    assert pages.state(2) is PageState.PINNED


def test_fake_counts_flag_reads_in_batches() -> None:
    pages = fake()
    pages.poisoned(0, 1300)
    assert pages.flag_reads == 3


def test_fake_is_deterministic_given_its_rng() -> None:
    def run(seed: int) -> tuple[object, ...]:
        pages = FakePages(
            rng=random.Random(seed),
            lost_race_rate=0.2,
            migration_in_range_rate=0.5,
            reallocate_rate=0.3,
        )
        take(pages, 0, SUBBLOCK)
        after = tuple(pages.state(pfn) for pfn in range(SUBBLOCK, SUBBLOCK + 64))
        return pages.soft_offline_writes, pages.lost_races, pages.reallocations, after

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_fake_unavailable_reason_is_a_parameter() -> None:
    assert fake().unavailable_reason() is None
    assert fake(unavailable="no debugfs").unavailable_reason() == "no debugfs"
