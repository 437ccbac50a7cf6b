"""The tracker owner's in-memory state: IndexSet, RegionState, and their agreement
with the file through every transition a Tracker makes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.errors import SafetyError
from vmem_guest.spec import RequestType
from vmem_guest.tracker import (
    RegionState,
    Tracker,
    TrackerIdentity,
    UnitClass,
    state_disagreement,
    state_of,
)
from vmem_guest.tracker.indexset import IndexSet

MIB = 1 << 20
GIB = 1 << 30
SBM = Geometry(4 * GIB, 1 * GIB, 2 * MIB, 128 * MIB)
BBM = Geometry(4 * GIB, 2 * GIB, 256 * MIB, 128 * MIB)
EDGES = Geometry(4 * GIB + 64 * MIB, 512 * MIB, 2 * MIB, 128 * MIB)

# --- IndexSet ------------------------------------------------------------------

operations = st.lists(st.tuples(st.booleans(), st.integers(0, 299)), max_size=200)


@settings(max_examples=200, deadline=None)
@given(operations, st.integers(-5, 310))
def test_index_set_answers_like_a_python_set(ops: list[tuple[bool, int]], probe: int) -> None:
    members = IndexSet(300)
    model: set[int] = set()
    for add, value in ops:
        if add:
            members.add(value)
            model.add(value)
        else:
            members.discard(value)
            model.discard(value)
    assert len(members) == len(model)
    assert bool(members) == bool(model)
    assert list(members) == sorted(model)
    assert list(members.descending()) == sorted(model, reverse=True)
    assert members.first(probe) == min((m for m in model if m >= probe), default=None)
    assert members.last(probe) == max((m for m in model if m < probe), default=None)
    assert members.last() == max(model, default=None)
    assert list(members.ascending(probe)) == sorted(m for m in model if m >= probe)
    assert members.count_below(probe) == sum(1 for m in model if m < probe)
    assert (probe in members) == (probe in model)


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 1000])
def test_a_full_index_set_holds_every_member(size: int) -> None:
    full = IndexSet.full(size)
    assert list(full) == list(range(size))
    assert len(full) == size
    if size:
        full.discard(size - 1)
        assert full.last() == (size - 2 if size > 1 else None)


def test_index_set_refuses_members_outside_its_size() -> None:
    members = IndexSet(10)
    with pytest.raises(IndexError):
        members.add(10)
    with pytest.raises(IndexError):
        members.discard(-1)
    assert 10 not in members and "3" not in members


# --- RegionState -----------------------------------------------------------------


def test_a_fresh_state_is_all_empty_and_consistent() -> None:
    state = RegionState(SBM)
    assert len(state.units(UnitClass.EMPTY)) == len(state.grid) == 8
    assert state.full_units == 0 and state.plugged_bytes == 0
    assert state.highest_plugged_subblock() is None
    assert state.problem() is None


def test_units_move_between_classes_as_subblocks_and_blocks_change() -> None:
    state = RegionState(SBM)
    mb = SBM.first_memory_block + 2
    subblocks = SBM.subblocks_of(mb)
    state.set_subblocks(subblocks.start, 10, plugged=True)
    assert list(state.units(UnitClass.PARTIAL)) == [2]
    state.set_subblocks(subblocks.start + 10, len(subblocks) - 10, plugged=True)
    assert list(state.units(UnitClass.FULL_OFFLINE)) == [2]
    assert list(state.not_fully_online) == [2]
    state.set_block(mb, MemoryBlockState.ONLINE, Zone.MOVABLE, True)
    assert list(state.units(UnitClass.FULL_MOVABLE)) == [2]
    assert not state.not_fully_online
    assert state.movable_online_blocks == 1
    state.set_block(mb, MemoryBlockState.ONLINE, Zone.KERNEL, True)
    assert list(state.units(UnitClass.FULL_KERNEL)) == [2]
    assert state.movable_online_blocks == 0
    assert state.highest_plugged_subblock() == subblocks.stop - 1
    assert state.problem() is None


def test_big_block_mode_unit_is_fully_online_only_with_all_its_memory_blocks() -> None:
    state = RegionState(BBM)
    state.set_subblocks(3, 1, plugged=True)
    first, second = BBM.memory_blocks_of(3)
    state.set_block(first, MemoryBlockState.ONLINE, Zone.MOVABLE, True)
    assert 3 in state.not_fully_online
    assert list(state.units(UnitClass.FULL_MOVABLE)) == [3]
    state.set_block(second, MemoryBlockState.ONLINE, Zone.MOVABLE, True)
    assert 3 not in state.not_fully_online
    assert state.online_blocks(3) == [first, second]
    assert state.problem() is None


def test_orphan_subblocks_count_as_plugged_but_in_no_unit() -> None:
    state = RegionState(EDGES)
    assert state.orphans  # the region's edges cut two memory blocks
    orphan = state.orphans[-1]
    state.set_subblocks(orphan, 1, plugged=True)
    assert state.plugged_subblocks == 1
    assert state.full_units == 0 and not state.units(UnitClass.PARTIAL)
    assert state.highest_plugged_subblock() == orphan


def test_problem_names_an_index_that_drifted() -> None:
    state = RegionState(SBM)
    state.set_subblocks(0, 64, plugged=True)
    state.units_by_class[UnitClass.EMPTY].add(0)  # an index no transition would produce
    assert state.problem() is not None


# --- the owner keeps state and file in step -----------------------------------------

tracker_ops = st.lists(
    st.tuples(
        st.sampled_from(["plug", "unplug", "present", "online", "offline", "unplug_all"]),
        st.integers(0, 1 << 16),
        st.integers(1, 200),
        st.sampled_from([Zone.MOVABLE, Zone.KERNEL, Zone.AUTO]),
    ),
    max_size=40,
)


def apply(tracker: Tracker, op: str, where: int, count: int, zone: Zone) -> None:
    geometry = tracker.geometry
    blocks = geometry.memory_blocks()
    mb = blocks[where % len(blocks)]
    first = where % geometry.nr_subblocks
    count = min(count, geometry.nr_subblocks - first)
    addr = geometry.subblock_addr(first)
    try:
        if op == "plug":
            tracker.set_intent(RequestType.PLUG, addr, count)
            tracker.record_plugged(addr, count)
        elif op == "unplug":
            tracker.set_intent(RequestType.UNPLUG, addr, count)
            tracker.record_unplugged(addr, count)
        elif op == "present":
            tracker.record_present(mb)
        elif op == "online":
            tracker.record_online(mb, zone)
        elif op == "offline":
            tracker.record_offline(mb)
        else:
            tracker.record_unplug_all()
    except SafetyError:
        pass  # refused before any change: the check below still holds
    tracker.clear_intent()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sampled_from([SBM, BBM, EDGES]), tracker_ops)
def test_the_owner_state_agrees_with_its_file_after_every_transition(
    tmp_path: Path, geometry: Geometry, ops: list[tuple[str, int, int, Zone]]
) -> None:
    identity = TrackerIdentity(f"t{abs(hash((geometry, len(ops))))}", geometry)
    with Tracker.open(tmp_path, identity) as tracker:
        for op in ops:
            apply(tracker, *op)
            problem = state_disagreement(tracker.state, tracker.snapshot())
            assert problem is None, (op, problem)
        snap = tracker.snapshot()
    # What a restarted owner derives from the file is the same state.
    with Tracker.open(tmp_path, identity) as reopened:
        assert state_disagreement(reopened.state, snap) is None
        assert bytes(state_of(snap).bitmap) == bytes(reopened.state.bitmap)


def test_a_rebuild_replaces_the_state_with_the_file(tmp_path: Path) -> None:
    with Tracker.open(tmp_path, TrackerIdentity("rebuild", SBM)) as tracker:
        mb = SBM.first_memory_block + 1
        plugged = list(SBM.subblocks_of(mb))
        tracker.rebuild_from_states(plugged=plugged, online={mb: Zone.MOVABLE}, present=[mb])
        assert list(tracker.state.units(UnitClass.FULL_MOVABLE)) == [1]
        assert state_disagreement(tracker.state, tracker.snapshot()) is None
