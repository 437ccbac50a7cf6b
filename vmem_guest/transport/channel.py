"""PciChannel: a :class:`vmem_guest.device.RequestChannel` over VFIO and virtio-pci.

It puts the pieces together in the order the spec asks (virtio spec 3.1.1,
4.1.5.1): VFIO device, capability walk, BAR mappings, reset, ACKNOWLEDGE,
DRIVER, features, FEATURES_OK, DMA memory, interrupts, queue 0, DRIVER_OK.

Interrupts are eventfds. With INTx (all QEMU 7.2 offers for virtio-mem) one
eventfd carries both causes: :meth:`PciChannel.handle_interrupt` reads the ISR
byte (which clears it) and unmasks INTx. A config change that arrives while a
request waits for its answer is remembered and the eventfd re-signalled once
the request is done, so an outer selector loop never misses it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
from collections.abc import Sequence
from pathlib import Path

from vmem_guest import spec
from vmem_guest._linux import pagemap
from vmem_guest._linux import vfio_uapi as uapi
from vmem_guest._linux.eventfd import EventFd
from vmem_guest._linux.lifetime import Closing
from vmem_guest._linux.sysfs import SYSFS_ROOT
from vmem_guest.device import DEVICE_FEATURE_MASK, Cause, InterruptMode
from vmem_guest.errors import DeviceBroken, DeviceTimeout, IoctlError, TransportError
from vmem_guest.spec import Feature
from vmem_guest.transport import virtio_pci as vp
from vmem_guest.transport.dma import PAGE_SIZE, DmaBuffer, IovaBuffer, PhysBuffer
from vmem_guest.transport.vfio import DEV_ROOT, Mode, VfioDevice, choose_iova
from vmem_guest.transport.virtqueue import RingLayout, Virtqueue

#: Where the first DMA buffer goes in the IOMMU domain (type1). Below the x86
#: MSI window (0xfee00000) and above the first 256 MiB.
DEFAULT_IOVA = 0x1000_0000
#: One request in flight needs two descriptors; a small ring fits in one page.
DEFAULT_QUEUE_SIZE = 16
DEFAULT_TIMEOUT = 5.0

#: MSI-X table entries the channel uses: config changes and the request queue.
CONFIG_VECTOR = 0
QUEUE_VECTOR = 1
MSIX_VECTORS = 2

_OPTIONAL_FEATURES = (
    Feature.ACPI_PXM,
    Feature.UNPLUGGED_INACCESSIBLE,
    Feature.PERSISTENT_SUSPEND,
    Feature.ACCESS_PLATFORM,
)


def check_identity(config: bytes) -> None:
    """A modern virtio-mem PCI function: 1af4:1058, revision >= 1 (spec 4.1.2.1)."""
    vendor = int.from_bytes(config[vp.PCI_VENDOR_ID : vp.PCI_VENDOR_ID + 2], "little")
    device = int.from_bytes(config[vp.PCI_DEVICE_ID : vp.PCI_DEVICE_ID + 2], "little")
    revision = config[vp.PCI_REVISION_ID]
    if (vendor, device) != (spec.PCI_VENDOR_ID, spec.PCI_DEVICE_ID) or revision < 1:
        raise TransportError(
            f"not a modern virtio-mem device: {vendor:04x}:{device:04x} rev {revision}",
            vendor=vendor,
            device=device,
            revision=revision,
        )


def select_features(offered: int, *, mode: Mode) -> int:
    """The features we accept from ``offered`` (docs/protocol.md section 1).

    VERSION_1 is required. ACPI_PXM and UNPLUGGED_INACCESSIBLE are accepted
    when offered (QEMU refuses FEATURES_OK if the latter is offered and
    declined). PERSISTENT_SUSPEND is accepted when offered: plugged memory then
    stays plugged across suspend and resume (spec, device-types/mem, feature
    bits), so the agent may let the guest suspend and only re-initialises the
    transport on resume; without it the driver must
    not let the guest suspend (docs/protocol.md section 1, driver rules).
    ACCESS_PLATFORM is accepted when offered (spec 6: a driver SHOULD) and
    required under type1: without it the device would bypass the IOMMU and our
    IOVAs would mean nothing. Everything else is declined.
    """
    if not offered & (1 << Feature.VERSION_1):
        raise TransportError(f"device does not offer VERSION_1 ({offered:#x})", offered=offered)
    if mode == "type1" and not offered & (1 << Feature.ACCESS_PLATFORM):
        raise TransportError(
            "type1 needs ACCESS_PLATFORM (QEMU: iommu_platform=on)", offered=offered
        )
    accepted = 1 << Feature.VERSION_1
    for feature in _OPTIONAL_FEATURES:
        accepted |= offered & (1 << feature)
    return accepted


def pick_queue_size(device_max: int, limit: int) -> int:
    """The largest power of two <= min(device_max, limit)."""
    top = min(device_max, limit)
    if top < 2:
        raise TransportError(f"queue size {device_max} cannot hold a two-descriptor chain")
    return 1 << (top.bit_length() - 1)


class PciChannel(Closing):
    """One virtio-mem PCI function driven from userspace; see the module docstring.

    Build it with :meth:`open`; it is a context manager.
    """

    def __init__(self, bdf: str, vfio: VfioDevice) -> None:
        self.bdf = bdf
        self.vfio = vfio
        self.log = logging.getLogger(f"vmem_guest.channel.{bdf}")
        self.timeout = DEFAULT_TIMEOUT
        self.features = 0
        #: The device's whole feature word as offered (before negotiation).
        self.offered_features = 0
        self.msix = False
        self.transport: vp.VirtioPciTransport | None = None
        self.buffer: DmaBuffer | None = None
        self.queue: Virtqueue | None = None
        #: Physical ranges ([start, end)) the no-IOMMU DMA pages must stay out of.
        self.guard_ranges: list[tuple[int, int]] = []
        self._irq: EventFd | None = None  # INTx, or the MSI-X queue vector
        self._config_irq: EventFd | None = None  # MSI-X config vector
        self._release_req: EventFd | None = None  # the kernel wants the device back
        self._pending = Cause.NONE
        self._pagemap_path = pagemap.PAGEMAP  # where no-IOMMU buffers read their addresses

    @classmethod
    def open(
        cls,
        bdf: str,
        *,
        mode: Mode,
        sysfs_root: Path = SYSFS_ROOT,
        dev_root: Path = DEV_ROOT,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        iova: int = DEFAULT_IOVA,
        pagemap_path: Path = pagemap.PAGEMAP,
        guard_ranges: Sequence[tuple[int, int]] = (),
    ) -> PciChannel:
        """Open ``bdf`` (bound to vfio-pci) and bring the device to DRIVER_OK.

        ``guard_ranges``: other devices' regions, which no-IOMMU DMA pages must
        stay out of too (this device's own region is always guarded).
        """
        vfio = VfioDevice.open(bdf, mode=mode, sysfs_root=sysfs_root, dev_root=dev_root)
        channel = cls(bdf, vfio)
        channel.guard_ranges.extend(guard_ranges)
        channel.timeout = timeout
        try:
            channel._start(mode, queue_size, iova, pagemap_path)
        except BaseException:
            channel.close()
            raise
        return channel

    def _start(self, mode: Mode, queue_size: int, iova: int, pagemap_path: Path) -> None:
        self._pagemap_path = pagemap_path
        vfio = self.vfio
        config = vfio.config_space()
        check_identity(config)
        caps = vp.parse_virtio_caps(
            config, vfio.bar_sizes(), device_cfg_size=ctypes.sizeof(spec.VirtioMemConfig)
        )
        bars = {index: vfio.map_bar(index) for index in sorted(caps.bars())}
        transport = vp.VirtioPciTransport(caps, bars, name=self.bdf)
        self.transport = transport
        offered = self._handshake(transport)
        self.offered_features = offered
        self.features = select_features(offered, mode=mode)
        transport.negotiate(self.features)
        self.log.info("features offered %#x, accepted %#x", offered, self.features)

        size = pick_queue_size(transport.max_queue_size(spec.REQUEST_QUEUE), queue_size)
        layout = RingLayout.for_size(
            size,
            request_len=ctypes.sizeof(spec.VirtioMemReq),
            response_len=ctypes.sizeof(spec.VirtioMemResp),
        )
        if mode == "type1":
            ranges = vfio.container.iova_ranges()
            iova = choose_iova(ranges, layout.total, iova, PAGE_SIZE)
            self.buffer = IovaBuffer(layout.total, vfio.container, iova)
        config_size = ctypes.sizeof(spec.VirtioMemConfig)
        raw = spec.VirtioMemConfig.from_buffer_copy(transport.read_config(config_size))
        if raw.region_size:
            self.guard_ranges.append((raw.addr, raw.addr + raw.region_size))
        if mode == "noiommu":
            self.buffer = PhysBuffer.outside(
                layout.total, self.guard_ranges, pagemap_path=pagemap_path
            )
        assert self.buffer is not None
        self.buffer.check_outside(self.guard_ranges)

        self._setup_interrupts(transport)
        self._start_queue(transport, self.buffer, layout)
        self.log.info(
            "DRIVER_OK: %s, queue size %d, ring at bus %#x, %s interrupts",
            mode,
            size,
            self._ring_bus(),
            self.interrupt_mode.text,
        )

    def _handshake(self, transport: vp.VirtioPciTransport) -> int:
        """Reset, bus master, ACKNOWLEDGE, DRIVER (spec 3.1.1 steps 1-3); the offered features."""
        transport.reset()
        self.vfio.enable_bus_master()
        transport.add_status(vp.Status.ACKNOWLEDGE)
        transport.add_status(vp.Status.DRIVER)
        return transport.device_features()

    def _start_queue(
        self, transport: vp.VirtioPciTransport, buffer: DmaBuffer, layout: RingLayout
    ) -> None:
        """A fresh ring in ``buffer`` (zeroed, indices 0), queue 0 programmed and
        enabled, then DRIVER_OK (spec 4.1.5.1.3, 3.1.1 step 8)."""
        queue = Virtqueue(
            buffer,
            layout,
            notify=lambda: transport.notify(spec.REQUEST_QUEUE),
            wait_for_interrupt=self._wait_for_queue,
            name=self.bdf,
        )
        transport.setup_queue(
            spec.REQUEST_QUEUE,
            size=layout.size,
            desc=queue.desc_bus,
            driver=queue.avail_bus,
            device=queue.used_bus,
        )
        self.queue = queue
        transport.driver_ok()

    def _ring_bus(self) -> int:
        return self.queue.desc_bus if self.queue is not None else 0

    # -- after a resume from suspend -------------------------------------------------

    def transport_was_reset(self) -> bool:
        """True when the device no longer shows DRIVER_OK: its transport was reset
        under the driver. QEMU resets every device at S3 wake-up (7.2: the wake-up
        is a system reset, ``pc_machine_wakeup``; 10.0: ``qemu_devices_reset`` with
        RESET_TYPE_WAKEUP, virtio-pci's ``virtio_pci_reset`` included), so after a
        resume the device status reads 0 (docs/protocol.md section 7)."""
        transport, _, _ = self._live()
        return not transport.status() & vp.Status.DRIVER_OK

    def reinitialize(self) -> None:
        """Bring the function back to DRIVER_OK after a resume, as it was before.

        Reset, renegotiate exactly the features accepted at open (TransportError
        when the device no longer offers one of them), route the same eventfds
        again (the agent's selector keeps them), rebuild the queue in the same DMA
        buffer and DRIVER_OK. A device reset changes no block state (spec,
        device-types/mem, device reset), so what the memory is plugged to is not
        touched here: the driver checks it afterwards (``DeviceDriver.after_resume``).
        """
        transport, queue, buffer = self._live()
        self._restart(transport, buffer, queue.layout)
        self.log.info(
            "transport re-initialised: features %#x negotiated again, queue size %d rebuilt"
            " at bus %#x, %s interrupts, DRIVER_OK",
            self.features,
            queue.layout.size,
            self._ring_bus(),
            self.interrupt_mode.text,
        )

    def leave_secret_memory(self) -> bool:
        """Before a hibernation: move the ring out of memfd_secret memory, since Linux
        offers no hibernation while any exists (``hibernation_available``:
        ``!secretmem_active()``), into a locked anonymous page outside every device
        region (:meth:`PhysBuffer.outside`'s fallback, as where memfd_secret is off).
        The device is reset and the queue rebuilt in the new page, as after a resume
        (a reset changes no block state); the memfd_secret page is then released.
        False when the ring is not in memfd_secret memory (nothing to do)."""
        transport, queue, buffer = self._live()
        if not buffer.secret:
            return False
        plain = PhysBuffer.outside(
            queue.layout.total, self.guard_ranges, pagemap_path=self._pagemap_path, secret=False
        )
        try:
            self._restart(transport, plain, queue.layout)
        except BaseException:
            plain.close()
            raise
        self.buffer = plain
        buffer.close()
        self.log.info("ring moved out of memfd_secret memory to %s (hibernation)", plain.where())
        return True

    def _restart(
        self, transport: vp.VirtioPciTransport, buffer: DmaBuffer, layout: RingLayout
    ) -> None:
        """Reset, the features accepted at open negotiated again (TransportError when
        the device no longer offers one), the same eventfds routed, a fresh ring in
        ``buffer``, DRIVER_OK."""
        offered = self._handshake(transport)
        missing = self.features & ~offered
        if missing:
            raise TransportError(
                f"{self.bdf} no longer offers features {missing:#x} after resume"
                f" (offered {offered:#x}, accepted at open {self.features:#x})",
                bdf=self.bdf,
                offered=offered,
            )
        transport.negotiate(self.features)
        self._restore_interrupts(transport)
        self._start_queue(transport, buffer, layout)

    def _restore_interrupts(self, transport: vp.VirtioPciTransport) -> None:
        """Route the existing eventfds again, and the MSI-X vectors the reset forgot
        (``virtio_pci_reset`` sets them to VIRTIO_MSI_NO_VECTOR).

        VFIO_DEVICE_SET_IRQS with the same eventfds rewrites the MSI-X table entries
        from the kernel's cached messages (``vfio_msi_set_vector_signal``: "The MSIx
        vector table resides in device memory which may be cleared via backdoor
        resets"); for INTx it rebinds the eventfd, and the unmask lets a line VFIO
        masked before the suspend fire again.
        """
        if self._irq is None:
            raise TransportError(f"channel {self.bdf} has no interrupt", bdf=self.bdf)
        if not self.msix:
            self.vfio.enable_irqs(uapi.VFIO_PCI_INTX_IRQ_INDEX, [self._irq])
            self.vfio.unmask_intx()
            return
        assert self._config_irq is not None
        self.vfio.enable_irqs(uapi.VFIO_PCI_MSIX_IRQ_INDEX, [self._config_irq, self._irq])
        if not (
            transport.set_config_vector(CONFIG_VECTOR)
            and transport.set_queue_vector(spec.REQUEST_QUEUE, QUEUE_VECTOR)
        ):
            raise TransportError(f"{self.bdf} refused its MSI-X vectors after resume", bdf=self.bdf)

    def _setup_interrupts(self, transport: vp.VirtioPciTransport) -> None:
        """MSI-X with a config and a queue vector when the device has two and takes
        them, else INTx (QEMU 7.2's virtio-mem-pci has no MSI-X; 10.0 has two vectors).
        And VFIO's request index, so a hot-unplug asks for the device back."""
        self._setup_release_request()
        if self._try_msix(transport):
            return
        intx = self.vfio.irq_info(uapi.VFIO_PCI_INTX_IRQ_INDEX)
        if intx.count < 1:
            raise TransportError(f"{self.bdf} has neither MSI-X nor INTx", bdf=self.bdf)
        self._irq = EventFd()
        self.vfio.enable_irqs(uapi.VFIO_PCI_INTX_IRQ_INDEX, [self._irq])

    def _setup_release_request(self) -> None:
        release = EventFd()
        try:
            offered = self.vfio.enable_release_request(release)
        except (TransportError, IoctlError) as exc:
            self.log.warning("no release request (%s): a hot-unplug will wait for us", exc)
            offered = False
        if offered:
            self._release_req = release
        else:
            release.close()

    def release_request_fd(self) -> int | None:
        """Readable when the kernel asks for the device back (``device_del``)."""
        return None if self._release_req is None else self._release_req.fd

    def _try_msix(self, transport: vp.VirtioPciTransport) -> bool:
        """Vector 0 for config changes, 1 for the request queue; False (and MSI-X off
        again) when the function has fewer vectors or the device refuses one."""
        vectors = self.vfio.irq_info(uapi.VFIO_PCI_MSIX_IRQ_INDEX).count
        if vectors < MSIX_VECTORS:
            self.log.info("%d MSI-X vectors: INTx", vectors)
            return False
        config_irq, queue_irq = EventFd(), EventFd()
        try:
            self.vfio.enable_irqs(uapi.VFIO_PCI_MSIX_IRQ_INDEX, [config_irq, queue_irq])
        except TransportError as exc:
            self.log.warning("MSI-X cannot be enabled (%s): falling back to INTx", exc)
            config_irq.close()
            queue_irq.close()
            return False
        if transport.set_config_vector(CONFIG_VECTOR) and transport.set_queue_vector(
            spec.REQUEST_QUEUE, QUEUE_VECTOR
        ):
            self._config_irq, self._irq = config_irq, queue_irq
            self.msix = True
            return True
        self.log.warning("the device refused its MSI-X vectors: falling back to INTx")
        transport.set_config_vector(vp.VIRTIO_MSI_NO_VECTOR)
        transport.set_queue_vector(spec.REQUEST_QUEUE, vp.VIRTIO_MSI_NO_VECTOR)
        self.vfio.disable_irqs()
        config_irq.close()
        queue_irq.close()
        return False

    @property
    def interrupt_mode(self) -> InterruptMode:
        """MSI-X (two vectors) or INTx: how this device's interrupts arrive."""
        return InterruptMode.MSIX if self.msix else InterruptMode.INTX

    @property
    def device_features(self) -> int:
        """The virtio-mem feature bits (0-23, spec 5.15.3) accepted at negotiation."""
        return self.features & DEVICE_FEATURE_MASK

    # -- RequestChannel ------------------------------------------------------------

    def _live(self) -> tuple[vp.VirtioPciTransport, Virtqueue, DmaBuffer]:
        if self.transport is None or self.queue is None or self.buffer is None:
            raise TransportError(f"channel {self.bdf} is closed", bdf=self.bdf)
        return self.transport, self.queue, self.buffer

    def read_config(self) -> bytes:
        """The 56 config bytes, stable across ``config_generation``."""
        transport, _, _ = self._live()
        return transport.read_config(ctypes.sizeof(spec.VirtioMemConfig))

    def submit(self, request: bytes) -> bytes:
        """One request, one response; DeviceTimeout if the device stays silent."""
        transport, queue, buffer = self._live()
        if transport.needs_reset():
            raise DeviceBroken(f"{self.bdf} signals DEVICE_NEEDS_RESET", bdf=self.bdf)
        if self.transport_was_reset():
            # The queue is disabled: the request would go unanswered for the whole
            # timeout. A suspend that froze the agent in the middle of a step ends here.
            raise DeviceBroken(
                f"{self.bdf} lost DRIVER_OK (status {transport.status():#x}): its transport"
                " was reset under the driver, by a resume from suspend?",
                bdf=self.bdf,
            )
        buffer.check_outside(self.guard_ranges)
        try:
            return queue.submit(request, self.timeout)
        except DeviceTimeout as exc:
            exc.fields["status"] = transport.status()
            raise
        finally:
            if self._pending and self._irq is not None:
                self._irq.signal()  # hand the outer loop what we saw while waiting

    # -- interrupts -----------------------------------------------------------------

    def interrupt_fd(self) -> int:
        """The eventfd to poll for queue interrupts (with INTx: for everything)."""
        if self._irq is None:
            raise TransportError(f"channel {self.bdf} has no interrupt", bdf=self.bdf)
        return self._irq.fd

    def config_change_fd(self) -> int:
        """The eventfd to poll for config changes (the INTx eventfd without MSI-X)."""
        if self._config_irq is not None:
            return self._config_irq.fd
        return self.interrupt_fd()

    def handle_interrupt(self) -> Cause:
        """Consume pending interrupts and say which causes they had.

        With INTx: drain the eventfd, read ISR (clears it), unmask INTx.
        """
        causes, self._pending = self._pending, Cause.NONE
        if self.msix:
            if self._config_irq is not None and self._config_irq.drain():
                causes |= Cause.CONFIG
            if self._irq is not None and self._irq.drain():
                causes |= Cause.QUEUE
            return causes
        transport, _, _ = self._live()
        if self._irq is not None:
            self._irq.drain()
        isr = transport.read_isr()
        self.vfio.unmask_intx()
        if isr & vp.ISR_QUEUE:
            causes |= Cause.QUEUE
        if isr & vp.ISR_CONFIG:
            causes |= Cause.CONFIG
        return causes

    def _wait_for_queue(self, timeout: float) -> bool:
        """Virtqueue seam: block on the interrupt eventfd, keep config causes for later."""
        if self._irq is None or not self._irq.wait(timeout):
            return False
        # A config change seen while waiting is kept for the outer loop.
        self._pending |= self.handle_interrupt() & Cause.CONFIG
        return True

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Interrupts off, device reset (block state survives it, spec 5.15.5), DMA unmapped."""
        try:
            self.vfio.disable_irqs()
        except IoctlError as exc:
            if exc.errno != errno.ENODEV:
                self.log.warning("disabling interrupts: %s", exc)
        if self.transport is not None:
            try:
                self.transport.reset()
            except TransportError as exc:
                self.log.warning("reset at close: %s", exc)
        self.queue = None
        self.transport = None
        if self.buffer is not None:
            try:
                self.buffer.close()
            except TransportError as exc:
                self.log.warning("releasing DMA memory: %s", exc)
            self.buffer = None
        self.vfio.close()
        for efd in (self._irq, self._config_irq, self._release_req):
            if efd is not None:
                efd.close()
        self._irq = self._config_irq = self._release_req = None
        self.log.info("closed")
