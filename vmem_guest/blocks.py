"""Geometry of a device region and the per-memory-block state machine.

Two granularities meet here (docs/design.md section 2):

* the *device block* (``block_size``), the unit of PLUG/UNPLUG; we call the
  device blocks inside one memory block its *subblocks*;
* the *memory block* (``block_size_bytes`` in sysfs), the unit of
  probe/online/offline.

In Sub Block Mode (device block < memory block) a memory block holds
``memory_block_size // block_size`` subblocks. In Big Block Mode (device block
>= memory block) one device block spans ``block_size // memory_block_size``
memory blocks, and each memory block is covered by exactly one device block.

The memory blocks we manage are those that lie wholly inside the region;
a region edge that cuts a memory block leaves that part unusable.

Per-memory-block states (the tracker stores them, the planner reads them)::

                 plug all subblocks            probe (if absent) + online
    UNPLUGGED ------------------------> PLUGGED --------------------------> ONLINE
        ^   \\                            |  ^                                  |
        |    \\ crash between requests    |  |            offline (EBUSY: stay) |
        |     v                           |  +----------------------------------+
        |   PARTIAL -- plug the rest --> PLUGGED
        +----- unplug every plugged subblock (only when not ONLINE) ---------+

Invariant (docs/design.md 5.1): a block is ONLINE only if every subblock is plugged.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Sequence
from typing import overload


class MemoryBlockState(enum.IntEnum):
    """Where one memory block of a device region stands."""

    UNPLUGGED = 0  # no subblock plugged; offline or absent in the kernel
    PARTIAL = 1  # some, not all, subblocks plugged (interrupted plug/unplug)
    PLUGGED = 2  # every subblock plugged; not online (absent or offline)
    ONLINE = 3  # every subblock plugged and the block online in the kernel


class Zone(enum.IntEnum):
    """The zone a block was onlined to (what ``memoryN/state`` was written)."""

    NONE = 0
    MOVABLE = 1  # "online_movable"
    KERNEL = 2  # "online_kernel"
    AUTO = 3  # "online": the kernel chose

    @property
    def sysfs_word(self) -> str:
        """The word written to ``memoryN/state`` to online into this zone."""
        return {Zone.MOVABLE: "online_movable", Zone.KERNEL: "online_kernel"}.get(self, "online")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Address arithmetic for one device region; all sizes in bytes.

    Derived sizes are computed once per object (``cached_property``: the
    fields are frozen, and they are read on every step).

    Memory block *indices* here are the kernel's (``memoryN``): physical
    address // memory_block_size. Subblock (device block) indices count from
    the start of the region.
    """

    addr: int
    region_size: int
    block_size: int
    memory_block_size: int

    def __post_init__(self) -> None:
        for name in ("block_size", "memory_block_size"):
            value = getattr(self, name)
            if value <= 0 or value & (value - 1):
                raise ValueError(f"{name} {value:#x} is not a power of two")
        if self.addr % self.block_size or self.region_size % self.block_size:
            raise ValueError("region is not aligned to the device block size")

    @functools.cached_property
    def big_block_mode(self) -> bool:
        """True when one device block spans one or more whole memory blocks."""
        return self.block_size >= self.memory_block_size

    @functools.cached_property
    def end(self) -> int:
        return self.addr + self.region_size

    @functools.cached_property
    def nr_subblocks(self) -> int:
        """Device blocks in the region (bits in the tracker's bitmap)."""
        return self.region_size // self.block_size

    @functools.cached_property
    def first_memory_block(self) -> int:
        """Kernel index of the first memory block wholly inside the region."""
        return -(-self.addr // self.memory_block_size)

    @functools.cached_property
    def nr_memory_blocks(self) -> int:
        """Memory blocks wholly inside the region."""
        last = self.end // self.memory_block_size
        return max(0, last - self.first_memory_block)

    @functools.cached_property
    def subblocks_per_memory_block(self) -> int:
        """Device blocks overlapping one memory block (1 in Big Block Mode)."""
        return max(1, self.memory_block_size // self.block_size)

    @functools.cached_property
    def memory_blocks_per_device_block(self) -> int:
        """Memory blocks one device block spans (1 in Sub Block Mode)."""
        return max(1, self.block_size // self.memory_block_size)

    def memory_block_addr(self, index: int) -> int:
        """Physical address of memory block ``index``."""
        return index * self.memory_block_size

    def memory_blocks(self) -> range:
        """Kernel indices of the memory blocks wholly inside the region."""
        return range(self.first_memory_block, self.first_memory_block + self.nr_memory_blocks)

    def subblock_index(self, addr: int) -> int:
        """Index (from the region start) of the device block at ``addr``."""
        return (addr - self.addr) // self.block_size

    def subblock_addr(self, index: int) -> int:
        return self.addr + index * self.block_size

    def subblocks_of(self, mb_index: int) -> range:
        """Subblock indices overlapping memory block ``mb_index``."""
        start = self.memory_block_addr(mb_index)
        first = self.subblock_index(start)
        if self.big_block_mode:
            return range(first, first + 1)
        return range(first, first + self.subblocks_per_memory_block)

    def memory_blocks_of(self, sb_index: int) -> range:
        """Memory block indices (wholly inside the region) a device block overlaps."""
        start = self.subblock_addr(sb_index)
        first = start // self.memory_block_size
        count = self.memory_blocks_per_device_block
        lo = max(first, self.first_memory_block)
        hi = min(first + count, self.first_memory_block + self.nr_memory_blocks)
        if not self.big_block_mode:
            return range(first, first + 1) if lo <= first < hi else range(0)
        return range(lo, max(lo, hi))

    def contains_memory_block(self, mb_index: int) -> bool:
        first = self.first_memory_block
        return first <= mb_index < first + self.nr_memory_blocks


@dataclasses.dataclass(frozen=True)
class Unit:
    """Subblocks and memory blocks that are plugged and onlined together.

    In Sub Block Mode one memory block and its subblocks; in Big Block Mode one
    device block and the memory blocks it spans.
    """

    subblocks: range
    memory_blocks: range


@dataclasses.dataclass(frozen=True)
class UnitGrid(Sequence[Unit]):
    """The units of a region: a regular grid, so unit ``i`` is computed, not stored.

    Units are whole memory blocks (Sub Block Mode) or whole device blocks (Big
    Block Mode) wholly inside the region. Both are evenly spaced: in Sub Block
    Mode because memory blocks are; in Big Block Mode because the region starts
    on a device-block boundary (spec 5.15.4: ``addr`` is a multiple of
    ``block_size``) and a device block is a whole number of memory blocks. So a
    region of any size costs the same to describe.
    """

    first_subblock: int
    subblocks_per_unit: int
    first_memory_block: int
    memory_blocks_per_unit: int
    nr_units: int

    @classmethod
    def of(cls, geometry: Geometry) -> UnitGrid:
        if geometry.big_block_mode:
            per_unit = geometry.memory_blocks_per_device_block
            return cls(
                first_subblock=0,
                subblocks_per_unit=1,
                first_memory_block=geometry.first_memory_block,
                memory_blocks_per_unit=per_unit,
                nr_units=geometry.nr_memory_blocks // per_unit,
            )
        first_mb = geometry.first_memory_block
        return cls(
            first_subblock=geometry.subblock_index(geometry.memory_block_addr(first_mb)),
            subblocks_per_unit=geometry.subblocks_per_memory_block,
            first_memory_block=first_mb,
            memory_blocks_per_unit=1,
            nr_units=geometry.nr_memory_blocks,
        )

    def __len__(self) -> int:
        return self.nr_units

    @overload
    def __getitem__(self, index: int) -> Unit: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Unit]: ...

    def __getitem__(self, index: int | slice) -> Unit | Sequence[Unit]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.nr_units))]
        if index < 0:
            index += self.nr_units
        if not 0 <= index < self.nr_units:
            raise IndexError(f"unit {index} outside 0..{self.nr_units - 1}")
        sb = self.first_subblock + index * self.subblocks_per_unit
        mb = self.first_memory_block + index * self.memory_blocks_per_unit
        return Unit(
            range(sb, sb + self.subblocks_per_unit), range(mb, mb + self.memory_blocks_per_unit)
        )

    @property
    def subblocks_end(self) -> int:
        """One past the last subblock that belongs to a unit."""
        return self.first_subblock + self.nr_units * self.subblocks_per_unit

    def unit_of_subblock(self, sb_index: int) -> int | None:
        """The unit holding subblock ``sb_index``, None for an orphan."""
        offset = sb_index - self.first_subblock
        if offset < 0 or sb_index >= self.subblocks_end:
            return None
        return offset // self.subblocks_per_unit

    def unit_of_memory_block(self, mb_index: int) -> int:
        """The unit holding memory block ``mb_index`` (a block of the region)."""
        offset = mb_index - self.first_memory_block
        if not 0 <= offset < self.nr_units * self.memory_blocks_per_unit:
            raise IndexError(f"memory{mb_index} is in no unit")
        return offset // self.memory_blocks_per_unit

    def units_ending_by(self, sb_stop: int) -> int:
        """How many units lie wholly below subblock ``sb_stop`` (all of them end by it)."""
        whole = (sb_stop - self.first_subblock) // self.subblocks_per_unit
        return max(0, min(self.nr_units, whole))

    def orphan_subblocks(self, nr_subblocks: int) -> tuple[int, ...]:
        """Subblocks of no unit: those of memory blocks a region edge cuts (at most
        two memory blocks' worth, so this is bounded by the geometry, not the region)."""
        head = range(0, min(self.first_subblock, nr_subblocks))
        tail = range(max(self.subblocks_end, 0), nr_subblocks)
        return (*head, *tail)
