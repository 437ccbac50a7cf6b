"""The owner's in-memory state of one tracker, indexed for the planner.

What is derived from what (docs/design.md, "The tracker"):

* The **file** (bitmap + block records, ``layout.py``) is the shared, crash-safe
  record. Readers and a restarted agent decode it whole.
* A :class:`RegionState` is derived from the file: :meth:`RegionState.load`
  builds it in O(region) when the owner opens the file, on recovery and on a
  rebuild. After that the owner applies every transition to both, in the same
  call, at O(what changed): :meth:`set_subblocks` for the bitmap,
  :meth:`set_block` for a block record. They must agree after every completed
  step (``snapshot.state_disagreement`` checks it; the fuzzers call it after
  every rule).
* Inside the state, the per-unit counts (subblocks plugged, taken, taken
  and still plugged, memory blocks online, online outside ZONE_MOVABLE) are
  derived from the two bitmaps and the block states; each unit's
  :class:`UnitClass` from those counts; the :class:`IndexSet` of each class,
  and the per-state block counters (like ``mb_count[]`` of Linux's
  ``virtio_mem_sbm_set_mb_state``), from the classes and states.
  :meth:`problem` recomputes all of them from scratch (tests only).

Nothing here does I/O; the planner reads a RegionState and never changes it.
"""

from __future__ import annotations

import enum
import re
from array import array
from collections.abc import Iterable, Iterator

from vmem_guest.blocks import Geometry, MemoryBlockState, Unit, UnitGrid, Zone
from vmem_guest.tracker.indexset import IndexSet


class UnitClass(enum.IntEnum):
    """What a unit holds; the planner asks for units by class."""

    EMPTY = 0  # no subblock plugged
    PARTIAL = 1  # some, not all, subblocks plugged
    FULL_OFFLINE = 2  # fully plugged, no memory block online
    FULL_MOVABLE = 3  # fully plugged, something online, all of it in ZONE_MOVABLE
    FULL_KERNEL = 4  # fully plugged, something online outside ZONE_MOVABLE
    HOLED = 5  # online, with subblocks taken out of use (holes, or being taken/given back)


FULL_CLASSES = (UnitClass.FULL_OFFLINE, UnitClass.FULL_MOVABLE, UnitClass.FULL_KERNEL)

#: Runs of non-zero bytes, found by the regular expression engine (C) inside chunks
#: that a memcmp against zeros found non-zero: a bitmap of a large, mostly empty
#: region costs a few comparisons, not a Python loop over its bytes.
_NONZERO_RUN = re.compile(rb"[^\x00]+")
_ZERO_CHUNK = bytes(512)


def nonzero_bit_spans(*bitmaps: bytes | bytearray) -> Iterator[tuple[int, int]]:
    """(first bit, bit count) of each run of non-zero bytes of each bitmap: every set
    bit lies in one of them (a span may hold clear bits too, at most 7 at each end)."""
    step = len(_ZERO_CHUNK)
    for bitmap in bitmaps:
        for lo in range(0, len(bitmap), step):
            chunk = bitmap[lo : lo + step]
            if chunk == _ZERO_CHUNK[: len(chunk)]:
                continue
            for run in _NONZERO_RUN.finditer(chunk):
                yield (lo + run.start()) * 8, (run.end() - run.start()) * 8


def _bits(bitmap: bytes | bytearray, first: int, count: int) -> int:
    """Bits ``first .. first+count-1`` of ``bitmap`` as an int (bit k = bit first+k)."""
    if count <= 0:
        return 0
    chunk = int.from_bytes(bitmap[first >> 3 : (first + count + 7) >> 3], "little")
    return (chunk >> (first & 7)) & ((1 << count) - 1)


def _store_bits(bitmap: bytearray, first: int, count: int, value: bool) -> int:
    """Set (``value``) or clear bits ``first .. first+count-1``; how many changed."""
    if count <= 0:
        return 0
    lo, hi = first >> 3, (first + count + 7) >> 3
    mask = ((1 << count) - 1) << (first & 7)
    word = int.from_bytes(bitmap[lo:hi], "little")
    changed = ((mask & ~word) if value else (mask & word)).bit_count()
    word = (word | mask) if value else (word & ~mask)
    bitmap[lo:hi] = word.to_bytes(hi - lo, "little")
    return changed


class RegionState:
    """Bitmap, block states and the indexes over them, for one device region.

    Memory block ``mb`` (a kernel index) is stored at offset
    ``mb - geometry.first_memory_block``; unit ``u`` is ``grid[u]``.
    """

    def __init__(self, geometry: Geometry, bitmap_size: int | None = None) -> None:
        """An all-UNPLUGGED region; ``bitmap_size`` in bytes (default: just enough)."""
        self.geometry = geometry
        self.grid = UnitGrid.of(geometry)
        self.orphans = self.grid.orphan_subblocks(geometry.nr_subblocks)
        needed = -(-geometry.nr_subblocks // 8)
        self.bitmap = bytearray(max(needed, bitmap_size or 0))
        #: Subblocks of online blocks whose pages the agent takes or took out of use.
        self.taken = bytearray(len(self.bitmap))
        nr_blocks = geometry.nr_memory_blocks
        units = len(self.grid)
        self._first_mb = geometry.first_memory_block
        self.block_states = bytearray(nr_blocks)  # MemoryBlockState.UNPLUGGED == 0
        self.block_zones = bytearray(nr_blocks)  # Zone.NONE == 0
        self.block_present = bytearray(nr_blocks)
        self.unit_plugged = array("L", bytes(units * array("L").itemsize))
        self.unit_online = array("L", bytes(units * array("L").itemsize))
        self.unit_pinned = array("L", bytes(units * array("L").itemsize))
        self.unit_taken = array("L", bytes(units * array("L").itemsize))
        self.unit_taken_plugged = array("L", bytes(units * array("L").itemsize))
        self.unit_class = bytearray(units)  # UnitClass.EMPTY == 0
        self.units_by_class = {cls: IndexSet(units) for cls in UnitClass}
        self.units_by_class[UnitClass.EMPTY] = IndexSet.full(units)
        #: Full units with at least one memory block not online.
        self.not_fully_online = IndexSet(units)
        #: Units with a subblock both taken and plugged (a take or give-back under way).
        self.units_taking = IndexSet(units)
        self.plugged_subblocks = 0
        self.taken_subblocks = 0
        self.taken_plugged_subblocks = 0
        #: Subblocks plugged and in use in HOLED units (what those units still give).
        self.holed_in_use_subblocks = 0
        self.block_counts = dict.fromkeys(MemoryBlockState, 0)
        self.block_counts[MemoryBlockState.UNPLUGGED] = nr_blocks
        self.movable_online_blocks = 0

    # --- building --------------------------------------------------------------

    @classmethod
    def load(
        cls,
        geometry: Geometry,
        bitmap: bytes | bytearray,
        blocks: Iterable[tuple[int, MemoryBlockState, Zone, bool]],
        taken: bytes | bytearray = b"",
    ) -> RegionState:
        """The state of a decoded file: its bitmaps, and (index, state, zone, present)
        of every block record. O(region): at open, recovery and rebuild only."""
        state = cls(geometry, len(bitmap))
        state.bitmap[: len(bitmap)] = bitmap
        state.taken[: len(taken)] = taken
        state.plugged_subblocks = int.from_bytes(bitmap, "little").bit_count()
        state.taken_subblocks = int.from_bytes(state.taken, "little").bit_count()
        # A fresh state is every unit EMPTY with nothing counted: only units with a
        # block that is not UNPLUGGED, absent, zoneless, or with a bit set, differ
        # from it (a 256 GiB region has 2,048 units, of which few hold anything).
        touched: set[int] = set()
        unplugged, no_zone = MemoryBlockState.UNPLUGGED, Zone.NONE
        for index, block_state, zone, present in blocks:
            if block_state == unplugged and zone == no_zone and not present:
                continue
            state._store_block(index, block_state, zone, present)
            touched.add(state.grid.unit_of_memory_block(index))
        for unit in touched:
            state._recount_online(unit)
        state._refresh_units(touched)
        return state

    # --- the transitions (the owner calls these, and only these) ---------------

    def set_subblocks(self, first: int, count: int, *, plugged: bool) -> int:
        """Set or clear bits ``first .. first+count-1``; the number of bits changed.

        Cost: O(count / 8) for the bits, plus one recount per unit touched.
        """
        changed = _store_bits(self.bitmap, first, count, plugged)
        self.plugged_subblocks += changed if plugged else -changed
        for unit in self._units_over(first, count):
            self._refresh_unit(unit)
        return changed

    def set_taken(self, first: int, count: int, *, taken: bool) -> int:
        """Set or clear taken bits ``first .. first+count-1``; the number changed."""
        changed = _store_bits(self.taken, first, count, taken)
        self.taken_subblocks += changed if taken else -changed
        for unit in self._units_over(first, count):
            self._refresh_unit(unit)
        return changed

    def replace_bitmap(self, bitmap: bytes | bytearray, taken: bytes | bytearray) -> None:
        """Whole new bitmaps (rebuild). Only units with a bit set before or after are
        recounted (the others had and keep none): Python work in what the bitmaps
        hold, a scan at C speed in the region size."""
        touched = self._units_of_bits()
        self.bitmap[:] = bitmap
        self.taken[:] = taken
        self.plugged_subblocks = int.from_bytes(bitmap, "little").bit_count()
        self.taken_subblocks = int.from_bytes(taken, "little").bit_count()
        self._refresh_units(touched | self._units_of_bits())

    def set_block(self, index: int, state: MemoryBlockState, zone: Zone, present: bool) -> None:
        """Block ``index`` now has this record (the owner's ``_set_block_state``)."""
        self._store_block(index, state, zone, present)
        unit = self.grid.unit_of_memory_block(index)
        self._recount_online(unit)
        self._refresh_unit(unit)

    # --- queries (the planner's) ------------------------------------------------

    @property
    def plugged_bytes(self) -> int:
        return self.plugged_subblocks * self.geometry.block_size

    @property
    def online_bytes(self) -> int:
        return self.block_counts[MemoryBlockState.ONLINE] * self.geometry.memory_block_size

    def is_plugged(self, sb_index: int) -> bool:
        return bool(self.bitmap[sb_index >> 3] >> (sb_index & 7) & 1)

    def plugged_in(self, subblocks: range) -> list[int]:
        """The plugged subblocks of ``subblocks`` (one unit's worth, say)."""
        bits = _bits(self.bitmap, subblocks.start, len(subblocks))
        return [subblocks.start + k for k in range(len(subblocks)) if bits >> k & 1]

    def missing_in(self, subblocks: range) -> list[int]:
        """The unplugged subblocks of ``subblocks``."""
        bits = _bits(self.bitmap, subblocks.start, len(subblocks))
        return [subblocks.start + k for k in range(len(subblocks)) if not bits >> k & 1]

    def is_taken(self, sb_index: int) -> bool:
        return bool(self.taken[sb_index >> 3] >> (sb_index & 7) & 1)

    def subblocks_where(self, subblocks: range, *, plugged: bool, taken: bool) -> list[int]:
        """The subblocks of ``subblocks`` with exactly these plugged and taken bits:
        (True, False) in use, (True, True) being taken or given back, (False, True) holes."""
        start, count = subblocks.start, len(subblocks)
        plug_bits = _bits(self.bitmap, start, count)
        taken_bits = _bits(self.taken, start, count)
        mask = (1 << count) - 1
        wanted = (plug_bits if plugged else ~plug_bits) & (taken_bits if taken else ~taken_bits)
        wanted &= mask
        return [start + k for k in range(count) if wanted >> k & 1]

    @property
    def hole_subblocks(self) -> int:
        """Subblocks of online blocks taken out of use and unplugged."""
        return self.taken_subblocks - self.taken_plugged_subblocks

    def block_state(self, index: int) -> MemoryBlockState:
        return MemoryBlockState(self.block_states[index - self._first_mb])

    def block_zone(self, index: int) -> Zone:
        return Zone(self.block_zones[index - self._first_mb])

    def is_present(self, index: int) -> bool:
        return bool(self.block_present[index - self._first_mb])

    def unit(self, unit_index: int) -> Unit:
        return self.grid[unit_index]

    def units(self, cls: UnitClass) -> IndexSet:
        return self.units_by_class[cls]

    @property
    def full_units(self) -> int:
        """Fully plugged units."""
        return sum(len(self.units_by_class[cls]) for cls in FULL_CLASSES)

    def full_units_below(self, unit_index: int) -> int:
        """Fully plugged units lower than ``unit_index``. O(region / 64): rare paths only."""
        return sum(self.units_by_class[cls].count_below(unit_index) for cls in FULL_CLASSES)

    def unit_blocks(self, unit_index: int) -> range:
        """The memory blocks of one unit (no Unit object: this is on every step)."""
        per_unit = self.grid.memory_blocks_per_unit
        first = self._first_mb + unit_index * per_unit
        return range(first, first + per_unit)

    def online_blocks(self, unit_index: int) -> list[int]:
        """The online memory blocks of one unit, lowest first."""
        if not self.unit_online[unit_index]:
            return []
        online = MemoryBlockState.ONLINE
        mbs = self.unit_blocks(unit_index)
        return [mb for mb in mbs if self.block_states[mb - self._first_mb] == online]

    def highest_plugged_subblock(self) -> int | None:
        """The highest plugged subblock of the region, or None. O(1) in the region size."""
        highest: int | None = None
        for cls in (UnitClass.PARTIAL, *FULL_CLASSES, UnitClass.HOLED):
            unit = self.units_by_class[cls].last()
            plugged = self.plugged_in(self.grid[unit].subblocks) if unit is not None else []
            if plugged:  # a HOLED unit may have every subblock unplugged
                highest = max(highest if highest is not None else -1, plugged[-1])
        for sb in self.orphans:
            if self.is_plugged(sb) and (highest is None or sb > highest):
                highest = sb
        return highest

    # --- checking (tests and fuzzers) -------------------------------------------

    def problem(self) -> str | None:
        """The first index that does not match a recount from scratch, or None. O(region)."""
        fresh = RegionState.load(
            self.geometry, bytes(self.bitmap), self._records(), bytes(self.taken)
        )
        if fresh.plugged_subblocks != self.plugged_subblocks:
            return f"plugged_subblocks {self.plugged_subblocks}, bitmap {fresh.plugged_subblocks}"
        if fresh.block_counts != self.block_counts:
            return f"block counts {self.block_counts}, records {fresh.block_counts}"
        if fresh.movable_online_blocks != self.movable_online_blocks:
            return f"movable online {self.movable_online_blocks}, {fresh.movable_online_blocks}"
        for name in ("taken_subblocks", "taken_plugged_subblocks", "holed_in_use_subblocks"):
            if getattr(fresh, name) != getattr(self, name):
                return f"{name} {getattr(self, name)}, recount {getattr(fresh, name)}"
        names = ("unit_plugged", "unit_online", "unit_pinned", "unit_taken", "unit_class")
        for name in (*names, "unit_taken_plugged"):
            if getattr(fresh, name) != getattr(self, name):
                return f"{name} differs from a recount"
        for cls in UnitClass:
            if list(fresh.units_by_class[cls]) != list(self.units_by_class[cls]):
                return f"units of class {cls.name} differ from a recount"
        if list(fresh.not_fully_online) != list(self.not_fully_online):
            return "not-fully-online units differ from a recount"
        if list(fresh.units_taking) != list(self.units_taking):
            return "units with a take under way differ from a recount"
        return None

    def _records(self) -> Iterator[tuple[int, MemoryBlockState, Zone, bool]]:
        for offset, raw_state in enumerate(self.block_states):
            yield (
                self._first_mb + offset,
                MemoryBlockState(raw_state),
                Zone(self.block_zones[offset]),
                bool(self.block_present[offset]),
            )

    # --- internals ----------------------------------------------------------------

    def _store_block(self, index: int, state: MemoryBlockState, zone: Zone, present: bool) -> None:
        offset = index - self._first_mb
        old_state = self.block_states[offset]  # ints: no enum lookups on the hot path
        online = MemoryBlockState.ONLINE
        old_movable = old_state == online and self.block_zones[offset] == Zone.MOVABLE
        new_movable = state == online and zone == Zone.MOVABLE
        self.block_counts[old_state] -= 1  # type: ignore[index]
        self.block_counts[state] += 1
        self.movable_online_blocks += int(new_movable) - int(old_movable)
        self.block_states[offset] = state
        self.block_zones[offset] = zone
        self.block_present[offset] = present

    def _units_over(self, first: int, count: int) -> range:
        """Units holding any of subblocks ``first .. first+count-1``."""
        grid = self.grid
        lo = max(first, grid.first_subblock)
        hi = min(first + count, grid.subblocks_end)
        if lo >= hi:
            return range(0)
        return range(
            (lo - grid.first_subblock) // grid.subblocks_per_unit,
            (hi - 1 - grid.first_subblock) // grid.subblocks_per_unit + 1,
        )

    def _units_of_bits(self) -> set[int]:
        """Every unit with a bit set in the plug or taken bitmap (and maybe neighbours)."""
        units: set[int] = set()
        for first, count in nonzero_bit_spans(self.bitmap, self.taken):
            units.update(self._units_over(first, count))
        return units

    def _refresh_units(self, units: Iterable[int]) -> None:
        for unit in sorted(units):
            self._refresh_unit(unit)

    def _refresh_unit(self, unit: int) -> None:
        """Recount a unit's subblocks from the bitmaps, then reclassify it."""
        self.holed_in_use_subblocks -= self._holed_in_use(unit)
        self.taken_plugged_subblocks -= self.unit_taken_plugged[unit]
        grid = self.grid
        first = grid.first_subblock + unit * grid.subblocks_per_unit
        plug_bits = _bits(self.bitmap, first, grid.subblocks_per_unit)
        taken_bits = _bits(self.taken, first, grid.subblocks_per_unit)
        self.unit_plugged[unit] = plug_bits.bit_count()
        self.unit_taken[unit] = taken_bits.bit_count()
        self.unit_taken_plugged[unit] = (plug_bits & taken_bits).bit_count()
        self._reclassify(unit)
        self.taken_plugged_subblocks += self.unit_taken_plugged[unit]
        self.holed_in_use_subblocks += self._holed_in_use(unit)
        if self.unit_taken_plugged[unit]:
            self.units_taking.add(unit)
        else:
            self.units_taking.discard(unit)

    def _holed_in_use(self, unit: int) -> int:
        if self.unit_class[unit] != UnitClass.HOLED:
            return 0
        return self.unit_plugged[unit] - self.unit_taken_plugged[unit]

    def _recount_online(self, unit: int) -> None:
        per_unit = self.grid.memory_blocks_per_unit
        first = unit * per_unit  # offset of the unit's first block (grid starts at offset 0)
        online = pinned = 0
        for offset in range(first, first + per_unit):
            if self.block_states[offset] == MemoryBlockState.ONLINE:
                online += 1
                pinned += self.block_zones[offset] != Zone.MOVABLE
        self.unit_online[unit] = online
        self.unit_pinned[unit] = pinned

    def _reclassify(self, unit: int) -> None:
        grid = self.grid
        plugged = self.unit_plugged[unit]
        online = self.unit_online[unit]
        if online and self.unit_taken[unit]:
            cls = UnitClass.HOLED
        elif plugged == 0:
            cls = UnitClass.EMPTY
        elif plugged < grid.subblocks_per_unit:
            cls = UnitClass.PARTIAL
        elif online == 0:
            cls = UnitClass.FULL_OFFLINE
        elif self.unit_pinned[unit] == 0:
            cls = UnitClass.FULL_MOVABLE
        else:
            cls = UnitClass.FULL_KERNEL
        old = self.unit_class[unit]  # an int: IntEnum keys hash and compare alike
        if old != cls:
            self.units_by_class[old].discard(unit)  # type: ignore[index]
            self.units_by_class[cls].add(unit)
            self.unit_class[unit] = cls
        if cls in FULL_CLASSES and online < grid.memory_blocks_per_unit:
            self.not_fully_online.add(unit)
        else:
            self.not_fully_online.discard(unit)
