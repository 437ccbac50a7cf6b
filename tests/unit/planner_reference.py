"""The reference planner: the planner as it was before it read an indexed state.

Kept verbatim (only this docstring's first paragraph, its docs/ file
citations and the imports differ) as an oracle: it scans every unit of the
region on every call, which is what made it slow at scale, and is easy to check
by eye. ``test_planner_reference.py`` asserts that the live planner, with one
unit unplugged at a time (``unplug_batch_units=1``, the old behaviour), returns
the same step as this one for any legal input.

Original first line: the one next step toward ``requested_size``.

Pure and deterministic: no I/O, no clock. The driver core (``driver.py``)
calls :func:`next_step` after every step it executes, so the loop converges
from *any* state (after a crash, a refused offline, a NACK, a resize...).

Units. Memory is plugged and onlined, or offlined and unplugged, in *units*
(docs/design.md section 2): in Sub Block Mode a unit is one memory block and its
subblocks; in Big Block Mode it is one device block and the memory blocks it
spans. A unit is *full* when every subblock of it is plugged.

Order of business (each call returns the first that applies):

1. plugged subblocks outside every unit (a region edge that cuts a memory
   block) are unplugged: they can never be onlined;
2. growing (fewer full units than the target): online full units lowest
   first, complete partially plugged units, then plug new units lowest first;
3. otherwise: unplug partially plugged units, then drop excess full units from
   the highest address down, preferring units with nothing online, then
   movable ones, skipping blocks the kernel refused to offline recently;
   full units that stay are onlined;
4. nothing left: :class:`Done`, with the remainder the guest cannot use.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Iterator, Mapping
from typing import NamedTuple

from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.device import DeviceConfig
from vmem_guest.spec import MAX_BLOCKS_PER_REQUEST

#: At most this many units are plugged ahead of being onlined (Linux caps
#: added-but-offline memory too, docs/protocol.md section 5).
DEFAULT_PLUG_BATCH_UNITS = 8
#: Linux's default ``auto_movable_ratio`` (memory-hotplug.rst): 301 %.
DEFAULT_AUTO_MOVABLE_RATIO = 3.01


class OnlinePolicy(enum.Enum):
    """Which zone new blocks are onlined to (docs/design.md section 6)."""

    MOVABLE = "movable"
    KERNEL = "kernel"
    AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Policy:
    """Settable policies; the defaults are the sane ones."""

    online: OnlinePolicy = OnlinePolicy.MOVABLE
    auto_movable_ratio: float = DEFAULT_AUTO_MOVABLE_RATIO
    #: Memory in kernel zones (boot memory): the base of the ``auto`` ratio.
    kernel_memory_bytes: int = 1 << 30
    plug_batch_units: int = DEFAULT_PLUG_BATCH_UNITS


DEFAULT_POLICY = Policy()


class BlockInfo(NamedTuple):
    """What the planner needs to know of one memory block."""

    state: MemoryBlockState
    zone: Zone = Zone.NONE


@dataclasses.dataclass(frozen=True)
class Unit:
    """Subblocks and memory blocks that are plugged and onlined together."""

    subblocks: range
    memory_blocks: range


@dataclasses.dataclass(frozen=True)
class Layout:
    """The units of a region and the subblocks that belong to none."""

    geometry: Geometry
    units: tuple[Unit, ...]
    orphan_subblocks: tuple[int, ...]

    @property
    def unit_bytes(self) -> int:
        return max(self.geometry.block_size, self.geometry.memory_block_size)


@functools.lru_cache(maxsize=16)
def layout_of(geometry: Geometry) -> Layout:
    """Cut a region into units (cached: geometry never changes for a device)."""
    units: list[Unit] = []
    if geometry.big_block_mode:
        per_block = geometry.memory_blocks_per_device_block
        for sb_index in range(geometry.nr_subblocks):
            mbs = geometry.memory_blocks_of(sb_index)
            if len(mbs) == per_block:
                units.append(Unit(range(sb_index, sb_index + 1), mbs))
    else:
        for mb_index in geometry.memory_blocks():
            units.append(Unit(geometry.subblocks_of(mb_index), range(mb_index, mb_index + 1)))
    covered = {sb for unit in units for sb in unit.subblocks}
    orphans = tuple(sb for sb in range(geometry.nr_subblocks) if sb not in covered)
    return Layout(geometry, tuple(units), orphans)


# --- steps -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlugStep:
    """PLUG ``nb_blocks`` device blocks from ``addr``; online the units afterwards."""

    addr: int
    nb_blocks: int


@dataclasses.dataclass(frozen=True)
class UnplugStep:
    """UNPLUG ``nb_blocks`` device blocks from ``addr`` (nothing over them is online)."""

    addr: int
    nb_blocks: int


@dataclasses.dataclass(frozen=True)
class OnlineStep:
    """Probe (if absent) and online one fully plugged memory block."""

    memory_block: int
    zone: Zone


@dataclasses.dataclass(frozen=True)
class OfflineStep:
    """Offline one memory block on its way to being unplugged."""

    memory_block: int


@dataclasses.dataclass(frozen=True)
class Done:
    """Nothing to do now.

    ``blocked`` is True when the target is not reached only because the kernel
    refused to offline (or online) the remaining candidates: retry later.
    """

    target_bytes: int
    remainder_bytes: int
    blocked: bool = False


Step = PlugStep | UnplugStep | OnlineStep | OfflineStep | Done


@dataclasses.dataclass(frozen=True)
class PlanInput:
    """Everything the planner looks at; built by the driver core from the tracker."""

    config: DeviceConfig
    geometry: Geometry
    blocks: Mapping[int, BlockInfo]
    #: Subblock bitmap, bit i = device block i of the region (LSB first).
    bitmap: bytes
    policy: Policy = DEFAULT_POLICY
    #: Memory blocks the kernel refused to offline (or online) recently.
    avoid: frozenset[int] = frozenset()

    def is_plugged(self, sb_index: int) -> bool:
        return bool(self.bitmap[sb_index >> 3] >> (sb_index & 7) & 1)

    def block(self, mb_index: int) -> BlockInfo:
        return self.blocks.get(mb_index, BlockInfo(MemoryBlockState.UNPLUGGED))


def target_bytes(config: DeviceConfig, layout: Layout) -> int:
    """What the guest can use of ``requested_size``: whole units in the usable region."""
    usable_units = sum(
        1
        for unit in layout.units
        if layout.geometry.subblock_addr(unit.subblocks.stop) <= config.usable_end
    )
    return min(config.requested_size // layout.unit_bytes, usable_units) * layout.unit_bytes


def _bit_count(bitmap: bytes, first: int, count: int) -> int:
    """Set bits in [first, first + count) of ``bitmap`` (LSB first), reading only its bytes."""
    chunk = int.from_bytes(bitmap[first >> 3 : (first + count + 7) >> 3], "little")
    return ((chunk >> (first & 7)) & ((1 << count) - 1)).bit_count()


class _Census:
    """Per-unit plugged counts of one PlanInput, computed once per call."""

    def __init__(self, inp: PlanInput, layout: Layout) -> None:
        self.inp = inp
        self.layout = layout
        self.plugged_counts = [
            _bit_count(inp.bitmap, unit.subblocks.start, len(unit.subblocks))
            for unit in layout.units
        ]

    def full(self) -> Iterator[Unit]:
        for unit, count in zip(self.layout.units, self.plugged_counts, strict=True):
            if count == len(unit.subblocks):
                yield unit

    def partial(self) -> Iterator[Unit]:
        for unit, count in zip(self.layout.units, self.plugged_counts, strict=True):
            if 0 < count < len(unit.subblocks):
                yield unit

    def empty(self) -> Iterator[Unit]:
        for unit, count in zip(self.layout.units, self.plugged_counts, strict=True):
            if count == 0:
                yield unit

    def plugged_bytes(self) -> int:
        orphans = sum(1 for sb in self.layout.orphan_subblocks if self.inp.is_plugged(sb))
        return (sum(self.plugged_counts) + orphans) * self.layout.geometry.block_size

    def online_blocks(self, unit: Unit) -> list[int]:
        return [
            mb for mb in unit.memory_blocks if self.inp.block(mb).state is MemoryBlockState.ONLINE
        ]


def runs(indices: list[int], limit: int) -> Iterator[tuple[int, int]]:
    """Contiguous runs (first, count) of sorted ``indices``, each at most ``limit`` long."""
    start = prev = -2
    for index in indices:
        if index == prev + 1 and prev - start + 1 < limit:
            prev = index
            continue
        if start >= 0:
            yield start, prev - start + 1
        start = prev = index
    if start >= 0:
        yield start, prev - start + 1


def _unplug_run(inp: PlanInput, subblocks: list[int], highest: bool = True) -> UnplugStep:
    found = list(runs(sorted(subblocks), MAX_BLOCKS_PER_REQUEST))
    first, count = found[-1] if highest else found[0]
    return UnplugStep(inp.geometry.subblock_addr(first), count)


def _zone_for(inp: PlanInput, census: _Census) -> Zone:
    policy = inp.policy
    if policy.online is OnlinePolicy.MOVABLE:
        return Zone.MOVABLE
    if policy.online is OnlinePolicy.KERNEL:
        return Zone.KERNEL
    movable_online = (
        sum(
            1
            for info in inp.blocks.values()
            if info.state is MemoryBlockState.ONLINE and info.zone is Zone.MOVABLE
        )
        * inp.geometry.memory_block_size
    )
    limit = policy.auto_movable_ratio * policy.kernel_memory_bytes
    if movable_online + inp.geometry.memory_block_size <= limit:
        return Zone.MOVABLE
    return Zone.KERNEL


def _online_next(inp: PlanInput, census: _Census, full: list[Unit]) -> OnlineStep | None:
    """The lowest block of a full unit that is not online yet (and not avoided)."""
    for unit in full:
        for mb in unit.memory_blocks:
            if inp.block(mb).state is not MemoryBlockState.ONLINE and mb not in inp.avoid:
                return OnlineStep(mb, _zone_for(inp, census))
    return None


def _grow(inp: PlanInput, census: _Census, full: list[Unit], target_units: int) -> Step | None:
    online = _online_next(inp, census, full)
    if online is not None:
        return online
    geometry = inp.geometry
    headroom = inp.config.requested_size - census.plugged_bytes()
    usable_end_sb = geometry.subblock_index(inp.config.usable_end)
    for unit in census.partial():
        missing = [sb for sb in unit.subblocks if not inp.is_plugged(sb)]
        first, count = next(runs(missing, MAX_BLOCKS_PER_REQUEST))
        if first + count <= usable_end_sb and count * geometry.block_size <= headroom:
            return PlugStep(geometry.subblock_addr(first), count)
    wanted_units = min(target_units - len(full), inp.policy.plug_batch_units)
    wanted_units = min(wanted_units, headroom // max(1, census.layout.unit_bytes))
    if wanted_units <= 0:
        return None
    run = _first_empty_run(census, usable_end_sb, wanted_units)
    if run is None:
        return None
    first, count = run
    return PlugStep(geometry.subblock_addr(first), count)


def _first_empty_run(
    census: _Census, usable_end_sb: int, wanted_units: int
) -> tuple[int, int] | None:
    """The lowest run of contiguous empty units in the usable region, as (first subblock,
    count): at most ``wanted_units`` units and one request; whole units only, unless one
    unit alone is larger than a request."""
    first = stop = -1
    for unit in census.empty():
        if unit.subblocks.stop > usable_end_sb:
            break
        if first < 0:
            first = unit.subblocks.start
        elif unit.subblocks.start != stop:
            break
        stop = unit.subblocks.stop
        if (stop - first) // len(unit.subblocks) >= wanted_units:
            break
    if first < 0:
        return None
    per_unit = len(census.layout.units[0].subblocks)
    count = min(stop - first, MAX_BLOCKS_PER_REQUEST)
    if count >= per_unit:
        count -= count % per_unit
    return first, count


def shrink_order(inp: PlanInput, full: list[Unit]) -> list[Unit]:
    """The order in which ``full`` units are given back (see :func:`_shrink_order`)."""
    return _shrink_order(inp, _Census(inp, layout_of(inp.geometry)), full)


def _shrink_order(inp: PlanInput, census: _Census, full: list[Unit]) -> list[Unit]:
    """Units to give back first: nothing online, then movable, then kernel; high first."""

    def cost(unit: Unit) -> tuple[int, int]:
        online = census.online_blocks(unit)
        if not online:
            rank = 0
        elif all(inp.block(mb).zone is Zone.MOVABLE for mb in online):
            rank = 1
        else:
            rank = 2
        return rank, -unit.subblocks.start

    return sorted(full, key=cost)


def _shrink(inp: PlanInput, census: _Census, full: list[Unit], excess: int) -> Step | None:
    for unit in sorted(census.partial(), key=lambda u: -u.subblocks.start):
        plugged = [sb for sb in unit.subblocks if inp.is_plugged(sb)]
        return _unplug_run(inp, plugged)
    if excess <= 0:
        return None
    for unit in _shrink_order(inp, census, full):
        if any(mb in inp.avoid for mb in unit.memory_blocks):
            continue
        online = census.online_blocks(unit)
        if online:
            return OfflineStep(online[-1])
        return _unplug_run(inp, list(unit.subblocks))
    return None


def next_step(inp: PlanInput) -> Step:
    """The next step toward the target from the state in ``inp``."""
    layout = layout_of(inp.geometry)
    census = _Census(inp, layout)
    orphans = [sb for sb in layout.orphan_subblocks if inp.is_plugged(sb)]
    if orphans:
        return _unplug_run(inp, orphans)
    target = target_bytes(inp.config, layout)
    target_units = target // layout.unit_bytes
    remainder = inp.config.requested_size - target
    full = list(census.full())
    step: Step | None
    if len(full) < target_units:
        step = _grow(inp, census, full, target_units)
        if step is None:
            step = _shrink(inp, census, full, 0)
    else:
        step = _shrink(inp, census, full, len(full) - target_units)
        if step is None:
            step = _online_next(inp, census, full[:target_units])
    if step is not None:
        return step
    fully_online = all(len(census.online_blocks(unit)) == len(unit.memory_blocks) for unit in full)
    settled = len(full) == target_units and fully_online and not any(census.partial())
    return Done(target, remainder, blocked=not settled)
