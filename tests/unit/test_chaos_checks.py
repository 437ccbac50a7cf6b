"""The checks of scripts/chaos.py that run on the host: MemTotal after a system_reset,
and reading the guest's tracker files (retrying torn copies only). No VM: the
tracker files are written here by a real owner."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import chaos  # noqa: E402

from vmem_guest.blocks import Geometry  # noqa: E402
from vmem_guest.errors import TrackerError  # noqa: E402
from vmem_guest.tracker import Tracker, TrackerIdentity, write_in_progress  # noqa: E402
from vmem_guest.tracker.layout import GENERATION, GENERATION_OFFSET  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
BOOT = 3 * GIB + 512 * MIB  # a boot's MemTotal
NAME = "0000:00:03.0"
GEOMETRY = Geometry(
    addr=4 * GIB, region_size=1 * GIB, block_size=2 * MIB, memory_block_size=128 * MIB
)


# --- MemTotal after a system_reset --------------------------------------------------


@pytest.mark.parametrize("delta", [0, -4096, 4096, -chaos.RESET_MEMTOTAL_MARGIN, 3 * MIB])
def test_a_new_boot_a_few_kib_off_is_boot_memory(delta: int) -> None:
    assert chaos.reset_memtotal_problem(BOOT + delta, BOOT) == ""


@pytest.mark.parametrize(
    "delta",
    [
        128 * MIB - 4096,  # one memory block of device memory, minus a boot's noise
        128 * MIB,
        chaos.RESET_MEMTOTAL_MARGIN + 4096,
        -(chaos.RESET_MEMTOTAL_MARGIN + 4096),
    ],
)
def test_memory_left_online_after_a_reset_is_found(delta: int) -> None:
    problem = chaos.reset_memtotal_problem(BOOT + delta, BOOT)
    assert problem.startswith("MemTotal after reboot"), problem
    assert f"{delta / MIB:+.1f} MiB" in problem


def test_the_margin_is_below_any_memory_block() -> None:
    assert chaos.RESET_MEMTOTAL_MARGIN < chaos.MEMORY_BLOCK // 2
    # The harness's margin for the same comparison in the VM tests is the same one.
    from vmharness import REBOOT_MEMTOTAL_MARGIN

    assert chaos.RESET_MEMTOTAL_MARGIN == REBOOT_MEMTOTAL_MARGIN


# --- reading the tracker files ------------------------------------------------------


@pytest.fixture
def tracker_bytes(tmp_path: Path) -> bytes:
    with Tracker.open(tmp_path, TrackerIdentity(NAME, GEOMETRY)) as tracker:
        first = GEOMETRY.subblocks_of(33)
        tracker.record_plugged(GEOMETRY.subblock_addr(first.start), len(first))
        return tracker.path.read_bytes()


def odd(data: bytes) -> bytes:
    """``data`` as a copy taken inside a write section."""
    copy = bytearray(data)
    generation = GENERATION.unpack_from(copy, GENERATION_OFFSET)[0]
    GENERATION.pack_into(copy, GENERATION_OFFSET, generation | 1)
    return bytes(copy)


class Reads:
    """What the guest's files read as, one list of copies per attempt."""

    def __init__(self, *attempts: list[tuple[str, bytes, bytes]]) -> None:
        self.attempts = list(attempts)
        self.count = 0
        self.sleeps: list[float] = []

    def __call__(self) -> list[tuple[str, bytes, bytes]]:
        self.count += 1
        return self.attempts[min(self.count, len(self.attempts)) - 1]


def test_a_torn_copy_is_read_again(tracker_bytes: bytes) -> None:
    torn = odd(tracker_bytes)
    assert write_in_progress(torn) and not write_in_progress(tracker_bytes)
    name = NAME + ".state"
    reads = Reads(
        [(name, torn, torn)],  # equal, but inside one write section
        [(name, tracker_bytes, torn)],  # unequal
        [(name, tracker_bytes, tracker_bytes)],
    )
    status = chaos.stable_status(reads, chaos.Chaos._decode, reads.sleeps.append)
    assert reads.count == 3 and len(reads.sleeps) == 2
    assert status[GEOMETRY.addr]["plugged_size"] == 128 * MIB


def test_a_corrupt_copy_is_a_finding_not_a_retry(tracker_bytes: bytes) -> None:
    corrupt = b"XXXXXXXX" + tracker_bytes[8:]  # no magic; the generation is even
    name = NAME + ".state"
    reads = Reads([(name, corrupt, corrupt)], [(name, tracker_bytes, tracker_bytes)])
    with pytest.raises(TrackerError, match="magic"):
        chaos.stable_status(reads, chaos.Chaos._decode, reads.sleeps.append)
    assert reads.count == 1 and not reads.sleeps


def test_copies_that_stay_torn_give_up(tracker_bytes: bytes) -> None:
    torn = odd(tracker_bytes)
    reads = Reads([(NAME + ".state", torn, torn)])
    with pytest.raises(RuntimeError, match="no stable copy"):
        chaos.stable_status(reads, chaos.Chaos._decode, reads.sleeps.append)
    assert reads.count == chaos.STATUS_ATTEMPTS


def test_a_copy_too_short_for_a_generation_is_not_torn() -> None:
    assert not write_in_progress(b"VMEMTRK\0")
