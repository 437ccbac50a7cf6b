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
from collections.abc import Callable, Iterator
from typing import Any

from vmem_guest import control, manual
from vmem_guest.attach import Attached
from vmem_guest.control import ControlServer, Emit, Handler
from vmem_guest.driver import Outcome
from vmem_guest.errors import UsageError

#: Passes over the due devices (one step each) before the loop looks at its
#: file descriptors again.
STEPS_PER_TURN = 32

log = logging.getLogger("vmem_guest.agent")


@dataclasses.dataclass
class DeviceSlot:
    """The agent's view of one attached device."""

    attached: Attached
    wake_at: float | None = 0.0  # None: converged, waiting for a config change

    @property
    def bdf(self) -> str:
        return self.attached.bdf

    @property
    def broken(self) -> str | None:
        """The driver core's verdict (the tracker's flag), never the agent's own."""
        return self.attached.driver.broken_reason


class Agent:
    """The daemon behind ``vmem-guest run``."""

    def __init__(
        self,
        devices: list[Attached],
        control: Callable[[Handler], ControlServer] | None = None,
        *,
        manual_mode: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = {attached.bdf: DeviceSlot(attached) for attached in devices}
        self.manual_mode = manual_mode
        self.clock = clock
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
            while not self.stopping:
                self._drive_devices()
                self._wait_for_events(self._timeout())
        log.info("agent stopping")

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
        for slot in self.slots.values():
            channel = slot.attached.channel
            fds = {channel.interrupt_fd(), channel.config_change_fd()}
            for fd in fds:
                self.selector.register(fd, selectors.EVENT_READ, slot)

    # --- the loop -------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Every device converged (or broken): the loop blocks with no timeout."""
        return self.manual_mode or all(
            slot.wake_at is None or slot.broken for slot in self.slots.values()
        )

    def _timeout(self) -> float | None:
        """Seconds until the earliest device timer; None when all have converged."""
        if self.stopping:
            return 0.0
        if self.idle:
            return None
        wakes = [s.wake_at for s in self.slots.values() if s.wake_at is not None and not s.broken]
        return max(0.0, min(wakes) - self.clock())

    def _wait_for_events(self, timeout: float | None) -> None:
        for key, _events in self.selector.select(timeout):
            if key.data == "wakeup":
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
            elif key.data == "control" and self.control is not None:
                self.control.serve_one()
            elif isinstance(key.data, DeviceSlot):
                self._interrupt(key.data)

    def _interrupt(self, slot: DeviceSlot) -> None:
        driver = slot.attached.driver
        if driver.interrupt(slot.attached.channel.handle_interrupt()):
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
        if self.manual_mode:
            return
        for _ in range(STEPS_PER_TURN):
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
        result = slot.attached.driver.step()
        if result.outcome is Outcome.PROGRESS:
            slot.wake_at = self.clock()
        elif result.outcome is Outcome.WAIT:
            slot.wake_at = self.clock() + result.wait_seconds
        elif result.outcome is Outcome.DONE:
            slot.wake_at = None
        else:
            self._forget(slot)

    def _forget(self, slot: DeviceSlot) -> None:
        """The driver marked the device broken: no more interrupts from it either."""
        slot.wake_at = None
        channel = slot.attached.channel
        for fd in {channel.interrupt_fd(), channel.config_change_fd()}:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(fd)

    # --- control requests -----------------------------------------------------

    def handle_request(self, operation: control.Operation, emit: Emit) -> dict[str, Any]:
        """Serve one control request (see control.py for the protocol). STATE is
        served in either mode; what changes memory only in manual mode."""
        if isinstance(operation, control.Ping):
            return {"pid": os.getpid(), "manual": self.manual_mode, "devices": list(self.slots)}
        slot = self._slot_for(operation.device)
        if not self.manual_mode and not isinstance(operation, control.QueryState):
            raise UsageError(
                f"the agent follows the host's requested size; '{operation.op}' needs an agent"
                " started with --manual (or no agent)",
                op=operation.op,
            )
        return manual.perform(slot.attached.driver, operation, emit)

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
