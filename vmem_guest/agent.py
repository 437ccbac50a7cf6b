"""The agent: one process, every virtio-mem device, one selector loop.

The loop sleeps in ``select`` on the devices' interrupt eventfds, the control
socket and a self-pipe for signals; its timeout is the earliest backoff timer,
or none at all when every device has converged, so an idle agent costs no CPU.

Per device, the driver core takes steps until it converges, waits (BUSY,
EBUSY) or breaks. A config-change interrupt re-reads the config and cuts any
wait short. SIGTERM/SIGINT only set a flag: the step in flight (and so the
request in flight) finishes, the tracker is left consistent, memory stays as it
is and the devices keep their state (a device reset does not unplug).

In ``manual`` mode the agent does not follow ``requested_size``: it serves
plug/unplug/state/unplug-all requests from the control socket.

Suspend and resume (docs/design.md section 1, "Suspend and resume"): a
:class:`~vmem_guest._linux.timerfd.ResumeWatch` fd sits in the selector beside
the eventfds and is also read (non-blocking) before every pass of steps, so a
resume is noticed before another request goes out; :meth:`Agent._after_resume`
re-initialises each device's transport and lets the driver core judge its
memory (``DeviceDriver.after_resume``). A :class:`~vmem_guest.inhibit.SuspendGuard`
holds logind's sleep inhibitor while a device without PERSISTENT_SUSPEND holds
plugged memory.

Devices hot-plugged at run time (docs/design.md section 1, "Devices that come and
go"): an :class:`Arrivals` source (a PCI uevent monitor, service.py) sits in the
selector; each device it binds and attaches is added with :meth:`Agent.add_device`.
A device's release request (VFIO's REQ index: ``device_del`` waits in the kernel
until the device is given back) removes it with :meth:`Agent.release_device`.

What the agent serves is told to a :class:`StateListener` (the service manager's
READY=1 and STATUS=, ``sdstatus.py``): once the loop is set up, then after each
turn of steps, right before the loop sleeps; each device's resizes are timed by
its :class:`~vmem_guest.resizes.ResizeTimer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import selectors
import signal
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from vmem_guest import control, hibernate, manual, planner
from vmem_guest._linux.timerfd import ResumeWatch
from vmem_guest.attach import Attached
from vmem_guest.control import ControlServer, Emit, Handler
from vmem_guest.driver import Outcome, StepResult
from vmem_guest.errors import HibernationRefused, UsageError, VmemError
from vmem_guest.inhibit import SuspendGuard
from vmem_guest.resizes import ResizeTimer
from vmem_guest.spec import Feature

#: Passes over the due devices (one step each) before the loop looks at its
#: file descriptors again.
STEPS_PER_TURN = 32

log = logging.getLogger("vmem_guest.agent")


@dataclasses.dataclass
class DeviceSlot:
    """The agent's view of one attached device."""

    attached: Attached
    wake_at: float | None = 0.0  # None: converged, waiting for a config change
    resize: ResizeTimer = dataclasses.field(init=False)  # its last resize: resize.last

    def __post_init__(self) -> None:
        self.resize = ResizeTimer(self.attached.bdf)

    @property
    def bdf(self) -> str:
        return self.attached.bdf

    @property
    def broken(self) -> str | None:
        """The driver core's verdict (the tracker's flag), never the agent's own."""
        return self.attached.driver.broken_reason

    @property
    def persistent(self) -> bool:
        """PERSISTENT_SUSPEND was negotiated: plugged memory survives a suspend."""
        return bool(self.attached.channel.device_features & 1 << Feature.PERSISTENT_SUSPEND)

    @property
    def at_risk_in_suspend(self) -> bool:
        """Something is plugged that a suspend would lose (no PERSISTENT_SUSPEND)."""
        return not self.persistent and self.attached.tracker.state.plugged_bytes > 0


class Arrivals(Protocol):
    """Devices that appear at run time, bound and attached by the source itself."""

    def fileno(self) -> int:
        """Readable when something may have arrived."""

    def arrived(self) -> list[Attached]:
        """The devices attached since the last call (never one already served)."""


class StateListener(Protocol):
    """Told what the agent serves; each call is cheap when nothing changed."""

    def ready(self, slots: Mapping[str, DeviceSlot]) -> None:
        """The loop is set up with every device attached at start (maybe none)."""

    def changed(self, slots: Mapping[str, DeviceSlot]) -> None:
        """A turn of steps and events is over: the devices may have changed."""

    def stopping(self) -> None:
        """SIGTERM or SIGINT: the loop has ended."""


@dataclasses.dataclass(frozen=True)
class Listeners:
    """Several listeners told the same, in order (the service manager, the metrics file)."""

    listeners: Sequence[StateListener]

    def ready(self, slots: Mapping[str, DeviceSlot]) -> None:
        for listener in self.listeners:
            listener.ready(slots)

    def changed(self, slots: Mapping[str, DeviceSlot]) -> None:
        for listener in self.listeners:
            listener.changed(slots)

    def stopping(self) -> None:
        for listener in self.listeners:
            listener.stopping()


@dataclasses.dataclass(frozen=True)
class _Release:
    """Selector data: the kernel asks for this slot's device back."""

    slot: DeviceSlot


class Agent:
    """The daemon behind ``vmem-guest run``."""

    def __init__(
        self,
        devices: list[Attached],
        control: Callable[[Handler], ControlServer] | None = None,
        *,
        manual_mode: bool = False,
        clock: Callable[[], float] = time.monotonic,
        resume_watch: ResumeWatch | None = None,
        suspend_guard: SuspendGuard | None = None,
        arrivals: Arrivals | None = None,
        listener: StateListener | None = None,
    ) -> None:
        """``resume_watch``, ``suspend_guard`` and ``arrivals`` belong to the caller (it
        closes them); so do the devices, released ones included (closed here already)."""
        self.slots = {attached.bdf: DeviceSlot(attached) for attached in devices}
        self.manual_mode = manual_mode
        self.clock = clock
        self.resume_watch = resume_watch
        self.suspend_guard = suspend_guard
        self.arrivals = arrivals
        self.listener = listener
        self._inhibitor_fd: int | None = None  # the pipe of a lock being taken, if watched
        self.hibernation = hibernate.Hold(clock)
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.control = control(self.handle_request) if control is not None else None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # --- lifetime -------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT."""
        with self._signals():
            self._register()
            log.info(
                "agent running: %d device(s), %s mode",
                len(self.slots),
                "manual" if self.manual_mode else "automatic",
            )
            if self.listener is not None:
                self.listener.ready(self.slots)
            while not self.stopping:
                self._drive_devices()
                self._guard_suspend()
                if self.listener is not None:
                    self.listener.changed(self.slots)
                self._wait_for_events(self._timeout())
        log.info("agent stopping")
        if self.listener is not None:
            self.listener.stopping()

    def close(self) -> None:
        """Release the loop's own resources; the devices belong to the caller."""
        if self.control is not None:
            self.control.close()
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        def on_signal(signum: int, frame: types.FrameType | None) -> None:
            self.stopping = True

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        old_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _register(self) -> None:
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wakeup")
        if self.control is not None:
            self.selector.register(self.control.fileno(), selectors.EVENT_READ, "control")
        if self.resume_watch is not None:
            self.selector.register(self.resume_watch.fileno(), selectors.EVENT_READ, "resume")
        if self.arrivals is not None:
            self.selector.register(self.arrivals.fileno(), selectors.EVENT_READ, "arrivals")
        for slot in self.slots.values():
            self._register_slot(slot)

    def _register_slot(self, slot: DeviceSlot) -> None:
        for fd in self._slot_fds(slot):
            self.selector.register(fd, selectors.EVENT_READ, slot)
        release = slot.attached.channel.release_request_fd()
        if release is not None:
            self.selector.register(release, selectors.EVENT_READ, _Release(slot))

    @staticmethod
    def _slot_fds(slot: DeviceSlot) -> set[int]:
        channel = slot.attached.channel
        return {channel.interrupt_fd(), channel.config_change_fd()}

    # --- devices that come and go -----------------------------------------------

    def add_device(self, attached: Attached) -> None:
        """Serve a device attached at run time, from its next step on."""
        slot = DeviceSlot(attached)
        self.slots[attached.bdf] = slot
        self._register_slot(slot)
        log.info("%s: device added at run time; %d device(s) served", attached.bdf, len(self.slots))

    def release_device(self, slot: DeviceSlot) -> None:
        """The kernel asks for the device back (a hot-unplug): stop serving it, close
        its tracker and channel. Its memory stays as it is; QEMU lets a virtio-mem
        device go only with nothing plugged, so normally there is none."""
        plugged = slot.attached.tracker.state.plugged_bytes
        if plugged:
            log.error(
                "%s: released by the kernel with %d bytes still plugged: they are not"
                " touched again (the tracker keeps the record)",
                slot.bdf,
                plugged,
            )
        release = slot.attached.channel.release_request_fd()
        self._unregister(self._slot_fds(slot) | ({release} if release is not None else set()))
        del self.slots[slot.bdf]
        slot.attached.close()
        log.warning(
            "%s: device released (hot-unplug); %d device(s) served", slot.bdf, len(self.slots)
        )
        self._guard_suspend()

    # --- the loop -------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Every device converged (or broken): the loop blocks with no timeout."""
        return self.manual_mode or all(
            slot.wake_at is None or slot.broken for slot in self.slots.values()
        )

    def _timeout(self) -> float | None:
        """Seconds until the earliest device timer or the end of the wait for an inhibitor
        lock; None when all devices have converged and no lock is being taken."""
        if self.stopping:
            return 0.0
        timeouts = []
        held = self.hibernation.seconds_left()
        if held is not None:  # the devices stay empty until the resume or the hold's end
            timeouts.append(held)
        elif not self.idle:
            wakes = [
                s.wake_at for s in self.slots.values() if s.wake_at is not None and not s.broken
            ]
            timeouts.append(max(0.0, min(wakes) - self.clock()))
        if self.suspend_guard is not None:
            given_up_in = self.suspend_guard.seconds_left()  # an unanswered inhibitor
            if given_up_in is not None:
                timeouts.append(given_up_in)
        return min(timeouts, default=None)

    def _wait_for_events(self, timeout: float | None) -> None:
        for key, _events in self.selector.select(timeout):
            if key.data == "wakeup":
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
            elif key.data == "control" and self.control is not None:
                self.control.serve_one()
            elif key.data == "resume":
                self._check_resume()
            elif key.data == "arrivals" and self.arrivals is not None:
                for attached in self.arrivals.arrived():
                    self.add_device(attached)
            elif isinstance(key.data, _Release) and self._serves(key.data.slot):
                self.release_device(key.data.slot)
            elif key.data == "inhibitor" and self.suspend_guard is not None:
                self.suspend_guard.on_readable()
                self._watch_inhibitor()
            elif isinstance(key.data, DeviceSlot) and self._serves(key.data):
                self._interrupt(key.data)

    def _serves(self, slot: DeviceSlot) -> bool:
        """Still served: not released by an earlier event of the same select."""
        return self.slots.get(slot.bdf) is slot

    def _interrupt(self, slot: DeviceSlot) -> None:
        driver = slot.attached.driver
        if driver.interrupt(slot.attached.channel.handle_interrupt()):
            slot.resize.config_changed(self.clock())
            slot.wake_at = 0.0
        elif slot.broken:
            self._forget(slot)

    def _drive_devices(self) -> None:
        """Step the devices that are due side by side, one step each per pass.

        Steps alternate between devices, so one device's slow steps (an offline
        can take seconds while the kernel migrates pages) hold another's plug up
        by one step at most, not by a whole turn. After STEPS_PER_TURN passes
        the loop looks at its file descriptors again.
        """
        if self.manual_mode or self.hibernation.seconds_left() is not None:
            return
        for _ in range(STEPS_PER_TURN):
            self._check_resume()  # one non-blocking read: no request to a reset device
            now = self.clock()
            due = [
                slot
                for slot in self.slots.values()
                if not slot.broken and slot.wake_at is not None and slot.wake_at <= now
            ]
            if not due:
                return
            for slot in due:
                if self.stopping:
                    return
                self._step(slot)

    def _step(self, slot: DeviceSlot) -> None:
        """One step of one device; its timer says when it is due again."""
        slot.resize.stepping(self.clock())
        result = slot.attached.driver.step()
        if result.outcome is Outcome.PROGRESS:
            slot.resize.stepped()
            slot.wake_at = self.clock()
        elif result.outcome is Outcome.WAIT:
            slot.wake_at = self.clock() + result.wait_seconds
        elif result.outcome is Outcome.DONE:
            slot.wake_at = None
            self._converged(slot, result)
        else:
            self._forget(slot)

    def _converged(self, slot: DeviceSlot, result: StepResult) -> None:
        """Time (and log) the resize that ends here, if one does."""
        if isinstance(result.step, planner.Done):
            slot.resize.converged(self.clock(), result.step)
        else:
            slot.resize.abandon()

    def _forget(self, slot: DeviceSlot) -> None:
        """The driver marked the device broken: no more interrupts from it either."""
        slot.resize.abandon()
        slot.wake_at = None
        self._unregister(self._slot_fds(slot))  # its release request stays watched

    def _unregister(self, fds: set[int]) -> None:
        """Take ``fds`` out of the selector; one already out (a broken device's) is fine."""
        for fd in fds:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(fd)

    # --- suspend and resume ---------------------------------------------------

    def _check_resume(self) -> None:
        """The realtime clock was set: if the guest slept, or a device lost DRIVER_OK
        (QEMU resets the transport at S3 wake-up; the RTC measures a short sleep as
        0 s), handle the resume on every device still in use."""
        if self.resume_watch is None:
            return
        event = self.resume_watch.check()
        if event is None:
            return
        live = [slot for slot in self.slots.values() if not slot.broken]
        reset = [slot.bdf for slot in live if self._transport_was_reset(slot)]
        if not event.suspended and not reset:
            log.info("clock set, no suspend: every device still at DRIVER_OK; nothing to do")
            return
        self.hibernation.end("the guest resumed")
        log.warning(
            "resumed from suspend (slept %.1f s; transport reset on %s): re-initialising"
            " and checking %d device(s)",
            event.slept,
            ", ".join(reset) or "no device",
            len(live),
        )
        for slot in live:
            self._after_resume(slot, event.slept)
        self._guard_suspend()

    @staticmethod
    def _transport_was_reset(slot: DeviceSlot) -> bool:
        try:
            return slot.attached.channel.transport_was_reset()
        except VmemError:
            return True

    def _after_resume(self, slot: DeviceSlot, slept: float) -> None:
        """Transport first (every request needs it), then the driver core's judgement."""
        driver = slot.attached.driver
        try:
            slot.attached.channel.reinitialize()
        except VmemError as exc:
            driver.mark_broken(f"re-initialising the transport after resume: {exc.message}")
        else:
            driver.after_resume(persistent=slot.persistent, slept=slept)
        if slot.broken:
            self._forget(slot)
        else:
            slot.wake_at = 0.0  # re-plan: requested_size may have changed meanwhile

    def _guard_suspend(self) -> None:
        if self.suspend_guard is not None:
            self.suspend_guard.update(
                [slot.bdf for slot in self.slots.values() if slot.at_risk_in_suspend]
            )
            self._watch_inhibitor()

    def _watch_inhibitor(self) -> None:
        """Keep the selector on the pipe of the lock being taken, if one is: its answer
        arrives like any other event, and no step waits for it."""
        assert self.suspend_guard is not None
        fd = self.suspend_guard.fileno()
        if fd == self._inhibitor_fd:
            return
        if self._inhibitor_fd is not None:
            self.selector.unregister(self._inhibitor_fd)
        if fd is not None:
            self.selector.register(fd, selectors.EVENT_READ, "inhibitor")
        self._inhibitor_fd = fd

    # --- control requests -----------------------------------------------------

    def handle_request(self, operation: control.Operation, emit: Emit) -> dict[str, Any]:
        """Serve one control request (see control.py for the protocol). STATE is
        served in either mode; what changes memory only in manual mode."""
        if isinstance(operation, control.Ping):
            answer: dict[str, Any] = {
                "pid": os.getpid(),
                "manual": self.manual_mode,
                "devices": list(self.slots),
                "online_paths": {
                    bdf: slot.attached.driver.online_path for bdf, slot in self.slots.items()
                },
            }
            if self.suspend_guard is not None:
                answer["suspend"] = self.suspend_guard.description
            if self.hibernation.until is not None:
                answer["hibernation"] = "memory given back: devices held empty until the resume"
            return answer
        if isinstance(operation, control.Hibernate):
            return self._prepare_hibernation(operation.seconds)
        slot = self._slot_for(operation.device)
        if not self.manual_mode and not isinstance(operation, control.QueryState):
            raise UsageError(
                f"the agent follows the host's requested size; '{operation.op}' needs an agent"
                " started with --manual (or no agent)",
                op=operation.op,
            )
        return manual.perform(slot.attached.driver, operation, emit)

    def _prepare_hibernation(self, seconds: float) -> dict[str, Any]:
        """Give every device's memory back and hold the devices empty until the resume
        (vmem_guest/hibernate.py); when that cannot be done they grow again at once
        and the refusal goes back to the caller (which then stops the hibernation)."""
        plugged = {bdf: s.attached.tracker.state.plugged_bytes for bdf, s in self.slots.items()}
        if self.manual_mode and any(plugged.values()):
            raise HibernationRefused(
                "the agent runs in --manual mode with memory plugged: give it back first"
                " (vmem-guest unplug-all)"
            )
        live = {bdf: s.attached.driver for bdf, s in self.slots.items() if not s.broken}
        broken = {bdf: s.broken for bdf, s in self.slots.items() if s.broken and plugged[bdf]}
        self.hibernation.start()
        try:
            answer = hibernate.give_back_all(live, broken=broken, seconds=seconds, clock=self.clock)
            channels = {bdf: s.attached.channel for bdf, s in self.slots.items() if not s.broken}
            answer["left_secret_memory"] = hibernate.leave_secret_memory(channels)
        except HibernationRefused as exc:
            log.error("hibernation refused: %s", exc.message)
            self.hibernation.end("hibernation refused")
            raise
        finally:
            for slot in self.slots.values():
                slot.wake_at = None if slot.broken else 0.0  # re-plan once the hold ends
        self._guard_suspend()
        return answer

    def _slot_for(self, bdf: str | None) -> DeviceSlot:
        if bdf is None:
            if len(self.slots) != 1:
                raise UsageError(f"several devices: choose one of {', '.join(self.slots)}")
            return next(iter(self.slots.values()))
        if bdf not in self.slots:
            raise UsageError(f"the agent does not own device {bdf!r}", device=str(bdf))
        slot = self.slots[bdf]
        if slot.broken:
            raise UsageError(f"device {bdf} is broken: {slot.broken}", device=bdf)
        return slot
