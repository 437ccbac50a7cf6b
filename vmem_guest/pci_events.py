"""PCI functions that appear while the agent runs: the kernel's uevents, through pyudev.

The monitor listens to the kernel's own uevents (``source="kernel"``), not udevd's:
binding to vfio-pci needs nothing udev's rules add, and the test VM runs no udevd.
Only ``add`` of a ``pci`` device is reported; what it is (virtio-mem or not) is for
the caller to read, as at start (:mod:`vmem_guest.pci`). A removal needs no
monitor: VFIO's release request reaches the agent first (``agent.py``).

Every other uevent is dropped in the kernel by a socket filter
(:mod:`vmem_guest._linux.sockfilter`): the memory blocks the agent adds and onlines
bring two or more uevents each, which would otherwise wake the agent's loop and cost
a libudev receive and a pyudev device each.
"""

from __future__ import annotations

import logging
from typing import Any

from vmem_guest._linux import sockfilter
from vmem_guest._linux.lifetime import Closing
from vmem_guest.pci import udev_context

log = logging.getLogger("vmem_guest.pci_events")


class PciMonitor(Closing):
    """A non-blocking reader of the kernel's PCI ``add`` uevents (a selector's fd)."""

    def __init__(self, monitor: Any) -> None:
        """``monitor``: a started ``pyudev.Monitor`` (or a test's stand-in)."""
        self._monitor = monitor

    @classmethod
    def open(cls) -> PciMonitor | None:
        """The monitor; None (and a warning) where pyudev or libudev is missing."""
        try:
            import pyudev

            context = udev_context()
            if context is None:
                raise OSError("libudev.so.1 not found")
            monitor = pyudev.Monitor.from_netlink(context, source="kernel")
            monitor.start()
        except (ImportError, OSError) as exc:
            log.warning("no uevent monitor (%s): devices hot-plugged later are not served", exc)
            return None
        try:
            sockfilter.attach_prefix_filter(int(monitor.fileno()))
        except OSError as exc:
            log.warning("no uevent filter (%s): every kernel uevent wakes the agent", exc)
        return cls(monitor)

    def fileno(self) -> int:
        if self._monitor is None:
            raise ValueError("the PCI monitor is closed")
        return int(self._monitor.fileno())

    def added(self) -> list[str]:
        """The PCI addresses added since the last call (reads without blocking)."""
        bdfs: list[str] = []
        while self._monitor is not None:
            device = self._monitor.poll(timeout=0)
            if device is None:
                break
            if device.action == "add" and device.subsystem == "pci":
                bdfs.append(str(device.sys_name))
        return bdfs

    def close(self) -> None:
        """Drop the monitor: pyudev closes its netlink socket with it."""
        self._monitor = None
