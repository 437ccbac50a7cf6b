"""PciChannel: a :class:`vmem_guest.device.RequestChannel` over virtio-pci, on a
PCI function handed over by VFIO or UIO (:mod:`.function`).

It puts the pieces together in the order the spec asks (virtio spec 3.1.1,
4.1.5.1): the function, capability walk, BAR mappings, reset, ACKNOWLEDGE,
DRIVER, features, FEATURES_OK, DMA memory, interrupts, queue 0, DRIVER_OK.

Interrupts arrive on file descriptors (:class:`.function.Interrupts`). With INTx
(all QEMU 7.2 offers for virtio-mem) one line carries both causes: taking an
interrupt reads the ISR byte (which clears it) and lets the line fire again. A
config change that arrives while a request waits for its answer is remembered
and re-posted once the request is done, so an outer selector loop never misses it.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path

from vmem_guest import spec
from vmem_guest._linux import pagemap
from vmem_guest._linux.lifetime import Closing
from vmem_guest._linux.sysfs import SYSFS_ROOT
from vmem_guest.device import DEVICE_FEATURE_MASK, Binding, Cause, InterruptMode
from vmem_guest.errors import DeviceBroken, DeviceTimeout, TransportError
from vmem_guest.spec import Feature
from vmem_guest.transport import virtio_pci as vp
from vmem_guest.transport.dma import DmaBuffer, PhysBuffer
from vmem_guest.transport.function import Access, Interrupts, PciFunction, binding_of
from vmem_guest.transport.uio import UioFunction
from vmem_guest.transport.vfio import DEV_ROOT
from vmem_guest.transport.vfio_function import DEFAULT_IOVA, VfioFunction
from vmem_guest.transport.virtqueue import RingLayout, Virtqueue

#: One request in flight needs two descriptors; a small ring fits in one page.
DEFAULT_QUEUE_SIZE = 16
DEFAULT_TIMEOUT = 5.0

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


def select_features(offered: int, *, mode: Access) -> int:
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
    IOVAs would mean nothing (without an IOMMU, VFIO no-IOMMU or UIO, the platform's
    DMA translation is the identity). Everything else is declined.
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

    def __init__(self, bdf: str, function: PciFunction) -> None:
        self.bdf = bdf
        self.function = function
        self.log = logging.getLogger(f"vmem_guest.channel.{bdf}")
        self.timeout = DEFAULT_TIMEOUT
        self.features = 0
        #: The device's whole feature word as offered (before negotiation).
        self.offered_features = 0
        self.transport: vp.VirtioPciTransport | None = None
        self.buffer: DmaBuffer | None = None
        self.queue: Virtqueue | None = None
        self.interrupts: Interrupts | None = None
        #: Physical ranges ([start, end)) the no-IOMMU DMA pages must stay out of.
        self.guard_ranges: list[tuple[int, int]] = []
        self._pending = Cause.NONE
        self._pagemap_path = pagemap.PAGEMAP  # where no-IOMMU buffers read their addresses

    @classmethod
    def open(
        cls,
        bdf: str,
        *,
        mode: Access,
        sysfs_root: Path = SYSFS_ROOT,
        dev_root: Path = DEV_ROOT,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        iova: int = DEFAULT_IOVA,
        pagemap_path: Path = pagemap.PAGEMAP,
        guard_ranges: Sequence[tuple[int, int]] = (),
    ) -> PciChannel:
        """Open ``bdf`` (bound to vfio-pci, or to uio_pci_generic for ``uio``) and
        bring the device to DRIVER_OK.

        ``guard_ranges``: other devices' regions, which physically addressed DMA
        pages must stay out of too (this device's own region is always guarded).
        """
        function: PciFunction
        if mode == "uio":
            function = UioFunction.open(
                bdf, sysfs_root=sysfs_root, dev_root=dev_root, pagemap_path=pagemap_path
            )
        else:
            function = VfioFunction.open(
                bdf,
                mode=mode,
                sysfs_root=sysfs_root,
                dev_root=dev_root,
                iova=iova,
                pagemap_path=pagemap_path,
            )
        return cls.start(
            bdf,
            function,
            queue_size=queue_size,
            timeout=timeout,
            guard_ranges=guard_ranges,
            pagemap_path=pagemap_path,
        )

    @classmethod
    def start(
        cls,
        bdf: str,
        function: PciFunction,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        guard_ranges: Sequence[tuple[int, int]] = (),
        pagemap_path: Path = pagemap.PAGEMAP,
    ) -> PciChannel:
        """Bring the device behind an open ``function`` to DRIVER_OK (the channel
        owns the function from here: it is closed if this fails)."""
        channel = cls(bdf, function)
        channel._pagemap_path = pagemap_path
        channel.guard_ranges.extend(guard_ranges)
        channel.timeout = timeout
        try:
            channel._start(queue_size)
        except BaseException:
            channel.close()
            raise
        return channel

    def _start(self, queue_size: int) -> None:
        function = self.function
        config = function.config_space()
        check_identity(config)
        caps = vp.parse_virtio_caps(
            config, function.bar_sizes(), device_cfg_size=ctypes.sizeof(spec.VirtioMemConfig)
        )
        bars = {index: function.map_bar(index) for index in sorted(caps.bars())}
        transport = vp.VirtioPciTransport(caps, bars, name=self.bdf)
        self.transport = transport
        offered = self._handshake(transport)
        self.offered_features = offered
        self.features = select_features(offered, mode=function.access)
        transport.negotiate(self.features)
        self.log.info("features offered %#x, accepted %#x", offered, self.features)

        size = pick_queue_size(transport.max_queue_size(spec.REQUEST_QUEUE), queue_size)
        layout = RingLayout.for_size(
            size,
            request_len=ctypes.sizeof(spec.VirtioMemReq),
            response_len=ctypes.sizeof(spec.VirtioMemResp),
        )
        config_size = ctypes.sizeof(spec.VirtioMemConfig)
        raw = spec.VirtioMemConfig.from_buffer_copy(transport.read_config(config_size))
        if raw.region_size:
            self.guard_ranges.append((raw.addr, raw.addr + raw.region_size))
        self.buffer = function.dma_buffer(layout.total, self.guard_ranges)
        self.buffer.check_outside(self.guard_ranges)

        self.interrupts = function.open_interrupts(transport)
        self._start_queue(transport, self.buffer, layout)
        self.log.info(
            "DRIVER_OK: %s, queue size %d, ring at bus %#x, %s interrupts",
            self.binding.text,
            size,
            self._ring_bus(),
            self.interrupt_mode.text,
        )

    def _handshake(self, transport: vp.VirtioPciTransport) -> int:
        """Reset, bus master, ACKNOWLEDGE, DRIVER (spec 3.1.1 steps 1-3); the offered features."""
        transport.reset()
        self.function.enable_bus_master()
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
        the device no longer offers one), the same interrupt fds routed, a fresh ring
        in ``buffer``, DRIVER_OK."""
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
        self._irqs().restore()
        self._start_queue(transport, buffer, layout)

    def _irqs(self) -> Interrupts:
        if self.interrupts is None:
            raise TransportError(f"channel {self.bdf} has no interrupt", bdf=self.bdf)
        return self.interrupts

    def release_request_fd(self) -> int | None:
        """Readable when the kernel asks for the device back (``device_del``)."""
        return None if self.interrupts is None else self.interrupts.release_request_fd()

    @property
    def interrupt_mode(self) -> InterruptMode:
        """MSI-X (two vectors) or INTx: how this device's interrupts arrive."""
        return self._irqs().mode

    @property
    def msix(self) -> bool:
        return self.interrupt_mode is InterruptMode.MSIX

    @property
    def binding(self) -> Binding:
        """vfio type1, vfio noiommu or uio: who handed the function over."""
        return binding_of(self.function.access)

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

    def config_generation(self) -> int:
        """The ``config_generation`` the last :meth:`read_config` was read under (the
        conformance fuzzer's spec oracle checks it, spec 4.1.4.3.1)."""
        transport, _, _ = self._live()
        if transport.last_config_generation is None:
            transport.read_config(ctypes.sizeof(spec.VirtioMemConfig))
        return transport.last_config_generation or 0

    def submit(self, request: bytes) -> bytes:
        """One request, one response; DeviceTimeout if the device stays silent.

        The DMA pages are checked before the request is posted, so PagemapRefused
        (that check could not run now) means the device saw nothing."""
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
            if self._pending and self.interrupts is not None:
                self.interrupts.repost()  # hand the outer loop what we saw while waiting

    # -- interrupts -----------------------------------------------------------------

    def interrupt_fd(self) -> int:
        """The fd to poll for queue interrupts (with INTx: for everything)."""
        return self._irqs().queue_fd()

    def config_change_fd(self) -> int:
        """The fd to poll for config changes (with INTx: the same one)."""
        return self._irqs().config_fd()

    def handle_interrupt(self) -> Cause:
        """Consume pending interrupts and say which causes they had (with INTx: the
        ISR read, which clears it, then the line let fire again)."""
        causes, self._pending = self._pending, Cause.NONE
        return causes | self._irqs().take()

    def _wait_for_queue(self, timeout: float) -> bool:
        """Virtqueue seam: block on the queue interrupt, keep config causes for later."""
        if self.interrupts is None or not self.interrupts.wait(timeout):
            return False
        # A config change seen while waiting is kept for the outer loop.
        self._pending |= self.handle_interrupt() & Cause.CONFIG
        return True

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Interrupts off, device reset (block state survives it, spec 5.15.5), DMA
        released, the function let go."""
        if self.interrupts is not None:
            self.interrupts.close()
            self.interrupts = None
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
        self.function.close()
        self.log.info("closed")
