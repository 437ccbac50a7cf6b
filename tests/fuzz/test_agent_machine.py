"""Fuzz the driver core against the device model: resizes, faults, crashes, reboots.

A hypothesis state machine plays the host (resizes of any size, misaligned
ones too, and shrinks that race a PLUG in flight), the device (every profile
of sim/profiles.py: QEMU, Cloud Hypervisor, Firecracker, StratoVirt; BUSY
answers where the profile has them; device resets), the kernel (refused
offlines; probes, onlines, offlines, soft offlines and unpoisons refused with
ENOMEM or EBUSY; pages it will not give up, pinned or unmovable; soft offlines
that lose races or migrate into the same subblock) and fate (killing the agent
between any two
actions, including between writing the intent and getting the response,
between plug and online, between two page writes of a take or give-back,
between poisoning and UNPLUG and between PLUG and unpoison; rebooting the
guest). After every rule the safety invariants of docs/design.md section 5
hold; at the end, with faults lifted, the driver converges in a bounded number
of steps to exactly what the guest can use. A device whose reset forgets its
blocks (StratoVirt) is refused at the agent's next start, with the reason; no
other profile may be refused or marked broken (docs/design.md, "What the agent
assumes of a device").
"""

from __future__ import annotations

import errno
import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from vmem_guest import planner
from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.device import VirtioMemDevice
from vmem_guest.driver import DeviceDriver, Outcome
from vmem_guest.errors import VmemError
from vmem_guest.hotplug import KernelBlockState
from vmem_guest.sim.device_model import DeviceModel
from vmem_guest.sim.kernel import BLOCK_OPS, FakeKernelMemory, KernelOp
from vmem_guest.sim.pages import PAGE_OPS, FakePages
from vmem_guest.sim.profiles import PROFILES, DeviceProfile
from vmem_guest.sim.runner import VirtualClock
from vmem_guest.spec import RequestType
from vmem_guest.tracker import Tracker, TrackerIdentity, state_disagreement, state_of

MIB = 1 << 20
REGION_ADDR = 4 << 30
MEMORY_BLOCK = 128 * MIB
PAGE = 4096
#: (region size, device block size): Sub Block Mode and Big Block Mode.
GEOMETRIES = [(1024 * MIB, 2 * MIB), (1024 * MIB, 4 * MIB), (2048 * MIB, 256 * MIB)]
#: How the kernel refuses a memory operation it may grant later.
REFUSALS = [errno.ENOMEM, errno.EBUSY]
#: The share of its calls a flaky operation refuses.
FLAKY_RATE = 0.3
#: With faults lifted, convergence from any state must take fewer steps than this.
CONVERGENCE_STEP_BOUND = 2000


class Crash(BaseException):
    """The agent process dies here (BaseException: nothing in the driver catches it)."""


class FaultyChannel:
    """The device channel, able to kill the agent just before or just after a request,
    and to let the host shrink ``requested_size`` while the next PLUG is in flight (the
    config interrupt then arrives after the answer: :attr:`interrupt_pending`)."""

    def __init__(self, model: DeviceModel) -> None:
        self.model = model
        self.crash_before = False
        self.crash_after = False
        #: A requested_size the host sets after the next request left the driver.
        self.resize_in_flight: int | None = None
        self.interrupt_pending = False

    def read_config(self) -> bytes:
        return self.model.read_config()

    def submit(self, request: bytes) -> bytes:
        if self.crash_before:
            self.crash_before = False
            raise Crash("killed after the intent was written, before the request")
        if self.resize_in_flight is not None and request[0] == RequestType.PLUG:
            size, self.resize_in_flight = self.resize_in_flight, None
            notify, self.model.on_config_change = self.model.on_config_change, None
            try:
                self.model.resize(size)
                self.interrupt_pending = notify is not None
            except ValueError:
                pass
            finally:
                self.model.on_config_change = notify
        response = self.model.submit(request)
        if self.crash_after:
            self.crash_after = False
            raise Crash("killed after the device answered, before the tracker knew")
        return response


class CheckedKernel(FakeKernelMemory):
    """A fake kernel that checks invariant 5.5 at every probe and online, and can crash."""

    def __init__(self, model: DeviceModel, geometry: Geometry) -> None:
        super().__init__(geometry.memory_block_size)
        self.model = model
        self.geometry = geometry
        self.crash_after_change = False
        #: Linux 6.2 and later: a block holding poisoned pages cannot be onlined.
        self.poisoned_blocks_refuse_online: FakePages | None = None

    def _assert_backed(self, mb: int) -> None:
        unplugged = [sb for sb in self.geometry.subblocks_of(mb) if not self.model.is_plugged(sb)]
        assert not unplugged, f"memory{mb} added/onlined over unplugged blocks {unplugged[:4]}"

    def _maybe_crash(self) -> None:
        if self.crash_after_change:
            self.crash_after_change = False
            raise Crash("killed after a sysfs write, before the tracker knew")

    def probe(self, phys_addr: int) -> bool:
        self._assert_backed(phys_addr // self.memory_block_size)
        added = super().probe(phys_addr)
        self._maybe_crash()
        return added

    def online(self, index: int, zone: Zone) -> None:
        self._assert_backed(index)
        pages = self.poisoned_blocks_refuse_online
        if pages is not None:
            first = index * self.memory_block_size // PAGE
            count = self.memory_block_size // PAGE
            poisoned = any(pages.is_poisoned(pfn) for pfn in range(first, first + count))
            assert not poisoned, f"memory{index} onlined with poisoned pages (-EHWPOISON on 6.2+)"
        super().online(index, zone)
        self._maybe_crash()

    def offline(self, index: int) -> None:
        super().offline(index)
        self._maybe_crash()


class CheckedPages(FakePages):
    """Fake pages that can kill the agent after the next page write (soft offline
    or unpoison): inside a take or a give-back."""

    def __init__(self, kernel: FakeKernelMemory, seed: int) -> None:
        def online(pfn: int) -> bool:
            block = pfn * PAGE // kernel.memory_block_size
            return kernel.state(block) is KernelBlockState.ONLINE

        super().__init__(
            rng=random.Random(seed),
            page_size=PAGE,
            online=online,
        )
        kernel.on_online = lambda addr, size: self.block_onlined(addr // PAGE, size // PAGE)
        self.crash_after_writes: int | None = None

    def _count_write(self) -> None:
        if self.crash_after_writes is None:
            return
        self.crash_after_writes -= 1
        if self.crash_after_writes <= 0:
            self.crash_after_writes = None
            raise Crash("killed between two page writes")

    def soft_offline(self, pfn: int) -> None:
        super().soft_offline(pfn)
        self._count_write()

    def unpoison(self, pfn: int) -> None:
        super().unpoison(pfn)
        self._count_write()


class AgentMachine(RuleBasedStateMachine):
    """Host, device, kernel and fate against one driver."""

    def __init__(self) -> None:
        super().__init__()
        self.state_dir = Path(tempfile.mkdtemp(prefix="vmem-fuzz-"))
        self.driver: DeviceDriver | None = None
        self.tracker: Tracker | None = None
        #: Why the agent refused the device at its last start (None: it did not).
        self.refused: str | None = None

    @initialize(
        which_geometry=st.integers(0, len(GEOMETRIES) - 1),
        profile_name=st.sampled_from(sorted(PROFILES)),
        seed=st.integers(0, 2**16),
        refuses_poisoned_online=st.booleans(),  # Linux 6.2 and later, or before
        plugged=st.floats(0, 1),
        flaky=st.sampled_from([None, *sorted(KernelOp, key=str)]),
        err=st.sampled_from(REFUSALS),
    )
    def boot(
        self,
        which_geometry: int,
        profile_name: str,
        seed: int,
        refuses_poisoned_online: bool,
        plugged: float,
        flaky: KernelOp | None,
        err: int,
    ) -> None:
        """A guest that already runs the agent with ``plugged`` of its region in use, so
        that the rules that follow shrink (offlines, takes) as often as they grow; and
        a kernel that refuses a third of its ``flaky`` operation's calls with ``err``
        (until the refusals are lifted), so that each operation is refused where it
        happens, not only where a refusal rule happened to come first. The device is
        of any profile, on a geometry its block sizes allow (Cloud Hypervisor: 2 MiB
        blocks only)."""
        self.profile: DeviceProfile = PROFILES[profile_name]
        accepted = [g for g in GEOMETRIES if self.profile.accepts_block_size(g[1])]
        region_size, block_size = accepted[which_geometry % len(accepted)]
        self.geometry = Geometry(REGION_ADDR, region_size, block_size, MEMORY_BLOCK)
        self.model = self.profile.model(
            addr=REGION_ADDR, region_size=region_size, block_size=block_size
        )
        self.channel = FaultyChannel(self.model)
        self.kernel = CheckedKernel(self.model, self.geometry)
        self.refuses_poisoned_online = refuses_poisoned_online
        self.new_pages(seed)
        self.clock = VirtualClock()
        self.start_agent()
        if flaky in BLOCK_OPS:
            self.kernel.refuse(flaky, err, rate=FLAKY_RATE)
        elif flaky is not None:
            self.pages.refuse(flaky, err, rate=FLAKY_RATE)
        self.host_resize(plugged, misalign=False)
        self.run_steps(CONVERGENCE_STEP_BOUND)

    def new_pages(self, seed: int) -> None:
        """A boot's pages; on the 6.2+ kind the kernel refuses to online a block
        holding poisoned ones (its per-block hwpoison counter)."""
        self.pages = CheckedPages(self.kernel, seed)
        if self.refuses_poisoned_online:
            self.kernel.poisoned_blocks_refuse_online = self.pages

    # --- agent lifecycle ------------------------------------------------------

    def start_agent(self) -> None:
        """Start (or restart) the agent; a crash armed for start-up kills it there too.

        A refusal (a VmemError out of ``start``, as ``attach`` would pass it on) is
        recorded in :attr:`refused`: allowed only for a device whose reset forgot
        its blocks, and then it must say so."""
        identity = TrackerIdentity("fuzz0", self.geometry)
        while True:
            self.tracker = Tracker.open(self.state_dir, identity)
            device = VirtioMemDevice(self.channel, "fuzz0")
            driver = DeviceDriver(
                device, self.tracker, self.kernel, clock=self.clock, pages=self.pages
            )
            try:
                driver.start()
            except Crash:
                self.kill_agent()
                continue
            except VmemError as exc:
                self.kill_agent()
                assert self.profile.rules.reset_forgets_blocks, f"refused: {exc.message}"
                assert "plugged" in exc.message and "STATE" in exc.message, exc.message
                self.refused = exc.message
                return
            self.model.on_config_change = driver.config_changed
            self.driver = driver
            return

    def kill_agent(self) -> None:
        if hasattr(self, "model"):
            self.model.on_config_change = None
        if self.tracker is not None:
            self.tracker.close()
        self.tracker = None
        self.driver = None

    def deliver_late_interrupt(self) -> None:
        """The config interrupt of a resize that raced the last request."""
        if self.channel.interrupt_pending and self.driver is not None:
            self.channel.interrupt_pending = False
            self.driver.config_changed()

    def run_steps(self, count: int) -> None:
        if self.refused is not None:
            return
        assert self.driver is not None
        for _ in range(count):
            try:
                result = self.driver.step()
            except Crash:
                self.kill_agent()
                self.start_agent()
                return
            assert result.outcome is not Outcome.BROKEN, result.detail
            self.deliver_late_interrupt()
            if result.outcome is Outcome.DONE:
                return
            if result.outcome is Outcome.WAIT:
                self.clock.advance(result.wait_seconds)

    # --- rules ----------------------------------------------------------------

    @rule(fraction=st.floats(0, 1), misalign=st.booleans())
    def host_resize(self, fraction: float, misalign: bool) -> None:
        blocks = int(fraction * self.geometry.nr_subblocks)
        requested = blocks * self.geometry.block_size + (MIB // 2 if misalign else 0)
        same = requested == self.model.requested_size
        try:
            self.model.resize(requested)
        except ValueError:
            # Cloud Hypervisor refuses a resize to the current size (mem.rs:225-228).
            refused_same = same and self.profile.rules.resize_same_refused
            assert misalign or refused_same, f"the model refused an aligned size {requested:#x}"

    @rule(grow=st.floats(0, 1), shrink=st.floats(0, 1), steps=st.integers(1, 20))
    def host_shrink_races_plug(self, grow: float, shrink: float, steps: int) -> None:
        """The host raises requested_size, then lowers it while the agent's next PLUG
        is in flight: the PLUG planned for the higher size meets the lower one (NACK
        in QEMU, ERROR in Firecracker, device.rs:328-331); the config interrupt of
        the shrink arrives after the answer."""
        self.host_resize(grow, misalign=False)
        blocks = int(shrink * self.model.requested_size) // self.geometry.block_size
        self.channel.resize_in_flight = blocks * self.geometry.block_size
        self.run_steps(steps)

    @rule()
    def device_reset_and_restart(self) -> None:
        """The agent restarts and its transport resets the device (PciChannel.open
        does): a device reset must not change block state (spec, Device
        Initialization); StratoVirt forgets its blocks (memory.rs:821-826)."""
        if self.refused is not None:
            return
        self.kill_agent()
        self.model.device_reset()
        self.start_agent()

    @rule(count=st.integers(1, 40))
    def agent_steps(self, count: int) -> None:
        self.run_steps(count)

    @rule(count=st.integers(1, 3))
    def device_busy(self, count: int) -> None:
        self.model.busy_next = count

    @rule(which=st.integers(0, 63))
    def kernel_refuses_offline(self, which: int) -> None:
        blocks = list(self.geometry.memory_blocks())
        self.kernel.refuse_offline.add(blocks[which % len(blocks)])

    @rule()
    def kernel_allows_offline(self) -> None:
        self.kernel.refuse_offline.clear()

    @rule(op=st.sampled_from(sorted(BLOCK_OPS, key=str)), err=st.sampled_from(REFUSALS))
    def kernel_refuses_blocks(self, op: KernelOp, err: int) -> None:
        """A kernel short of memory or busy: every probe, online or offline fails with
        ``err`` until the refusals are lifted (a probe or online refused after the
        PLUG: plugged memory waits, or goes back)."""
        self.kernel.refuse(op, err)

    @rule(op=st.sampled_from(sorted(PAGE_OPS, key=str)), err=st.sampled_from(REFUSALS))
    def kernel_refuses_pages(self, op: KernelOp, err: int) -> None:
        """The same for soft offline (a take undone, its subblock avoided) and unpoison
        (the subblock stays taken until the kernel agrees)."""
        self.pages.refuse(op, err)

    @rule()
    def kernel_stops_refusing(self) -> None:
        self.kernel.stop_refusing()
        self.pages.stop_refusing()

    @rule(where=st.sampled_from(["before-request", "after-response", "after-sysfs"]))
    def arm_crash(self, where: str) -> None:
        """Kill the agent at the next request or sysfs write (the next steps will hit it)."""
        if where == "before-request":
            self.channel.crash_before = True
        elif where == "after-response":
            self.channel.crash_after = True
        else:
            self.kernel.crash_after_change = True

    @rule(writes=st.integers(1, 2000))
    def arm_page_crash(self, writes: int) -> None:
        """Kill the agent after that many more page writes: inside a take or give-back."""
        self.pages.crash_after_writes = writes

    @rule(which=st.integers(0, 1 << 20), unmovable=st.booleans(), spread=st.integers(1, 600))
    def kernel_holds_pages(self, which: int, unmovable: bool, spread: int) -> None:
        """Pages of online memory the kernel will not give up: pinned (EBUSY) or
        unmovable (EIO); ``spread`` pages apart from a chosen online block on."""
        online = sorted(self.online_blocks())
        if not online:
            return
        mb = online[which % len(online)]
        per_block = self.geometry.memory_block_size // PAGE
        first = mb * per_block
        held = set(range(first + which % per_block, first + per_block, spread))
        (self.pages.unmovable if unmovable else self.pages.pinned).update(held)

    @rule()
    def kernel_frees_pages(self) -> None:
        self.pages.pinned.clear()
        self.pages.unmovable.clear()

    @rule(lost=st.sampled_from([0.0, 0.01, 0.3]), moved=st.sampled_from([0.0, 0.01, 0.2]))
    def soft_offline_races(self, lost: float, moved: float) -> None:
        """Soft offlines that answer 0 without poisoning, or migrate into the range."""
        self.pages.lost_race_rate = lost
        self.pages.migration_in_range_rate = moved
        self.pages.reallocate_rate = moved

    @rule()
    def kill_and_restart(self) -> None:
        """SIGKILL at a step boundary (e.g. between plug and online), then restart."""
        if self.refused is not None:
            return
        self.kill_agent()
        self.start_agent()

    @rule(lose_tracker=st.booleans())
    def guest_reboot(self, lose_tracker: bool) -> None:
        """System reset: the device unplugs all, hotplugged blocks are gone, /run is cleared."""
        self.refused = None  # a new boot: the device is whole again
        self.kill_agent()
        self.model.system_reset()
        self.kernel.reboot()
        # A new boot's pages.
        self.new_pages(len(self.kernel.probes))
        self.channel.crash_before = self.channel.crash_after = False
        self.kernel.crash_after_change = False
        self.channel.resize_in_flight = None
        self.channel.interrupt_pending = False
        if lose_tracker:
            shutil.rmtree(self.state_dir)
            self.state_dir.mkdir()
        self.start_agent()

    # --- invariants (docs/design.md section 5) --------------------------------

    def online_blocks(self) -> set[int]:
        return {
            mb
            for mb in self.geometry.memory_blocks()
            if self.kernel.block(mb).state is KernelBlockState.ONLINE
        }

    @invariant()
    def online_memory_is_plugged_or_poisoned(self) -> None:
        """5.1 and 5.2: every page of an online block lies in a subblock the device
        holds plugged, or is poisoned (taken out of use) for as long as it is not.
        (Not judged once the agent refused a device that forgot its blocks.)"""
        if not hasattr(self, "model") or self.refused is not None:
            return
        pages_per_subblock = self.geometry.block_size // PAGE
        for mb in self.online_blocks():
            for sb in self.geometry.subblocks_of(mb):
                if self.model.is_plugged(sb):
                    continue
                first = self.geometry.subblock_addr(sb) // PAGE
                unpoisoned = [
                    pfn
                    for pfn in range(first, first + pages_per_subblock)
                    if not self.pages.is_poisoned(pfn)
                ]
                assert not unpoisoned, (
                    f"memory{mb} online over unplugged block {sb}, page {unpoisoned[0]:#x} usable"
                )

    @invariant()
    def tracker_agrees_with_device_and_kernel(self) -> None:
        """5.3: after every completed step the tracker matches STATE and sysfs."""
        if self.tracker is None:
            return
        snap = self.tracker.snapshot()
        assert snap.intent is None, f"intent left pending: {snap.intent}"
        model_plugged = self.model.plugged_blocks()
        tracked = {sb for sb in range(self.geometry.nr_subblocks) if snap.is_plugged(sb)}
        assert tracked == model_plugged, "tracker bitmap differs from the device"
        assert snap.plugged_bytes == self.model.plugged_size
        tracked_online = {rec.index for rec in snap.blocks if rec.state is MemoryBlockState.ONLINE}
        assert tracked_online == self.online_blocks(), "tracker online set differs from sysfs"

    @invariant()
    def in_memory_state_agrees_with_the_file(self) -> None:
        """The owner's state is what its file says, and plans what a restart would.

        The state is updated in place at each transition (O(change)); a restarted
        agent decodes the file instead. Both must plan the same next step.
        """
        if self.tracker is None or self.driver is None:
            return
        snap = self.tracker.snapshot()
        problem = state_disagreement(self.tracker.state, snap)
        assert problem is None, problem
        live = self.driver.plan_input()
        rebuilt = planner.PlanInput(
            live.config,
            live.geometry,
            policy=live.policy,
            avoid=live.avoid,
            state=state_of(snap),
            avoid_subblocks=live.avoid_subblocks,
        )
        assert planner.next_step(rebuilt) == planner.next_step(live)

    def teardown(self) -> None:
        try:
            if self.driver is not None:
                self.converge_without_faults()
        finally:
            self.kill_agent()
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def converge_without_faults(self) -> None:
        """Lift every fault: the driver must settle on exactly what the guest can use
        (within the usable region: Firecracker leaves it below requested_size after
        an UNPLUG_ALL until the host resizes again, device.rs:418)."""
        self.channel.resize_in_flight = None
        self.deliver_late_interrupt()
        self.model.busy_next = 0
        self.kernel.refuse_offline.clear()
        self.kernel_stops_refusing()
        self.channel.crash_before = self.channel.crash_after = False
        self.kernel.crash_after_change = False
        self.pages.crash_after_writes = None
        self.kernel_frees_pages()
        self.soft_offline_races(0.0, 0.0)
        assert self.driver is not None
        for _ in range(CONVERGENCE_STEP_BOUND):
            result = self.driver.step()
            assert result.outcome is not Outcome.BROKEN, result.detail
            if result.outcome is Outcome.DONE:
                break
            if result.outcome is Outcome.WAIT:
                self.clock.advance(result.wait_seconds)
        else:
            raise AssertionError(f"no convergence in {CONVERGENCE_STEP_BOUND} steps")
        done = self.driver.last_done
        assert done is not None and not done.blocked
        assert self.model.plugged_size == done.target_bytes, (self.model.plugged_size, done)
        config = self.driver.config
        requested = min(config.requested_size, config.usable_region_size)
        if self.geometry.block_size < MEMORY_BLOCK and done.target_bytes < requested:
            # Growth into new blocks is whole-block; shrinking ends exactly on target.
            assert requested - done.target_bytes < MEMORY_BLOCK, (requested, done)
        assert not self.driver.tracker.state.units_taking, "a take left half done"
        # 5.4: no plugged memory is leaked: every plugged block is under an online block.
        online = self.online_blocks()
        for sb in self.model.plugged_blocks():
            owners = self.geometry.memory_blocks_of(sb)
            assert owners and all(mb in online for mb in owners), f"block {sb} plugged, not used"


TestAgentMachine = AgentMachine.TestCase
