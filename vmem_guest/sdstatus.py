"""The agent's state for ``systemctl status``: READY=1, STATUS=, STOPPING=1.

:class:`SystemdStatus` is the agent's :class:`~vmem_guest.agent.StateListener`. It
sends READY=1 once the loop is set up (every device present at start attached, or
none and the agent waiting for one), a new STATUS= line only when the line
changes (the agent calls it after each turn of its event loop, so nothing is
polled: an idle agent sends nothing), and STOPPING=1 when the loop ends.

The line holds each device's ``requested_size`` and what the guest has plugged:
``requested/plugged: 0000:00:03.0 1GiB/1GiB; 0000:00:04.0 0/512MiB``.
"""

from __future__ import annotations

from collections.abc import Mapping

from vmem_guest.agent import DeviceSlot
from vmem_guest.sdnotify import Notifier
from vmem_guest.units import format_size

#: STATUS= while no device is served.
WAITING = "waiting for a virtio-mem device to be hot-plugged"


def device_status(slot: DeviceSlot) -> str:
    """``BDF requested/plugged``, or ``BDF broken`` for a device no longer served."""
    if slot.broken:
        return f"{slot.bdf} broken"
    requested = slot.attached.driver.config.requested_size
    plugged = slot.attached.tracker.state.plugged_bytes
    return f"{slot.bdf} {format_size(requested)}/{format_size(plugged)}"


def status_line(slots: Mapping[str, DeviceSlot]) -> str:
    """One short line for all devices, in the order they were attached."""
    if not slots:
        return WAITING
    return "requested/plugged: " + "; ".join(device_status(s) for s in slots.values())


class SystemdStatus:
    """Tells the service manager what the agent serves (through a :class:`Notifier`)."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.sent: str | None = None  # the last STATUS= line sent

    def ready(self, slots: Mapping[str, DeviceSlot]) -> None:
        self.sent = status_line(slots)
        self.notifier.ready(self.sent)

    def changed(self, slots: Mapping[str, DeviceSlot]) -> None:
        if not self.notifier.enabled:
            return
        line = status_line(slots)
        if line != self.sent:
            self.sent = line
            self.notifier.status(line)

    def stopping(self) -> None:
        self.notifier.stopping()
