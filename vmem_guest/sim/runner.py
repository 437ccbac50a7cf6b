"""The simulator: the real driver core against the device model and a fake kernel.

Time is virtual: when the driver asks to wait (backoff), the clock jumps, so a
scenario with BUSY answers and refused offlines runs in milliseconds and is
reproducible from its seed.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from vmem_guest import planner
from vmem_guest.blocks import Geometry, MemoryBlockState
from vmem_guest.device import VirtioMemDevice
from vmem_guest.driver import DeviceDriver, Outcome
from vmem_guest.errors import UsageError
from vmem_guest.hotplug import FakeKernelMemory
from vmem_guest.sim.device_model import DeviceModel
from vmem_guest.tracker import Tracker, TrackerIdentity

#: Where QEMU put the first virtio-mem region in our test VM (test-vm-facts.md).
DEFAULT_REGION_ADDR = 0x1_0000_0000


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


@dataclasses.dataclass(frozen=True)
class SimReport:
    """The state after one resize has converged (sizes in bytes)."""

    requested: int
    plugged: int
    online: int
    usable: int
    remainder: int
    steps: int
    requests: int
    retries: int
    converged: bool
    broken: bool
    virtual_seconds: float

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class Simulation:
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
            geometry = Geometry(
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
        self.tracker = Tracker.open(state_dir, TrackerIdentity(options.name, geometry))
        self.device = VirtioMemDevice(self.model, options.name)
        self.driver = DeviceDriver(
            self.device, self.tracker, self.kernel, options.policy, clock=self.clock
        )
        self.driver.start()
        self.model.on_config_change = self.driver.config_changed

    def close(self) -> None:
        self.tracker.close()

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resize(self, requested: int) -> SimReport:
        """Host side ``qom-set requested-size``, then run the driver until it settles."""
        try:
            self.model.resize(requested)
        except ValueError as exc:
            raise UsageError(f"the device refuses requested size {requested:#x}: {exc}") from None
        return self.converge()

    def converge(self) -> SimReport:
        before = self.tracker.snapshot()
        steps = 0
        outcome = Outcome.PROGRESS
        while steps < self.options.max_steps:
            result = self.driver.step()
            outcome = result.outcome
            if outcome in (Outcome.DONE, Outcome.BROKEN):
                break
            if outcome is Outcome.WAIT:
                self.clock.advance(result.wait_seconds)
            else:
                steps += 1
        return self.report(steps, outcome, before.requests, before.retries)

    def report(self, steps: int, outcome: Outcome, requests0: int, retries0: int) -> SimReport:
        snap = self.tracker.snapshot()
        online = sum(1 for rec in snap.blocks if rec.state is MemoryBlockState.ONLINE)
        return SimReport(
            requested=self.model.requested_size,
            plugged=self.model.plugged_size,
            online=online * self.options.memory_block_size,
            usable=self.model.usable_region_size,
            remainder=snap.remainder_bytes,
            steps=steps,
            requests=snap.requests - requests0,
            retries=snap.retries - retries0,
            converged=outcome is Outcome.DONE,
            broken=outcome is Outcome.BROKEN,
            virtual_seconds=round(self.clock.now, 3),
        )
