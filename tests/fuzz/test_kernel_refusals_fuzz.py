"""Each memory operation refused by the kernel, where it happens, at random sizes.

The agent machine (test_agent_machine.py) refuses operations at random moments,
which a bounded run may not reach for every operation. Here each example plays
one resize cycle, grow, shrink into a block, grow back, that needs every
operation (probe and online to grow, offline and soft offline to shrink, unpoison
to give the holes back), and refuses the drawn operation with ENOMEM or EBUSY
for the whole phase that needs it. The invariants of docs/design.md section 5 are
checked after the phase, the refusal is then lifted, and the agent must converge
to exactly what the guest can use (the machine's teardown).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vmem_guest.sim.kernel import BLOCK_OPS, KernelOp

from .test_agent_machine import (
    CONVERGENCE_STEP_BOUND,
    GEOMETRIES,
    MEMORY_BLOCK,
    REFUSALS,
    AgentMachine,
)

#: The phase of the cycle each operation is needed in.
PHASE = {
    KernelOp.PROBE: "grow",
    KernelOp.ONLINE: "grow",
    KernelOp.OFFLINE: "shrink",
    KernelOp.SOFT_OFFLINE: "shrink",
    KernelOp.UNPOISON: "grow back",
}
#: Steps played while the kernel refuses (each refused step waits out its window).
STEPS_WHILE_REFUSED = 60
#: Examples per run: each plays a whole cycle, with takes of thousands of pages.
EXAMPLES = 25
SUB_BLOCK_MODE = [g for g in GEOMETRIES if g[1] < MEMORY_BLOCK]


def check(machine: AgentMachine) -> None:
    machine.online_memory_is_plugged_or_poisoned()
    machine.tracker_agrees_with_device_and_kernel()
    machine.in_memory_state_agrees_with_the_file()


@st.composite
def cycles(draw: st.DrawFn) -> tuple[tuple[int, int], KernelOp, int, int, int]:
    op = draw(st.sampled_from(sorted(KernelOp, key=str)))
    geometry = draw(st.sampled_from(GEOMETRIES if op in BLOCK_OPS else SUB_BLOCK_MODE))
    region, block = geometry
    unit = max(block, MEMORY_BLOCK)
    units = draw(st.integers(2, region // unit))
    grown = units * unit
    if block < MEMORY_BLOCK:
        # One whole memory block to offline, then a few subblocks of the next to take.
        taken = draw(st.integers(1, MEMORY_BLOCK // block // 2))
        shrink_to = grown - MEMORY_BLOCK - taken * block
    else:
        shrink_to = grown - unit
    return geometry, op, draw(st.sampled_from(REFUSALS)), grown, shrink_to


@settings(max_examples=EXAMPLES)
@given(cycle=cycles(), seed=st.integers(0, 2**16))
def test_each_refused_operation_keeps_the_invariants_and_the_agent_converges(
    cycle: tuple[tuple[int, int], KernelOp, int, int, int], seed: int
) -> None:
    geometry, op, err, grown, shrink_to = cycle
    machine = AgentMachine()
    try:
        machine.boot(
            GEOMETRIES.index(geometry),  # qemu-10.0 takes every geometry: same index
            "qemu-10.0",  # the kernel refuses here, not the device: one profile is enough
            seed,
            refuses_poisoned_online=False,
            plugged=0.0,
            flaky=None,
            err=err,
        )
        for phase, size in (("grow", grown), ("shrink", shrink_to), ("grow back", grown)):
            if PHASE[op] == phase:
                (machine.kernel if op in BLOCK_OPS else machine.pages).refuse(op, err)
            machine.model.resize(size)
            refusing = PHASE[op] == phase
            machine.run_steps(STEPS_WHILE_REFUSED if refusing else CONVERGENCE_STEP_BOUND)
            check(machine)
            if refusing:
                refused = (machine.kernel if op in BLOCK_OPS else machine.pages).refused[op]
                assert refused, f"{op.value} was never asked for while refused ({phase})"
                machine.kernel_stops_refusing()
                machine.run_steps(CONVERGENCE_STEP_BOUND)
                check(machine)
    finally:
        machine.teardown()
