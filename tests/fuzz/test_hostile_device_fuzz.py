"""Fuzz the driver against a device that turns hostile at a random moment.

Hypothesis picks a misbehaviour (vmem_guest.sim.hostile.Fault), how many
requests the device answers honestly first, and a sequence of host resizes.
The driver runs through the real attach path and the agent's per-device loop
(config interrupt -> config_changed, then steps). Whatever happens:

- no online memory block ever covers a device block the driver was not ACKed;
- a refusal or a broken device is a VmemError with a reason, never a crash,
  and only a device that did misbehave is refused;
- a device that never got to misbehave converges like an honest one.

That a broken device gets no further request is the agent's job
(tests/unit/test_hostile_device.py checks it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from vmem_guest import planner
from vmem_guest.attach import Attached, attach_channel
from vmem_guest.driver import Outcome
from vmem_guest.errors import VmemError
from vmem_guest.sim.device_model import DeviceModel
from vmem_guest.sim.faults import Fault
from vmem_guest.sim.hostile import HostileChannel
from vmem_guest.sim.kernel import FakeKernelMemory

MIB = 1 << 20
GIB = 1 << 30
MEMORY_BLOCK = 128 * MIB
ADDR = 4 * GIB
REGION = 1 * GIB
STEPS_PER_RESIZE = 300

sizes = st.integers(0, REGION // (2 * MIB)).map(lambda blocks: blocks * 2 * MIB)


def drive(attached: Attached, channel: HostileChannel, kernel: FakeKernelMemory) -> str:
    """The agent's loop for one device after a resize: "done", "wait" or the broken reason."""
    driver = attached.driver
    driver.interrupt(channel.handle_interrupt())
    for _ in range(STEPS_PER_RESIZE):
        result = driver.step()
        assert channel.unacked_online(kernel) == []
        if result.outcome is Outcome.BROKEN:
            # The reason is in the step's result and in the tracker's one flag.
            assert result.detail and driver.broken_reason
            assert driver.broken_reason in result.detail or result.detail in (driver.broken_reason)
            return result.detail
        if result.outcome is not Outcome.PROGRESS:
            return result.outcome.value
    raise AssertionError(f"no convergence in {STEPS_PER_RESIZE} steps")


@given(
    fault=st.sampled_from(Fault),
    honest=st.integers(0, 12),
    resizes=st.lists(sizes, min_size=1, max_size=6),
    big_blocks=st.booleans(),
)
def test_a_hostile_device_never_gets_unacked_memory_onlined(
    fault: Fault, honest: int, resizes: list[int], big_blocks: bool
) -> None:
    block_size = 256 * MIB if big_blocks else 2 * MIB
    kernel = FakeKernelMemory(MEMORY_BLOCK)
    kernel.add_boot_memory(0, 1 * GIB)
    model = DeviceModel(addr=ADDR, region_size=REGION, block_size=block_size)
    channel = HostileChannel(model, fault, honest_requests=honest, boot_memory_addr=0)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            attached = attach_channel(
                "0000:00:03.0",
                channel,
                state_dir=Path(tmp) / "state",
                kernel=kernel,
                policy=planner.DEFAULT_POLICY,
                boot_record=Path(tmp) / "boot-memory",
            )
        except VmemError as exc:
            assert channel.active and exc.message  # only a lying device is refused
            assert kernel.probes == []
            return
        try:
            for size in resizes:
                channel.host_resize(size - size % block_size)
                ended = drive(attached, channel, kernel)
                if ended not in ("done", "wait"):
                    assert channel.active, f"an honest device was refused: {ended}"
                    return
            if not channel.active:  # it never got to lie: it converged like QEMU's
                target = resizes[-1] - resizes[-1] % max(block_size, MEMORY_BLOCK)
                assert ended == "done"
                assert model.plugged_size == target
        finally:
            attached.close()
