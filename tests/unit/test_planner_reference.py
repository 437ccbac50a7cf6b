"""The planner against its reference (the region-scanning planner it replaced).

The live planner reads an indexed :class:`~vmem_guest.tracker.state.RegionState`;
the reference (``planner_reference.py``) scans the whole region. With one unit
unplugged at a time they must plan the same step from any legal input: the
index changed the cost, not the decisions.
"""

from __future__ import annotations

import dataclasses

import planner_reference as reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_planner import PROPERTY_GEOMETRIES, make_input, plan_inputs

from vmem_guest import planner
from vmem_guest.blocks import Geometry
from vmem_guest.planner import PlanInput


def reference_input(inp: PlanInput) -> reference.PlanInput:
    """The same input, as the reference planner takes it (a dict and a bitmap)."""
    state = inp.state
    blocks = {
        mb: reference.BlockInfo(state.block_state(mb), state.block_zone(mb))
        for mb in inp.geometry.memory_blocks()
    }
    policy = reference.Policy(
        online=reference.OnlinePolicy(inp.policy.online.value),
        auto_movable_ratio=inp.policy.auto_movable_ratio,
        kernel_memory_bytes=(
            planner.DEFAULT_KERNEL_MEMORY_BYTES
            if inp.policy.kernel_memory_bytes is None
            else inp.policy.kernel_memory_bytes
        ),
        plug_batch_units=inp.policy.plug_batch_units,
    )
    return reference.PlanInput(
        config=inp.config,
        geometry=inp.geometry,
        blocks=blocks,
        bitmap=bytes(state.bitmap),
        policy=policy,
        avoid=inp.avoid,
    )


def as_reference_step(step: planner.Step) -> object:
    kind = getattr(reference, type(step).__name__)
    return kind(**dataclasses.asdict(step))


def one_at_a_time(inp: PlanInput) -> PlanInput:
    # The reference is the whole-block planner: no subblock of an online block is taken.
    policy = dataclasses.replace(inp.policy, unplug_batch_units=1, subblock_unplug=False)
    return PlanInput(inp.config, inp.geometry, policy=policy, avoid=inp.avoid, state=inp.state)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_inputs())
def test_the_planner_plans_what_the_reference_plans(inp: PlanInput) -> None:
    inp = one_at_a_time(inp)
    assert as_reference_step(planner.next_step(inp)) == reference.next_step(reference_input(inp))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(PROPERTY_GEOMETRIES), st.integers(0, 1 << 40))
def test_units_and_orphans_are_the_ones_the_reference_cuts(
    geometry: Geometry, requested: int
) -> None:
    new = planner.layout_of(geometry)
    old = reference.layout_of(geometry)
    assert [(u.subblocks, u.memory_blocks) for u in new.units] == [
        (u.subblocks, u.memory_blocks) for u in old.units
    ]
    assert new.orphan_subblocks == old.orphan_subblocks
    requested = min(requested, geometry.region_size) // geometry.block_size * geometry.block_size
    inp = make_input(geometry, requested=requested)
    assert planner.target_bytes(inp.config, new) == reference.target_bytes(inp.config, old)
