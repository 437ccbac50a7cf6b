"""The driver core: executes the planner's steps against a device, the kernel and the tracker.

One :class:`DeviceDriver` per device. It is transport-agnostic: the same code
runs over the device model (simulator, fuzzers) and over the real virtqueue
(the agent). It never sleeps; :meth:`DeviceDriver.step` returns how long to
wait instead, so the caller (a selector loop, or a virtual clock) owns time.

Response handling (docs/design.md section 5.6, spec 5.15.6):

* ACK: record the new state in the tracker; reset the backoff.
* NACK: the config changed under us; re-read it and plan again.
* BUSY (device): exponential, bounded backoff; a config change cuts the wait
  short. A kernel refusal (EBUSY offline, a page it will not give up) avoids that
  block or subblock for a window of its own and tries others (``retry.py``); the
  window ends early once its cause is gone (``relief.py``).
* ERROR: a driver bug or a broken device: mark it broken and stop.
* No request at all (PagemapRefused: the kernel could not read pagemap for the
  no-IOMMU check before it): waited out like BUSY; a page that moved stays fatal.

Every request is bracketed by the tracker's pending intent, so a crash at any
point is resolved on restart by :meth:`DeviceDriver.start` with STATE requests.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Iterable

from vmem_guest import online_path, planner
from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.device import Cause, DeviceConfig, Response, VirtioMemDevice
from vmem_guest.errors import (
    ConfigError,
    DeviceBroken,
    DeviceError,
    KernelError,
    OfflineRefused,
    PagemapRefused,
    PageRefused,
    SafetyError,
    VmemError,
)
from vmem_guest.hotplug import KernelBlockState, KernelMemory
from vmem_guest.online_path import AUTO_ONLINE_ZONES
from vmem_guest.pages import PageControl, all_poisoned, give_back, poisoned_count, take
from vmem_guest.relief import Relief
from vmem_guest.retry import (
    DEFAULT_BACKOFF,
    DEFAULT_REFUSAL_BACKOFF,
    Backoff,
    BackoffPolicy,
    Refusals,
)
from vmem_guest.spec import MAX_BLOCKS_PER_REQUEST, BlockState, RequestType, ResponseType
from vmem_guest.tracker import BlockRecord, Tracker
from vmem_guest.units import format_size

#: How the manual API waits out a BUSY device, and how often before it gives up.
MANUAL_BUSY = BackoffPolicy(initial=0.05, maximum=2.0)
MANUAL_BUSY_RETRIES = 8
#: A take of a run of subblocks stops after the subblock that brings it past this long
#: (the rest is given back untouched), so other devices and the control socket wait
#: one subblock at most for their turn beyond it.
TAKE_STEP_SECONDS = 0.5
#: Consecutive NACKs (each followed by a config re-read) before backing off.
MAX_NACKS_BEFORE_BACKOFF = 3


class Outcome(enum.Enum):
    PROGRESS = "progress"  # a step was taken; call step() again
    WAIT = "wait"  # call again after ``wait_seconds`` (or at a config change)
    DONE = "done"  # converged as far as the guest can; wait for a config change
    BROKEN = "broken"  # the device is broken; stop


@dataclasses.dataclass(frozen=True)
class StepResult:
    outcome: Outcome
    step: planner.Step | None = None
    wait_seconds: float = 0.0
    detail: str = ""


class DeviceDriver:
    """Keeps one device's plugged and onlined memory converging on ``requested_size``."""

    def __init__(
        self,
        device: VirtioMemDevice,
        tracker: Tracker,
        kernel: KernelMemory,
        policy: planner.Policy = planner.DEFAULT_POLICY,
        *,
        backoff: BackoffPolicy = DEFAULT_BACKOFF,
        refusal_backoff: BackoffPolicy = DEFAULT_REFUSAL_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
        pages: PageControl | None = None,
        relief: Relief | None = None,
    ) -> None:
        """``pages``: the kernel's page-level interface, for taking single subblocks
        of online blocks; without it (or where the kernel cannot) shrinking goes
        in whole memory blocks, as ``policy.subblock_unplug`` False does.
        ``relief``: what ends refusal windows before their time (None: only their
        time and a config change do)."""
        self.device = device
        self.tracker = tracker
        self.kernel = kernel
        self.log = logging.getLogger(f"vmem_guest.driver.{device.name}")
        self.pages = pages
        self.subblocks_off_reason = self._subblocks_off_reason(policy)
        if self.subblocks_off_reason is not None:
            policy = dataclasses.replace(policy, subblock_unplug=False)
        else:
            self.log.info("subblock unplug on: shrinking ends on any multiple of the block")
        self.policy = policy
        self.clock = clock
        self.backoff = Backoff(backoff)
        self.geometry: Geometry = tracker.geometry
        self.config: DeviceConfig = device.config()
        self.not_before = 0.0
        #: Memory blocks the kernel refused to offline (or online) lately.
        self.refused_blocks = Refusals(refusal_backoff)
        #: Subblocks whose pages the kernel would not give up (or take back) lately.
        self.refused_subblocks = Refusals(refusal_backoff)
        self.relief = relief
        self.nacks_in_a_row = 0
        self.last_done: planner.Done | None = None
        self._broken_text = ""
        #: ``auto_online_blocks`` as last read; None: read it before the next probe.
        self._auto_online: str | None = None
        #: How new blocks get online (online_path.describe), as last logged.
        self.online_path = ""

    def _subblocks_off_reason(self, policy: planner.Policy) -> str | None:
        """Why single subblocks of online blocks will not be taken, None if they will."""
        if not policy.subblock_unplug:
            return "turned off by policy"
        if self.tracker.geometry.big_block_mode:
            return "Big Block Mode: a device block spans whole memory blocks"
        if self.pages is None:
            return "no page-level kernel interface"
        reason = self.pages.unavailable_reason()
        if reason is not None:
            self.log.warning("subblock unplug off, shrinking in whole memory blocks: %s", reason)
        return reason

    # --- config ---------------------------------------------------------------

    def refresh_config(self) -> DeviceConfig:
        """Re-read the device config, check it against what the driver knows, and
        publish it in the tracker.

        ``addr``, ``region_size`` and ``block_size`` change only at a system reset
        (spec 5.15.4): a device that changes them under us is not trusted further.
        Nor is one whose usable region drops plugged blocks, judged by the tracker's
        bitmap (which :meth:`start` rebuilds first: a crash may have left it stale).
        """
        config = self._read_config()
        self._check_plugged_inside_usable(config)
        return self._publish(config)

    def _read_config(self) -> DeviceConfig:
        """The device's config, with the region the tracker was made for."""
        config = self.device.config()
        geometry = self.geometry
        if (config.addr, config.region_size, config.block_size) != (
            geometry.addr,
            geometry.region_size,
            geometry.block_size,
        ):
            raise ConfigError(
                f"device region changed under the driver: {config.addr:#x}"
                f"+{config.region_size:#x}/{config.block_size:#x}, was {geometry.addr:#x}"
                f"+{geometry.region_size:#x}/{geometry.block_size:#x}",
                addr=config.addr,
                region_size=config.region_size,
                block_size=config.block_size,
            )
        return config

    def _publish(self, config: DeviceConfig) -> DeviceConfig:
        self.config = config
        self.tracker.set_device_info(
            requested_size=config.requested_size,
            usable_region_size=config.usable_region_size,
            plugged_size=config.plugged_size,
            node_id=config.node_id,
        )
        return config

    def _check_plugged_inside_usable(self, config: DeviceConfig) -> None:
        """A usable region that no longer holds plugged blocks is a lying device.

        The usable region shrinks only after an ACKed UNPLUG_ALL or a system reset
        (spec 5.15.4), so every block the tracker holds plugged (ACKed) lies inside it.
        """
        highest = self.tracker.state.highest_plugged_subblock()
        usable_blocks = config.usable_region_size // self.geometry.block_size
        if highest is not None and highest >= usable_blocks:
            raise ConfigError(
                f"usable_region_size {config.usable_region_size:#x} shrank below plugged blocks",
                usable_region_size=config.usable_region_size,
            )

    def config_changed(self) -> None:
        """A config-change interrupt: re-read, and cut any backoff short."""
        self.refresh_config()
        self._plan_afresh()

    def _plan_afresh(self) -> None:
        """Forget backoff and refusals: the next step plans from scratch."""
        self.not_before = 0.0
        self.refused_blocks.clear()
        self.refused_subblocks.clear()
        if self.relief is not None:
            self.relief.clear()
        self.last_done = None

    # --- after a resume from suspend (docs/design.md section 1, "Suspend and resume") --

    def after_resume(self, *, persistent: bool, slept: float) -> None:
        """The guest resumed from suspend and the channel was re-initialised: find out
        whether what the tracker holds plugged still is, and go on or stop.

        With PERSISTENT_SUSPEND the device promised to keep every block (spec,
        device-types/mem, feature bits: QEMU 10.0 skips the unplug for
        RESET_TYPE_WAKEUP in ``virtio_mem_system_reset_hold``); without it QEMU 7.2
        unplugs everything at S3 wake-up (the wake-up is a system reset:
        ``virtio_mem_system_reset``). STATE requests over the tracker's plugged
        runs (one per run of at most 65,535 blocks) tell which happened:

        * all still PLUGGED: the tracker is the truth; plan on, following
          ``requested_size`` (Linux's ``virtio_mem_restore`` likewise only rebuilds
          its queue and re-reads the config);
        * blocks lost under ONLINE memory blocks: the guest was using memory that
          is gone. Mark the device broken with what happened and how to recover;
        * blocks lost under offline memory only: nothing in use was lost; rebuild
          from STATE and sysfs (:meth:`resync`) and plan on.

        Any VmemError on the way marks the device broken too (:meth:`mark_broken`).
        """
        if self.broken_reason is not None:
            return
        try:
            self._check_after_resume(persistent, slept)
        except VmemError as exc:
            self.mark_broken(f"after resume from suspend: {exc.message}")

    def _check_after_resume(self, persistent: bool, slept: float) -> None:
        # Not refresh_config: after a system reset the usable region may have shrunk
        # below blocks the tracker holds plugged; that is what is being found out.
        config = self._publish(self._read_config())
        block_size = self.geometry.block_size
        plugged = self.tracker.state.plugged_in(range(self.geometry.nr_subblocks))
        usable_blocks = config.usable_region_size // block_size
        asked = [sb for sb in plugged if sb < usable_blocks]
        runs = list(planner.runs(asked, MAX_BLOCKS_PER_REQUEST))
        still = set(self._plugged_among(runs))
        lost = [sb for sb in plugged if sb not in still]
        promise = "PERSISTENT_SUSPEND negotiated" if persistent else "no PERSISTENT_SUSPEND"
        self.log.info(
            "after resume (slept %.1f s, %s): the tracker holds %d device blocks plugged;"
            " STATE over %d runs: %d still PLUGGED, %d lost; device plugged_size %s,"
            " usable %s, requested %s",
            slept,
            promise,
            len(plugged),
            len(runs),
            len(plugged) - len(lost),
            len(lost),
            format_size(config.plugged_size),
            format_size(config.usable_region_size),
            format_size(config.requested_size),
        )
        self._plan_afresh()
        if not lost:
            return
        state = self.tracker.state
        online = sorted(
            {
                mb
                for sb in lost
                for mb in self.geometry.memory_blocks_of(sb)
                if state.block_state(mb) is MemoryBlockState.ONLINE
            }
        )
        what = (
            f"{len(lost)} of {len(plugged)} plugged device blocks"
            f" ({format_size(len(lost) * block_size)}) came back unplugged after suspend"
        )
        why = (
            "the device broke its PERSISTENT_SUSPEND promise"
            if persistent
            else "the device has no PERSISTENT_SUSPEND and unplugged them at wake-up"
            " (QEMU 7.2 does)"
        )
        if online:
            self.mark_broken(
                f"memory lost in suspend: {what}, under {len(online)} online memory blocks"
                f" (memory{online[0]}..memory{online[-1]}); {why}. The data in them is"
                " gone and the guest may fail using it: reboot the guest to recover"
            )
            return
        self.log.warning("%s, none under online memory (%s): rebuilding from STATE", what, why)
        self.resync()

    # --- recovery -------------------------------------------------------------

    def start(self) -> None:
        """Rebuild exact state from the device (STATE) and sysfs, then plan from there.

        The tracker's content, and its pending intent, are only hints: the device
        and the kernel are the truth after a crash (docs/design.md section 5.3).
        Plugged memory of which nothing is online is given back with one
        UNPLUG_ALL (spec 5.15.5) first.
        """
        self._publish(self._read_config())
        self.tracker.clear_broken()
        self._broken_text = ""
        self._auto_online = None
        self._auto_online_zone()  # logs the online path this device starts on
        pending = self.tracker.intent
        if pending is not None:
            self.log.info("resolving pending %s from a previous run", pending)
        online, present = self._kernel_view()
        if self.config.plugged_size and not online:
            plugged = self._unplug_all_unused(present)
        else:
            plugged = self._scan_consistent() if self.config.plugged_size else []
        self._rebuild(plugged, online, present)

    def resync(self) -> None:
        """Replace the tracker's state with the device's (STATE) and the kernel's."""
        online, present = self._kernel_view()
        plugged = self._scan_plugged() if self.config.plugged_size else []
        self._rebuild(plugged, online, present)

    def _kernel_view(self) -> tuple[dict[int, Zone], list[int]]:
        """The region's online blocks (with their zones) and present blocks, from sysfs."""
        # One directory listing, then only the region's present blocks are read:
        # a 1 TiB region has 8,192 memory blocks, of which few are present at start.
        region = self.geometry.memory_blocks()
        in_region = [mb for mb in self.kernel.present_blocks() if mb in region]
        kernel_blocks = {mb: self.kernel.block(mb) for mb in in_region}
        online = {
            mb: kb.zone for mb, kb in kernel_blocks.items() if kb.state is KernelBlockState.ONLINE
        }
        present = [
            mb for mb, kb in kernel_blocks.items() if kb.state is not KernelBlockState.ABSENT
        ]
        return online, present

    def _unplug_all_unused(self, present: list[int]) -> list[int]:
        """UNPLUG_ALL, nothing being online; the subblocks still plugged after it.

        The answer is not taken on trust (docs/design.md, "What the agent assumes
        of a device"): BUSY, NACK or ERROR (StratoVirt NACKs it while
        ``requested_size`` is not 0, memory.rs:468-471 via 491-509; Cloud
        Hypervisor answers ERROR when a discard fails, mem.rs:563-566) leave the
        STATE scan to say what is plugged, as after a crash; an ACK is checked
        against ``plugged_size`` and a STATE scan of the usable region
        (:meth:`_check_unplug_all`).
        """
        # Forget what the tracker believed first: it may say ONLINE for a block
        # a crash left offline, and the tracker refuses UNPLUG_ALL over those.
        self.tracker.rebuild_from_states(plugged=[], online={}, present=present)
        response = self._request(RequestType.UNPLUG_ALL, 0, 0)
        if not response.acked:
            self.log.warning(
                "UNPLUG_ALL answered %s: finding what is plugged by STATE", response.type.name
            )
            self.refresh_config()
            return self._scan_plugged()
        # ACKed UNPLUG_ALL zeroes plugged_size and may shrink the usable
        # region, with no config interrupt: re-read it.
        self.refresh_config()
        return self._check_unplug_all()

    def _check_unplug_all(self) -> list[int]:
        """After an ACKed UNPLUG_ALL: the subblocks still plugged (normally none).

        ``plugged_size`` must be 0 (spec, UNPLUG ALL request: "The device MUST set
        plugged_size to 0"); a device that leaves runs plugged (StratoVirt casts a
        run's length to 16 bits, memory.rs:282) gets them found by STATE and
        unplugged later like any others. STATE over the usable region must find
        nothing plugged either: blocks plugged behind a ``plugged_size`` of 0
        (Cloud Hypervisor v51.0 clears ``nr_blocks as u16`` bitmap entries,
        mem.rs:589-591) are a device whose accounting cannot be trusted.
        """
        config = self.config
        if config.requested_beyond_usable:
            self.log.warning(
                "after UNPLUG_ALL the usable region (%s) is below requested_size (%s):"
                " nothing more can be plugged until the host resizes again",
                format_size(config.usable_region_size),
                format_size(config.requested_size),
            )
        plugged = self._scan_plugged()
        found = len(plugged) * self.geometry.block_size
        if found != config.plugged_size:
            raise DeviceBroken(
                f"UNPLUG_ALL was ACKed, yet STATE finds {format_size(found)} plugged and"
                f" plugged_size says {format_size(config.plugged_size)}: the device's"
                " block accounting cannot be trusted",
                found=found,
                plugged_size=config.plugged_size,
            )
        if plugged:
            self.log.warning(
                "UNPLUG_ALL was ACKed but left %s plugged: unplugging them one by one",
                format_size(found),
            )
        return plugged

    def _rebuild(self, plugged: list[int], online: dict[int, Zone], present: list[int]) -> None:
        """Record what the device and the kernel say, resolving interrupted takes."""
        taken_before = self._taken_hints()
        plugged_set = set(plugged)
        online, holes = self._offline_unbacked(online, plugged_set)
        taken = holes + self._interrupted_takes(taken_before, online, plugged_set)
        self.tracker.rebuild_from_states(
            plugged=plugged, online=online, present=present, taken=taken
        )
        self.tracker.clear_intent()
        self.log.info(
            "state rebuilt: plugged %d blocks, %d memory blocks online", len(plugged), len(online)
        )

    def _scan_plugged(self) -> list[int]:
        """Indices of plugged subblocks of the usable region, by STATE."""
        usable_blocks = self.config.usable_region_size // self.geometry.block_size
        return self._plugged_among(
            [
                (first, min(MAX_BLOCKS_PER_REQUEST, usable_blocks - first))
                for first in range(0, usable_blocks, MAX_BLOCKS_PER_REQUEST)
            ]
        )

    def _scan_consistent(self) -> list[int]:
        """:meth:`_scan_plugged`, checked against ``plugged_size``: a device whose STATE
        answers and ``plugged_size`` disagree is refused (ConfigError) before anything
        is done on its word. StratoVirt forgets every block at a device reset and keeps
        ``plugged_size`` (a new bitmap at activation, memory.rs:821-826): every restart
        of the agent resets the device, so such a device is refused at attach."""
        plugged = self._scan_plugged()
        found = len(plugged) * self.geometry.block_size
        if found != self.config.plugged_size:
            raise ConfigError(
                f"STATE finds {format_size(found)} plugged but plugged_size says"
                f" {format_size(self.config.plugged_size)}: the device lost its block state"
                " (a device reset must not change it, spec: Device Initialization)",
                found=found,
                plugged_size=self.config.plugged_size,
            )
        return plugged

    def _plugged_among(self, ranges: list[tuple[int, int]]) -> list[int]:
        """Indices of plugged subblocks in ``ranges`` ((first, count), each at most one
        request long), by STATE over each, bisecting MIXED ones."""
        pending = list(ranges)
        plugged: list[int] = []
        while pending:
            first, count = pending.pop()
            response = self._request(RequestType.STATE, self.geometry.subblock_addr(first), count)
            if not response.acked:
                raise DeviceBroken(f"STATE answered {response.type.name}", first=first)
            if response.state is BlockState.PLUGGED:
                plugged.extend(range(first, first + count))
            elif response.state is BlockState.MIXED:
                if count == 1:
                    raise DeviceBroken("STATE of one block answered MIXED", first=first)
                half = count // 2
                pending += [(first, half), (first + half, count - half)]
        return sorted(plugged)

    def _offline_unbacked(
        self, online: dict[int, Zone], plugged: set[int]
    ) -> tuple[dict[int, Zone], list[int]]:
        """Offline online blocks over unplugged subblocks that are not holes: the guest
        must not use them. A hole is an unplugged subblock every page of which the
        kernel shows poisoned (kpageflags): it stays, recorded taken. Returns the
        blocks still online and the holes."""
        kept = dict(online)
        holes: list[int] = []
        for mb, _zone in online.items():
            unplugged = [sb for sb in self.geometry.subblocks_of(mb) if sb not in plugged]
            if not unplugged:
                continue
            if self._all_pages_poisoned(unplugged):
                self.log.info("memory%d is online with %d holes", mb, len(unplugged))
                holes += unplugged
                continue
            self.log.error("memory%d is online over unplugged device blocks: offlining", mb)
            try:
                self.kernel.offline(mb)
            except KernelError as exc:
                raise SafetyError(
                    f"memory{mb} is online over unplugged memory and cannot be offlined",
                    block=mb,
                    errno=exc.errno,
                ) from exc
            del kept[mb]
        return kept, holes

    def _all_pages_poisoned(self, subblocks: list[int]) -> bool:
        if self.pages is None or self.geometry.big_block_mode:
            return False
        try:
            return all(all_poisoned(self.pages, *self._pfns_of(sb, 1)) for sb in subblocks)
        except KernelError as exc:
            self.log.warning("cannot read page flags (%s): holes are not trusted", exc.message)
            return False

    def _taken_hints(self) -> list[int] | range:
        """Subblocks the tracker held taken before a rebuild: where a crash may have
        left poisoned pages under plugged subblocks (a take or give-back cut short).

        A tracker set aside at open (a write cut short by the crash, or a corrupt
        file) has no hints left, though the crash may have come inside a take or a
        give-back (chaos: killed inside the write recording the PLUG of a hole):
        then every subblock is a hint, and the page flags of every plugged subblock
        of an online block are read (one pread per subblock, only after a set-aside).
        """
        if self.tracker.discarded_reason is not None:
            return range(self.geometry.nr_subblocks)
        state = self.tracker.state
        if not state.taken_subblocks:
            return []
        return [
            offset * 8 + bit
            for offset, byte in enumerate(state.taken)
            if byte
            for bit in range(8)
            if byte >> bit & 1
        ]

    def _interrupted_takes(
        self, hints: list[int] | range, online: dict[int, Zone], plugged: set[int]
    ) -> list[int]:
        """Hinted subblocks that are plugged, in an online block, and hold a poisoned
        page: a take or give-back to finish (the planner gives them back or unplugs)."""
        if self.pages is None:
            return []
        found = []
        for sb in hints:
            blocks = self.geometry.memory_blocks_of(sb)
            if sb not in plugged or not blocks or blocks[0] not in online:
                continue
            try:
                if poisoned_count(self.pages, *self._pfns_of(sb, 1)):
                    found.append(sb)
            except KernelError as exc:
                self.log.warning("cannot read page flags of subblock %d: %s", sb, exc.message)
        return found

    def _pfns_of(self, first_sb: int, count: int) -> tuple[int, int]:
        """(first page frame number, page count) of ``count`` subblocks from ``first_sb``."""
        page_size = self._pages().page_size
        addr = self.geometry.subblock_addr(first_sb)
        return addr // page_size, count * self.geometry.block_size // page_size

    # --- the loop -------------------------------------------------------------

    def plan_input(self) -> planner.PlanInput:
        """The planner's view: the tracker owner's live state (nothing is decoded)."""
        return planner.PlanInput(
            config=self.config,
            geometry=self.geometry,
            policy=self.policy,
            avoid=self.refused_blocks.keys(),
            state=self.tracker.state,
            avoid_subblocks=self.refused_subblocks.keys(),
        )

    @property
    def broken_reason(self) -> str | None:
        """Why the device is broken (None: it is not). Whether it is comes from the
        tracker's one flag; the text is the whole reason when this driver marked it
        (the tracker keeps 39 bytes of it)."""
        stored = self.tracker.broken_reason
        if stored is None:
            return None
        return self._broken_text or stored

    def mark_broken(self, reason: str) -> None:
        """Stop touching the device: the only place a device is marked broken (the
        flag lives in the tracker, so ``status`` and a restarted agent see it too,
        until :meth:`start` finds the device sound again)."""
        self._broken_text = reason
        self.tracker.set_broken(reason)
        self.log.error("device broken, not touching it any more: %s", reason)

    def interrupt(self, causes: Cause) -> bool:
        """Handle the causes of an interrupt; True when the config changed (steps are
        due again). Queue causes need nothing: requests wait for their own answer."""
        if Cause.CONFIG not in causes or self.broken_reason is not None:
            return False
        try:
            self.config_changed()
        except VmemError as exc:
            self.mark_broken(exc.message)
            return False
        self.log.info("config changed, requested %#x", self.config.requested_size)
        return True

    def step(self) -> StepResult:
        """Take the next step, or say how long to wait before the next one.

        Anything that makes the device untrustworthy (an ERROR answer, a config or
        response that breaks the spec, a safety check) marks it broken here, once.
        """
        reason = self.broken_reason
        if reason is not None:
            return StepResult(Outcome.BROKEN, detail=reason)
        now = self.clock()
        if now < self.not_before:
            return StepResult(Outcome.WAIT, wait_seconds=self.not_before - now)
        self.refused_blocks.expire(now)
        self.refused_subblocks.expire(now)
        self._end_outlived_windows(now)
        step: planner.Step | None = None
        try:
            step = planner.next_step(self.plan_input())
            held = self._plug_held_until(step)
            if held is not None:
                return StepResult(Outcome.WAIT, step, wait_seconds=held - now, detail="held")
            return self._execute(step)
        except PagemapRefused as exc:
            # Not the device, not a moved page: the kernel's allocation for pagemap.
            return self._wait(step, exc.message)
        except VmemError as exc:
            self.mark_broken(exc.message)
            return StepResult(Outcome.BROKEN, step, detail=exc.message)

    def _execute(self, step: planner.Step) -> StepResult:
        if isinstance(step, planner.PlugStep):
            return self._plug(step)
        if isinstance(step, planner.UnplugStep):
            return self._unplug(step)
        if isinstance(step, planner.OnlineStep):
            return self._online(step)
        if isinstance(step, planner.OfflineStep):
            return self._offline(step)
        if isinstance(step, planner.TakeStep):
            return self._take(step)
        if isinstance(step, planner.GiveBackStep):
            return self._give_back(step)
        return self._done(step)

    def _done(self, step: planner.Done) -> StepResult:
        if step != self.last_done:
            self.tracker.set_remainder(step.remainder_bytes)
            self.last_done = step
        if not step.blocked:
            self.backoff.reset()
            return StepResult(Outcome.DONE, step)
        now = self.clock()
        # Not min(..., default=...): the default is evaluated even when unused,
        # and next_delay() doubles the backoff.
        earliest = (self.refused_blocks.earliest(), self.refused_subblocks.earliest())
        waits = [t for t in earliest if t is not None]
        if waits and self.relief is not None:
            waits.append(self.relief.next_check)  # a window may end before its time
        wake = min(waits) if waits else now + self.backoff.next_delay()
        return StepResult(Outcome.WAIT, step, wait_seconds=max(0.0, wake - now))

    def _end_outlived_windows(self, now: float) -> None:
        """End the refusal windows whose cause is gone (:class:`~vmem_guest.relief.Relief`,
        asked only while a window is open)."""
        if self.relief is None or not (self.refused_blocks or self.refused_subblocks):
            return
        relieved = self.relief.check(now)
        if relieved is None:
            return
        if relieved.everything:
            blocks = self.refused_blocks.lift()
            subblocks = self.refused_subblocks.lift()
        else:
            blocks, subblocks = [], self.refused_subblocks.lift(relieved.subblocks)
        if blocks or subblocks:
            self.log.info(
                "%s: refusals end early (%d memory blocks, %d subblocks)",
                relieved.why,
                len(blocks),
                len(subblocks),
            )

    def _plug(self, step: planner.PlugStep) -> StepResult:
        response = self._request(RequestType.PLUG, step.addr, step.nb_blocks)
        return self._after_range_request(step, response)

    def _unplug(self, step: planner.UnplugStep) -> StepResult:
        first = self.geometry.subblock_index(step.addr)
        if self._online_at(first):
            refused = self._verify_taken(step, first)
            if refused is not None:
                return refused
        response = self._request(RequestType.UNPLUG, step.addr, step.nb_blocks)
        return self._after_range_request(step, response)

    def _online_at(self, sb: int) -> bool:
        blocks = self.geometry.memory_blocks_of(sb)
        state = self.tracker.state
        return bool(blocks) and state.block_state(blocks[0]) is MemoryBlockState.ONLINE

    # --- subblocks of online blocks (docs/design.md, "Subblocks of online blocks") --

    def _take(self, step: planner.TakeStep) -> StepResult:
        """Record the take of the run (the crash-safe intent), then soft-offline every
        page, subblock by subblock from the highest. A census first drops the part of
        the run at and below a subblock with an unmovable page (:meth:`_above_unmovable`).

        A subblock the kernel refuses is avoided; it and the lower ones, not taken,
        are given back, while those above it stay taken (the planner UNPLUGs them).
        A take that has run for TAKE_STEP_SECONDS stops the same way after the
        subblock at hand, so one step never holds the loop (and other devices) long.
        """
        first = self.geometry.subblock_index(step.addr)
        end = first + step.nb_blocks
        first = self._above_unmovable(first, end)
        if first == end:
            return StepResult(Outcome.PROGRESS, step, detail="unmovable pages")
        self.tracker.record_taking(self.geometry.subblock_addr(first), end - first)
        pages = self._pages()
        started = self.clock()
        lowest = end
        while lowest > first:
            if lowest < end and self.clock() - started >= TAKE_STEP_SECONDS:
                self._undo_take(first, lowest - first)
                break
            sb = lowest - 1
            try:
                take(pages, *self._pfns_of(sb, 1))
            except KernelError as exc:
                self._undo_take(first, sb - first + 1)
                return self._avoid_subblocks(step, sb, 1, exc, started)
            lowest = sb
        self._subblocks_succeeded(range(lowest, end))
        return StepResult(Outcome.PROGRESS, step)

    def _above_unmovable(self, first: int, end: int) -> int:
        """The census of a take (one kpageflags read of the run): subblocks holding a
        page soft offline would refuse outright (slab, page tables, PageOffline) are
        not started on, but avoided like a refused take; the first subblock of the
        run above the highest of them (``end`` when none is left)."""
        pages = self._pages()
        page_first, per_subblock = self._pfns_of(first, 1)
        try:
            held = pages.unmovable_groups(page_first, per_subblock, end - first)
        except KernelError as exc:
            self.log.warning("no census of subblocks %d+%d: %s", first, end - first, exc.message)
            return first
        unmovable = [first + offset for offset, hit in enumerate(held) if hit]
        if not unmovable:
            return first
        now = self.clock()
        until = self.refused_subblocks.refuse(unmovable, now, 0.0)
        self._tell_relief(unmovable)
        self.log.info(
            "subblocks %s hold unmovable pages (kpageflags): not taken (until %.2f s from now)",
            unmovable,
            until - now,
        )
        return unmovable[-1] + 1

    def _verify_taken(self, step: planner.UnplugStep, first: int) -> StepResult | None:
        """Make sure every page of the step's subblocks is poisoned (kpageflags: one
        read for a run of a memory block), taking those that are not, right before
        their UNPLUG, so nothing in use is ever unplugged (invariant 5.2). On a refusal
        the pages go back; None when all are."""
        pages = self._pages()
        started = self.clock()
        try:
            take(pages, *self._pfns_of(first, step.nb_blocks))
        except KernelError as exc:
            self._undo_take(first, step.nb_blocks)
            return self._avoid_subblocks(step, first, step.nb_blocks, exc, started)
        self._subblocks_succeeded(range(first, first + step.nb_blocks))
        return None

    def _undo_take(self, first: int, count: int) -> None:
        """Give back what a refused take poisoned (its subblocks are still plugged)."""
        try:
            self._give_back_subblocks(first, count)
        except KernelError as exc:
            self.log.warning("subblocks %d+%d stay taken: %s", first, count, exc.message)

    def _give_back_subblocks(self, first: int, count: int) -> None:
        """Unpoison every page of taken, plugged subblocks and record them in use.

        The tracker checks that the device ACKed their plug before one page goes
        back (docs/design.md 5.1). KernelError when the kernel refuses."""
        self.tracker.check_may_give_back(first, count)
        give_back(self._pages(), *self._pfns_of(first, count))
        self.tracker.record_given_back(self.geometry.subblock_addr(first), count)

    def _give_back(self, step: planner.GiveBackStep) -> StepResult:
        first = self.geometry.subblock_index(step.addr)
        started = self.clock()
        try:
            self._give_back_subblocks(first, step.nb_blocks)
        except KernelError as exc:
            return self._avoid_subblocks(step, first, step.nb_blocks, exc, started)
        self._subblocks_succeeded(range(first, first + step.nb_blocks))
        self.backoff.reset()
        return StepResult(Outcome.PROGRESS, step)

    def _pages(self) -> PageControl:
        if self.pages is None:
            raise SafetyError("a subblock step without a page-level kernel interface")
        return self.pages

    def _avoid_subblocks(
        self, step: planner.Step, first: int, count: int, exc: KernelError, started: float
    ) -> StepResult:
        """The kernel would not give up (or take back) these pages: try others first,
        for longer each time these are refused (:class:`~vmem_guest.retry.Refusals`)."""
        self.tracker.count_retry()
        now = self.clock()
        until = self.refused_subblocks.refuse(range(first, first + count), now, now - started)
        self._tell_relief(range(first, first + count), exc)
        self.log.info(
            "%s; subblocks %d+%d later (in %.2f s)", exc.message, first, count, until - now
        )
        return StepResult(Outcome.PROGRESS, step, detail=exc.message)

    def _subblocks_succeeded(self, subblocks: range) -> None:
        """The kernel did what was asked of ``subblocks``: their refusals are forgotten."""
        self.refused_subblocks.succeeded(subblocks)
        if self.relief is not None:
            self.relief.forget(subblocks)

    def _tell_relief(self, subblocks: Iterable[int] = (), exc: KernelError | None = None) -> None:
        """A refusal: the relief watches from here (and the page a take stopped at)."""
        if self.relief is not None:
            pfn = exc.pfn if isinstance(exc, PageRefused) else None
            self.relief.refused(subblocks, pfn)

    def _after_range_request(
        self, step: planner.PlugStep | planner.UnplugStep, response: Response
    ) -> StepResult:
        if response.type is ResponseType.ACK:
            self.nacks_in_a_row = 0
            self.backoff.reset()
            return StepResult(Outcome.PROGRESS, step)
        if response.type is ResponseType.NACK:
            self.nacks_in_a_row += 1
            config = self.refresh_config()
            if config.plugged_size != self.tracker.state.plugged_bytes:
                # The device holds plugged memory we do not know of: every plan
                # would NACK again. Learn the truth before planning.
                self.log.warning("device plugged size differs from the tracker: resync")
                self.resync()
            if self.nacks_in_a_row <= MAX_NACKS_BEFORE_BACKOFF:
                return StepResult(Outcome.PROGRESS, step, detail="NACK")
            return self._wait(step, "NACK")
        if response.type is ResponseType.BUSY:
            return self._wait(step, "BUSY")
        if isinstance(step, planner.PlugStep) and self._plug_error_explained(step):
            return self._after_range_request(step, Response(ResponseType.NACK))
        # Cause first: the tracker keeps only 39 bytes of the reason.
        verb = "PLUG" if isinstance(step, planner.PlugStep) else "UNPLUG"
        raise DeviceBroken(
            f"{verb} answered ERROR: {step.addr:#x} x{step.nb_blocks}",
            addr=step.addr,
            nb_blocks=step.nb_blocks,
        )

    def _plug_error_explained(self, step: planner.PlugStep) -> bool:
        """An ERROR to a PLUG that a shrink of ``requested_size`` explains: re-read the
        config before deciding. Firecracker answers ERROR, not NACK, to a PLUG beyond
        ``requested_size`` (device.rs:328-331, 350-354); when the host shrank the
        request while the PLUG was under way, that ERROR is the race, not a broken
        device, and it is handled as the NACK QEMU gives (Linux marks the device
        broken on any PLUG ERROR: ``virtio_mem_send_plug_request`` -> -EINVAL)."""
        config = self.refresh_config()
        size = step.nb_blocks * self.geometry.block_size
        plugged_bytes = self.tracker.state.plugged_bytes
        if config.plugged_size != plugged_bytes:
            return False  # the device changed its state and still said ERROR: no race
        if plugged_bytes + size <= config.requested_size:
            return False
        self.log.warning(
            "PLUG %#x x%d answered ERROR after requested_size dropped to %s: taken as NACK",
            step.addr,
            step.nb_blocks,
            format_size(config.requested_size),
        )
        return True

    def _wait(self, step: planner.Step | None, why: str) -> StepResult:
        self.tracker.count_retry()
        delay = self.backoff.next_delay()
        self.not_before = self.clock() + delay
        return StepResult(Outcome.WAIT, step, wait_seconds=delay, detail=why)

    def _request(self, req_type: RequestType, addr: int, nb_blocks: int) -> Response:
        """One request, bracketed by the tracker's intent; ACKs recorded before it clears."""
        self.tracker.set_intent(req_type, addr, nb_blocks)
        try:
            response = self._send(req_type, addr, nb_blocks)
        except PagemapRefused as exc:
            # Raised before the request was posted: the device saw nothing to resolve.
            self.tracker.clear_intent()
            self.log.warning("%s %#x x%d not sent: %s", req_type.name, addr, nb_blocks, exc)
            raise
        self.tracker.count_requests(1)
        if response.acked:
            if req_type is RequestType.PLUG:
                self._auto_online = None  # re-read before this plug's blocks are probed
                self.tracker.record_plugged(addr, nb_blocks)
            elif req_type is RequestType.UNPLUG:
                self.tracker.record_unplugged(addr, nb_blocks)
            elif req_type is RequestType.UNPLUG_ALL:
                self.tracker.record_unplug_all()
        self.tracker.clear_intent()
        return response

    def _send(self, req_type: RequestType, addr: int, nb_blocks: int) -> Response:
        if req_type is RequestType.PLUG:
            return self.device.plug(addr, nb_blocks)
        if req_type is RequestType.UNPLUG:
            return self.device.unplug(addr, nb_blocks)
        if req_type is RequestType.STATE:
            return self.device.state(addr, nb_blocks)
        return self.device.unplug_all()

    def _require_plugged(self, mb: int) -> BlockRecord:
        """Invariant 5.1/5.5: never probe or online a block that is not fully plugged."""
        record = self.tracker.block(mb)
        if record.state not in (MemoryBlockState.PLUGGED, MemoryBlockState.ONLINE):
            raise SafetyError(f"memory{mb} is not fully plugged ({record.state.name})", block=mb)
        return record

    def _online_block(self, mb: int, zone: Zone) -> None:
        """Probe (if absent) and online fully plugged block ``mb``; record it.

        The hot path of every plug, so it asks sysfs only what it cannot know:

        * a block the tracker holds present is onlined with one write;
        * a new block is probed; when ``auto_online_blocks`` is ``offline`` the
          kernel added it offline (the probe's success says so) and one more
          write onlines it; otherwise the kernel tried to online it inside the
          probe and ignored any failure (``add_memory_resource`` does not return
          it), so one read of ``memoryN/state`` tells which.

        A write the kernel refuses is then checked against what sysfs says (a
        block already online, or absent although the tracker held it present).
        Raises KernelError when the kernel refuses.
        """
        record = self._require_plugged(mb)
        if not record.present:
            self.kernel.probe(self.geometry.memory_block_addr(mb))
            auto_zone = self._auto_online_zone()
            if auto_zone is not None and self.kernel.state(mb) is KernelBlockState.ONLINE:
                landed = auto_zone if auto_zone is not Zone.AUTO else self.kernel.block(mb).zone
                if zone in (Zone.AUTO, landed) or not self._took_back_auto_online(mb, landed):
                    self.tracker.record_online(mb, landed, self.kernel.node(mb))
                    return
        try:
            self.kernel.online(mb, zone)
        except KernelError as exc:
            self._after_refused_online(mb, zone, exc)
            return
        landed = zone if zone is not Zone.AUTO else self.kernel.block(mb).zone
        self.tracker.record_online(mb, landed, self.kernel.node(mb))

    def _took_back_auto_online(self, mb: int, landed: Zone) -> bool:
        """The kernel onlined new block ``mb`` inside the probe into ``landed``, not the
        zone the policy asks for (``auto_online_blocks`` = ``online`` puts it in
        ZONE_NORMAL, where unmovable allocations soon pin it: Debian's 6.12 does this).
        Offline it again while it is still almost free; True when that worked, and the
        caller onlines it into the policy's zone. False (kept where it is) when the
        kernel already refuses."""
        try:
            self.kernel.offline(mb)
        except KernelError as exc:
            self.log.warning(
                "memory%d was onlined to %s by the kernel and cannot be taken back (%s):"
                " it stays there, harder to unplug",
                mb,
                landed.name,
                exc.message,
            )
            return False
        self.log.info("memory%d: auto-onlined to %s, onlined again as planned", mb, landed.name)
        self.tracker.record_present(mb)
        return True

    def _after_refused_online(self, mb: int, zone: Zone, refusal: KernelError) -> None:
        """The kernel refused to online ``mb``: learn why from sysfs, record, or re-raise."""
        current = self.kernel.block(mb)
        if current.state is KernelBlockState.ONLINE:
            self.tracker.record_online(mb, current.zone, current.node)
            return
        if current.state is KernelBlockState.OFFLINE:
            self.tracker.record_present(mb)
            raise refusal
        # The tracker believed it present: add it, then online it as planned.
        self.kernel.probe(self.geometry.memory_block_addr(mb))
        current = self.kernel.block(mb)
        if current.state is not KernelBlockState.ONLINE:
            self.tracker.record_present(mb)
            self.kernel.online(mb, zone)
            current = self.kernel.block(mb)
        self.tracker.record_online(mb, current.zone, current.node)

    def _auto_online_zone(self) -> Zone | None:
        """The zone the kernel onlines new blocks to (``auto_online_blocks``), None
        when it leaves them offline. Read once per PLUG request (it can be changed
        at run time): see :meth:`_request`."""
        if self._auto_online is None:
            self._auto_online = self.kernel.auto_online_blocks()
            path = online_path.describe(self._auto_online, online_path.planned_zone(self.policy))
            if path != self.online_path:
                self.log.info(
                    "new memory blocks: %s (auto_online_blocks %s)", path, self._auto_online
                )
                self.online_path = path
        return AUTO_ONLINE_ZONES.get(self._auto_online, Zone.AUTO)

    def _offline_block(self, mb: int) -> None:
        """Offline block ``mb`` and record it; OfflineRefused when the kernel says no.

        The one place the agent offlines a block it owns: the tracker refuses first
        what it would refuse to record (``check_may_offline``: a block with taken
        subblocks, holes only or not, is never offlined, docs/design.md 5.1), so the
        kernel is never asked for an offline the rules forbid."""
        self.tracker.check_may_offline(mb)
        self.kernel.offline(mb)
        self.tracker.record_offline(mb)

    def _online(self, step: planner.OnlineStep) -> StepResult:
        started = self.clock()
        try:
            self._online_block(step.memory_block, step.zone)
        except KernelError as exc:
            result = self._avoid(step, step.memory_block, exc, started)
            self._give_back_refused_unit(step.memory_block)
            return result
        self.refused_blocks.succeeded((step.memory_block,))
        self.backoff.reset()
        return StepResult(Outcome.PROGRESS, step)

    # --- a unit the kernel would not take (docs/design.md 5.4) -----------------------

    def _give_back_refused_unit(self, mb: int) -> None:
        """The kernel refused to probe or online ``mb``: when nothing of its unit is
        online, UNPLUG the unit now rather than hold plugged memory the guest cannot use
        for the refusal's window (Linux's ``virtio_mem_sbm_plug_and_add_mb`` unplugs
        what ``add_memory`` refused); :meth:`_plug_held_until` keeps it from being
        plugged again before the window ends. sysfs is asked first, block by block:
        a block the kernel onlined after all, or one it will not even say the state
        of, keeps the unit plugged (tried again after the window)."""
        state = self.tracker.state
        unit_index = state.grid.unit_of_memory_block(mb)
        unit = state.unit(unit_index)
        try:
            onlined = [
                index
                for index in unit.memory_blocks
                if self.kernel.state(index) is KernelBlockState.ONLINE
            ]
        except KernelError as exc:
            self.log.info("memory%d stays plugged: %s", mb, exc.message)
            return
        if onlined or state.online_blocks(unit_index):
            return
        plugged = state.plugged_in(unit.subblocks)
        for first, count in reversed(list(planner.runs(plugged, MAX_BLOCKS_PER_REQUEST))):
            response = self._request(RequestType.UNPLUG, self.geometry.subblock_addr(first), count)
            if response.type is ResponseType.ERROR:
                raise DeviceBroken(f"UNPLUG answered ERROR: memory{mb}'s unit", block=mb)
            if not response.acked:
                return  # BUSY or NACK: the planner unplugs or onlines it later
        self.log.info("memory%d: its unit given back, not plugged again for now", mb)

    def _plug_held_until(self, step: planner.Step) -> float | None:
        """Until when ``step`` must wait: a PLUG over a memory block whose probe or
        online the kernel refused lately waits for the end of that refusal's window
        (None: it need not). Holes of online blocks are not held."""
        if not isinstance(step, planner.PlugStep) or not self.refused_blocks:
            return None
        size = self.geometry.memory_block_size
        end = step.addr + step.nb_blocks * self.geometry.block_size
        state = self.tracker.state
        held = [
            self.refused_blocks.until[mb]
            for mb in range(step.addr // size, -(-end // size))
            if mb in self.refused_blocks and state.block_state(mb) is not MemoryBlockState.ONLINE
        ]
        return min(held) if held else None

    def _offline(self, step: planner.OfflineStep) -> StepResult:
        started = self.clock()
        try:
            self._offline_block(step.memory_block)
        except OfflineRefused as exc:
            return self._avoid(step, step.memory_block, exc, started)
        self.refused_blocks.succeeded((step.memory_block,))
        self.backoff.reset()
        return StepResult(Outcome.PROGRESS, step)

    def _avoid(self, step: planner.Step, mb: int, exc: KernelError, started: float) -> StepResult:
        """The kernel said no for this block: try others, come back to it later (later
        each time it says no again, and never before the others had their turn)."""
        self.tracker.count_retry()
        now = self.clock()
        until = self.refused_blocks.refuse((mb,), now, now - started)
        self._tell_relief()
        self.log.info("%s; retrying memory%d later (in %.2f s)", exc.message, mb, until - now)
        return StepResult(Outcome.PROGRESS, step, detail=exc.message)

    # --- The manual API (manual.py): whole units, blocking, all or nothing ------------
    #
    # ``vmem-guest plug|unplug|state|unplug-all`` run outside the step loop, from a
    # command or the agent's control socket in --manual mode; they may block, so they
    # take the sleep to use. They keep the same invariants: only whole units are plugged
    # and every plugged block is onlined; a block is offline before any of its
    # subblocks is unplugged; nothing this API plugged is left unused when it fails.

    def manual_request(
        self, req_type: RequestType, addr: int, nb_blocks: int, sleep: Callable[[float], None]
    ) -> Response:
        """One request; BUSY (and a request PagemapRefused kept from going out) retried
        per :data:`MANUAL_BUSY`, NACK and ERROR raised (ERROR marks the device broken:
        spec 5.15.6, the request was valid)."""
        for attempt in range(MANUAL_BUSY_RETRIES + 1):
            try:
                response = self._request(req_type, addr, nb_blocks)
            except PagemapRefused:
                if attempt == MANUAL_BUSY_RETRIES:
                    raise
            else:
                if response.type is not ResponseType.BUSY:
                    break
            self.tracker.count_retry()
            sleep(MANUAL_BUSY.delay(attempt + 1))
        if response.type is ResponseType.ACK:
            return response
        config = self.refresh_config()
        if response.type is ResponseType.NACK:
            raise DeviceError(
                f"the device refused {req_type.name} (NACK): the host requests"
                f" {format_size(config.requested_size)}, {format_size(config.plugged_size)}"
                " are plugged",
                requested_size=config.requested_size,
                plugged_size=config.plugged_size,
            )
        if response.type is ResponseType.BUSY:
            raise DeviceError(f"the device stayed BUSY for {req_type.name}", addr=addr)
        self.mark_broken(f"{req_type.name} {addr:#x} answered ERROR")
        raise DeviceBroken(f"{req_type.name} {addr:#x} x{nb_blocks} answered ERROR", addr=addr)

    def plug_unit(self, unit: planner.Unit, zone: Zone, sleep: Callable[[float], None]) -> None:
        """PLUG every subblock of an unplugged ``unit`` and online its memory blocks; when
        the kernel refuses an online, give the whole unit back and re-raise."""
        for first in range(unit.subblocks.start, unit.subblocks.stop, MAX_BLOCKS_PER_REQUEST):
            count = min(MAX_BLOCKS_PER_REQUEST, unit.subblocks.stop - first)
            self.manual_request(RequestType.PLUG, self.geometry.subblock_addr(first), count, sleep)
        try:
            for mb in unit.memory_blocks:
                self._online_block(mb, zone)
        except KernelError:
            # Plugged memory that cannot be onlined would leak: give it back.
            self.release_unit(unit, sleep)
            raise

    def release_unit(self, unit: planner.Unit, sleep: Callable[[float], None]) -> None:
        """Offline ``unit``'s memory blocks (all or none), then UNPLUG what of it is plugged."""
        self.offline_all(unit.memory_blocks)
        plugged = self.tracker.state.plugged_in(unit.subblocks)
        for first, count in planner.runs(plugged, MAX_BLOCKS_PER_REQUEST):
            self.manual_request(
                RequestType.UNPLUG, self.geometry.subblock_addr(first), count, sleep
            )

    def offline_all(self, blocks: Iterable[int]) -> None:
        """Offline every online block of ``blocks``, highest first, all or nothing: when
        the kernel refuses one, those offlined here are onlined again and the refusal
        (naming the block and the errno) is re-raised. A block the rules keep online
        (:class:`~vmem_guest.errors.HolesKeepBlockOnline`) is refused before any is
        offlined."""
        state = self.tracker.state
        online = [mb for mb in blocks if state.block_state(mb) is MemoryBlockState.ONLINE]
        for mb in online:
            self.tracker.check_may_offline(mb)
        zones = {mb: state.block_zone(mb) for mb in online}
        done: list[int] = []
        try:
            for mb in sorted(online, reverse=True):
                self._offline_block(mb)
                done.append(mb)
        except KernelError:
            for mb in done:
                self._online_block(mb, zones[mb])
            raise

    def unplug_everything(self, sleep: Callable[[float], None]) -> None:
        """Offline every online block of the device (all or none), then UNPLUG_ALL,
        whose ACK is checked (``plugged_size`` and STATE, :meth:`_check_unplug_all`)."""
        self.offline_all(self.geometry.memory_blocks())
        self.manual_request(RequestType.UNPLUG_ALL, 0, 0, sleep)
        self.refresh_config()
        left = self._check_unplug_all()
        if left:
            self.resync()  # the tracker recorded the ACK: take STATE's word instead
            raise DeviceError(
                f"UNPLUG_ALL was ACKed but {format_size(len(left) * self.geometry.block_size)}"
                " stay plugged; the agent unplugs them block by block",
                plugged=len(left) * self.geometry.block_size,
            )
