"""The driver core against the device model, a fake kernel and a real tracker file.

Time is a VirtualClock: a WAIT only passes when the test advances it. Every
request goes through a recording channel, so the tests check what was sent to
the device, not only where the driver ended up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from vmem_guest import planner, spec
from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.device import VirtioMemDevice
from vmem_guest.driver import MAX_NACKS_BEFORE_BACKOFF, DeviceDriver, Outcome, StepResult
from vmem_guest.errors import ConfigError, SafetyError
from vmem_guest.hotplug import KernelBlock, KernelBlockState
from vmem_guest.sim.device_model import DeviceModel
from vmem_guest.sim.kernel import FakeKernelMemory
from vmem_guest.sim.runner import VirtualClock
from vmem_guest.spec import RequestType, ResponseType
from vmem_guest.tracker import Intent, Tracker, TrackerIdentity

MIB = 1 << 20
GIB = 1 << 30
ADDR = 4 * GIB
MEMORY_BLOCK = 128 * MIB
GEOMETRY = Geometry(ADDR, 1 * GIB, 2 * MIB, MEMORY_BLOCK)
PER_UNIT = 64  # 2 MiB subblocks per 128 MiB memory block
MB0 = ADDR // MEMORY_BLOCK  # memory32, the region's first memory block
NAME = "drv0"
T = TypeVar("T")
INITIAL_BACKOFF = 0.05  # BackoffPolicy().initial


@dataclasses.dataclass(frozen=True)
class Sent:
    type: RequestType
    addr: int
    nb_blocks: int


class RecordingChannel:
    """The device model's channel, recording every request; hooks may act before it."""

    def __init__(self, model: DeviceModel) -> None:
        self.model = model
        self.sent: list[Sent] = []
        self.before_submit: Callable[[Sent], bytes | None] | None = None

    def read_config(self) -> bytes:
        return self.model.read_config()

    def submit(self, request: bytes) -> bytes:
        req = spec.VirtioMemReq.from_buffer_copy(request)
        sent = Sent(RequestType(req.type), req.addr, req.nb_blocks)
        self.sent.append(sent)
        if self.before_submit is not None:
            answer = self.before_submit(sent)
            if answer is not None:
                return answer
        return self.model.submit(request)

    def types(self) -> list[RequestType]:
        return [s.type for s in self.sent]


class Rig:
    """One device: model, channel, fake kernel, tracker file, driver, virtual clock."""

    def __init__(self, state_dir: Path, kernel: FakeKernelMemory | None = None) -> None:
        self.state_dir = state_dir
        self.model = DeviceModel(addr=ADDR, region_size=GEOMETRY.region_size, block_size=2 * MIB)
        self.channel = RecordingChannel(self.model)
        self.kernel = kernel if kernel is not None else FakeKernelMemory(MEMORY_BLOCK)
        self.clock = VirtualClock()
        self.tracker: Tracker | None = None
        self.driver: DeviceDriver | None = None

    def open(self, *, start: bool = True, wire: bool = True) -> DeviceDriver:
        """(Re)start the agent: open the tracker, build the driver, start() it."""
        self.tracker = Tracker.open(self.state_dir, TrackerIdentity(NAME, GEOMETRY))
        device = VirtioMemDevice(self.channel, NAME)
        self.driver = DeviceDriver(device, self.tracker, self.kernel, clock=self.clock)
        if start:
            self.driver.start()
        if wire:
            self.model.on_config_change = self.driver.config_changed
        return self.driver

    def crash(self) -> None:
        """The agent dies: the tracker file stays as it was, the lock goes."""
        self.model.on_config_change = None
        assert self.tracker is not None
        self.tracker.close()
        self.tracker = None
        self.driver = None

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def converge(self, max_steps: int = 500) -> list[StepResult]:
        """Step until DONE (or BROKEN), advancing the clock through every WAIT."""
        assert self.driver is not None
        results: list[StepResult] = []
        for _ in range(max_steps):
            result = self.driver.step()
            results.append(result)
            if result.outcome in (Outcome.DONE, Outcome.BROKEN):
                return results
            if result.outcome is Outcome.WAIT:
                self.clock.advance(result.wait_seconds)
        pytest.fail(f"no convergence in {max_steps} steps: last {results[-1]}")

    def tracker_plugged(self) -> set[int]:
        assert self.tracker is not None
        snap = self.tracker.snapshot()
        return {sb for sb in range(GEOMETRY.nr_subblocks) if snap.is_plugged(sb)}

    def plug_behind(self, first: int, count: int) -> None:
        """Plug blocks on the device directly (a previous run did it)."""
        answer = self.model.submit(
            spec.encode_request(RequestType.PLUG, GEOMETRY.subblock_addr(first), count)
        )
        assert answer == spec.encode_response(ResponseType.ACK)

    def online_behind(self, mb: int, zone: Zone = Zone.MOVABLE) -> None:
        """Probe and online a block in the kernel directly (a previous run did it)."""
        self.kernel.probe(mb * MEMORY_BLOCK)
        self.kernel.online(mb, zone)

    def check_consistent(self) -> None:
        """docs/design.md 5.1-5.3: tracker == device == kernel, online only over plugged."""
        assert self.tracker is not None
        snap = self.tracker.snapshot()
        assert self.tracker_plugged() == self.model.plugged_blocks()
        assert snap.intent is None
        for mb in GEOMETRY.memory_blocks():
            record = snap.block(mb)
            online = self.kernel.block(mb).state is KernelBlockState.ONLINE
            assert (record.state is MemoryBlockState.ONLINE) == online, mb
            if online:
                assert all(self.model.is_plugged(sb) for sb in GEOMETRY.subblocks_of(mb)), mb


RigT = TypeVar("RigT", bound="Rig")


def opened(made: RigT) -> Iterator[RigT]:
    """The body of an opened-rig fixture: open the driver, yield the rig, close it."""
    made.open()
    yield made
    made.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def unit(i: int) -> range:
    """Subblocks of the i-th memory block of the region."""
    return range(i * PER_UNIT, (i + 1) * PER_UNIT)


def online_blocks(rig: Rig) -> set[int]:
    return {
        mb
        for mb in GEOMETRY.memory_blocks()
        if rig.kernel.block(mb).state is KernelBlockState.ONLINE
    }


# --- start(): recovery -------------------------------------------------------------


def test_start_with_plugged_memory_and_nothing_online_sends_unplug_all(rig: Rig) -> None:
    rig.model.resize(512 * MIB)
    rig.plug_behind(0, 2 * PER_UNIT)
    rig.kernel.probe(MB0 * MEMORY_BLOCK)  # present but offline: not in use
    rig.open()
    # The ACK is checked: one STATE over the usable region finds nothing plugged.
    assert rig.channel.types() == [RequestType.UNPLUG_ALL, RequestType.STATE]
    assert rig.model.stats[("UNPLUG_ALL", "ACK")] == 1
    assert rig.model.stats[("STATE", "ACK")] == 1
    assert rig.model.plugged_size == 0
    assert rig.tracker_plugged() == set()
    assert rig.tracker is not None
    snap = rig.tracker.snapshot()
    assert snap.intent is None
    assert snap.block(MB0).present
    assert snap.requests == 2
    rig.check_consistent()


def test_start_after_unplug_all_rereads_the_shrunken_usable_region(rig: Rig) -> None:
    # Usable grew to 1 GiB for a 1 GiB request; the host then asked for 128 MiB.
    # UNPLUG_ALL shrinks the usable region to 384 MiB (no config interrupt).
    rig.model.resize(1 * GIB)
    rig.plug_behind(0, PER_UNIT)
    rig.model.resize(128 * MIB)
    assert rig.model.usable_region_size == 1 * GIB
    driver = rig.open()
    assert rig.model.usable_region_size == 384 * MIB
    assert driver.config.usable_region_size == 384 * MIB
    assert driver.config.plugged_size == 0
    assert rig.tracker is not None
    snap = rig.tracker.snapshot()
    assert (snap.usable_region_size, snap.plugged_size) == (384 * MIB, 0)


def test_start_falls_back_to_state_when_unplug_all_is_busy(rig: Rig) -> None:
    rig.model.resize(512 * MIB)
    rig.plug_behind(PER_UNIT, 10)
    rig.model.busy_next = 1
    rig.open()
    types = rig.channel.types()
    assert types[0] is RequestType.UNPLUG_ALL
    assert set(types[1:]) == {RequestType.STATE}
    assert rig.tracker_plugged() == set(range(PER_UNIT, PER_UNIT + 10))
    rig.check_consistent()
    rig.converge()
    assert rig.model.plugged_size == 512 * MIB
    rig.check_consistent()


def test_start_with_online_blocks_rebuilds_the_bitmap_with_state(rig: Rig) -> None:
    rig.model.resize(768 * MIB)
    rig.plug_behind(0, 2 * PER_UNIT)  # units 0 and 1: fully plugged
    rig.plug_behind(2 * PER_UNIT, 20)  # unit 2: partially plugged
    rig.plug_behind(5 * PER_UNIT + 7, 1)  # a stray subblock in unit 5
    rig.online_behind(MB0)
    rig.online_behind(MB0 + 1)
    rig.online_behind(MB0 + 2)  # online over unplugged memory: must go offline
    rig.open()
    types = rig.channel.types()
    assert RequestType.UNPLUG_ALL not in types
    assert RequestType.STATE in types
    assert set(types) == {RequestType.STATE}
    assert rig.tracker_plugged() == rig.model.plugged_blocks()
    assert rig.model.plugged_blocks() == {*unit(0), *unit(1), *range(128, 148), 5 * PER_UNIT + 7}
    assert rig.kernel.block(MB0 + 2).state is KernelBlockState.OFFLINE
    assert online_blocks(rig) == {MB0, MB0 + 1}
    assert rig.tracker is not None
    snap = rig.tracker.snapshot()
    assert snap.block(MB0).state is MemoryBlockState.ONLINE
    assert snap.block(MB0 + 2).state is MemoryBlockState.PARTIAL
    assert snap.block(MB0 + 5).state is MemoryBlockState.PARTIAL
    rig.check_consistent()
    rig.converge()
    assert rig.model.plugged_size == 768 * MIB
    assert online_blocks(rig) == {MB0 + i for i in range(6)}
    rig.check_consistent()


def test_start_refuses_to_go_on_when_an_unbacked_block_cannot_be_offlined(rig: Rig) -> None:
    rig.model.resize(256 * MIB)
    rig.plug_behind(0, PER_UNIT)
    rig.plug_behind(PER_UNIT, 3)
    rig.online_behind(MB0)
    rig.online_behind(MB0 + 1)  # over 61 unplugged subblocks
    rig.kernel.refuse_offline.add(MB0 + 1)
    with pytest.raises(SafetyError, match="memory33"):
        rig.open()


def test_pending_intent_of_an_acked_plug_is_resolved_by_state(rig: Rig) -> None:
    rig.model.resize(128 * MIB)
    rig.open()
    rig.converge()
    assert online_blocks(rig) == {MB0}
    # The agent writes the intent, the device ACKs, the agent dies before recording.
    rig.model.resize(256 * MIB)
    assert rig.tracker is not None
    rig.tracker.set_intent(RequestType.PLUG, GEOMETRY.subblock_addr(PER_UNIT), PER_UNIT)
    rig.plug_behind(PER_UNIT, PER_UNIT)
    rig.crash()
    rig.channel.sent.clear()
    driver = rig.open(start=False)
    assert rig.tracker is not None
    assert rig.tracker.recovered
    assert rig.tracker.snapshot().intent == Intent(
        RequestType.PLUG, GEOMETRY.subblock_addr(PER_UNIT), PER_UNIT
    )
    driver.start()
    assert rig.tracker.snapshot().intent is None
    assert RequestType.STATE in rig.channel.types()
    assert rig.tracker_plugged() == {*unit(0), *unit(1)}
    rig.check_consistent()
    results = rig.converge()
    # Nothing is plugged twice: the recovered unit is only onlined.
    assert RequestType.PLUG not in rig.channel.types()
    assert [r.step for r in results[:-1]] == [planner.OnlineStep(MB0 + 1, Zone.MOVABLE)]
    rig.check_consistent()


def test_pending_intent_on_an_empty_device_is_cleared_without_requests(rig: Rig) -> None:
    # The very first PLUG: intent written, then the agent died before sending it.
    rig.model.resize(256 * MIB)
    rig.open()
    assert rig.tracker is not None
    rig.tracker.set_intent(RequestType.PLUG, ADDR, 2 * PER_UNIT)
    rig.crash()
    rig.channel.sent.clear()
    rig.open()
    assert rig.channel.sent == []  # nothing plugged, nothing online: nothing to ask
    assert rig.tracker is not None
    assert rig.tracker.snapshot().intent is None
    rig.converge()
    rig.check_consistent()


def test_pending_intent_of_a_plug_never_sent_is_resolved(rig: Rig) -> None:
    rig.model.resize(256 * MIB)
    rig.open()
    rig.converge()
    rig.model.resize(384 * MIB)
    assert rig.tracker is not None
    rig.tracker.set_intent(RequestType.PLUG, GEOMETRY.subblock_addr(2 * PER_UNIT), PER_UNIT)
    rig.crash()
    rig.open()
    assert rig.tracker is not None
    assert rig.tracker.snapshot().intent is None
    assert rig.tracker_plugged() == {*unit(0), *unit(1)}
    rig.converge()
    assert rig.model.plugged_blocks() == {*unit(0), *unit(1), *unit(2)}
    rig.check_consistent()


# --- responses ---------------------------------------------------------------------


def test_nack_rereads_the_config_and_replans(rig: Rig) -> None:
    rig.model.resize(512 * MIB)
    driver = rig.open(wire=False)  # the config interrupt arrives late (never, here)

    def host_shrinks_first(sent: Sent) -> None:
        if sent.type is RequestType.PLUG and rig.model.requested_size == 512 * MIB:
            rig.model.resize(128 * MIB)

    rig.channel.before_submit = host_shrinks_first
    result = driver.step()
    assert result.step == planner.PlugStep(ADDR, 4 * PER_UNIT)
    assert (result.outcome, result.detail) == (Outcome.PROGRESS, "NACK")
    assert rig.model.stats[("PLUG", "NACK")] == 1
    assert driver.config.requested_size == 128 * MIB
    assert rig.tracker is not None
    assert rig.tracker.snapshot().requested_size == 128 * MIB
    assert rig.tracker_plugged() == set()
    result = driver.step()
    assert result.step == planner.PlugStep(ADDR, PER_UNIT)
    assert result.outcome is Outcome.PROGRESS
    rig.converge()
    assert rig.model.plugged_size == 128 * MIB
    assert rig.model.stats[("PLUG", "NACK")] == 1
    rig.check_consistent()


def test_repeated_nacks_back_off(rig: Rig) -> None:
    rig.model.resize(256 * MIB)
    driver = rig.open()
    nack = spec.encode_response(ResponseType.NACK)
    rig.channel.before_submit = lambda sent: nack if sent.type is RequestType.PLUG else None
    for _ in range(MAX_NACKS_BEFORE_BACKOFF):
        result = driver.step()
        assert (result.outcome, result.detail) == (Outcome.PROGRESS, "NACK")
    result = driver.step()
    assert (result.outcome, result.detail) == (Outcome.WAIT, "NACK")
    assert result.wait_seconds == INITIAL_BACKOFF
    assert rig.tracker_plugged() == set()


def test_busy_waits_with_growing_backoff_reset_on_success(rig: Rig) -> None:
    rig.model.resize(256 * MIB)
    driver = rig.open()
    rig.model.busy_next = 3
    waits = []
    for _ in range(3):
        result = driver.step()
        assert (result.outcome, result.detail) == (Outcome.WAIT, "BUSY")
        waits.append(result.wait_seconds)
        # Stepping early sends nothing and says how long is left.
        sent = len(rig.channel.sent)
        early = driver.step()
        assert early.outcome is Outcome.WAIT
        assert early.wait_seconds == pytest.approx(result.wait_seconds)
        assert len(rig.channel.sent) == sent
        rig.clock.advance(result.wait_seconds)
    assert waits == [INITIAL_BACKOFF, 2 * INITIAL_BACKOFF, 4 * INITIAL_BACKOFF]
    result = driver.step()
    assert result.outcome is Outcome.PROGRESS
    assert result.step == planner.PlugStep(ADDR, 2 * PER_UNIT)
    assert driver.backoff.delay == 0  # the ACK itself reset it
    assert rig.model.stats[("PLUG", "BUSY")] == 3
    assert rig.tracker is not None
    assert rig.tracker.snapshot().retries == 3
    rig.converge()
    # The success reset the backoff: the next BUSY waits the initial delay again.
    rig.model.busy_next = 1
    rig.model.resize(384 * MIB)
    result = driver.step()
    assert (result.outcome, result.wait_seconds) == (Outcome.WAIT, INITIAL_BACKOFF)


def test_config_change_cuts_the_backoff_short(rig: Rig) -> None:
    rig.model.resize(256 * MIB)
    driver = rig.open()
    rig.model.busy_next = 2
    result = driver.step()
    assert (result.outcome, result.wait_seconds) == (Outcome.WAIT, INITIAL_BACKOFF)
    rig.clock.advance(result.wait_seconds)
    result = driver.step()
    assert (result.outcome, result.wait_seconds) == (Outcome.WAIT, 2 * INITIAL_BACKOFF)
    now = rig.clock.now
    sent = len(rig.channel.sent)
    assert driver.step().outcome is Outcome.WAIT
    assert len(rig.channel.sent) == sent
    rig.model.resize(384 * MIB)  # config interrupt -> driver.config_changed()
    result = driver.step()
    assert (result.outcome, result.step) == (Outcome.PROGRESS, planner.PlugStep(ADDR, 3 * PER_UNIT))
    assert len(rig.channel.sent) == sent + 1
    assert rig.clock.now == now
    rig.converge()
    assert rig.model.plugged_size == 384 * MIB
    rig.check_consistent()


def test_error_marks_the_device_broken_and_stops_all_requests(rig: Rig) -> None:
    rig.model.resize(256 * MIB)
    driver = rig.open()
    rig.converge()
    # One subblock of unit 1 unplugged behind the driver's back (a device that lost
    # state, or a driver bug): the UNPLUG of unit 1 covers it, and QEMU answers ERROR.
    answer = rig.model.submit(
        spec.encode_request(RequestType.UNPLUG, GEOMETRY.subblock_addr(PER_UNIT + 5), 1)
    )
    assert answer == spec.encode_response(ResponseType.ACK)
    rig.model.resize(128 * MIB)
    assert driver.step().step == planner.OfflineStep(MB0 + 1)
    result = driver.step()
    assert result.step == planner.UnplugStep(GEOMETRY.subblock_addr(PER_UNIT), PER_UNIT)
    assert result.outcome is Outcome.BROKEN
    assert rig.model.stats[("UNPLUG", "ERROR")] == 1
    assert rig.tracker is not None
    snap = rig.tracker.snapshot()
    assert snap.broken
    # The whole reason fits the tracker's 39 bytes: cause, address, size.
    assert snap.broken_reason == "UNPLUG answered ERROR: 0x108000000 x64"
    assert result.detail == snap.broken_reason
    sent = len(rig.channel.sent)
    probes = list(rig.kernel.probes)
    rig.model.resize(512 * MIB)  # a config change does not revive it
    for _ in range(3):
        again = driver.step()
        assert again.outcome is Outcome.BROKEN
        assert again.detail == result.detail
    assert len(rig.channel.sent) == sent
    assert rig.kernel.probes == probes
    assert rig.kernel.block(MB0).state is KernelBlockState.ONLINE


def test_refused_offline_avoids_the_block_and_offlines_another(rig: Rig) -> None:
    rig.model.resize(512 * MIB)
    driver = rig.open()
    rig.converge()
    assert online_blocks(rig) == {MB0 + i for i in range(4)}
    rig.kernel.refuse_offline.add(MB0 + 3)
    rig.model.resize(384 * MIB)
    result = driver.step()
    assert result.step == planner.OfflineStep(MB0 + 3)
    assert result.outcome is Outcome.PROGRESS
    assert "memory35" in result.detail
    assert rig.kernel.offline_refusals == 1
    assert MB0 + 3 in driver.refused_blocks
    results = rig.converge()
    steps = [r.step for r in results]
    assert steps[0] == planner.OfflineStep(MB0 + 2)
    assert steps[1] == planner.UnplugStep(GEOMETRY.subblock_addr(2 * PER_UNIT), PER_UNIT)
    assert results[-1].outcome is Outcome.DONE
    assert online_blocks(rig) == {MB0, MB0 + 1, MB0 + 3}
    assert rig.model.plugged_blocks() == {*unit(0), *unit(1), *unit(3)}
    assert rig.kernel.offline_refusals == 1
    assert rig.tracker is not None
    assert rig.tracker.snapshot().retries == 1
    rig.check_consistent()


def test_refused_offlines_everywhere_wait_each_block_doubling_per_its_own_refusal(
    rig: Rig,
) -> None:
    rig.model.resize(256 * MIB)
    driver = rig.open()
    rig.converge()
    rig.kernel.refuse_offline.update({MB0, MB0 + 1})
    rig.model.resize(0)
    policy = driver.refused_blocks.policy
    refused: dict[int, int] = {}
    waits = 0
    for _ in range(60):
        result = driver.step()
        if result.outcome is Outcome.WAIT:
            # Nothing else to try: wait for the first block to come off the avoid list.
            assert result.step == planner.Done(0, 0, blocked=True)
            earliest = driver.refused_blocks.earliest()
            assert earliest is not None
            assert rig.clock.now + result.wait_seconds == pytest.approx(earliest)
            waits += 1
            rig.clock.advance(result.wait_seconds)
            continue
        assert result.outcome is Outcome.PROGRESS
        assert isinstance(result.step, planner.OfflineStep)
        mb = result.step.memory_block
        refused[mb] = refused.get(mb, 0) + 1
        # Each block's window doubles with its own refusals, not with the other's.
        window = driver.refused_blocks.until[mb] - rig.clock.now
        assert window == pytest.approx(policy.delay(refused[mb]))
    assert waits >= 10
    assert set(refused) == {MB0, MB0 + 1}
    assert abs(refused[MB0] - refused[MB0 + 1]) <= 1
    assert rig.model.plugged_size == 256 * MIB
    # Once the kernel lets go, the driver gets there.
    rig.kernel.refuse_offline.clear()
    rig.converge()
    assert rig.model.plugged_size == 0
    assert not driver.refused_blocks.in_a_row
    rig.check_consistent()


class SlowRefusingKernel(FakeKernelMemory):
    """A kernel whose refused offlines each take ``cost`` seconds (a migration
    deadline), counted on the rig's virtual clock."""

    def __init__(self, clock: VirtualClock, cost: float) -> None:
        super().__init__(MEMORY_BLOCK)
        self.clock = clock
        self.cost = cost
        self.attempts: list[int] = []

    def offline(self, index: int) -> None:
        self.attempts.append(index)
        if index in self.refuse_offline:
            self.clock.advance(self.cost)
        super().offline(index)


def test_a_slow_refused_offline_waits_its_cost_and_what_is_offline_goes_back_first(
    tmp_path: Path,
) -> None:
    clock = VirtualClock()
    # An offline that takes 8 s to be refused (past the 5 s first window).
    kernel = SlowRefusingKernel(clock, cost=8.0)
    rig = Rig(tmp_path, kernel)
    rig.clock = clock
    rig.model.resize(512 * MIB)
    driver = rig.open()
    rig.converge()
    kernel.refuse_offline.add(MB0 + 3)
    rig.model.resize(0)
    assert driver.step().step == planner.OfflineStep(MB0 + 3)
    # Avoided for twice what the refusal cost, not the first window of a cheap one.
    until = driver.refused_blocks.until[MB0 + 3]
    assert driver.refused_blocks.policy.initial < 16.0
    assert until - clock.now == pytest.approx(16.0)
    assert driver.step().step == planner.OfflineStep(MB0 + 2)
    # A success elsewhere does not shorten the window ...
    assert driver.refused_blocks.until[MB0 + 3] == until
    # ... and with the kernel refusing, what is offline goes back before the next offline.
    unplug = driver.step()
    assert unplug.step == planner.UnplugStep(GEOMETRY.subblock_addr(2 * PER_UNIT), PER_UNIT)
    assert unplug.outcome is Outcome.PROGRESS
    assert kernel.attempts == [MB0 + 3, MB0 + 2]
    while (result := driver.step()).outcome is Outcome.PROGRESS:
        pass
    # Everything else went within the refused block's window: it was tried once.
    assert result.outcome is Outcome.WAIT
    assert result.step == planner.Done(0, 0, blocked=True)
    assert rig.model.plugged_blocks() == set(unit(3))
    assert kernel.attempts.count(MB0 + 3) == 1
    rig.check_consistent()


def test_auto_online_kernel_is_recorded_without_writing_online(tmp_path: Path) -> None:
    class CountingKernel(FakeKernelMemory):
        def __init__(self) -> None:
            super().__init__(MEMORY_BLOCK, auto_online="online")
            self.online_calls: list[int] = []

        def online(self, index: int, zone: Zone) -> None:
            self.online_calls.append(index)
            super().online(index, zone)

    kernel = CountingKernel()
    rig = Rig(tmp_path, kernel)
    try:
        rig.model.resize(256 * MIB)
        rig.open()
        results = rig.converge()
        assert [r.step for r in results if isinstance(r.step, planner.OnlineStep)] == [
            planner.OnlineStep(MB0, Zone.MOVABLE),
            planner.OnlineStep(MB0 + 1, Zone.MOVABLE),
        ]
        assert all(r.detail == "" for r in results)
        assert kernel.online_calls == []
        assert kernel.probes == [MB0 * MEMORY_BLOCK, (MB0 + 1) * MEMORY_BLOCK]
        assert rig.tracker is not None
        snap = rig.tracker.snapshot()
        assert snap.block(MB0).state is MemoryBlockState.ONLINE
        assert snap.block(MB0).zone is Zone.MOVABLE
        assert snap.retries == 0
        rig.check_consistent()
    finally:
        rig.close()


def test_online_of_a_block_not_fully_plugged_is_a_safety_error(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.model.resize(256 * MIB)
    driver = rig.open()
    driver.manual_request(
        RequestType.PLUG, GEOMETRY.subblock_addr(PER_UNIT), PER_UNIT // 2, lambda _s: None
    )
    assert rig.tracker is not None
    assert rig.tracker.snapshot().block(MB0 + 1).state is MemoryBlockState.PARTIAL

    def bad_plan(inp: planner.PlanInput) -> planner.Step:
        return planner.OnlineStep(MB0 + 1, Zone.MOVABLE)

    monkeypatch.setattr(planner, "next_step", bad_plan)
    result = driver.step()
    # The safety check stops the device: marked broken once, in the tracker.
    assert result.outcome is Outcome.BROKEN
    assert "memory33 is not fully plugged" in result.detail
    assert driver.broken_reason is not None
    assert rig.tracker.snapshot().broken
    assert driver.step().outcome is Outcome.BROKEN  # and it stays so
    assert rig.kernel.probes == []
    assert rig.kernel.block(MB0 + 1).state is KernelBlockState.ABSENT
    # An unplugged block is refused too (on a device found sound again at a restart).
    driver.start()
    assert driver.broken_reason is None
    monkeypatch.setattr(planner, "next_step", lambda inp: planner.OnlineStep(MB0 + 2, Zone.KERNEL))
    result = driver.step()
    assert result.outcome is Outcome.BROKEN
    assert "memory34" in result.detail
    assert rig.kernel.probes == []


def test_sim_sized_resizes_converge_and_stay_consistent(rig: Rig) -> None:
    driver = rig.open()
    for requested, plugged in [
        (1 * GIB, 1 * GIB),
        (1000 * MIB, 896 * MIB),
        (130 * MIB, 128 * MIB),
        (0, 0),
    ]:
        rig.model.resize(requested)
        results = rig.converge()
        assert results[-1].outcome is Outcome.DONE
        assert rig.model.plugged_size == plugged
        assert len(online_blocks(rig)) * MEMORY_BLOCK == plugged
        assert driver.last_done is not None
        assert driver.last_done.remainder_bytes == requested - plugged
        rig.check_consistent()


def test_nack_with_plugged_memory_unknown_to_the_tracker_resyncs(rig: Rig) -> None:
    """Blocks plugged behind the driver's back would make every PLUG NACK forever."""
    driver = rig.open()
    rig.model.resize(512 * MIB)
    rig.plug_behind(5 * PER_UNIT, PER_UNIT)  # 128 MiB the tracker knows nothing of
    rig.converge()
    assert rig.model.plugged_size == 512 * MIB
    assert rig.tracker_plugged() == rig.model.plugged_blocks()
    assert RequestType.STATE in rig.channel.types()  # learnt with STATE, not guessed
    assert driver.nacks_in_a_row == 0
    rig.check_consistent()


def test_block_the_tracker_believes_present_but_absent_is_probed(rig: Rig) -> None:
    """After a guest reboot with a stale tracker, 'present' is a hint, not the truth."""
    driver = rig.open()
    rig.model.resize(128 * MIB)
    rig.converge()
    assert rig.kernel.block(MB0).state is KernelBlockState.ONLINE
    rig.kernel.blocks.clear()  # the kernel lost the block; the tracker still says present
    assert rig.tracker is not None
    rig.tracker.record_offline(MB0)
    driver._online_block(MB0, Zone.MOVABLE)
    assert rig.kernel.block(MB0).state is KernelBlockState.ONLINE
    assert rig.kernel.probes.count(MB0 * MEMORY_BLOCK) == 2
    assert rig.tracker.block(MB0).state is MemoryBlockState.ONLINE


def test_a_device_whose_region_changes_is_not_trusted(rig: Rig) -> None:
    """addr/region_size/block_size change only at system reset (spec 5.15.4)."""
    driver = rig.open()
    cfg = spec.VirtioMemConfig.from_buffer_copy(rig.model.read_config())
    cfg.block_size = 4 * MIB  # still valid on its own: a power of two, sizes multiples
    rig.channel.read_config = lambda: bytes(cfg)  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match="region changed"):
        driver.config_changed()
    assert rig.channel.sent == []  # nothing was sent on the strength of it


def test_a_usable_region_that_drops_plugged_blocks_is_not_trusted(rig: Rig) -> None:
    """The usable region shrinks only when nothing is plugged (spec 5.15.4).

    The config below passes validate() (plugged_size <= usable_region_size),
    yet its usable region ends before the last block the driver was ACKed.
    """
    driver = rig.open()
    rig.model.resize(256 * MIB)
    rig.converge()
    rig.channel.sent.clear()
    cfg = spec.VirtioMemConfig.from_buffer_copy(rig.model.read_config())
    cfg.usable_region_size = 254 * MIB  # drops the last plugged block
    cfg.plugged_size = cfg.requested_size = 254 * MIB
    rig.channel.read_config = lambda: bytes(cfg)  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match="shrank below plugged blocks"):
        driver.config_changed()
    assert rig.channel.sent == []


def test_start_accepts_a_usable_region_shrunk_by_an_unplug_all_it_did_not_record(
    rig: Rig,
) -> None:
    """A crash after an ACKed UNPLUG_ALL leaves the tracker believing in plugged blocks."""
    rig.open()
    rig.model.resize(256 * MIB)
    rig.converge()
    for mb in range(MB0, MB0 + 2):
        rig.kernel.offline(mb)
    rig.crash()
    rig.model.resize(0)
    rig.model.submit(spec.encode_request(RequestType.UNPLUG_ALL, 0, 0))  # ACKed, unrecorded
    assert rig.model.usable_region_size == 0
    rig.open()  # the stale bitmap must not make start() refuse the device
    assert rig.tracker_plugged() == set()


class CallLog(FakeKernelMemory):
    """A fake kernel that logs the calls the driver makes on it, by name (the
    fake's calls to itself are not logged)."""

    def __init__(self, auto_online: str) -> None:
        super().__init__(MEMORY_BLOCK, auto_online=auto_online)
        self.calls: list[str] = []
        self._depth = 0

    def _logged(self, name: str, call: Callable[[], T]) -> T:
        if not self._depth:
            self.calls.append(name)
        self._depth += 1
        try:
            return call()
        finally:
            self._depth -= 1

    def block(self, index: int) -> KernelBlock:
        return self._logged("block", lambda: super(CallLog, self).block(index))

    def state(self, index: int) -> KernelBlockState:
        return self._logged("state", lambda: super(CallLog, self).state(index))

    def probe(self, phys_addr: int) -> bool:
        return self._logged("probe", lambda: super(CallLog, self).probe(phys_addr))

    def online(self, index: int, zone: Zone) -> None:
        self._logged("online", lambda: super(CallLog, self).online(index, zone))

    def offline(self, index: int) -> None:
        self._logged("offline", lambda: super(CallLog, self).offline(index))

    def auto_online_blocks(self) -> str:
        return self._logged("auto_online_blocks", super().auto_online_blocks)

    def node(self, index: int) -> int:
        # SysfsMemory reads a block's node once, then caches it.
        return self._logged("node", lambda: super(CallLog, self).node(index))


@pytest.mark.parametrize(
    ("auto_online", "per_block"),
    [
        # Added offline: the probe's success says so; one write onlines it.
        ("offline", ["probe", "online", "node"]),
        # Onlined inside the probe: one read of memoryN/state tells whether it worked.
        ("online_movable", ["probe", "state", "node"]),
    ],
)
def test_a_new_block_costs_the_fewest_sysfs_calls(
    tmp_path: Path, auto_online: str, per_block: list[str]
) -> None:
    kernel = CallLog(auto_online)
    rig = Rig(tmp_path, kernel)
    try:
        rig.model.resize(256 * MIB)
        rig.open()
        kernel.calls.clear()
        rig.converge()
        # One PLUG request for both blocks, so auto_online_blocks is read once.
        assert kernel.calls == ["probe", "auto_online_blocks", *per_block[1:], *per_block]
        rig.check_consistent()
    finally:
        rig.close()


def test_a_present_block_is_onlined_with_one_write(tmp_path: Path) -> None:
    kernel = CallLog("offline")
    rig = Rig(tmp_path, kernel)
    try:
        rig.model.resize(256 * MIB)
        rig.open()
        rig.converge()
        rig.model.resize(0)
        rig.converge()
        kernel.calls.clear()
        rig.model.resize(256 * MIB)
        rig.converge()
        assert kernel.calls == ["online", "node", "online", "node"]
        rig.check_consistent()
    finally:
        rig.close()


def plug_one_new_block(rig: Rig, kernel: CallLog) -> None:
    """Start the driver, then plug and online one new memory block, with only that
    logged in ``kernel.calls``."""
    rig.model.resize(128 * MIB)
    rig.open()
    kernel.calls.clear()
    rig.converge()


def test_a_block_auto_onlining_failed_for_is_onlined_by_the_driver(tmp_path: Path) -> None:
    class FailingAutoOnline(CallLog):
        def probe(self, phys_addr: int) -> bool:
            added = super().probe(phys_addr)
            index = phys_addr // MEMORY_BLOCK
            self.blocks[index] = KernelBlock(index, KernelBlockState.OFFLINE, Zone.NONE, 0)
            return added

    kernel = FailingAutoOnline("online_movable")
    rig = Rig(tmp_path, kernel)
    try:
        plug_one_new_block(rig, kernel)
        assert kernel.calls == ["probe", "auto_online_blocks", "state", "online", "node"]
        assert kernel.block(MB0).state is KernelBlockState.ONLINE
        rig.check_consistent()
    finally:
        rig.close()


def test_a_block_auto_onlined_to_the_kernel_zone_is_onlined_again_as_movable(
    tmp_path: Path,
) -> None:
    """auto_online_blocks=online puts new memory in ZONE_NORMAL (Debian's 6.12): the
    driver takes the still-free block back and onlines it into the policy's zone."""
    kernel = CallLog("online_kernel")
    rig = Rig(tmp_path, kernel)
    try:
        plug_one_new_block(rig, kernel)
        assert kernel.calls == [
            *("probe", "auto_online_blocks", "state"),
            *("offline", "online", "node"),  # taken back, onlined movable
        ]
        assert kernel.block(MB0).zone is Zone.MOVABLE
        assert rig.tracker is not None and rig.tracker.block(MB0).zone is Zone.MOVABLE
        rig.check_consistent()
    finally:
        rig.close()


def test_an_auto_onlined_block_the_kernel_keeps_stays_in_its_zone(tmp_path: Path) -> None:
    kernel = FakeKernelMemory(MEMORY_BLOCK, auto_online="online_kernel")
    kernel.refuse_offline.add(MB0)
    rig = Rig(tmp_path, kernel)
    try:
        rig.model.resize(128 * MIB)
        rig.open()
        rig.converge()
        assert kernel.block(MB0).zone is Zone.KERNEL
        assert rig.tracker is not None and rig.tracker.block(MB0).zone is Zone.KERNEL
        assert rig.tracker.block(MB0).state is MemoryBlockState.ONLINE
        rig.check_consistent()
    finally:
        rig.close()
