"""Attach to one virtio-mem device: channel, tracker and driver core, recovered.

Shared by the agent (``vmem-guest run``) and the manual commands when no
agent runs: both must take the tracker lock (one owner per device), recover
exact state (DeviceDriver.start) and release everything on the way out.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from vmem_guest import bootmem, planner
from vmem_guest.blocks import Geometry
from vmem_guest.device import InterruptingChannel, VirtioMemDevice
from vmem_guest.driver import DeviceDriver
from vmem_guest.hotplug import KernelMemory
from vmem_guest.pages import PageControl
from vmem_guest.tracker import Tracker, TrackerIdentity
from vmem_guest.transport.channel import PciChannel
from vmem_guest.transport.function import Access

log = logging.getLogger("vmem_guest.attach")


@dataclasses.dataclass
class Attached:
    """One device the current process owns."""

    bdf: str
    channel: InterruptingChannel
    tracker: Tracker
    driver: DeviceDriver

    closed: bool = False

    def close(self) -> None:
        """Tracker first (memory stays as it is), then the channel (device reset); once
        (a device released at run time is closed by the agent, then seen at exit)."""
        if self.closed:
            return
        self.closed = True
        self.tracker.close()
        self.channel.close()


def attach(
    bdf: str,
    *,
    mode: Access,
    state_dir: Path,
    kernel: KernelMemory,
    policy: planner.Policy,
    guard_ranges: list[tuple[int, int]] | None = None,
    boot_record: Path = bootmem.RECORD,
    pages: PageControl | None = None,
) -> Attached:
    """Open ``bdf`` (bound to vfio-pci, or to uio_pci_generic for ``uio``), lock its
    tracker and recover its state."""
    channel = PciChannel.open(bdf, mode=mode, guard_ranges=guard_ranges or ())
    return attach_channel(
        bdf,
        channel,
        state_dir=state_dir,
        kernel=kernel,
        policy=policy,
        boot_record=boot_record,
        pages=pages,
    )


def attach_channel(
    bdf: str,
    channel: InterruptingChannel,
    *,
    state_dir: Path,
    kernel: KernelMemory,
    policy: planner.Policy,
    boot_record: Path = bootmem.RECORD,
    clock: Callable[[], float] = time.monotonic,
    pages: PageControl | None = None,
) -> Attached:
    """Take over an open channel: validate the device, lock its tracker, recover its state.

    The channel is closed again if anything fails. A device whose config breaks
    the spec, or whose region overlaps boot memory, is refused (ConfigError)
    before a request is sent or a tracker written.
    """
    try:
        device = VirtioMemDevice(channel, bdf)
        config = device.config()
        bootmem.check_region(config, bootmem.load_or_record(kernel, boot_record), boot_record)
        geometry = Geometry(config.addr, config.region_size, config.block_size, kernel.block_size())
        tracker = Tracker.open(state_dir, TrackerIdentity(bdf, geometry))
    except BaseException:
        channel.close()
        raise
    try:
        if tracker.discarded_reason:
            log.warning("%s: tracker set aside: %s", bdf, tracker.discarded_reason)
        tracker.set_transport_info(
            device_features=channel.device_features,
            interrupt_mode=channel.interrupt_mode,
            binding=channel.binding,
        )
        driver = DeviceDriver(device, tracker, kernel, policy, clock=clock, pages=pages)
        driver.start()
    except BaseException:
        tracker.close()
        channel.close()
        raise
    return Attached(bdf, channel, tracker, driver)
