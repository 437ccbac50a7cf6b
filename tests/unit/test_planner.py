"""The planner: the one next step from a hand-built PlanInput.

Every test builds the state the planner sees (config, geometry, memory block
records, subblock bitmap) and checks the step it chooses. The property test at
the end draws random legal states and checks the safety rules of docs/design.md
section 5 and the device's rules (docs/protocol.md section 1) on whatever comes back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmem_guest import planner
from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.device import DeviceConfig
from vmem_guest.planner import (
    BlockInfo,
    Done,
    GiveBackStep,
    OfflineStep,
    OnlinePolicy,
    OnlineStep,
    PlanInput,
    PlugStep,
    Policy,
    TakeStep,
    UnplugStep,
    next_step,
)
from vmem_guest.sim.device_model import usable_region_for
from vmem_guest.spec import MAX_BLOCKS_PER_REQUEST

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
ADDR = 4 * GIB
#: QEMU's default on x86-64: 2 MiB device blocks, 128 MiB memory blocks; 1 GiB region.
SBM = Geometry(addr=ADDR, region_size=1 * GIB, block_size=2 * MIB, memory_block_size=128 * MIB)
PER_UNIT = 64  # subblocks per memory block in SBM
FIRST_MB = ADDR // (128 * MIB)  # kernel index of the region's first memory block: 32
#: Big Block Mode: one 256 MiB device block spans two 128 MiB memory blocks.
BBM = Geometry(addr=ADDR, region_size=1 * GIB, block_size=256 * MIB, memory_block_size=128 * MIB)
#: Both region edges cut a memory block: 64 MiB unusable at each end.
EDGES = Geometry(
    addr=ADDR + 64 * MIB, region_size=1 * GIB, block_size=2 * MIB, memory_block_size=128 * MIB
)


# --- building PlanInputs by hand -------------------------------------------------


def bitmap_of(geometry: Geometry, plugged: Iterable[int]) -> bytes:
    bits = bytearray((geometry.nr_subblocks + 7) // 8)
    for sb in plugged:
        bits[sb >> 3] |= 1 << (sb & 7)
    return bytes(bits)


def unit_subblocks(geometry: Geometry, mb: int) -> range:
    """The subblocks plugged together with memory block ``mb``."""
    return geometry.subblocks_of(mb)


def derived_blocks(
    geometry: Geometry, plugged: set[int], online: Mapping[int, Zone]
) -> dict[int, BlockInfo]:
    """Block records as the tracker derives them from the bitmap, plus the online ones."""
    blocks: dict[int, BlockInfo] = {}
    for mb in geometry.memory_blocks():
        subblocks = geometry.subblocks_of(mb)
        count = sum(1 for sb in subblocks if sb in plugged)
        if mb in online:
            assert count == len(subblocks), f"test bug: memory{mb} online but not fully plugged"
            blocks[mb] = BlockInfo(MemoryBlockState.ONLINE, online[mb])
        elif count == len(subblocks):
            blocks[mb] = BlockInfo(MemoryBlockState.PLUGGED)
        elif count:
            blocks[mb] = BlockInfo(MemoryBlockState.PARTIAL)
        else:
            blocks[mb] = BlockInfo(MemoryBlockState.UNPLUGGED)
    return blocks


def make_input(
    geometry: Geometry = SBM,
    *,
    requested: int,
    plugged: Iterable[int] = (),
    online: Mapping[int, Zone] | None = None,
    usable: int | None = None,
    policy: Policy = planner.DEFAULT_POLICY,
    avoid: Iterable[int] = (),
) -> PlanInput:
    plugged_set = set(plugged)
    online = dict(online or {})
    if usable is None:
        # QEMU's usable region only grows on resize: it still covers what is plugged.
        usable = max(
            usable_region_for(requested, geometry.region_size, geometry.block_size),
            (max(plugged_set, default=-1) + 1) * geometry.block_size,
        )
    config = DeviceConfig(
        block_size=geometry.block_size,
        node_id=0,
        addr=geometry.addr,
        region_size=geometry.region_size,
        usable_region_size=usable,
        plugged_size=len(plugged_set) * geometry.block_size,
        requested_size=requested,
    )
    config.validate()
    return PlanInput(
        config=config,
        geometry=geometry,
        blocks=derived_blocks(geometry, plugged_set, online),
        bitmap=bitmap_of(geometry, plugged_set),
        policy=policy,
        avoid=frozenset(avoid),
    )


def units(*mbs: int, geometry: Geometry = SBM) -> list[int]:
    """Every subblock of memory blocks ``mbs`` (the units they belong to)."""
    return [sb for mb in mbs for sb in unit_subblocks(geometry, mb)]


def sb_addr(sb: int, geometry: Geometry = SBM) -> int:
    return geometry.addr + sb * geometry.block_size


def mb_n(i: int) -> int:
    """Kernel index of the i-th memory block of the SBM/BBM region."""
    return FIRST_MB + i


# --- growing ---------------------------------------------------------------------


def test_empty_region_grow_plugs_whole_units_from_the_lowest_address() -> None:
    step = next_step(make_input(requested=512 * MIB))
    assert step == PlugStep(ADDR, 4 * PER_UNIT)


def test_grow_batch_is_capped_by_plug_batch_units() -> None:
    policy = Policy(plug_batch_units=3)
    step = next_step(make_input(requested=1 * GIB, policy=policy))
    assert step == PlugStep(ADDR, 3 * PER_UNIT)
    # The default batch (8 units) covers the whole 1 GiB region here.
    assert next_step(make_input(requested=1 * GIB)) == PlugStep(ADDR, 8 * PER_UNIT)


def test_grow_skips_full_units_and_plugs_the_next_empty_ones() -> None:
    plugged = units(mb_n(0), mb_n(1))
    online = {mb_n(0): Zone.MOVABLE, mb_n(1): Zone.MOVABLE}
    step = next_step(make_input(requested=512 * MIB, plugged=plugged, online=online))
    assert step == PlugStep(sb_addr(2 * PER_UNIT), 2 * PER_UNIT)


def test_one_request_carries_at_most_65535_blocks() -> None:
    # 1 MiB device blocks in 128 MiB memory blocks: 128 per unit; a 128 GiB region
    # with everything requested asks for 8 units = 1024 blocks (batch-capped), and
    # with a batch of 1024 units the request is cut to whole units under 65535.
    geometry = Geometry(ADDR, 128 * GIB, 1 * MIB, 128 * MIB)
    policy = Policy(plug_batch_units=1024)
    step = next_step(make_input(geometry, requested=128 * GIB, policy=policy))
    assert isinstance(step, PlugStep)
    assert step.addr == ADDR
    assert step.nb_blocks <= MAX_BLOCKS_PER_REQUEST
    assert step.nb_blocks % 128 == 0
    assert step.nb_blocks == (MAX_BLOCKS_PER_REQUEST // 128) * 128


def test_full_units_not_online_are_onlined_lowest_first() -> None:
    plugged = units(mb_n(0), mb_n(1), mb_n(2))
    online = {mb_n(0): Zone.MOVABLE}
    step = next_step(make_input(requested=512 * MIB, plugged=plugged, online=online))
    # Onlining what is plugged comes before plugging more.
    assert step == OnlineStep(mb_n(1), Zone.MOVABLE)


def test_full_units_are_onlined_when_the_target_is_reached() -> None:
    plugged = units(mb_n(0), mb_n(1))
    step = next_step(make_input(requested=256 * MIB, plugged=plugged, online={}))
    assert step == OnlineStep(mb_n(0), Zone.MOVABLE)


def test_partial_unit_is_completed_when_growing() -> None:
    # Unit 1 half plugged (a crash between two requests), unit 0 online.
    plugged = units(mb_n(0)) + list(range(PER_UNIT, PER_UNIT + 32))
    online = {mb_n(0): Zone.MOVABLE}
    step = next_step(make_input(requested=512 * MIB, plugged=plugged, online=online))
    assert step == PlugStep(sb_addr(PER_UNIT + 32), 32)


def test_partial_unit_with_a_hole_is_completed_run_by_run() -> None:
    plugged = [sb for sb in range(PER_UNIT) if not 10 <= sb < 20 and sb != 40]
    step = next_step(make_input(requested=128 * MIB, plugged=plugged))
    assert step == PlugStep(sb_addr(10), 10)
    step = next_step(make_input(requested=128 * MIB, plugged=[*plugged, *range(10, 20)]))
    assert step == PlugStep(sb_addr(40), 1)


def test_partial_unit_is_unplugged_when_not_growing() -> None:
    plugged = units(mb_n(0)) + list(range(3 * PER_UNIT, 3 * PER_UNIT + 5))
    online = {mb_n(0): Zone.MOVABLE}
    step = next_step(make_input(requested=128 * MIB, plugged=plugged, online=online))
    assert step == UnplugStep(sb_addr(3 * PER_UNIT), 5)


def test_partial_unit_is_unplugged_when_growing_has_no_headroom() -> None:
    # Target 3 units, 2 full and two half units: 416 MiB plugged > 384 MiB requested.
    # No plug fits (the device would NACK), so the highest partial unit goes.
    half = PER_UNIT // 2
    partial = [*range(2 * PER_UNIT, 2 * PER_UNIT + half), *range(5 * PER_UNIT, 5 * PER_UNIT + 40)]
    plugged = units(mb_n(0), mb_n(1)) + partial
    online = {mb_n(0): Zone.MOVABLE, mb_n(1): Zone.MOVABLE}
    step = next_step(make_input(requested=384 * MIB, plugged=plugged, online=online))
    assert step == UnplugStep(sb_addr(5 * PER_UNIT), 40)


def test_nack_headroom_limits_a_new_plug() -> None:
    # 3 full units and a 20-subblock partial unit: 424 MiB of 512 MiB requested.
    # The partial unit needs 88 MiB (fits); done first.
    partial = list(range(4 * PER_UNIT, 4 * PER_UNIT + 20))
    plugged = units(mb_n(0), mb_n(1), mb_n(2)) + partial
    online = {mb_n(i): Zone.MOVABLE for i in range(3)}
    step = next_step(make_input(requested=512 * MIB, plugged=plugged, online=online))
    assert step == PlugStep(sb_addr(4 * PER_UNIT + 20), PER_UNIT - 20)
    # Then the 4th unit is full, headroom is 0: it is onlined, nothing more plugged.
    plugged += list(range(4 * PER_UNIT + 20, 5 * PER_UNIT))
    step = next_step(make_input(requested=512 * MIB, plugged=plugged, online=online))
    assert step == OnlineStep(mb_n(4), Zone.MOVABLE)


def test_nack_headroom_never_plugs_beyond_requested_minus_plugged() -> None:
    # Orphan-free but over-plugged by a partial unit: 2 full + 40 subblocks = 336 MiB,
    # requested 384 MiB: a new unit (128 MiB) does not fit in the 48 MiB headroom and
    # completing the partial one needs 48 MiB: exactly fits.
    partial = list(range(4 * PER_UNIT, 4 * PER_UNIT + 40))
    plugged = units(mb_n(0), mb_n(1)) + partial
    online = {mb_n(0): Zone.MOVABLE, mb_n(1): Zone.MOVABLE}
    inp = make_input(requested=384 * MIB, plugged=plugged, online=online)
    step = next_step(inp)
    assert step == PlugStep(sb_addr(4 * PER_UNIT + 40), 24)
    # One subblock less of headroom: nothing can be plugged; the partial unit goes.
    inp = make_input(requested=382 * MIB, plugged=plugged, online=online)
    step = next_step(inp)
    assert step == UnplugStep(sb_addr(4 * PER_UNIT), 40)


# --- shrinking -------------------------------------------------------------------


def test_shrink_offlines_an_online_unit_before_unplugging_it() -> None:
    plugged = units(mb_n(0), mb_n(1))
    online = {mb_n(0): Zone.MOVABLE, mb_n(1): Zone.MOVABLE}
    step = next_step(make_input(requested=128 * MIB, plugged=plugged, online=online))
    assert step == OfflineStep(mb_n(1))
    # Once offline, the same unit is unplugged whole.
    del online[mb_n(1)]
    step = next_step(make_input(requested=128 * MIB, plugged=plugged, online=online))
    assert step == UnplugStep(sb_addr(PER_UNIT), PER_UNIT)


ONE_AT_A_TIME = Policy(unplug_batch_units=1)
#: The planner before subblocks of online blocks could be taken.
WHOLE_BLOCKS = Policy(subblock_unplug=False)


def test_shrink_order_nothing_online_then_movable_then_kernel_highest_first() -> None:
    # Units 0..5 full: 0, 1 kernel; 2, 3 movable; 4 not online; 5 kernel. One unit
    # is offlined and unplugged at a time, so every step shows the order.
    plugged = units(*(mb_n(i) for i in range(6)))
    online = {
        mb_n(0): Zone.KERNEL,
        mb_n(1): Zone.KERNEL,
        mb_n(2): Zone.MOVABLE,
        mb_n(3): Zone.MOVABLE,
        mb_n(5): Zone.KERNEL,
    }
    expected = [
        UnplugStep(sb_addr(4 * PER_UNIT), PER_UNIT),  # nothing online
        OfflineStep(mb_n(3)),  # movable, highest first
        OfflineStep(mb_n(2)),
        OfflineStep(mb_n(5)),  # kernel, highest first
        OfflineStep(mb_n(1)),
        OfflineStep(mb_n(0)),
    ]
    state = dict(online)
    plugged_now = set(plugged)
    for want in expected:
        step = next_step(
            make_input(requested=0, plugged=plugged_now, online=state, policy=ONE_AT_A_TIME)
        )
        assert step == want
        # Play the step out: offline, then the unplug of that same unit.
        if isinstance(want, OfflineStep):
            del state[want.memory_block]
            step = next_step(
                make_input(requested=0, plugged=plugged_now, online=state, policy=ONE_AT_A_TIME)
            )
            unit_start = unit_subblocks(SBM, want.memory_block).start
            assert step == UnplugStep(sb_addr(unit_start), PER_UNIT)
        assert isinstance(step, UnplugStep)
        first = (step.addr - ADDR) // SBM.block_size
        plugged_now -= set(range(first, first + step.nb_blocks))
    assert next_step(make_input(requested=0, plugged=plugged_now, online=state)) == Done(0, 0)


def test_shrink_offlines_a_batch_in_order_then_unplugs_its_run_in_one_request() -> None:
    # The same units with the default batch: every excess unit is offlined in the
    # same order, then one UNPLUG gives back the run of all six.
    plugged = units(*(mb_n(i) for i in range(6)))
    online = {mb_n(i): Zone.KERNEL for i in (0, 1, 5)} | {mb_n(i): Zone.MOVABLE for i in (2, 3)}
    for want in (mb_n(3), mb_n(2), mb_n(5), mb_n(1), mb_n(0)):
        assert next_step(make_input(requested=0, plugged=plugged, online=online)) == (
            OfflineStep(want)
        )
        del online[want]
    step = next_step(make_input(requested=0, plugged=plugged, online=online))
    assert step == UnplugStep(sb_addr(0), 6 * PER_UNIT)


def test_unplug_batch_is_capped_by_the_excess_and_the_batch_size() -> None:
    plugged = units(*(mb_n(i) for i in range(8)))  # the whole region, nothing online
    step = next_step(make_input(requested=0, plugged=plugged))
    assert step == UnplugStep(sb_addr(0), 8 * PER_UNIT)
    step = next_step(make_input(requested=0, plugged=plugged, policy=Policy(unplug_batch_units=3)))
    assert step == UnplugStep(sb_addr(5 * PER_UNIT), 3 * PER_UNIT)
    # Keep 6: only the excess (2) goes, not a whole batch.
    step = next_step(make_input(requested=6 * 128 * MIB, plugged=plugged))
    assert step == UnplugStep(sb_addr(6 * PER_UNIT), 2 * PER_UNIT)


def test_unplug_batch_takes_only_the_highest_adjacent_run() -> None:
    # Units 1, 2 and 5, 6 full and offline: one request cannot carry a hole.
    plugged = units(mb_n(1), mb_n(2), mb_n(5), mb_n(6))
    step = next_step(make_input(requested=0, plugged=plugged))
    assert step == UnplugStep(sb_addr(5 * PER_UNIT), 2 * PER_UNIT)


def test_with_an_offline_refused_what_is_offline_goes_back_then_that_block_gives_subblocks() -> (
    None
):
    # Units 4, 3 and 2 offline (batched), 5, 1 and 0 online. Batching would offline
    # unit 5 next; once its offline is refused (avoided), the offline units go back
    # first (one UNPLUG), then unit 5 gives single subblocks, highest first (Linux:
    # virtio_mem_sbm_unplug_any_sb_online), before another block's offline is tried:
    # each refused offline may cost a whole migration deadline.
    plugged = units(*(mb_n(i) for i in range(6)))
    online = {mb_n(i): Zone.MOVABLE for i in (0, 1, 5)}
    batched = make_input(requested=0, plugged=plugged, online=online)
    assert next_step(batched) == OfflineStep(mb_n(5))
    refusing = make_input(requested=0, plugged=plugged, online=online, avoid={mb_n(5)})
    assert next_step(refusing) == UnplugStep(sb_addr(2 * PER_UNIT), 3 * PER_UNIT)
    plugged = units(mb_n(0), mb_n(1), mb_n(5))
    refusing = make_input(requested=0, plugged=plugged, online=online, avoid={mb_n(5)})
    # A run of them, one batch, from the top (given back in one UNPLUG afterwards).
    batch = planner.DEFAULT_TAKE_BATCH_SUBBLOCKS
    top = unit_subblocks(SBM, mb_n(5))[-1]
    assert next_step(refusing) == TakeStep(mb_n(5), sb_addr(top - batch + 1), batch)
    # Every subblock of unit 5 refused too: the next block's offline is tried.
    refusing.avoid_subblocks = frozenset(unit_subblocks(SBM, mb_n(5)))
    assert next_step(refusing) == OfflineStep(mb_n(1))


def test_shrink_keeps_the_lowest_units_when_all_are_alike() -> None:
    plugged = units(*(mb_n(i) for i in range(4)))
    online = {mb_n(i): Zone.MOVABLE for i in range(4)}
    step = next_step(make_input(requested=256 * MIB, plugged=plugged, online=online))
    assert step == OfflineStep(mb_n(3))


def test_avoided_blocks_are_skipped_for_offline() -> None:
    """Whole blocks only (with subblocks, an avoided block gives subblocks first:
    test_with_an_offline_refused_what_is_offline_goes_back_then_that_block_gives_subblocks)."""
    plugged = units(*(mb_n(i) for i in range(3)))
    online = {mb_n(i): Zone.MOVABLE for i in range(3)}
    inp = make_input(
        requested=256 * MIB, plugged=plugged, online=online, avoid={mb_n(2)}, policy=WHOLE_BLOCKS
    )
    assert next_step(inp) == OfflineStep(mb_n(1))


def test_all_candidates_avoided_gives_done_blocked() -> None:
    """Whole blocks only: nothing else can go."""
    plugged = units(*(mb_n(i) for i in range(3)))
    online = {mb_n(i): Zone.MOVABLE for i in range(3)}
    avoid = {mb_n(i) for i in range(3)}
    inp = make_input(
        requested=128 * MIB, plugged=plugged, online=online, avoid=avoid, policy=WHOLE_BLOCKS
    )
    assert next_step(inp) == Done(128 * MIB, 0, blocked=True)


def test_blocks_that_will_not_offline_give_up_single_subblocks() -> None:
    """Linux's reach under pressure: a block the kernel will not offline gives
    its subblocks one by one, the highest block and subblock first."""
    plugged = units(*(mb_n(i) for i in range(3)))
    online = {mb_n(i): Zone.MOVABLE for i in range(3)}
    avoid = {mb_n(i) for i in range(3)}
    inp = make_input(requested=128 * MIB, plugged=plugged, online=online, avoid=avoid)
    top = SBM.subblocks_of(mb_n(2))[-1]
    batch = planner.DEFAULT_TAKE_BATCH_SUBBLOCKS
    assert next_step(inp) == TakeStep(mb_n(2), SBM.subblock_addr(top - batch + 1), batch)
    inp.policy = Policy(take_batch_subblocks=1)
    assert next_step(inp) == TakeStep(mb_n(2), SBM.subblock_addr(top), 1)


def test_subblocks_are_taken_as_one_run_of_the_excess_from_the_top() -> None:
    """make bench-subblock's step: 64 MiB out of the top of eight online blocks is one
    take of 32 subblocks (then one UNPLUG), not 32 takes and 32 UNPLUGs."""
    plugged = units(*(mb_n(i) for i in range(8)))
    online = {mb_n(i): Zone.MOVABLE for i in range(8)}
    inp = make_input(requested=960 * MIB, plugged=plugged, online=online)
    top = SBM.subblocks_of(mb_n(7))[-1]
    assert next_step(inp) == TakeStep(mb_n(7), sb_addr(top - 31), 32)
    # Taken (not yet unplugged): the run goes back in one UNPLUG.
    inp.state.set_taken(top - 31, 32, taken=True)
    assert next_step(inp) == UnplugStep(sb_addr(top - 31), 32)


def test_a_take_run_stops_below_an_avoided_subblock() -> None:
    plugged = units(mb_n(0))
    online = {mb_n(0): Zone.MOVABLE}
    inp = make_input(requested=100 * MIB, plugged=plugged, online=online)
    top = SBM.subblocks_of(mb_n(0))[-1]
    inp.avoid_subblocks = frozenset({top, top - 3})
    # Excess 14 subblocks; the highest usable run is top-2 .. top-1.
    assert next_step(inp) == TakeStep(mb_n(0), sb_addr(top - 2), 2)


def test_avoided_online_is_skipped_and_done_blocked_when_nothing_else() -> None:
    plugged = units(mb_n(0), mb_n(1))
    online = {mb_n(0): Zone.MOVABLE}
    inp = make_input(requested=256 * MIB, plugged=plugged, online=online, avoid={mb_n(1)})
    assert next_step(inp) == Done(256 * MIB, 0, blocked=True)


def test_settled_state_is_done_not_blocked() -> None:
    plugged = units(mb_n(0), mb_n(1))
    online = {mb_n(0): Zone.MOVABLE, mb_n(1): Zone.KERNEL}
    inp = make_input(requested=256 * MIB, plugged=plugged, online=online)
    assert next_step(inp) == Done(256 * MIB, 0, blocked=False)


# --- what the guest can use ------------------------------------------------------


def test_requested_not_a_multiple_of_the_memory_block_leaves_a_remainder() -> None:
    # 1000 MiB with 128 MiB memory blocks: 7 blocks (896 MiB) usable, 104 MiB not.
    step = next_step(make_input(requested=1000 * MIB))
    assert step == PlugStep(ADDR, 7 * PER_UNIT)
    plugged = units(*(mb_n(i) for i in range(7)))
    online = {mb_n(i): Zone.MOVABLE for i in range(7)}
    done = next_step(make_input(requested=1000 * MIB, plugged=plugged, online=online))
    assert done == Done(896 * MIB, 104 * MIB)


def test_target_is_limited_by_the_usable_region() -> None:
    # requested == usable (legal: usable >= requested) with the region start cut:
    # of the 256 MiB usable only the memory block [4G+128M, 4G+256M) is whole.
    inp = make_input(EDGES, requested=256 * MIB, usable=256 * MIB)
    step = next_step(inp)
    assert step == PlugStep(ADDR + 128 * MIB, PER_UNIT)
    assert step.addr + step.nb_blocks * EDGES.block_size <= inp.config.usable_end
    first = (step.addr - EDGES.addr) // EDGES.block_size
    mb = (ADDR + 128 * MIB) // (128 * MIB)
    done = next_step(
        make_input(
            EDGES,
            requested=256 * MIB,
            usable=256 * MIB,
            plugged=range(first, first + PER_UNIT),
            online={mb: Zone.MOVABLE},
        )
    )
    assert done == Done(128 * MIB, 128 * MIB)


def test_usable_region_caps_the_plug_batch() -> None:
    # A made-up device: requested 512 MiB but only 384 MiB usable would be illegal,
    # so use requested == usable == 384 MiB: exactly 3 units, never the 4th.
    inp = make_input(requested=384 * MIB, usable=384 * MIB)
    step = next_step(inp)
    assert step == PlugStep(ADDR, 3 * PER_UNIT)


# --- region edges ----------------------------------------------------------------


def test_orphan_subblocks_at_an_unaligned_edge_are_unplugged() -> None:
    # EDGES: subblocks 0..31 lie in a memory block cut by the region start.
    orphan = [3, 4, 5]
    step = next_step(make_input(EDGES, requested=512 * MIB, plugged=orphan))
    assert step == UnplugStep(EDGES.addr + 3 * EDGES.block_size, 3)


def test_orphan_subblocks_at_the_region_end_are_unplugged_first() -> None:
    last = EDGES.nr_subblocks - 1
    mb = (ADDR + 128 * MIB) // (128 * MIB)
    plugged = [*unit_subblocks(EDGES, mb), last]
    step = next_step(make_input(EDGES, requested=1 * GIB, plugged=plugged))
    assert step == UnplugStep(EDGES.addr + last * EDGES.block_size, 1)


def test_memory_blocks_cut_by_the_region_edge_are_never_plugged_or_onlined() -> None:
    # Everything requested: the planner grows only over the 7 whole memory blocks.
    inp = make_input(EDGES, requested=1 * GIB)
    step = next_step(inp)
    first_whole = (ADDR + 128 * MIB - EDGES.addr) // EDGES.block_size
    assert step == PlugStep(EDGES.addr + first_whole * EDGES.block_size, 7 * PER_UNIT)
    whole = list(EDGES.memory_blocks())
    assert len(whole) == 7
    assert ADDR // (128 * MIB) not in whole
    plugged = [sb for mb in whole for sb in unit_subblocks(EDGES, mb)]
    done = next_step(
        make_input(
            EDGES,
            requested=1 * GIB,
            plugged=plugged,
            online=dict.fromkeys(whole, Zone.MOVABLE),
        )
    )
    assert done == Done(896 * MIB, 128 * MIB)


# --- Big Block Mode --------------------------------------------------------------


def test_big_block_mode_plugs_one_device_block_then_onlines_both_memory_blocks() -> None:
    assert BBM.big_block_mode
    step = next_step(make_input(BBM, requested=256 * MIB))
    assert step == PlugStep(ADDR, 1)
    online: dict[int, Zone] = {}
    for mb in (mb_n(0), mb_n(1)):
        step = next_step(make_input(BBM, requested=256 * MIB, plugged=[0], online=online))
        assert step == OnlineStep(mb, Zone.MOVABLE)
        online[mb] = Zone.MOVABLE
    assert next_step(make_input(BBM, requested=256 * MIB, plugged=[0], online=online)) == Done(
        256 * MIB, 0
    )


def test_big_block_mode_offlines_every_memory_block_before_the_unplug() -> None:
    online = {mb_n(0): Zone.MOVABLE, mb_n(1): Zone.MOVABLE}
    step = next_step(make_input(BBM, requested=0, plugged=[0], online=online))
    assert step == OfflineStep(mb_n(1))
    step = next_step(make_input(BBM, requested=0, plugged=[0], online={mb_n(0): Zone.MOVABLE}))
    assert step == OfflineStep(mb_n(0))
    step = next_step(make_input(BBM, requested=0, plugged=[0]))
    assert step == UnplugStep(ADDR, 1)


# --- zones -----------------------------------------------------------------------


def test_kernel_policy_onlines_to_kernel() -> None:
    policy = Policy(online=OnlinePolicy.KERNEL)
    inp = make_input(requested=128 * MIB, plugged=units(mb_n(0)), policy=policy)
    assert next_step(inp) == OnlineStep(mb_n(0), Zone.KERNEL)


def test_auto_zone_policy_movable_up_to_the_ratio_then_kernel() -> None:
    # Ratio 1.0 of 512 MiB kernel memory: 4 movable blocks, then kernel.
    policy = Policy(online=OnlinePolicy.AUTO, auto_movable_ratio=1.0, kernel_memory_bytes=512 * MIB)
    plugged = units(*(mb_n(i) for i in range(6)))
    for n_online in range(6):
        online = {mb_n(i): Zone.MOVABLE for i in range(min(n_online, 4))}
        online |= {mb_n(i): Zone.KERNEL for i in range(4, n_online)}
        inp = make_input(requested=768 * MIB, plugged=plugged, online=online, policy=policy)
        want = Zone.MOVABLE if n_online < 4 else Zone.KERNEL
        assert next_step(inp) == OnlineStep(mb_n(n_online), want), n_online


def test_auto_zone_policy_counts_only_movable_blocks() -> None:
    # Kernel-zone blocks online do not use up the movable allowance.
    policy = Policy(online=OnlinePolicy.AUTO, auto_movable_ratio=1.0, kernel_memory_bytes=256 * MIB)
    plugged = units(*(mb_n(i) for i in range(4)))
    online = {mb_n(0): Zone.KERNEL, mb_n(1): Zone.KERNEL, mb_n(2): Zone.MOVABLE}
    inp = make_input(requested=512 * MIB, plugged=plugged, online=online, policy=policy)
    assert next_step(inp) == OnlineStep(mb_n(3), Zone.MOVABLE)


# --- tiny device blocks ----------------------------------------------------------


def test_4k_blocks_in_2g_memory_blocks_plug_one_unit_over_several_requests() -> None:
    geometry = Geometry(8 * GIB, 4 * GIB, 4 * KIB, 2 * GIB)
    per_unit = (2 * GIB) // (4 * KIB)
    assert per_unit == 524_288 > MAX_BLOCKS_PER_REQUEST
    plugged: list[int] = []
    requests = 0
    while True:
        step = next_step(make_input(geometry, requested=2 * GIB, plugged=plugged))
        if not isinstance(step, PlugStep):
            break
        requests += 1
        assert step.nb_blocks <= MAX_BLOCKS_PER_REQUEST
        first = (step.addr - geometry.addr) // geometry.block_size
        assert first == len(plugged), "the unit is filled lowest address first, no gaps"
        plugged.extend(range(first, first + step.nb_blocks))
        assert requests < 20
    assert requests == -(-per_unit // MAX_BLOCKS_PER_REQUEST) == 9
    assert len(plugged) == per_unit
    # Only now, fully plugged, is the memory block onlined.
    assert step == OnlineStep(geometry.first_memory_block, Zone.MOVABLE)


def test_4k_blocks_partial_unit_is_never_onlined() -> None:
    geometry = Geometry(8 * GIB, 4 * GIB, 4 * KIB, 2 * GIB)
    plugged = range(3 * MAX_BLOCKS_PER_REQUEST)
    step = next_step(make_input(geometry, requested=2 * GIB, plugged=plugged))
    assert step == PlugStep(
        geometry.addr + 3 * MAX_BLOCKS_PER_REQUEST * geometry.block_size, MAX_BLOCKS_PER_REQUEST
    )


# --- the property ----------------------------------------------------------------

PROPERTY_GEOMETRIES = [
    SBM,
    BBM,
    EDGES,
    Geometry(ADDR, 512 * MIB, 4 * MIB, 128 * MIB),
    Geometry(ADDR, 1 * GIB, 128 * MIB, 128 * MIB),
    Geometry(ADDR + 64 * MIB, 768 * MIB, 32 * MIB, 128 * MIB),
]


@st.composite
def plan_inputs(draw: st.DrawFn) -> PlanInput:
    """A legal PlanInput: any bitmap, online only over fully plugged blocks (5.1)."""
    geometry = draw(st.sampled_from(PROPERTY_GEOMETRIES))
    n = geometry.nr_subblocks
    style = draw(st.sampled_from(["random", "units", "empty", "full"]))
    if style == "random":
        raw = draw(st.binary(min_size=(n + 7) // 8, max_size=(n + 7) // 8))
        plugged = {sb for sb in range(n) if raw[sb >> 3] >> (sb & 7) & 1}
    elif style == "units":
        # Whole units (so some blocks can be online), plus stray bits and holes.
        mbs = draw(st.sets(st.sampled_from(list(geometry.memory_blocks()))))
        plugged = {sb for mb in mbs for sb in geometry.subblocks_of(mb)}
        plugged |= draw(st.sets(st.integers(0, n - 1), max_size=8))
        plugged -= draw(st.sets(st.integers(0, n - 1), max_size=3))
    elif style == "empty":
        plugged = set()
    else:
        plugged = set(range(n))
    full_mbs = [
        mb
        for mb in geometry.memory_blocks()
        if all(sb in plugged for sb in geometry.subblocks_of(mb))
    ]
    zones = st.sampled_from([Zone.MOVABLE, Zone.KERNEL, Zone.AUTO])
    online = {mb: draw(zones) for mb in full_mbs if draw(st.booleans())}
    nr_blocks = geometry.region_size // geometry.block_size
    requested = draw(st.integers(0, nr_blocks)) * geometry.block_size
    # usable >= requested, and nothing is plugged beyond it (the usable region only
    # grows, and the UNPLUG_ALL that may shrink it leaves nothing plugged).
    usable_min = max(requested // geometry.block_size, max(plugged, default=-1) + 1)
    usable = draw(st.integers(usable_min, nr_blocks)) * geometry.block_size
    avoid = draw(st.sets(st.sampled_from(list(geometry.memory_blocks())), max_size=3))
    policy = Policy(
        online=draw(st.sampled_from(list(OnlinePolicy))),
        kernel_memory_bytes=draw(st.integers(0, 4)) * 128 * MIB,
        plug_batch_units=draw(st.integers(1, 10)),
        unplug_batch_units=draw(st.integers(1, 10)),
    )
    return make_input(
        geometry,
        requested=requested,
        plugged=plugged,
        online=online,
        usable=usable,
        policy=policy,
        avoid=avoid,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_inputs())
def test_planner_never_breaks_a_safety_rule(inp: PlanInput) -> None:
    geometry = inp.geometry
    step = next_step(inp)
    plugged_bytes = sum(1 for sb in range(geometry.nr_subblocks) if inp.is_plugged(sb))
    plugged_bytes *= geometry.block_size
    if isinstance(step, OnlineStep):
        assert geometry.contains_memory_block(step.memory_block)
        assert all(inp.is_plugged(sb) for sb in geometry.subblocks_of(step.memory_block)), (
            "online over unplugged subblocks"
        )
        assert inp.block(step.memory_block).state is MemoryBlockState.PLUGGED
        assert step.memory_block not in inp.avoid
    elif isinstance(step, OfflineStep):
        assert inp.block(step.memory_block).state is MemoryBlockState.ONLINE
        assert step.memory_block not in inp.avoid
    elif isinstance(step, (PlugStep, UnplugStep)):
        assert 1 <= step.nb_blocks <= MAX_BLOCKS_PER_REQUEST
        assert (step.addr - geometry.addr) % geometry.block_size == 0
        first = geometry.subblock_index(step.addr)
        covered = range(first, first + step.nb_blocks)
        assert first >= 0
        assert covered.stop <= geometry.nr_subblocks
        if isinstance(step, PlugStep):
            assert not any(inp.is_plugged(sb) for sb in covered), "PLUG of a plugged block"
            assert plugged_bytes + step.nb_blocks * geometry.block_size <= (
                inp.config.requested_size
            ), "PLUG beyond requested_size (NACK)"
            assert step.addr + step.nb_blocks * geometry.block_size <= inp.config.usable_end
            # Only blocks that can be onlined are plugged: none outside a whole unit.
            orphans = set(planner.layout_of(geometry).orphan_subblocks)
            assert not orphans.intersection(covered)
        else:
            assert all(inp.is_plugged(sb) for sb in covered), "UNPLUG of an unplugged block"
            for sb in covered:
                for mb in geometry.memory_blocks_of(sb):
                    online = inp.block(mb).state is MemoryBlockState.ONLINE
                    assert not online or inp.state.is_taken(sb), (
                        f"UNPLUG of subblock {sb} in use under online memory{mb}"
                    )
    elif isinstance(step, TakeStep):
        assert inp.takes_subblocks
        assert inp.block(step.memory_block).state is MemoryBlockState.ONLINE
        first = geometry.subblock_index(step.addr)
        for sb in range(first, first + step.nb_blocks):
            assert sb in geometry.subblocks_of(step.memory_block)
            assert inp.is_plugged(sb) and not inp.state.is_taken(sb)
            assert sb not in inp.avoid_subblocks
    elif isinstance(step, GiveBackStep):
        first = geometry.subblock_index(step.addr)
        for sb in range(first, first + step.nb_blocks):
            assert inp.is_plugged(sb) and inp.state.is_taken(sb), "give-back before the plug"
    else:
        assert isinstance(step, Done)
        assert step.target_bytes + step.remainder_bytes == inp.config.requested_size
        assert step.target_bytes % geometry.block_size == 0
        if not inp.takes_subblocks:
            assert step.target_bytes % max(geometry.block_size, geometry.memory_block_size) == 0


@pytest.mark.parametrize("geometry", PROPERTY_GEOMETRIES)
@pytest.mark.parametrize("requested_blocks", [0, 1, 63, 64, 200, 10_000])
def test_planner_converges_from_empty_by_playing_its_own_steps(
    geometry: Geometry, requested_blocks: int
) -> None:
    """Apply each step to the state as a perfect device and kernel would, until Done."""
    nr_blocks = geometry.nr_subblocks
    requested = min(requested_blocks, nr_blocks) * geometry.block_size
    plugged: set[int] = set()
    online: dict[int, Zone] = {}
    for _ in range(1000):
        step = next_step(make_input(geometry, requested=requested, plugged=plugged, online=online))
        if isinstance(step, Done):
            break
        if isinstance(step, PlugStep):
            first = geometry.subblock_index(step.addr)
            plugged |= set(range(first, first + step.nb_blocks))
        elif isinstance(step, UnplugStep):
            first = geometry.subblock_index(step.addr)
            plugged -= set(range(first, first + step.nb_blocks))
        elif isinstance(step, OnlineStep):
            online[step.memory_block] = step.zone
        else:
            del online[step.memory_block]
    else:
        pytest.fail("no convergence in 1000 steps")
    assert not step.blocked
    unit = max(geometry.block_size, geometry.memory_block_size)
    assert len(plugged) * geometry.block_size == step.target_bytes
    assert step.target_bytes == min(
        requested // unit * unit, len(planner.layout_of(geometry).units) * unit
    )
    assert len(online) * geometry.memory_block_size == step.target_bytes


def holed_input(in_use: int = 0) -> PlanInput:
    """Block 0 online with all but ``in_use`` of its subblocks holes; requested 0."""
    geometry = SBM
    mb = mb_n(0)
    subblocks = list(geometry.subblocks_of(mb))
    inp = make_input(
        requested=in_use * geometry.block_size,
        plugged=subblocks,
        online={mb: Zone.MOVABLE},
    )
    state = inp.state
    holes = subblocks[in_use:]
    state.set_taken(holes[0], len(holes), taken=True)
    state.set_subblocks(holes[0], len(holes), plugged=False)
    return inp


def test_a_block_of_holes_only_stays_online_and_the_planner_is_settled() -> None:
    """Never offlined: its poisoned pages would keep HardwareCorrupted raised for the
    rest of the boot (6.1) or keep it from coming online again (6.2 on)."""
    assert next_step(holed_input()) == Done(0, 0)


def test_a_take_that_would_leave_only_holes_drops_a_whole_unit_instead() -> None:
    """Units 0-2 full, unit 3 online with 12 holes (52 subblocks in use): asked for
    52 fewer, taking them would leave unit 3 holes only (stranded: never offlined).
    The highest full unit goes instead; growth then fills 12 holes back."""
    geometry = SBM
    mbs = [mb_n(i) for i in range(4)]
    subblocks = units(*mbs)
    online = {mb: Zone.MOVABLE for mb in mbs}
    holed = list(geometry.subblocks_of(mb_n(3)))[-12:]
    kept = 3 * PER_UNIT + (PER_UNIT - 12)
    inp = make_input(requested=(kept - 52) * geometry.block_size, plugged=subblocks, online=online)
    inp.state.set_taken(holed[0], 12, taken=True)
    inp.state.set_subblocks(holed[0], 12, plugged=False)
    assert next_step(inp) == OfflineStep(mb_n(2))
    # Asked for fewer than the subblocks in use of the holed unit: a take, as before.
    inp.config = dataclasses.replace(inp.config, requested_size=(kept - 51) * geometry.block_size)
    step = next_step(inp)
    assert isinstance(step, TakeStep) and step.memory_block == mb_n(3) and step.nb_blocks == 51


def test_a_block_with_holes_and_memory_in_use_stays_online() -> None:
    assert next_step(holed_input(in_use=3)) == Done(3 * SBM.block_size, 0)


def test_requested_beyond_usable_plans_within_usable() -> None:
    # Firecracker after UNPLUG_ALL: usable_region_size 0 while requested_size is not
    # (device.rs:418): nothing can be plugged until the host resizes again.
    assert next_step(make_input(requested=512 * MIB, usable=0)) == Done(0, 512 * MIB, False)
    # A usable region of two memory blocks: the plug stays inside it.
    step = next_step(make_input(requested=512 * MIB, usable=256 * MIB))
    assert step == PlugStep(ADDR, 2 * PER_UNIT)
