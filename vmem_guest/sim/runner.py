"""The simulator: the real attach path and driver core against the device model.

Time is virtual: when the driver asks to wait (backoff), the clock jumps, so a
scenario with BUSY answers and refused offlines runs in milliseconds and is
reproducible from its seed. With a :class:`~vmem_guest.sim.hostile.Fault`, the
device misbehaves after ``honest_requests`` answers; the report then says how
the driver refused it or stopped touching it.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from vmem_guest import planner
from vmem_guest._linux.lifetime import Closing
from vmem_guest.attach import attach_channel
from vmem_guest.blocks import Geometry, MemoryBlockState
from vmem_guest.driver import Outcome
from vmem_guest.errors import UsageError
from vmem_guest.hotplug import KernelBlockState
from vmem_guest.sim.channel import SimChannel
from vmem_guest.sim.device_model import DeviceModel
from vmem_guest.sim.faults import Fault
from vmem_guest.sim.hostile import HostileChannel
from vmem_guest.sim.kernel import FakeKernelMemory
from vmem_guest.sim.pages import FakePages

#: Where QEMU put the first virtio-mem region in our test VM (docs/test-vm.md section 4).
DEFAULT_REGION_ADDR = 0x1_0000_0000
#: The simulated guest's boot memory: [0, 1 GiB), or up to the region if it starts lower.
BOOT_MEMORY = 1 << 30


class VirtualClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


@dataclasses.dataclass(frozen=True)
class SimOptions:
    region_size: int = 4 << 30
    block_size: int = 2 << 20
    memory_block_size: int = 128 << 20
    addr: int = DEFAULT_REGION_ADDR
    busy_rate: float = 0.0
    offline_fail_rate: float = 0.0
    seed: int = 0
    policy: planner.Policy = planner.DEFAULT_POLICY
    name: str = "sim0"
    #: Steps one resize may take before the simulation gives up on it.
    max_steps: int = 100_000
    #: A misbehaving device (None: an honest one) and the requests it answers first.
    fault: Fault | None = None
    honest_requests: int = 0


@dataclasses.dataclass(frozen=True)
class SimReport:
    """The state after one resize has converged (sizes in bytes)."""

    requested: int
    plugged: int
    online: int
    usable: int
    remainder: int
    #: Bytes of online blocks taken out of use and unplugged (subblock holes).
    holes: int
    #: What the fake kernel counts as HardwareCorrupted (the holes' poisoned pages).
    hardware_corrupted: int
    steps: int
    requests: int
    retries: int
    converged: bool
    broken: bool
    virtual_seconds: float
    #: Why the driver stopped touching the device ("" unless broken).
    error: str = ""

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class Simulation(Closing):
    """One simulated device, its driver and tracker; call :meth:`resize` per host request."""

    def __init__(self, options: SimOptions, state_dir: Path) -> None:
        self.options = options
        rng = random.Random(options.seed)
        self.clock = VirtualClock()
        try:
            self.model = DeviceModel(
                addr=options.addr,
                region_size=options.region_size,
                block_size=options.block_size,
                rng=random.Random(rng.random()),
            )
            Geometry(  # checked here for a clear error; attach builds its own
                options.addr, options.region_size, options.block_size, options.memory_block_size
            )
        except ValueError as exc:
            raise UsageError(f"invalid simulated device: {exc}") from None
        self.model.busy_rate = options.busy_rate
        self.kernel = FakeKernelMemory(
            options.memory_block_size,
            offline_fail_rate=options.offline_fail_rate,
            rng=random.Random(rng.random()),
        )
        boot = min(BOOT_MEMORY, options.addr)
        self.kernel.add_boot_memory(0, boot - boot % options.memory_block_size)
        self.pages = self._fake_pages(rng)
        self.channel: SimChannel = (
            SimChannel(self.model)
            if options.fault is None
            else HostileChannel(self.model, options.fault, honest_requests=options.honest_requests)
        )
        self.attached = attach_channel(
            options.name,
            self.channel,
            state_dir=state_dir,
            kernel=self.kernel,
            policy=options.policy,
            boot_record=state_dir / "boot-memory",
            clock=self.clock,
            pages=self.pages,
        )
        self.tracker = self.attached.tracker
        self.driver = self.attached.driver
        self.error = ""

    def _fake_pages(self, rng: random.Random) -> FakePages:
        """Pages of the fake kernel: online where its blocks are, their poison wiped
        when a block goes online (as Linux's online_pages does)."""
        kernel = self.kernel
        page_size = 4096

        def online(pfn: int) -> bool:
            block = pfn * page_size // kernel.memory_block_size
            return kernel.state(block) is KernelBlockState.ONLINE

        pages = FakePages(rng=random.Random(rng.random()), page_size=page_size, online=online)
        kernel.on_online = lambda addr, size: pages.block_onlined(
            addr // page_size, size // page_size
        )
        return pages

    def close(self) -> None:
        self.attached.close()

    def resize(self, requested: int) -> SimReport:
        """Host side ``qom-set requested-size``, then run the driver until it settles."""
        try:
            self.channel.host_resize(requested)
        except ValueError as exc:
            raise UsageError(f"the device refuses requested size {requested:#x}: {exc}") from None
        return self.converge()

    def converge(self) -> SimReport:
        """The agent's loop for one device: config interrupts, then steps, until it
        settles. The driver decides everything (a broken device answers BROKEN at once);
        this loop only owns the virtual clock."""
        requests0, retries0 = self.tracker.requests, self.tracker.retries
        steps = 0
        outcome = Outcome.PROGRESS
        while steps < self.options.max_steps:
            self.driver.interrupt(self.channel.handle_interrupt())
            result = self.driver.step()
            outcome = result.outcome
            if outcome is Outcome.BROKEN:
                self.error = result.detail
            if outcome in (Outcome.DONE, Outcome.BROKEN):
                break
            if outcome is Outcome.WAIT:
                self.clock.advance(result.wait_seconds)
            else:
                steps += 1
        return self.report(steps, outcome, requests0, retries0)

    def report(self, steps: int, outcome: Outcome, requests0: int, retries0: int) -> SimReport:
        tracker = self.tracker
        online = tracker.state.block_counts[MemoryBlockState.ONLINE]
        return SimReport(
            requested=self.model.requested_size,
            plugged=self.model.plugged_size,
            online=online * self.options.memory_block_size,
            usable=self.model.usable_region_size,
            remainder=tracker.remainder_bytes,
            holes=tracker.state.hole_subblocks * self.options.block_size,
            hardware_corrupted=self.pages.hardware_corrupted_bytes() or 0,
            steps=steps,
            requests=tracker.requests - requests0,
            retries=tracker.retries - retries0,
            converged=outcome is Outcome.DONE,
            broken=outcome is Outcome.BROKEN,
            virtual_seconds=round(self.clock.now, 3),
            error=self.error,
        )
