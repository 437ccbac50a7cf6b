"""The shared-memory tracker: layout, transitions, recovery, locking, concurrent readers."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmem_guest import render
from vmem_guest import tracker as tracker_module
from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.device import InterruptMode
from vmem_guest.errors import HolesKeepBlockOnline, SafetyError, TrackerError, TrackerLocked
from vmem_guest.spec import RequestType
from vmem_guest.tracker import (
    HEADER_SIZE,
    LAYOUTS,
    NO_INTENT,
    NODE_UNKNOWN,
    RECORD_SIZE,
    VERSION,
    BlockRecordLayout,
    BrokenReason,
    Intent,
    Tracker,
    TrackerHeader,
    TrackerIdentity,
    TrackerReader,
    TrackerSnapshot,
    UnitClass,
    consistency_problem,
    list_trackers,
    state_disagreement,
    tracker_path,
)
from vmem_guest.tracker.layout import FileLayout

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

#: Sub Block Mode as QEMU's default on x86-64: 2 MiB device blocks, 128 MiB memory blocks.
SBM = Geometry(addr=4 * GIB, region_size=1 * GIB, block_size=2 * MIB, memory_block_size=128 * MIB)
#: Big Block Mode: one 256 MiB device block spans two 128 MiB memory blocks.
BBM = Geometry(addr=4 * GIB, region_size=1 * GIB, block_size=256 * MIB, memory_block_size=128 * MIB)
#: A region whose edges cut memory blocks: 64 MiB unusable at each end.
UNALIGNED = Geometry(
    addr=4 * GIB + 64 * MIB, region_size=512 * MIB, block_size=2 * MIB, memory_block_size=128 * MIB
)
SBM_NAME = "0000:00:03.0"
SUBBLOCKS_PER_BLOCK = 64  # 128 MiB / 2 MiB


def ident(geometry: Geometry = SBM, name: str = SBM_NAME) -> TrackerIdentity:
    return TrackerIdentity(name=name, geometry=geometry)


def mb_addr(geometry: Geometry, index: int) -> int:
    return geometry.memory_block_addr(index)


def plug_block(tracker: Tracker, index: int) -> None:
    """Plug every subblock of memory block ``index``."""
    subblocks = tracker.geometry.subblocks_of(index)
    tracker.record_plugged(tracker.geometry.subblock_addr(subblocks.start), len(subblocks))


def plug_and_online(tracker: Tracker, index: int, zone: Zone = Zone.MOVABLE) -> None:
    plug_block(tracker, index)
    tracker.record_present(index)
    tracker.record_online(index, zone, node=0)


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[Tracker]:
    with Tracker.open(tmp_path, ident()) as t:
        yield t


# ---------------------------------------------------------------------------
# Layout


HEADER_OFFSETS = {
    "magic": 0,
    "version": 8,
    "header_size": 12,
    "total_size": 16,
    "name": 24,
    "addr": 56,
    "region_size": 64,
    "block_size": 72,
    "memory_block_size": 80,
    "first_memory_block": 88,
    "nr_memory_blocks": 96,
    "nr_subblocks": 100,
    "generation": 104,
    "owner_pid": 112,
    "device_status": 116,
    "broken_code": 118,
    "requested_size": 120,
    "usable_region_size": 128,
    "plugged_size": 136,
    "node_id": 144,
    "device_features": 148,
    "plugged_bytes": 152,
    "online_bytes": 160,
    "remainder_bytes": 168,
    "retries": 176,
    "requests": 184,
    "intent_seq": 192,
    "intent_addr": 200,
    "intent_nb_blocks": 208,
    "intent_op": 212,
    "interrupt_mode": 214,
    "broken_detail": 216,
}
RECORD_OFFSETS = {
    "state": 0,
    "flags": 1,
    "zone": 2,
    "pad": 3,
    "plugged_subblocks": 4,
    "node": 8,
    "reserved": 12,
}

#: The first 104 bytes (up to the generation) of a fresh tracker "sim0" for SBM.
GOLDEN_SBM_PREFIX = bytes.fromhex(
    "564d454d54524b00"  # magic "VMEMTRK\0"
    "02000000"  # version 2
    "00010000"  # header size 256
    "0002000000000000"  # total size 512 = 256 + 8 records * 16 + 2 bitmaps of 64 bytes
    "73696d30"
    "00000000000000000000000000000000000000000000000000000000"  # name "sim0"
    "0000000001000000"  # addr 4 GiB
    "0000004000000000"  # region_size 1 GiB
    "0000200000000000"  # block_size 2 MiB
    "0000000800000000"  # memory_block_size 128 MiB
    "2000000000000000"  # first memory block 32
    "08000000"  # 8 memory blocks
    "00020000"  # 512 subblocks
)


def test_layout_sizes_are_pinned() -> None:
    assert ctypes.sizeof(TrackerHeader) == TrackerHeader.SPEC_SIZE == HEADER_SIZE == 256
    assert ctypes.sizeof(BlockRecordLayout) == BlockRecordLayout.SPEC_SIZE == RECORD_SIZE == 16
    for layout in LAYOUTS:
        assert ctypes.sizeof(layout) == layout.SPEC_SIZE  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("layout", "offsets"), [(TrackerHeader, HEADER_OFFSETS), (BlockRecordLayout, RECORD_OFFSETS)]
)
def test_field_offsets_are_pinned(layout: type[ctypes.Structure], offsets: dict[str, int]) -> None:
    names = [field[0] for field in layout._fields_]
    assert names == list(offsets)
    for name, offset in offsets.items():
        assert getattr(layout, name).offset == offset, name


def test_fresh_tracker_matches_golden_prefix(tmp_path: Path) -> None:
    with Tracker.open(tmp_path, ident(SBM, "sim0")) as t:
        data = t.path.read_bytes()
    assert data[: len(GOLDEN_SBM_PREFIX)] == GOLDEN_SBM_PREFIX
    assert len(data) == 512
    header = TrackerHeader.from_buffer_copy(data)
    assert header.generation == 2  # one write section: the owner claimed it
    assert header.owner_pid == os.getpid()
    assert header.intent_op == NO_INTENT
    records = (BlockRecordLayout * 8).from_buffer_copy(data, HEADER_SIZE)
    assert all(r.state == 0 and r.node == NODE_UNKNOWN for r in records)
    assert data[HEADER_SIZE + 8 * RECORD_SIZE :] == bytes(128)  # plug and taken bitmaps


@pytest.mark.parametrize(
    ("geometry", "total"),
    [
        # Two bitmaps of the same size: plugged and taken.
        (SBM, 256 + 8 * 16 + 2 * 64),
        (BBM, 256 + 8 * 16 + 2 * 8),  # 4 subblocks: one 8-byte bitmap word
        (UNALIGNED, 256 + 3 * 16 + 2 * 32),  # 3 whole memory blocks, 256 subblocks
        (Geometry(0, 66 * MIB, 2 * MIB, 2 * MIB), 256 + 33 * 16 + 2 * 8),  # 33 bits: one word
        (Geometry(0, 130 * MIB, 2 * MIB, 2 * MIB), 256 + 65 * 16 + 2 * 16),  # 65 bits: two
    ],
)
def test_file_size_follows_geometry(tmp_path: Path, geometry: Geometry, total: int) -> None:
    with Tracker.open(tmp_path, ident(geometry)) as t:
        assert t.path.stat().st_size == total
        snap = t.snapshot()
    assert len(snap.blocks) == geometry.nr_memory_blocks
    assert [b.index for b in snap.blocks] == list(geometry.memory_blocks())
    assert total % 8 == 0


def test_modes_of_new_dir_and_file(tmp_path: Path) -> None:
    state_dir = tmp_path / "run" / "vmem-guest"
    old_umask = os.umask(0o077)
    try:
        with Tracker.open(state_dir, ident()) as t:
            path = t.path
    finally:
        os.umask(old_umask)
    assert state_dir.stat().st_mode & 0o777 == 0o755
    assert path.stat().st_mode & 0o777 == 0o644
    assert path == state_dir / "0000:00:03.0.state"


def test_tracker_path_and_listing(tmp_path: Path) -> None:
    assert tracker_path(tmp_path, "0000:00:03.0").name == "0000:00:03.0.state"
    assert tracker_path(tmp_path, "a/b c").name == "a_b_c.state"
    assert tracker_path(tmp_path, "..").name == "_..state"
    assert list_trackers(tmp_path / "missing") == []
    Tracker.open(tmp_path, ident(SBM, "b")).close()
    Tracker.open(tmp_path, ident(SBM, "a")).close()
    (tmp_path / "a.state.bad-x").write_bytes(b"")
    assert [p.name for p in list_trackers(tmp_path)] == ["a.state", "b.state"]


@pytest.mark.parametrize("name", ["", "x" * 32, "a/b", "tab\there"])
def test_identity_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        TrackerIdentity(name=name, geometry=SBM)


# ---------------------------------------------------------------------------
# Open, close, recover


def test_fresh_tracker_is_empty(tracker: Tracker) -> None:
    snap = tracker.snapshot()
    assert not tracker.recovered and tracker.discarded_reason is None
    assert snap.identity == ident()
    assert snap.intent is None and not snap.broken and snap.broken_reason == ""
    assert snap.plugged_bytes == snap.online_bytes == 0
    assert snap.state_counts() == {
        MemoryBlockState.UNPLUGGED: 8,
        MemoryBlockState.PARTIAL: 0,
        MemoryBlockState.PLUGGED: 0,
        MemoryBlockState.ONLINE: 0,
    }
    assert not any(snap.is_plugged(i) for i in range(SBM.nr_subblocks))
    assert consistency_problem(snap) is None


def test_state_survives_close_and_reopen(tmp_path: Path) -> None:
    with Tracker.open(tmp_path, ident()) as t:
        plug_and_online(t, 33, Zone.KERNEL)
        t.record_plugged(mb_addr(SBM, 34), 10)
        t.set_intent(RequestType.PLUG, mb_addr(SBM, 34) + 10 * 2 * MIB, 54)
        t.set_device_info(
            requested_size=384 * MIB, usable_region_size=GIB, plugged_size=148 * MIB, node_id=1
        )
        t.set_remainder(3 * MIB)
        t.count_retry()
        t.count_requests(5)
        before = t.snapshot()
    t.close()  # idempotent
    with Tracker.open(tmp_path, ident()) as again:
        after = again.snapshot()
        assert again.recovered and again.discarded_reason is None
        assert again.set_aside_path is None
    assert after.generation == before.generation + 2  # the new owner claimed it
    fields = {f: getattr(before, f) for f in TrackerSnapshot.__dataclass_fields__}
    fields["generation"] = after.generation
    assert after == TrackerSnapshot(**fields)
    assert after.intent == Intent(RequestType.PLUG, mb_addr(SBM, 34) + 20 * MIB, 54)
    assert after.block(33).zone is Zone.KERNEL and after.block(34).plugged_subblocks == 10


def test_closed_tracker_refuses_use(tmp_path: Path) -> None:
    t = Tracker.open(tmp_path, ident())
    t.close()
    with pytest.raises(TrackerError):
        t.snapshot()
    with pytest.raises(TrackerError):
        t.record_plugged(SBM.addr, 1)


def test_close_survives_a_kept_exception(tmp_path: Path) -> None:
    """A SafetyError kept by the caller does not pin the mapping (close still unlocks)."""
    t = Tracker.open(tmp_path, ident())
    with pytest.raises(SafetyError) as kept:
        t.record_online(32, Zone.MOVABLE)
    t.close()
    assert kept.value.fields["block"] == 32
    Tracker.open(tmp_path, ident()).close()


# ---------------------------------------------------------------------------
# Transitions


def test_each_transition_is_one_write_section(tracker: Tracker) -> None:
    steps: list[Callable[[], None]] = [
        lambda: tracker.set_intent(RequestType.PLUG, SBM.addr, 64),
        lambda: tracker.record_plugged(SBM.addr, 64),
        tracker.clear_intent,
        lambda: tracker.record_present(32),
        lambda: tracker.record_online(32, Zone.MOVABLE),
        lambda: tracker.record_offline(32),
        lambda: tracker.record_unplugged(SBM.addr, 64),
        tracker.record_unplug_all,
        lambda: tracker.set_device_info(
            requested_size=0, usable_region_size=0, plugged_size=0, node_id=0
        ),
        lambda: tracker.set_broken("boom"),
        tracker.clear_broken,
        lambda: tracker.set_remainder(0),
        tracker.count_retry,
        lambda: tracker.count_requests(1),
        lambda: tracker.rebuild_from_states([], {}, []),
    ]
    for step in steps:
        before = tracker.generation
        step()
        assert tracker.generation == before + 2
        assert consistency_problem(tracker.snapshot()) is None


def test_partial_then_full_plug(tracker: Tracker) -> None:
    tracker.record_plugged(mb_addr(SBM, 33), 10)
    snap = tracker.snapshot()
    assert snap.block(33).state is MemoryBlockState.PARTIAL
    assert snap.block(33).plugged_subblocks == 10
    assert snap.plugged_bytes == 20 * MIB
    tracker.record_plugged(mb_addr(SBM, 33) + 10 * 2 * MIB, 54)
    snap = tracker.snapshot()
    assert snap.block(33).state is MemoryBlockState.PLUGGED
    assert snap.block(33).plugged_subblocks == SUBBLOCKS_PER_BLOCK
    assert snap.plugged_bytes == 128 * MIB
    assert [snap.is_plugged(i) for i in (63, 64, 127, 128)] == [False, True, True, False]


def test_plug_across_memory_blocks(tracker: Tracker) -> None:
    tracker.record_plugged(mb_addr(SBM, 32) + 60 * 2 * MIB, 72)  # 4 in memory32, 64, 4
    snap = tracker.snapshot()
    assert [snap.block(i).plugged_subblocks for i in (32, 33, 34)] == [4, 64, 4]
    assert [snap.block(i).state for i in (32, 33, 34)] == [
        MemoryBlockState.PARTIAL,
        MemoryBlockState.PLUGGED,
        MemoryBlockState.PARTIAL,
    ]


@pytest.mark.parametrize(
    ("addr", "nb_blocks"),
    [
        (SBM.addr - 2 * MIB, 1),  # before the region
        (SBM.end - 2 * MIB, 2),  # runs past its end
        (SBM.end, 1),  # at its end
        (SBM.addr + MIB, 1),  # misaligned
        (SBM.addr, 0),  # empty
        (SBM.addr, -1),
    ],
)
def test_bad_ranges_are_refused(tracker: Tracker, addr: int, nb_blocks: int) -> None:
    for action in (tracker.record_plugged, tracker.record_unplugged):
        with pytest.raises(SafetyError):
            action(addr, nb_blocks)
    with pytest.raises(SafetyError):
        tracker.set_intent(RequestType.PLUG, addr, nb_blocks)
    assert tracker.generation == 2


def assert_refused_without_change(
    tracker: Tracker, action: Callable[..., None], *args: object
) -> None:
    before = tracker.snapshot()
    with pytest.raises(SafetyError):
        action(*args)
    assert tracker.snapshot() == before


def test_plug_refusals(tracker: Tracker) -> None:
    tracker.record_plugged(mb_addr(SBM, 33) + 4 * MIB, 1)
    assert_refused_without_change(tracker, tracker.record_plugged, mb_addr(SBM, 33), 64)


def test_unplug_refusals(tracker: Tracker) -> None:
    plug_and_online(tracker, 33)
    tracker.record_plugged(mb_addr(SBM, 34), 2)
    # 5.2: nothing under an ONLINE block is unplugged, not even one subblock of it
    assert_refused_without_change(tracker, tracker.record_unplugged, mb_addr(SBM, 33), 64)
    assert_refused_without_change(tracker, tracker.record_unplugged, mb_addr(SBM, 34) - 2 * MIB, 2)
    assert_refused_without_change(tracker, tracker.record_unplug_all)
    assert_refused_without_change(tracker, tracker.set_intent, RequestType.UNPLUG_ALL, 0, 0)
    assert_refused_without_change(
        tracker, tracker.set_intent, RequestType.UNPLUG, mb_addr(SBM, 33), 1
    )
    # bits already clear
    assert_refused_without_change(tracker, tracker.record_unplugged, mb_addr(SBM, 34), 3)
    tracker.record_unplugged(mb_addr(SBM, 34), 2)
    assert tracker.snapshot().block(34).state is MemoryBlockState.UNPLUGGED


def test_present_online_offline_refusals(tracker: Tracker) -> None:
    tracker.record_plugged(mb_addr(SBM, 33), 63)
    for index in (32, 33):  # unplugged, partial: never probed (5.5), never onlined (5.1)
        assert_refused_without_change(tracker, tracker.record_present, index)
        assert_refused_without_change(tracker, tracker.record_online, index, Zone.MOVABLE)
        assert_refused_without_change(tracker, tracker.record_offline, index)
    for index in (31, 40):  # outside the region
        assert_refused_without_change(tracker, tracker.record_present, index)
    plug_and_online(tracker, 34)
    assert_refused_without_change(tracker, tracker.record_online, 34, Zone.MOVABLE)
    with pytest.raises(ValueError):
        tracker.record_online(33, Zone.NONE)


def test_online_offline_cycle_keeps_present_and_node(tracker: Tracker) -> None:
    plug_block(tracker, 35)
    tracker.record_present(35)
    assert tracker.snapshot().block(35) == tracker.block(35)
    tracker.record_online(35, Zone.MOVABLE, node=1)
    snap = tracker.snapshot()
    assert snap.online_bytes == 128 * MIB
    assert snap.block(35).zone is Zone.MOVABLE and snap.block(35).node == 1
    tracker.record_offline(35)
    record = tracker.snapshot().block(35)
    assert (record.state, record.zone, record.present, record.node) == (
        MemoryBlockState.PLUGGED,
        Zone.NONE,
        True,
        1,
    )
    tracker.record_unplugged(mb_addr(SBM, 35), 64)
    tracker.record_plugged(SBM.addr, 64)
    tracker.record_unplug_all()
    snap = tracker.snapshot()
    assert snap.block(35).present and snap.block(35).state is MemoryBlockState.UNPLUGGED
    assert snap.plugged_bytes == snap.online_bytes == 0
    assert snap.bitmap == bytes(len(snap.bitmap))


def test_intent_set_and_cleared(tracker: Tracker) -> None:
    tracker.set_intent(RequestType.STATE, SBM.addr, 512)
    snap = tracker.snapshot()
    assert snap.intent == Intent(RequestType.STATE, SBM.addr, 512) and snap.intent_seq == 1
    tracker.set_intent(RequestType.UNPLUG_ALL, 0, 0)
    assert tracker.snapshot().intent == Intent(RequestType.UNPLUG_ALL, 0, 0)
    with pytest.raises(SafetyError):
        tracker.set_intent(RequestType.UNPLUG_ALL, SBM.addr, 1)
    tracker.clear_intent()
    snap = tracker.snapshot()
    assert snap.intent is None and snap.intent_seq == 2


def test_device_info_broken_and_counters(tracker: Tracker) -> None:
    tracker.set_device_info(
        requested_size=GIB, usable_region_size=GIB, plugged_size=256 * MIB, node_id=3
    )
    tracker.set_remainder(104 * MIB)
    tracker.count_retry()
    tracker.count_retry()
    tracker.count_requests(7)
    tracker.set_broken(BrokenReason.DEVICE_ERROR)
    snap = tracker.snapshot()
    assert (snap.requested_size, snap.usable_region_size, snap.plugged_size, snap.node_id) == (
        GIB,
        GIB,
        256 * MIB,
        3,
    )
    assert (snap.remainder_bytes, snap.retries, snap.requests) == (104 * MIB, 2, 7)
    assert snap.broken and snap.broken_reason == "device answered ERROR"
    tracker.set_broken("TIMEOUT")
    assert tracker.snapshot().broken_reason == "device timeout"
    tracker.set_broken("response id 7 unknown " + "x" * 80)
    reason = tracker.snapshot().broken_reason
    assert reason.startswith("response id 7 unknown") and len(reason) == 39
    tracker.clear_broken()
    snap = tracker.snapshot()
    assert not snap.broken and snap.broken_reason == ""
    with pytest.raises(ValueError):
        tracker.set_remainder(-1)
    with pytest.raises(ValueError):
        tracker.count_requests(-1)


def test_rebuild_from_states(tracker: Tracker) -> None:
    tracker.set_intent(RequestType.PLUG, mb_addr(SBM, 36), 64)
    plug_and_online(tracker, 39)
    plugged = list(range(0, 64)) + list(range(64, 70)) + list(range(192, 256))
    tracker.rebuild_from_states(plugged, {32: Zone.KERNEL}, [32, 35])
    snap = tracker.snapshot()
    assert snap.intent == Intent(RequestType.PLUG, mb_addr(SBM, 36), 64)  # left alone
    assert [snap.block(i).state for i in (32, 33, 34, 35, 39)] == [
        MemoryBlockState.ONLINE,
        MemoryBlockState.PARTIAL,
        MemoryBlockState.UNPLUGGED,
        MemoryBlockState.PLUGGED,
        MemoryBlockState.UNPLUGGED,
    ]
    assert snap.block(32).present and snap.block(35).present and not snap.block(39).present
    assert snap.block(39).node == NODE_UNKNOWN
    assert snap.plugged_bytes == len(plugged) * 2 * MIB
    assert snap.online_bytes == 128 * MIB
    assert consistency_problem(snap) is None


def test_rebuild_refusals(tracker: Tracker) -> None:
    plug_block(tracker, 33)
    # an online block not fully plugged: the caller must deal with that first
    assert_refused_without_change(
        tracker, tracker.rebuild_from_states, range(64, 127), {33: Zone.MOVABLE}, []
    )
    assert_refused_without_change(tracker, tracker.rebuild_from_states, [512], {}, [])
    assert_refused_without_change(tracker, tracker.rebuild_from_states, [], {}, [40])


def test_large_region(tmp_path: Path) -> None:
    """1 TiB in 2 MiB blocks: 524,288 bits, 8192 records; rebuild and requests of 65,535 blocks."""
    geometry = Geometry(4 * GIB, 1024 * GIB, 2 * MIB, 128 * MIB)
    with Tracker.open(tmp_path, ident(geometry)) as t:
        blocks = geometry.memory_blocks()
        t.rebuild_from_states(
            range(geometry.nr_subblocks), dict.fromkeys(blocks, Zone.MOVABLE), blocks
        )
        snap = t.snapshot()
        assert snap.plugged_bytes == snap.online_bytes == 1024 * GIB
        assert consistency_problem(snap) is None
        last = blocks[-1024:]  # 128 GiB = 65,536 subblocks: two requests
        for index in last:
            t.record_offline(index)
        start = geometry.memory_block_addr(last[0])
        t.record_unplugged(start, 0xFFFF)
        t.record_unplugged(start + 0xFFFF * 2 * MIB, 1)
        snap = t.snapshot()
        assert snap.plugged_bytes == snap.online_bytes == 896 * GIB
        assert snap.state_counts()[MemoryBlockState.UNPLUGGED] == 1024
        assert consistency_problem(snap) is None


def test_big_block_mode(tmp_path: Path) -> None:
    with Tracker.open(tmp_path, ident(BBM)) as t:
        assert BBM.nr_subblocks == 4 and BBM.nr_memory_blocks == 8
        t.record_plugged(BBM.addr + 256 * MIB, 1)  # device block 1: memory34 and memory35
        snap = t.snapshot()
        assert [snap.block(i).state for i in range(32, 37)] == [
            MemoryBlockState.UNPLUGGED,
            MemoryBlockState.UNPLUGGED,
            MemoryBlockState.PLUGGED,
            MemoryBlockState.PLUGGED,
            MemoryBlockState.UNPLUGGED,
        ]
        assert snap.block(34).plugged_subblocks == 1 and snap.plugged_bytes == 256 * MIB
        t.record_present(35)
        t.record_online(35, Zone.MOVABLE)
        # the device block spans an ONLINE memory block: no unplug
        assert_refused_without_change(t, t.record_unplugged, BBM.addr + 256 * MIB, 1)
        t.record_online(34, Zone.MOVABLE)
        assert t.snapshot().online_bytes == 256 * MIB
        t.record_offline(35)
        assert_refused_without_change(t, t.record_unplugged, BBM.addr + 256 * MIB, 1)
        t.record_offline(34)
        t.record_unplugged(BBM.addr + 256 * MIB, 1)
        snap = t.snapshot()
        assert snap.plugged_bytes == snap.online_bytes == 0
        assert consistency_problem(snap) is None


def test_region_not_aligned_to_memory_blocks(tmp_path: Path) -> None:
    geometry = UNALIGNED
    assert list(geometry.memory_blocks()) == [33, 34, 35]
    with Tracker.open(tmp_path, ident(geometry)) as t:
        # the 32 edge subblocks below memory33 belong to no memory block
        t.record_plugged(geometry.addr, 64)
        snap = t.snapshot()
        assert snap.plugged_bytes == 128 * MIB
        assert snap.block(33).plugged_subblocks == 32
        assert snap.block(33).state is MemoryBlockState.PARTIAL
        with pytest.raises(KeyError):
            snap.block(32)
        t.record_plugged(geometry.addr + 128 * MIB, 32)
        t.record_online(33, Zone.MOVABLE)
        # unplugging the edge below is fine; unplugging into memory33 is not
        t.record_unplugged(geometry.addr, 32)
        assert_refused_without_change(t, t.record_unplugged, geometry.addr + 64 * MIB, 1)
        tail = geometry.end - 64 * MIB
        t.record_plugged(tail, 32)
        assert t.snapshot().plugged_bytes == (128 + 64) * MIB
        assert consistency_problem(t.snapshot()) is None


# ---------------------------------------------------------------------------
# Counters stay exact over any legal sequence (property-based)


class Model:
    """What the tracker should hold, kept independently of it."""

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        self.plugged: set[int] = set()
        self.online: dict[int, Zone] = {}
        self.present: set[int] = set()

    def fully_plugged(self, index: int) -> bool:
        return set(self.geometry.subblocks_of(index)) <= self.plugged

    def online_over(self, subblocks: range) -> bool:
        return any(
            mb in self.online for sb in subblocks for mb in self.geometry.memory_blocks_of(sb)
        )

    def state(self, index: int) -> MemoryBlockState:
        if index in self.online:
            return MemoryBlockState.ONLINE
        subblocks = self.geometry.subblocks_of(index)
        count = len(self.plugged.intersection(subblocks))
        if count == 0:
            return MemoryBlockState.UNPLUGGED
        return MemoryBlockState.PLUGGED if count == len(subblocks) else MemoryBlockState.PARTIAL


SMALL_GEOMETRIES = [
    Geometry(addr=64 * MIB, region_size=64 * MIB, block_size=2 * MIB, memory_block_size=8 * MIB),
    Geometry(addr=64 * MIB, region_size=64 * MIB, block_size=16 * MIB, memory_block_size=8 * MIB),
    Geometry(addr=68 * MIB, region_size=56 * MIB, block_size=2 * MIB, memory_block_size=8 * MIB),
]
OPS = ("plug", "unplug", "unplug_all", "present", "online", "offline", "rebuild")


def apply_op(tracker: Tracker, model: Model, data: st.DataObject) -> None:
    """Draw one operation; apply it to both, or check the tracker refuses it."""
    geometry = model.geometry
    op = data.draw(st.sampled_from(OPS))
    blocks = list(geometry.memory_blocks())
    if op in ("plug", "unplug"):
        first = data.draw(st.integers(0, geometry.nr_subblocks - 1))
        count = data.draw(st.integers(1, geometry.nr_subblocks - first))
        subblocks = range(first, first + count)
        addr = geometry.subblock_addr(first)
        if op == "plug":
            legal = not model.plugged.intersection(subblocks)
            action, change = tracker.record_plugged, model.plugged.update
        else:
            legal = set(subblocks) <= model.plugged and not model.online_over(subblocks)
            action, change = tracker.record_unplugged, model.plugged.difference_update
        if legal:
            action(addr, count)
            change(subblocks)
        else:
            assert_refused_without_change(tracker, action, addr, count)
    elif op == "unplug_all":
        if model.online:
            assert_refused_without_change(tracker, tracker.record_unplug_all)
        else:
            tracker.record_unplug_all()
            model.plugged.clear()
    elif op == "rebuild":
        plugged = data.draw(st.sets(st.integers(0, geometry.nr_subblocks - 1)))
        candidates = [i for i in blocks if set(geometry.subblocks_of(i)) <= plugged]
        online = data.draw(st.sets(st.sampled_from(candidates))) if candidates else set()
        present = data.draw(st.sets(st.sampled_from(blocks)))
        tracker.rebuild_from_states(plugged, dict.fromkeys(online, Zone.AUTO), present)
        model.plugged = set(plugged)
        model.online = dict.fromkeys(online, Zone.AUTO)
        model.present = set(present) | online
    else:
        index = data.draw(st.sampled_from(blocks))
        state = model.state(index)
        if op == "present":
            legal = state in (MemoryBlockState.PLUGGED, MemoryBlockState.ONLINE)
            if legal:
                tracker.record_present(index)
                model.present.add(index)
            else:
                assert_refused_without_change(tracker, tracker.record_present, index)
        elif op == "online":
            if state is MemoryBlockState.PLUGGED:
                tracker.record_online(index, Zone.KERNEL)
                model.online[index] = Zone.KERNEL
                model.present.add(index)
            else:
                assert_refused_without_change(tracker, tracker.record_online, index, Zone.KERNEL)
        elif state is MemoryBlockState.ONLINE:
            tracker.record_offline(index)
            del model.online[index]
        else:
            assert_refused_without_change(tracker, tracker.record_offline, index)


def assert_matches(snap: TrackerSnapshot, model: Model) -> None:
    geometry = model.geometry
    assert consistency_problem(snap) is None
    # counters equal the recomputation from bitmap and records, and the model
    popcount = int.from_bytes(snap.bitmap, "little").bit_count()
    assert snap.plugged_bytes == popcount * geometry.block_size
    assert snap.plugged_bytes == len(model.plugged) * geometry.block_size
    online = sum(1 for b in snap.blocks if b.state is MemoryBlockState.ONLINE)
    assert snap.online_bytes == online * geometry.memory_block_size
    assert snap.online_bytes == len(model.online) * geometry.memory_block_size
    assert {i for i in range(geometry.nr_subblocks) if snap.is_plugged(i)} == model.plugged
    for record in snap.blocks:
        assert record.state is model.state(record.index)
        assert record.present == (record.index in model.present)
        assert record.zone is model.online.get(record.index, Zone.NONE)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(geometry=st.sampled_from(SMALL_GEOMETRIES), data=st.data())
def test_counters_exact_over_random_sequences(geometry: Geometry, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as state_dir:
        model = Model(geometry)
        with Tracker.open(Path(state_dir), ident(geometry)) as t:
            for _ in range(data.draw(st.integers(1, 40))):
                apply_op(t, model, data)
                assert_matches(t.snapshot(), model)
        # and the whole state survives a reopen
        with Tracker.open(Path(state_dir), ident(geometry)) as t:
            assert t.recovered
            assert_matches(t.snapshot(), model)


# ---------------------------------------------------------------------------
# Files that must not be trusted


def header_field(name: str) -> int:
    offset: int = getattr(TrackerHeader, name).offset
    return offset


def patch(path: Path, offset: int, data: bytes) -> None:
    content = bytearray(path.read_bytes())
    content[offset : offset + len(data)] = data
    path.write_bytes(bytes(content))


def record_offset(slot: int) -> int:
    return HEADER_SIZE + slot * RECORD_SIZE


BITMAP_OFFSET = HEADER_SIZE + 8 * RECORD_SIZE  # for SBM


#: Damages a tracker file in place.
Corruption = Callable[[Path], None]


def corrupt_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def corrupt_truncate_tail(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-8])


def corrupt_empty(path: Path) -> None:
    path.write_bytes(b"")


def corrupt_magic(path: Path) -> None:
    patch(path, 0, b"NOTVMEM\0")


def corrupt_version(path: Path) -> None:
    patch(path, header_field("version"), (VERSION + 1).to_bytes(4, "little"))


def corrupt_total_size(path: Path) -> None:
    patch(path, header_field("total_size"), (4096).to_bytes(8, "little"))


def corrupt_identity(path: Path) -> None:
    patch(path, header_field("addr"), (8 * GIB).to_bytes(8, "little"))
    patch(path, header_field("first_memory_block"), (64).to_bytes(8, "little"))


def corrupt_bitmap(path: Path) -> None:
    patch(path, BITMAP_OFFSET + 8, b"\x01")  # memory33 gains a bit its record lacks


def corrupt_state_enum(path: Path) -> None:
    patch(path, record_offset(2), b"\x07")


def corrupt_zone_enum(path: Path) -> None:
    patch(path, record_offset(2) + 2, b"\x09")


def corrupt_online_not_plugged(path: Path) -> None:
    # memory32 is ONLINE and fully plugged: clear one of its bits and fix its count
    patch(path, BITMAP_OFFSET, b"\xfe")
    patch(path, record_offset(0) + 4, (63).to_bytes(4, "little"))
    patch(path, header_field("plugged_bytes"), ((128 + 126) * MIB).to_bytes(8, "little"))


def corrupt_counter(path: Path) -> None:
    patch(path, header_field("online_bytes"), (0).to_bytes(8, "little"))


def corrupt_odd_generation(path: Path) -> None:
    patch(path, header_field("generation"), (7).to_bytes(8, "little"))


def corrupt_intent_op(path: Path) -> None:
    patch(path, header_field("intent_op"), (9).to_bytes(2, "little"))


def make_world_writable(path: Path) -> None:
    path.chmod(0o666)


def make_foreign_owned(path: Path) -> None:
    os.chown(path, 1000, 1000)


def make_symlink(path: Path) -> None:
    target = path.with_name("elsewhere")
    path.rename(target)
    path.symlink_to(target)


CORRUPTIONS = [
    (corrupt_truncate, "truncated"),
    (corrupt_truncate_tail, "size mismatch"),
    (corrupt_empty, "truncated"),
    (corrupt_magic, "bad magic"),
    (corrupt_version, f"version {VERSION + 1}"),
    (corrupt_total_size, "size mismatch"),
    (corrupt_identity, "identity mismatch"),
    (corrupt_bitmap, "memory33"),
    (corrupt_state_enum, "not a MemoryBlockState"),
    (corrupt_zone_enum, "not a Zone"),
    (corrupt_online_not_plugged, "ONLINE over unplugged subblocks not taken"),
    (corrupt_counter, "online_bytes"),
    (corrupt_odd_generation, "interrupted write"),
    (corrupt_intent_op, "not a RequestType"),
    (make_symlink, "symbolic link"),
]
ROOT_ONLY = [
    (make_world_writable, "world-writable"),
    (make_foreign_owned, "not root"),
]


def case_id(value: object) -> str:
    return str(getattr(value, "__name__", value))


def write_sample(state_dir: Path) -> Path:
    with Tracker.open(state_dir, ident()) as t:
        plug_and_online(t, 32)
        t.record_plugged(mb_addr(SBM, 33), 63)
        return t.path


def check_set_aside(state_dir: Path, corrupt: Corruption, expected: str) -> None:
    path = write_sample(state_dir)
    corrupt(path)
    bad_bytes = path.read_bytes() if not path.is_symlink() else None
    with Tracker.open(state_dir, ident()) as t:
        assert not t.recovered
        assert t.discarded_reason is not None and expected in t.discarded_reason
        assert t.set_aside_path is not None and t.set_aside_path.name.startswith(
            "0000:00:03.0.state.bad-"
        )
        assert os.path.lexists(t.set_aside_path)
        if bad_bytes is not None:
            assert t.set_aside_path.read_bytes() == bad_bytes
        snap = t.snapshot()
    assert not path.is_symlink()
    assert snap.plugged_bytes == 0 and snap.intent is None
    assert snap.state_counts()[MemoryBlockState.UNPLUGGED] == 8
    # the rebuilt file is trusted next time
    with Tracker.open(state_dir, ident()) as t:
        assert t.recovered


@pytest.mark.parametrize(("corrupt", "expected"), CORRUPTIONS, ids=case_id)
def test_corrupt_file_is_set_aside_and_rebuilt(
    tmp_path: Path, corrupt: Corruption, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="vmem_guest.tracker"):
        check_set_aside(tmp_path, corrupt, expected)
    assert any("set aside" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership rules apply when running as root")
@pytest.mark.parametrize(("corrupt", "expected"), ROOT_ONLY, ids=case_id)
def test_untrusted_file_is_set_aside(tmp_path: Path, corrupt: Corruption, expected: str) -> None:
    check_set_aside(tmp_path, corrupt, expected)


def test_two_bad_files_get_distinct_aside_names(tmp_path: Path) -> None:
    asides = set()
    for _ in range(2):
        path = write_sample(tmp_path)
        corrupt_magic(path)
        with Tracker.open(tmp_path, ident()) as t:
            asides.add(t.set_aside_path)
    assert len(asides) == 2 and all(p is not None and p.exists() for p in asides)


# ---------------------------------------------------------------------------
# Locking

CHILD_OPEN = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from vmem_guest.blocks import Geometry
    from vmem_guest.errors import TrackerLocked
    from vmem_guest.tracker import Tracker, TrackerIdentity

    state_dir, name, geometry = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    try:
        Tracker.open(Path(state_dir), TrackerIdentity(name, Geometry(**geometry))).close()
    except TrackerLocked as exc:
        print(json.dumps({"locked": True, "holder": exc.fields["holder_pid"]}))
    else:
        print(json.dumps({"locked": False}))
    """
)


def open_in_child(state_dir: Path) -> dict[str, object]:
    geometry = {
        "addr": SBM.addr,
        "region_size": SBM.region_size,
        "block_size": SBM.block_size,
        "memory_block_size": SBM.memory_block_size,
    }
    out = subprocess.run(
        [sys.executable, "-c", CHILD_OPEN, str(state_dir), SBM_NAME, json.dumps(geometry)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_second_owner_in_another_process_is_locked_out(tmp_path: Path) -> None:
    with Tracker.open(tmp_path, ident()):
        assert open_in_child(tmp_path) == {"locked": True, "holder": os.getpid()}
    assert open_in_child(tmp_path) == {"locked": False}


def test_second_owner_in_the_same_process_is_locked_out(tmp_path: Path) -> None:
    with Tracker.open(tmp_path, ident()) as t:
        plug_block(t, 32)
        with pytest.raises(TrackerLocked) as info:
            Tracker.open(tmp_path, ident())
        assert info.value.fields["holder_pid"] == os.getpid()
        assert "locked" in str(info.value)
        assert t.snapshot().plugged_bytes == 128 * MIB  # untouched by the attempt


# ---------------------------------------------------------------------------
# Readers


def test_reader_sees_what_the_owner_wrote(tracker: Tracker) -> None:
    plug_and_online(tracker, 36)
    with TrackerReader.open(tracker.path) as reader:
        assert reader.snapshot() == tracker.snapshot()
        tracker.record_offline(36)
        assert reader.snapshot().block(36).state is MemoryBlockState.PLUGGED
    reader.close()  # idempotent
    with pytest.raises(TrackerError):
        reader.snapshot()


def test_reader_works_without_write_permission(tracker: Tracker, tmp_path: Path) -> None:
    os.chmod(tracker.path, 0o444)
    with TrackerReader.open(tracker.path) as reader:
        assert reader.snapshot().identity == ident()


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (corrupt_truncate, "truncated"),
        (corrupt_magic, "bad magic"),
        (corrupt_version, "version"),
        (corrupt_truncate_tail, "size mismatch"),
    ],
)
def test_reader_refuses_bad_files(tmp_path: Path, corrupt: Corruption, expected: str) -> None:
    path = write_sample(tmp_path)
    corrupt(path)
    with pytest.raises(TrackerError) as info:
        TrackerReader.open(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership rules apply when running as root")
@pytest.mark.parametrize(("corrupt", "expected"), ROOT_ONLY, ids=case_id)
def test_reader_refuses_what_the_owner_would_not_trust(
    tmp_path: Path, corrupt: Corruption, expected: str
) -> None:
    path = write_sample(tmp_path)
    corrupt(path)
    with pytest.raises(TrackerError) as info:
        TrackerReader.open(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_reader_refuses_a_tracker_under_another_devices_name(tmp_path: Path) -> None:
    path = write_sample(tmp_path)
    copy = path.with_name("0000:00:1f.7.state")
    copy.write_bytes(path.read_bytes())
    with pytest.raises(TrackerError) as info:
        TrackerReader.open(copy)
    assert "another device, '0000:00:03.0'" in str(info.value)
    with TrackerReader.open(path) as reader:  # the original still reads
        assert reader.snapshot().identity == ident()


def test_reader_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TrackerError, match="cannot open"):
        TrackerReader.open(tmp_path / "nothing.state")


def test_reader_retries_while_a_write_is_open(tracker: Tracker) -> None:
    """Inside a write section the file is inconsistent; the reader never returns it."""
    with TrackerReader.open(tracker.path) as reader:
        with tracker._write_section():
            tracker._write_subblocks(0, 64, plugged=True)  # bits set, records not yet
            torn = tracker_module.decode(tracker.path.read_bytes())
            assert consistency_problem(torn) is not None  # the checker sees tearing
            with pytest.raises(TrackerError, match="no stable snapshot"):
                reader.snapshot(retries=5)
            tracker._refresh_blocks(0, 64)
        snap = reader.snapshot()
        assert consistency_problem(snap) is None and snap.block(32).state is (
            MemoryBlockState.PLUGGED
        )


CHILD_READER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from vmem_guest.blocks import MemoryBlockState
    from vmem_guest.tracker import TrackerReader, consistency_problem

    path, min_snapshots, min_generations = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    deadline = time.monotonic() + float(sys.argv[4])
    generations, problems, snapshots, odd = set(), [], 0, 0
    with TrackerReader.open(path) as reader:
        print("ready", flush=True)
        while snapshots < min_snapshots or len(generations) < min_generations:
            if time.monotonic() > deadline:
                break
            snap = reader.snapshot(retries=5000)
            snapshots += 1
            generations.add(snap.generation)
            problem = consistency_problem(snap)
            geometry = snap.identity.geometry
            bits = int.from_bytes(snap.bitmap, "little").bit_count()
            online = snap.state_counts()[MemoryBlockState.ONLINE]
            if snap.generation % 2:
                odd += 1
            if snap.plugged_bytes != bits * geometry.block_size:
                problem = "plugged_bytes != popcount * block_size"
            elif snap.online_bytes != online * geometry.memory_block_size:
                problem = "online_bytes != ONLINE * memory_block_size"
            if problem:
                problems.append(problem)
    print(json.dumps({"generations": len(generations), "problems": sorted(set(problems))[:5],
                      "torn": len(problems), "odd": odd, "snapshots": snapshots}))
    """
)
#: The reader takes at least this many snapshots and sees this many generations...
READER_SNAPSHOTS = 2000
READER_GENERATIONS = 200
#: ...unless this many seconds pass first (the machine may be heavily loaded).
READER_DEADLINE_SECONDS = 60


#: A larger region for the race, so some write sections are long: a rebuild
#: rewrites 128 records and 8192 bitmap bits inside one section.
RACE = Geometry(addr=4 * GIB, region_size=16 * GIB, block_size=2 * MIB, memory_block_size=128 * MIB)
#: The first memory blocks of RACE stay put (ONLINE, ONLINE, ONLINE, PARTIAL).
STEADY_BLOCKS = 4
#: plug, online, offline, unplug, rebuild: then on to the next block.
OWNER_PHASES = 5


def rebuild_as_is(t: Tracker) -> None:
    """One long write section that leaves the state as it was."""
    snap = t.snapshot()
    plugged = [i for i in range(snap.geometry.nr_subblocks) if snap.is_plugged(i)]
    online = {b.index: b.zone for b in snap.blocks if b.state is MemoryBlockState.ONLINE}
    t.rebuild_from_states(plugged, online, [b.index for b in snap.blocks if b.present])


def owner_step(t: Tracker, step: int) -> None:
    """One move of the owner over RACE, cycling through the non-steady blocks."""
    moving = RACE.nr_memory_blocks - STEADY_BLOCKS
    index = RACE.first_memory_block + STEADY_BLOCKS + step // OWNER_PHASES % moving
    phase = step % OWNER_PHASES
    if phase == 0:
        t.set_intent(RequestType.PLUG, mb_addr(RACE, index), SUBBLOCKS_PER_BLOCK)
        plug_block(t, index)
        t.clear_intent()
    elif phase == 1:
        t.record_present(index)
        t.record_online(index, Zone.MOVABLE)
    elif phase == 2:
        t.record_offline(index)
    elif phase == 3:
        t.record_unplugged(mb_addr(RACE, index), SUBBLOCKS_PER_BLOCK)
    else:
        rebuild_as_is(t)
    t.count_requests(1)


def test_reader_in_another_process_never_sees_a_torn_snapshot(tmp_path: Path) -> None:
    with Tracker.open(tmp_path, ident(RACE)) as t:
        first = RACE.first_memory_block
        for index in range(first, first + STEADY_BLOCKS - 1):
            plug_and_online(t, index)
        t.record_plugged(mb_addr(RACE, first + STEADY_BLOCKS - 1), 17)
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD_READER,
                str(t.path),
                str(READER_SNAPSHOTS),
                str(READER_GENERATIONS),
                str(READER_DEADLINE_SECONDS),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        steps = 0
        while child.poll() is None:
            owner_step(t, steps)
            steps += 1
        out, err = child.communicate(timeout=READER_DEADLINE_SECONDS)
        assert child.returncode == 0, err
        assert consistency_problem(t.snapshot()) is None
    result = json.loads(out)
    assert result["torn"] == result["odd"] == 0, result
    assert steps > READER_GENERATIONS
    # the reader raced the writer: many snapshots, at many different generations
    assert result["snapshots"] >= READER_SNAPSHOTS, result
    assert result["generations"] >= READER_GENERATIONS, result


def test_only_the_newest_set_aside_files_are_kept(tmp_path: Path) -> None:
    """A crash loop with a bad tracker must not fill /run with .bad-* files."""
    other = tmp_path / "0000:00:04.0.state.bad-20200101T000000Z"
    other.write_bytes(b"another device's")
    for attempt in range(tracker_module.KEEP_SET_ASIDE + 3):
        path = write_sample(tmp_path)
        path.write_bytes(b"garbage")
        os.utime(path, ns=(attempt * 10**9, attempt * 10**9))
        with Tracker.open(tmp_path, ident()) as t:
            newest = t.set_aside_path
        assert newest is not None and newest.exists()
        path.unlink()  # the rebuilt one: next round writes a sample again
    kept = sorted(tmp_path.glob("0000:00:03.0.state.bad-*"))
    assert len(kept) == tracker_module.KEEP_SET_ASIDE
    assert newest in kept
    assert other.exists()  # another device's files are not touched


# ---------------------------------------------------------------------------
# Subblocks of online blocks: taken, holes, given back (docs/design.md 5.1, 5.2)


def sb_addr(tracker: Tracker, index: int, nth: int) -> int:
    """Address of the ``nth`` subblock of memory block ``index``."""
    return tracker.geometry.subblock_addr(tracker.geometry.subblocks_of(index)[nth])


def test_a_taken_subblock_of_an_online_block_is_unplugged_and_the_block_stays_online(
    tracker: Tracker,
) -> None:
    plug_and_online(tracker, 33)
    hole = sb_addr(tracker, 33, 63)
    tracker.record_taking(hole, 1)
    tracker.set_intent(RequestType.UNPLUG, hole, 1)
    tracker.record_unplugged(hole, 1)
    tracker.clear_intent()
    snap = tracker.snapshot()
    record = snap.block(33)
    assert record.state is MemoryBlockState.ONLINE
    assert record.zone is Zone.MOVABLE
    assert record.plugged_subblocks == SUBBLOCKS_PER_BLOCK - 1
    assert snap.hole_bytes == 2 * MIB
    assert snap.plugged_bytes == 126 * MIB
    assert snap.online_bytes == 128 * MIB
    assert consistency_problem(snap) is None
    assert state_disagreement(tracker.state, snap) is None
    assert tracker.state.unit_class[33 - SBM.first_memory_block] == UnitClass.HOLED


def test_subblocks_in_use_of_an_online_block_are_never_unplugged(tracker: Tracker) -> None:
    plug_and_online(tracker, 33)
    in_use = sb_addr(tracker, 33, 10)
    with pytest.raises(SafetyError, match="not taken"):
        tracker.set_intent(RequestType.UNPLUG, in_use, 1)
    with pytest.raises(SafetyError, match="not taken"):
        tracker.record_unplugged(in_use, 1)
    # A run that is partly taken is refused whole.
    tracker.record_taking(sb_addr(tracker, 33, 11), 1)
    with pytest.raises(SafetyError, match="not taken"):
        tracker.record_unplugged(in_use, 2)
    assert tracker.snapshot().plugged_bytes == 128 * MIB


def test_only_subblocks_of_online_blocks_are_taken(tracker: Tracker) -> None:
    plug_block(tracker, 34)
    with pytest.raises(SafetyError, match="not ONLINE"):
        tracker.record_taking(sb_addr(tracker, 34, 0), 1)
    plug_and_online(tracker, 33)
    tracker.record_taking(sb_addr(tracker, 33, 0), 1)
    with pytest.raises(SafetyError, match="not plugged and in use"):
        tracker.record_taking(sb_addr(tracker, 33, 0), 1)  # already taken


def test_a_block_with_taken_subblocks_is_never_offlined(tracker: Tracker) -> None:
    plug_and_online(tracker, 33)
    tracker.record_taking(sb_addr(tracker, 33, 5), 1)
    with pytest.raises(HolesKeepBlockOnline, match=r"taken subblocks and .* plugged"):
        tracker.record_offline(33)
    assert tracker.block(33).state is MemoryBlockState.ONLINE


def test_a_hole_is_given_back_only_after_its_plug(tracker: Tracker) -> None:
    plug_and_online(tracker, 33)
    hole = sb_addr(tracker, 33, 63)
    tracker.record_taking(hole, 1)
    tracker.record_unplugged(hole, 1)
    first = tracker.geometry.subblock_index(hole)
    with pytest.raises(SafetyError, match="not plugged and taken"):
        tracker.check_may_give_back(first, 1)
    with pytest.raises(SafetyError, match="not plugged and taken"):
        tracker.record_given_back(hole, 1)
    tracker.record_plugged(hole, 1)  # the device ACKed: plugged, pages still poisoned
    assert tracker.state.is_taken(first) and tracker.state.is_plugged(first)
    assert first // 64 in set(tracker.state.units_taking)
    tracker.record_given_back(hole, 1)
    snap = tracker.snapshot()
    assert not snap.is_taken(first)
    assert snap.hole_bytes == 0
    assert tracker.state.unit_class[33 - SBM.first_memory_block] == UnitClass.FULL_MOVABLE
    assert state_disagreement(tracker.state, snap) is None


def test_rebuild_keeps_holes_and_refuses_online_over_unplugged_memory(tracker: Tracker) -> None:
    subblocks = list(SBM.subblocks_of(33))
    with pytest.raises(SafetyError, match="neither plugged nor taken"):
        tracker.rebuild_from_states(plugged=subblocks[:-1], online={33: Zone.MOVABLE}, present=[33])
    with pytest.raises(SafetyError, match="taken outside an online block"):
        tracker.rebuild_from_states(plugged=subblocks, online={}, present=[33], taken=[0])
    tracker.rebuild_from_states(
        plugged=subblocks[:-1], online={33: Zone.MOVABLE}, present=[33], taken=subblocks[-1:]
    )
    snap = tracker.snapshot()
    assert snap.hole_bytes == 2 * MIB
    assert consistency_problem(snap) is None
    assert state_disagreement(tracker.state, snap) is None


def test_holes_survive_a_reopen(tmp_path: Path) -> None:
    with Tracker.open(tmp_path, ident()) as first:
        plug_and_online(first, 33)
        hole = sb_addr(first, 33, 0)
        first.record_taking(hole, 1)
        first.record_unplugged(hole, 1)
        before = first.snapshot()
    with Tracker.open(tmp_path, ident()) as again:
        assert again.recovered
        snap = again.snapshot()
        assert snap.taken == before.taken and snap.bitmap == before.bitmap
        assert state_disagreement(again.state, snap) is None
        assert again.state.hole_subblocks == 1


def test_a_taken_bit_under_a_block_not_online_is_a_corrupt_file(tmp_path: Path) -> None:
    with Tracker.open(tmp_path, ident()) as t:
        plug_block(t, 33)
        path = t.path
    layout = FileLayout.of(SBM)
    first = SBM.subblocks_of(33).start
    patch(path, layout.taken_offset + first // 8, b"\x01")
    with Tracker.open(tmp_path, ident()) as t:
        assert not t.recovered
        assert t.discarded_reason is not None
        assert "taken subblocks" in t.discarded_reason


def test_a_block_of_holes_only_is_never_offlined(tracker: Tracker) -> None:
    """docs/design.md section 2: its poisoned pages would keep HardwareCorrupted up
    (6.1) or the block offline for good (6.2+); it stays online until growth gives
    the holes back. The mutator refuses it, whoever asks, before any change."""
    plug_and_online(tracker, 33)
    first = SBM.subblocks_of(33).start
    addr = SBM.subblock_addr(first)
    tracker.record_taking(addr, SUBBLOCKS_PER_BLOCK)
    tracker.record_unplugged(addr, SUBBLOCKS_PER_BLOCK)
    with pytest.raises(HolesKeepBlockOnline, match="memory33 holds only holes") as info:
        tracker.check_may_offline(33)
    assert info.value.as_dict()["taken"] == SUBBLOCKS_PER_BLOCK
    assert info.value.fields["plugged"] == 0 and info.value.block == 33
    assert_refused_without_change(tracker, tracker.record_offline, 33)
    snap = tracker.snapshot()
    assert snap.block(33).state is MemoryBlockState.ONLINE
    assert snap.hole_bytes == 128 * MIB


def test_a_block_with_holes_and_memory_in_use_is_not_offlined(tracker: Tracker) -> None:
    plug_and_online(tracker, 33)
    hole = sb_addr(tracker, 33, 63)
    tracker.record_taking(hole, 1)
    tracker.record_unplugged(hole, 1)
    with pytest.raises(HolesKeepBlockOnline, match=r"taken subblocks and .* plugged"):
        tracker.record_offline(33)


def test_transport_info_is_kept_for_status(tracker: Tracker) -> None:
    assert tracker.snapshot().interrupt_mode is InterruptMode.UNKNOWN  # a fresh file: zeros
    tracker.set_transport_info(device_features=0b11, interrupt_mode=InterruptMode.MSIX)
    snap = tracker.snapshot()
    assert (snap.device_features, snap.interrupt_mode) == (0b11, InterruptMode.MSIX)
    assert render.feature_names(snap.device_features) == ["ACPI_PXM", "UNPLUGGED_INACCESSIBLE"]
    assert render.feature_names(1 << 7) == ["bit 7"]
    assert render.feature_names(0b101) == ["ACPI_PXM", "PERSISTENT_SUSPEND"]  # status shows it
    with pytest.raises(ValueError, match="device_features"):
        tracker.set_transport_info(device_features=1 << 24, interrupt_mode=InterruptMode.INTX)
