"""Attaching a device costs work in what its tracker holds, not in its region's size.

A fresh tracker's state is built without decoding the file; a rebuild visits only
the block records and units that hold something before or after; the scans that
find them (:func:`nonzero_bit_spans`, the record comparison) must miss nothing at
their chunk edges. Each result is checked against a decode of the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmem_guest import planner
from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.sim.runner import SimOptions, Simulation
from vmem_guest.tracker import (
    NODE_UNKNOWN,
    RECORD_SIZE,
    Tracker,
    TrackerIdentity,
    consistency_problem,
    decode,
    state_disagreement,
    state_of,
)
from vmem_guest.tracker.layout import FileLayout
from vmem_guest.tracker.owner import Tracker as OwnerTracker
from vmem_guest.tracker.state import RegionState, nonzero_bit_spans

MIB = 1 << 20
GIB = 1 << 30

GEOMETRIES = {
    "sbm": Geometry(4 * GIB, 1 * GIB, 2 * MIB, 128 * MIB),
    "bbm": Geometry(4 * GIB, 1 * GIB, 256 * MIB, 128 * MIB),
    "unaligned": Geometry(4 * GIB + 64 * MIB, 512 * MIB, 2 * MIB, 128 * MIB),
    # 600 memory blocks: records across two 256-record chunks and a partial third.
    "600 blocks": Geometry(4 * GIB, 600 * 128 * MIB, 4 * MIB, 128 * MIB),
    "1 TiB": Geometry(4 * GIB, 1024 * GIB, 2 * MIB, 128 * MIB),
}


def ident(geometry: Geometry) -> TrackerIdentity:
    return TrackerIdentity("0000:00:03.0", geometry)


def set_bits(size: int, bits: list[int]) -> bytes:
    bitmap = bytearray(size)
    for bit in bits:
        bitmap[bit // 8] |= 1 << (bit % 8)
    return bytes(bitmap)


@pytest.mark.parametrize(
    "bits",
    [
        [],
        [0],
        [7, 8],
        [4095],
        [4096],
        [4095, 4096, 8191],
        [(3 * 1024 - 5) * 8 - 1],
        list(range(100, 300)),
    ],
)
def test_nonzero_bit_spans_cover_every_set_bit(bits: list[int]) -> None:
    size = 3 * 1024 - 5  # chunks of 512 bytes and a partial last one
    bitmap = set_bits(size, bits)
    spans = list(nonzero_bit_spans(bitmap))
    for bit in bits:
        assert any(first <= bit < first + count for first, count in spans), bit
    for first, count in spans:
        assert first % 8 == 0 and count % 8 == 0
        assert all(bitmap[first // 8 : (first + count) // 8]), "a span over a zero byte"
    assert list(nonzero_bit_spans(bitmap, bytes(64), bitmap)) == spans + spans


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_fresh_tracker_state_is_the_decoded_file(tmp_path: Path, name: str) -> None:
    geometry = GEOMETRIES[name]
    with Tracker.open(tmp_path, ident(geometry)) as tracker:
        assert not tracker.recovered
        snap = tracker.snapshot()
        assert consistency_problem(snap) is None
        assert state_disagreement(tracker.state, snap) is None
        decoded = state_of(decode(bytes(Path(tracker.path).read_bytes())))
        assert bytes(decoded.bitmap) == bytes(tracker.state.bitmap)
        assert decoded.block_counts == tracker.state.block_counts


def online_block(tracker: Tracker, index: int, zone: Zone = Zone.MOVABLE) -> None:
    subblocks = tracker.geometry.subblocks_of(index)
    tracker.record_plugged(tracker.geometry.subblock_addr(subblocks.start), len(subblocks))
    tracker.record_present(index)
    tracker.record_online(index, zone, node=1)


def test_rebuild_reaches_records_at_chunk_edges(tmp_path: Path) -> None:
    """Blocks at both ends of each 256-record chunk, and the region's last, are found
    by the record comparison and rebuilt, on a reopened file too."""
    geometry = GEOMETRIES["600 blocks"]
    first = geometry.first_memory_block
    edges = [first + off for off in (0, 255, 256, 511, 512, 599)]
    with Tracker.open(tmp_path, ident(geometry)) as tracker:
        for index in edges:
            online_block(tracker, index)
    with Tracker.open(tmp_path, ident(geometry)) as tracker:
        assert tracker.recovered
        assert state_disagreement(tracker.state, tracker.snapshot()) is None
        tracker.rebuild_from_states(plugged=[], online={}, present=[edges[1]])
        snap = tracker.snapshot()
        assert consistency_problem(snap) is None
        assert state_disagreement(tracker.state, snap) is None
        assert snap.plugged_bytes == snap.online_bytes == 0
        for index in edges:
            record = snap.block(index)
            assert record.state is MemoryBlockState.UNPLUGGED and record.zone is Zone.NONE
            assert record.present == (index == edges[1])
        assert snap.block(edges[0]).node == NODE_UNKNOWN
        assert snap.block(edges[1]).node == 1  # still present: its node stays


def test_rebuild_resets_a_stray_node_of_an_absent_block(tmp_path: Path) -> None:
    """A record that differs from a fresh one only in its node is still visited."""
    geometry = GEOMETRIES["600 blocks"]
    slot = 300
    with Tracker.open(tmp_path, ident(geometry)) as tracker:
        path = tracker.path
    layout = FileLayout.of(geometry)
    node_at = layout.records_offset + slot * RECORD_SIZE + 8  # state, flags, zone, pad, count
    with open(path, "r+b") as file:
        file.seek(node_at)
        file.write((3).to_bytes(4, "little", signed=True))
    with Tracker.open(tmp_path, ident(geometry)) as tracker:
        assert tracker.recovered
        index = geometry.first_memory_block + slot
        assert tracker.block(index).node == 3
        tracker.rebuild_from_states(plugged=[], online={}, present=[])
        assert tracker.block(index).node == NODE_UNKNOWN


def test_attaching_a_large_empty_region_writes_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up of a fresh 1 TiB device (8,192 memory blocks, 524,288 subblocks) and of
    it again after a restart: no block record is written and no unit recounted."""
    writes: list[int] = []
    refreshed: list[int] = []
    set_block_state = OwnerTracker._set_block_state
    refresh_unit = RegionState._refresh_unit

    def count_writes(self: OwnerTracker, index: int, *args: object, **kwargs: object) -> None:
        writes.append(index)
        set_block_state(self, index, *args, **kwargs)  # type: ignore[arg-type]

    def count_refreshes(self: RegionState, unit: int) -> None:
        refreshed.append(unit)
        refresh_unit(self, unit)

    monkeypatch.setattr(OwnerTracker, "_set_block_state", count_writes)
    monkeypatch.setattr(RegionState, "_refresh_unit", count_refreshes)
    options = SimOptions(region_size=1024 * GIB, block_size=2 * MIB, policy=planner.DEFAULT_POLICY)
    for _restart in range(2):
        with Simulation(options, tmp_path) as sim:
            assert sim.tracker.state.geometry.nr_memory_blocks == 8192
            assert state_disagreement(sim.tracker.state, sim.tracker.snapshot()) is None
        assert writes == [] and refreshed == []
    # 1 GiB plugged and online (8 memory blocks): recovery and a reopened file do work
    # in those blocks only.
    with Simulation(options, tmp_path) as sim:
        sim.resize(1 * GIB)
        identity = sim.tracker.identity
        writes.clear()
        refreshed.clear()
        sim.driver.start()
        assert sim.tracker.state.online_bytes == 1 * GIB
        assert state_disagreement(sim.tracker.state, sim.tracker.snapshot()) is None
        assert len(set(writes)) <= 8
        assert 0 < len(set(refreshed)) <= 2 * 8
    refreshed.clear()
    with Tracker.open(tmp_path, identity) as tracker:
        assert tracker.recovered and tracker.state.online_bytes == 1 * GIB
        assert state_disagreement(tracker.state, tracker.snapshot()) is None
    assert 0 < len(set(refreshed)) <= 2 * 8
