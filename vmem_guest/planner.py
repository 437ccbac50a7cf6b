"""The planner: from what is known now, the one next step toward ``requested_size``.

Pure and deterministic: no I/O, no clock. The driver core (``driver.py``)
calls :func:`next_step` after every step it executes, so the loop converges
from *any* state (after a crash, a refused offline, a NACK, a resize...).

Units. Memory is plugged and onlined, or offlined and unplugged, in *units*
(docs/design.md, "Two granularities"): in Sub Block Mode a unit is one memory
block and its subblocks; in Big Block Mode it is one device block and the
memory blocks it spans. A unit is *full* when every subblock of it is plugged.

Cost. The planner reads a :class:`~vmem_guest.tracker.state.RegionState`,
which keeps the units in sets by class (empty, partial, full and offline,
full with movable memory online, full with kernel memory online). Every
question below is "the lowest/highest unit of a class", or a walk from one
end of a class that stops at the first usable unit: a step costs O(the units
it looks at), not O(region). Only units the kernel refused recently (``avoid``)
are skipped over.

Order of business (each call returns the first that applies):

1. plugged subblocks outside every unit (a region edge that cuts a memory
   block) are unplugged: they can never be onlined;
2. growing (fewer full units than the target): online full units lowest
   first, complete partially plugged units, then plug new units lowest first,
   at most ``plug_batch_units`` in one request;
3. otherwise: unplug partially plugged units, then drop excess full units from
   the highest address down, preferring units with nothing online, then
   movable ones, skipping blocks the kernel refused to offline recently. Up to
   ``unplug_batch_units`` of them are offlined before one UNPLUG gives back
   the run of them. Once the kernel has refused a block's offline, what is
   offline goes back first (one UNPLUG), then that block gives single subblocks
   (Linux's fallback), before another block's offline is tried; while no whole
   unit is in excess, single subblocks are taken, highest first; full units that
   stay are onlined;
4. nothing left: :class:`Done`, with the remainder the guest cannot use.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

from vmem_guest.blocks import Geometry, MemoryBlockState, Unit, UnitGrid, Zone
from vmem_guest.device import DeviceConfig
from vmem_guest.spec import MAX_BLOCKS_PER_REQUEST
from vmem_guest.tracker.state import FULL_CLASSES, RegionState, UnitClass

#: At most this many units are plugged ahead of being onlined (Linux caps
#: added-but-offline memory at 1 GiB: ``VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD``).
DEFAULT_PLUG_BATCH_UNITS = 8
#: At most this many units are offlined ahead of one UNPLUG of their run.
DEFAULT_UNPLUG_BATCH_UNITS = 8
#: At most this many subblocks of one online block are taken in one step, and go back
#: in one UNPLUG: a 128 MiB block of 2 MiB subblocks, whose pages one kpageflags read
#: checks (``pages.FLAG_READ_BATCH``). The driver stops a take early when it runs long.
DEFAULT_TAKE_BATCH_SUBBLOCKS = 64
#: Linux's default ``auto_movable_ratio`` (memory-hotplug.rst): 301 %.
DEFAULT_AUTO_MOVABLE_RATIO = 3.01
#: Kernel memory assumed by a planner that was never told (the test VM's boot memory).
DEFAULT_KERNEL_MEMORY_BYTES = 1 << 30

__all__ = [
    "BlockInfo",
    "Done",
    "GiveBackStep",
    "Goal",
    "Layout",
    "OfflineStep",
    "OnlinePolicy",
    "OnlineStep",
    "PlanInput",
    "PlugStep",
    "Policy",
    "Step",
    "TakeStep",
    "Unit",
    "UnplugStep",
    "goal",
    "kept_subblocks",
    "layout_of",
    "next_step",
    "runs",
    "shrink_order",
    "target_bytes",
]


class OnlinePolicy(enum.Enum):
    """Which zone new blocks are onlined to (docs/design.md, "Policies")."""

    MOVABLE = "movable"
    KERNEL = "kernel"
    AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Policy:
    """Settable policies; the defaults are the sane ones."""

    online: OnlinePolicy = OnlinePolicy.MOVABLE
    auto_movable_ratio: float = DEFAULT_AUTO_MOVABLE_RATIO
    #: Memory in kernel zones (boot memory): the base of the ``auto`` ratio. None:
    #: not told; the service measures MemTotal at start (``service.resolve_policy``),
    #: and a planner never told (simulator, tests) takes
    #: ``DEFAULT_KERNEL_MEMORY_BYTES``.
    kernel_memory_bytes: int | None = None
    plug_batch_units: int = DEFAULT_PLUG_BATCH_UNITS
    unplug_batch_units: int = DEFAULT_UNPLUG_BATCH_UNITS
    #: Take single subblocks out of online blocks (soft offline) to shrink to
    #: any multiple of the device block size; off where the kernel cannot
    #: (docs/design.md, "Subblocks of online blocks"). Sub Block Mode only.
    subblock_unplug: bool = True
    #: Subblocks taken at most in one step (one run, one UNPLUG afterwards).
    take_batch_subblocks: int = DEFAULT_TAKE_BATCH_SUBBLOCKS


DEFAULT_POLICY = Policy()


class BlockInfo(NamedTuple):
    """What the planner needs to know of one memory block."""

    state: MemoryBlockState
    zone: Zone = Zone.NONE


@dataclasses.dataclass(frozen=True)
class Layout:
    """The units of a region and the subblocks that belong to none."""

    geometry: Geometry
    units: UnitGrid
    orphan_subblocks: tuple[int, ...]

    @property
    def unit_bytes(self) -> int:
        return max(self.geometry.block_size, self.geometry.memory_block_size)


@functools.lru_cache(maxsize=16)
def layout_of(geometry: Geometry) -> Layout:
    """Cut a region into units (a grid: the same small object for any region size)."""
    grid = UnitGrid.of(geometry)
    return Layout(geometry, grid, grid.orphan_subblocks(geometry.nr_subblocks))


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
class TakeStep:
    """Take the pages of ``nb_blocks`` subblocks of online block ``memory_block`` out
    of use (soft offline, verified); an UNPLUG of them follows."""

    memory_block: int
    addr: int
    nb_blocks: int


@dataclasses.dataclass(frozen=True)
class GiveBackStep:
    """Give the pages of ``nb_blocks`` taken, plugged subblocks of online block
    ``memory_block`` back to the kernel (unpoison)."""

    memory_block: int
    addr: int
    nb_blocks: int


@dataclasses.dataclass(frozen=True)
class Done:
    """Nothing to do now.

    ``blocked`` is True when the target is not reached only because the kernel
    refused to offline (or online) the remaining candidates: retry later.
    """

    target_bytes: int
    remainder_bytes: int
    blocked: bool = False


Step = PlugStep | UnplugStep | OnlineStep | OfflineStep | TakeStep | GiveBackStep | Done


class PlanInput:
    """Everything the planner looks at.

    The driver core passes the tracker owner's live :class:`RegionState`
    (``state=``); tests and benchmarks may describe a region by hand with
    ``blocks`` and ``bitmap`` instead, from which a state is built once (O(region)).
    The planner never changes the state.
    """

    def __init__(
        self,
        config: DeviceConfig,
        geometry: Geometry,
        blocks: Mapping[int, BlockInfo] | None = None,
        bitmap: bytes | None = None,
        policy: Policy = DEFAULT_POLICY,
        avoid: frozenset[int] = frozenset(),
        *,
        state: RegionState | None = None,
        avoid_subblocks: frozenset[int] = frozenset(),
    ) -> None:
        if state is None:
            state = _state_from(geometry, blocks or {}, bitmap or b"")
        elif state.geometry != geometry:
            raise ValueError("the state is of another region")
        self.config = config
        self.geometry = geometry
        self.state = state
        self.policy = policy
        #: Memory blocks the kernel refused to offline (or online) recently.
        self.avoid = avoid
        #: Subblocks whose pages the kernel refused to give up (or take back) recently.
        self.avoid_subblocks = avoid_subblocks

    @property
    def takes_subblocks(self) -> bool:
        """Whether single subblocks of online blocks may be taken out of use."""
        return self.policy.subblock_unplug and not self.geometry.big_block_mode

    def is_plugged(self, sb_index: int) -> bool:
        return self.state.is_plugged(sb_index)

    def block(self, mb_index: int) -> BlockInfo:
        if not self.geometry.contains_memory_block(mb_index):
            return BlockInfo(MemoryBlockState.UNPLUGGED)
        return BlockInfo(self.state.block_state(mb_index), self.state.block_zone(mb_index))


def _state_from(geometry: Geometry, blocks: Mapping[int, BlockInfo], bitmap: bytes) -> RegionState:
    records = (
        (mb, info.state, info.zone, info.state is MemoryBlockState.ONLINE)
        for mb, info in ((mb, blocks.get(mb)) for mb in geometry.memory_blocks())
        if info is not None
    )
    return RegionState.load(geometry, bitmap, records)


def target_bytes(config: DeviceConfig, layout: Layout) -> int:
    """What the guest can use of ``requested_size`` in whole units of the usable region
    (the target when no subblock of an online block is taken: :func:`goal`)."""
    usable_sb = layout.geometry.subblock_index(config.usable_end)
    usable_units = layout.units.units_ending_by(usable_sb)
    return min(config.requested_size // layout.unit_bytes, usable_units) * layout.unit_bytes


class Goal(NamedTuple):
    """Where the planner is heading, in subblocks kept in use.

    ``kept`` counts what the guest uses or will use now: every subblock of a
    full unit, and the subblocks in use of HOLED units. ``keep`` is what that
    becomes at the end.
    """

    kept: int
    keep: int


def kept_subblocks(state: RegionState) -> int:
    """Subblocks of full units plus those in use in HOLED units."""
    return state.full_units * state.grid.subblocks_per_unit + state.holed_in_use_subblocks


def goal(inp: PlanInput) -> Goal:
    """How many subblocks to keep for ``requested_size``.

    Growth fills holes of online blocks subblock by subblock, then adds whole
    units only (a new memory block cannot be onlined in part: docs/design.md
    5.1). Shrinking ends exactly on the request when subblocks may be taken,
    else on whole units, short of the request as before.
    """
    state, geometry = inp.state, inp.geometry
    per_unit = state.grid.subblocks_per_unit
    usable_units = state.grid.units_ending_by(geometry.subblock_index(inp.config.usable_end))
    wanted = min(inp.config.requested_size // geometry.block_size, usable_units * per_unit)
    kept = kept_subblocks(state)
    if wanted >= kept:
        # Taken subblocks come back first: holes (PLUG, then give back) and those
        # plugged already (give back only).
        fill = min(wanted - kept, state.taken_subblocks)
        whole_units = (wanted - kept - fill) // per_unit
        return Goal(kept, kept + fill + whole_units * per_unit)
    if inp.takes_subblocks:
        return Goal(kept, wanted)
    dropped_units = -(-(kept - wanted) // per_unit)
    return Goal(kept, max(0, kept - dropped_units * per_unit))


def runs(indices: Sequence[int], limit: int) -> Iterator[tuple[int, int]]:
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


def _unplug_highest_run(inp: PlanInput, subblocks: Sequence[int]) -> UnplugStep:
    """UNPLUG the highest contiguous run of sorted ``subblocks`` (one request's worth)."""
    first, count = list(runs(subblocks, MAX_BLOCKS_PER_REQUEST))[-1]
    return UnplugStep(inp.geometry.subblock_addr(first), count)


def _zone_for(inp: PlanInput) -> Zone:
    policy = inp.policy
    if policy.online is OnlinePolicy.MOVABLE:
        return Zone.MOVABLE
    if policy.online is OnlinePolicy.KERNEL:
        return Zone.KERNEL
    block = inp.geometry.memory_block_size
    movable_online = inp.state.movable_online_blocks * block
    kernel_memory = policy.kernel_memory_bytes
    if kernel_memory is None:
        kernel_memory = DEFAULT_KERNEL_MEMORY_BYTES
    limit = policy.auto_movable_ratio * kernel_memory
    return Zone.MOVABLE if movable_online + block <= limit else Zone.KERNEL


def _online_next(inp: PlanInput, among_lowest: int | None = None) -> OnlineStep | None:
    """The lowest block of a full unit that is not online yet (and not avoided).

    With ``among_lowest``, only the lowest that many full units count.
    """
    state = inp.state
    for unit_index in state.not_fully_online.ascending():
        if among_lowest is not None and state.full_units_below(unit_index) >= among_lowest:
            return None
        for mb in state.unit(unit_index).memory_blocks:
            if state.block_state(mb) is not MemoryBlockState.ONLINE and mb not in inp.avoid:
                return OnlineStep(mb, _zone_for(inp))
    return None


def _grow(inp: PlanInput, deficit: int) -> Step | None:
    """Toward ``deficit`` more subblocks in use: online full units, fill holes of
    online blocks, complete partial units, then plug new whole units."""
    online = _online_next(inp)
    if online is not None:
        return online
    state, geometry = inp.state, inp.geometry
    headroom = (inp.config.requested_size - state.plugged_bytes) // geometry.block_size
    fill = _fill_holes(inp, min(deficit, headroom))
    if fill is not None:
        return fill
    usable_end_sb = geometry.subblock_index(inp.config.usable_end)
    for unit_index in state.units(UnitClass.PARTIAL).ascending():
        missing = state.missing_in(state.unit(unit_index).subblocks)
        first, count = next(runs(missing, MAX_BLOCKS_PER_REQUEST))
        if first + count <= usable_end_sb and count <= headroom:
            return PlugStep(geometry.subblock_addr(first), count)
    per_unit = state.grid.subblocks_per_unit
    wanted_units = min(deficit // per_unit, inp.policy.plug_batch_units, headroom // per_unit)
    if wanted_units <= 0:
        return None
    run = _first_empty_run(state, usable_end_sb, wanted_units)
    if run is None:
        return None
    first, count = run
    return PlugStep(geometry.subblock_addr(first), count)


def _fill_holes(inp: PlanInput, most: int) -> PlugStep | None:
    """PLUG the lowest run of holes of the lowest HOLED unit, at most ``most`` subblocks
    (the pages are given back after the ACK: :func:`_taken_step`)."""
    if most <= 0:
        return None
    state = inp.state
    for unit_index in state.units(UnitClass.HOLED).ascending():
        holes = state.subblocks_where(state.unit(unit_index).subblocks, plugged=False, taken=True)
        holes = [sb for sb in holes if sb not in inp.avoid_subblocks]
        if holes:
            first, count = next(runs(holes, min(most, MAX_BLOCKS_PER_REQUEST)))
            return PlugStep(inp.geometry.subblock_addr(first), count)
    return None


def _taken_step(inp: PlanInput, growing: bool) -> Step | None:
    """Subblocks both taken and plugged (a take done, or a give-back begun): growing,
    give the lowest back; otherwise UNPLUG the highest (the driver re-verifies first)."""
    state = inp.state
    units = state.units_taking
    for unit_index in units.ascending() if growing else units.descending():
        mb = state.unit_blocks(unit_index).start
        subblocks = state.subblocks_where(
            state.unit(unit_index).subblocks, plugged=True, taken=True
        )
        subblocks = [sb for sb in subblocks if sb not in inp.avoid_subblocks]
        if not subblocks:
            continue
        if growing:
            first, count = next(runs(subblocks, MAX_BLOCKS_PER_REQUEST))
            return GiveBackStep(mb, inp.geometry.subblock_addr(first), count)
        return _unplug_highest_run(inp, subblocks)
    return None


def _take_next(inp: PlanInput, excess: int) -> TakeStep | None:
    """The highest run of subblocks in use of the best online unit: HOLED units first,
    then movable, then kernel memory (Linux's order: virtio_mem_sbm_unplug_request),
    highest unit first; subblocks the kernel refused recently are skipped."""
    state = inp.state
    for cls in (UnitClass.HOLED, UnitClass.FULL_MOVABLE, UnitClass.FULL_KERNEL):
        for unit_index in state.units(cls).descending():
            step = _take_in_unit(inp, unit_index, excess)
            if step is not None:
                return step
    return None


def _take_in_unit(inp: PlanInput, unit_index: int, excess: int) -> TakeStep | None:
    """The top of the highest run of subblocks in use (and not avoided) of the unit:
    at most ``excess`` and ``take_batch_subblocks`` long, so that the taken run goes
    back in one UNPLUG (:func:`_taken_step`)."""
    state = inp.state
    in_use = state.subblocks_where(state.unit(unit_index).subblocks, plugged=True, taken=False)
    usable = [sb for sb in in_use if sb not in inp.avoid_subblocks]
    if not usable:
        return None
    first, count = list(runs(usable, len(usable)))[-1]
    most = max(1, min(excess, inp.policy.take_batch_subblocks, MAX_BLOCKS_PER_REQUEST))
    taken = min(count, most)
    mb = state.unit_blocks(unit_index).start
    return TakeStep(mb, inp.geometry.subblock_addr(first + count - taken), taken)


def _unplug_offline_units(inp: PlanInput, excess_units: int) -> UnplugStep | None:
    """One UNPLUG of the highest run of full units with nothing online, if any."""
    offline = inp.state.units(UnitClass.FULL_OFFLINE).descending()
    batch = list(itertools.islice(offline, _batch_limit(inp, excess_units)))
    return _unplug_run_of_units(inp, batch) if batch else None


def _batch_limit(inp: PlanInput, excess_units: int) -> int:
    """How many units one UNPLUG gives back: the excess, at most a batch."""
    return min(excess_units, max(1, inp.policy.unplug_batch_units))


def _take_from_refused(inp: PlanInput, excess: int) -> TakeStep | None:
    """The highest run of subblocks in use (not avoided) of the highest online unit with
    a block the kernel refused to offline: O(avoided blocks x subblocks per unit)."""
    state = inp.state
    grid = state.grid
    first_mb = grid.first_memory_block
    unit_mbs = range(first_mb, first_mb + grid.nr_units * grid.memory_blocks_per_unit)
    refused_units = {
        grid.unit_of_memory_block(mb)
        for mb in inp.avoid
        if mb in unit_mbs and state.block_state(mb) is MemoryBlockState.ONLINE
    }
    for unit_index in sorted(refused_units, reverse=True):
        step = _take_in_unit(inp, unit_index, excess)
        if step is not None:
            return step
    return None


def _first_empty_run(
    state: RegionState, usable_end_sb: int, wanted_units: int
) -> tuple[int, int] | None:
    """The lowest run of contiguous empty units in the usable region, as (first subblock,
    count): at most ``wanted_units`` units and one request; whole units only, unless one
    unit alone is larger than a request."""
    grid = state.grid
    usable_units = grid.units_ending_by(usable_end_sb)
    empty = state.units(UnitClass.EMPTY)
    lowest = empty.first()
    if lowest is None or lowest >= usable_units:
        return None
    last = lowest
    while last - lowest + 1 < wanted_units and last + 1 < usable_units and last + 1 in empty:
        last += 1
    first_sb = grid[lowest].subblocks.start
    per_unit = grid.subblocks_per_unit
    count = min((last - lowest + 1) * per_unit, MAX_BLOCKS_PER_REQUEST)
    if count >= per_unit:
        count -= count % per_unit
    return first_sb, count


def _shrink_candidates(inp: PlanInput) -> Iterator[int]:
    """Full units to give back, in order: nothing online, then only movable memory
    online, then kernel memory online; highest first in each; none with an avoided block."""
    state = inp.state
    for cls in FULL_CLASSES:
        for unit_index in state.units(cls).descending():
            if not inp.avoid or not any(mb in inp.avoid for mb in state.unit_blocks(unit_index)):
                yield unit_index


def shrink_order(inp: PlanInput, full: Sequence[Unit] | None = None) -> list[Unit]:
    """Full units in the order they are given back (ignoring ``avoid``).

    ``full`` restricts the answer to those units (manual operations pass the
    units of a range). O(full units): for manual operations, not the step loop.
    """
    state = inp.state
    order = [
        state.unit(unit_index)
        for cls in FULL_CLASSES
        for unit_index in state.units(cls).descending()
    ]
    if full is None:
        return order
    wanted = set(full)
    return [unit for unit in order if unit in wanted]


def _shrink(inp: PlanInput, excess: int) -> Step | None:
    """Toward ``excess`` fewer subblocks in use: unplug partial units, give back whole
    units while a whole unit is in excess (one offline beats 32,768 soft offlines),
    then take single subblocks."""
    state = inp.state
    partial = state.units(UnitClass.PARTIAL).last()
    if partial is not None:
        return _unplug_highest_run(inp, state.plugged_in(state.unit(partial).subblocks))
    if excess <= 0:
        return None
    per_unit = state.grid.subblocks_per_unit
    if excess >= per_unit and inp.takes_subblocks and inp.avoid:
        # Linux's fallback (virtio_mem_sbm_unplug_any_sb_online): a block that would
        # not go whole gives single subblocks next, before another block's offline
        # is tried, for a refused offline may have cost a whole migration deadline.
        # What is offline already goes back first (one UNPLUG, no kernel work).
        excess_units = excess // per_unit
        fallback = _unplug_offline_units(inp, excess_units) or _take_from_refused(inp, excess)
        if fallback is not None:
            return fallback
    whole = _shrink_whole_units(inp, excess // per_unit) if excess >= per_unit else None
    if whole is not None or not inp.takes_subblocks:
        return whole
    return _heal_instead_of_take(inp, excess) or _take_next(inp, excess)


def _heal_instead_of_take(inp: PlanInput, excess: int) -> Step | None:
    """One more whole unit (offline, UNPLUG) instead of a take that would leave online
    units of nothing but holes; the growth that follows fills holes back.

    A unit of holes only cannot go: it is never offlined while it holds poisoned
    pages (docs/design.md, "Subblocks of online blocks"), so it would stay online,
    stranded, until growth (``make demo``: 1000M -> 512M made the top block all
    holes, and at 0 it was still online). When taking ``excess`` would take every
    subblock still in use of the holed units, and their holes can take back what
    one more unit overshoots (``per_unit - excess``), dropping a full unit costs the
    same offline the next shrink would need anyway, and ends with fewer holes."""
    state = inp.state
    holes = state.taken_subblocks - state.taken_plugged_subblocks
    overshoot = state.grid.subblocks_per_unit - excess
    if not holes or excess < state.holed_in_use_subblocks or overshoot > holes:
        return None
    return _shrink_whole_units(inp, 1)


def _shrink_whole_units(inp: PlanInput, excess_units: int) -> Step | None:
    """Offline, then UNPLUG a batch of, the full units to go first; None if none can."""
    state = inp.state
    batch: list[int] = []
    for unit_index in _shrink_candidates(inp):
        online = state.online_blocks(unit_index)
        if online and batch and inp.avoid:
            # The kernel is refusing offlines: give back what is offline now rather
            # than hold it for a batch behind offlines that may each take a deadline.
            break
        if online:
            return OfflineStep(online[-1])
        batch.append(unit_index)
        if len(batch) >= _batch_limit(inp, excess_units):
            break
    if not batch:
        return None
    return _unplug_run_of_units(inp, batch)


def _unplug_run_of_units(inp: PlanInput, batch: list[int]) -> UnplugStep:
    """One UNPLUG for the highest run of adjacent units in ``batch`` (all offline, full),
    whole units within one request; a unit larger than a request goes a run at a time."""
    grid = inp.state.grid
    highest = max(batch)
    per_unit = grid.subblocks_per_unit
    if per_unit > MAX_BLOCKS_PER_REQUEST:
        return _unplug_highest_run(inp, grid[highest].subblocks)
    lowest = highest
    members = set(batch)
    max_units = MAX_BLOCKS_PER_REQUEST // per_unit
    while lowest - 1 in members and highest - lowest + 1 < max_units:
        lowest -= 1
    first = grid[lowest].subblocks.start
    return UnplugStep(inp.geometry.subblock_addr(first), (highest - lowest + 1) * per_unit)


def next_step(inp: PlanInput) -> Step:
    """The next step toward the target from the state in ``inp``."""
    state = inp.state
    layout = layout_of(inp.geometry)
    orphans = [sb for sb in layout.orphan_subblocks if state.is_plugged(sb)]
    if orphans:
        return _unplug_highest_run(inp, orphans)
    kept, keep = goal(inp)
    per_unit = state.grid.subblocks_per_unit
    target = keep * inp.geometry.block_size
    remainder = inp.config.requested_size - target
    step = _taken_step(inp, growing=kept < keep)
    if step is None and kept < keep:
        step = _grow(inp, keep - kept) or _shrink(inp, 0)
    elif step is None:
        step = _shrink(inp, kept - keep)
        if step is None:
            among = None if kept == keep else keep // per_unit
            step = _online_next(inp, among_lowest=among)
    if step is not None:
        return step
    settled = (
        kept == keep
        and not state.not_fully_online
        and not state.units(UnitClass.PARTIAL)
        and not state.units_taking
    )
    return Done(target, remainder, blocked=not settled)
