"""A :class:`~vmem_guest.transport.function.PciFunction` over VFIO (vfio-pci).

BARs and config space are regions of the device fd (:class:`.vfio.VfioDevice`);
DMA memory is mapped at an IOVA (type1) or found at physical addresses
(no-IOMMU, :class:`.dma.PhysBuffer`); interrupts are eventfds
(:class:`VfioInterrupts`): two MSI-X vectors when the device has them and takes
them, else INTx, which VFIO masks when it fires and we unmask after reading the
ISR (docs/protocol.md section 3).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable
from pathlib import Path

from vmem_guest import spec
from vmem_guest._linux import pagemap
from vmem_guest._linux import vfio_uapi as uapi
from vmem_guest._linux.eventfd import EventFd
from vmem_guest._linux.sysfs import SYSFS_ROOT
from vmem_guest.device import Cause, InterruptMode
from vmem_guest.errors import IoctlError, TransportError
from vmem_guest.transport import virtio_pci as vp
from vmem_guest.transport.dma import PAGE_SIZE, DmaBuffer, IovaBuffer, PhysBuffer
from vmem_guest.transport.function import Access
from vmem_guest.transport.vfio import DEV_ROOT, MappedBar, Mode, VfioDevice, choose_iova

#: Where the first DMA buffer goes in the IOMMU domain (type1). Below the x86
#: MSI window (0xfee00000) and above the first 256 MiB.
DEFAULT_IOVA = 0x1000_0000

#: MSI-X table entries used: config changes and the request queue.
CONFIG_VECTOR = 0
QUEUE_VECTOR = 1
MSIX_VECTORS = 2

log = logging.getLogger(__name__)


class VfioInterrupts:
    """:class:`~.function.Interrupts` through VFIO eventfds.

    MSI-X: one eventfd per vector (config, queue). INTx: one eventfd for both
    causes; :meth:`take` reads the ISR and unmasks the line VFIO masked.
    """

    def __init__(self, vfio: VfioDevice, transport: vp.VirtioPciTransport) -> None:
        self.vfio = vfio
        self.transport = transport
        self.msix = False
        self.irq: EventFd | None = None  # INTx, or the MSI-X queue vector
        self.config_irq: EventFd | None = None  # MSI-X config vector
        self.release: EventFd | None = None  # the kernel wants the device back

    def setup(self) -> None:
        """MSI-X with a config and a queue vector when the device has two and takes
        them, else INTx (QEMU 7.2's virtio-mem-pci has no MSI-X; 10.0 has two vectors).
        And VFIO's request index, so a hot-unplug asks for the device back."""
        self._setup_release_request()
        if self._try_msix():
            return
        intx = self.vfio.irq_info(uapi.VFIO_PCI_INTX_IRQ_INDEX)
        if intx.count < 1:
            raise TransportError(f"{self.vfio.bdf} has neither MSI-X nor INTx", bdf=self.vfio.bdf)
        self.irq = EventFd()
        self.vfio.enable_irqs(uapi.VFIO_PCI_INTX_IRQ_INDEX, [self.irq])

    def _setup_release_request(self) -> None:
        release = EventFd()
        try:
            offered = self.vfio.enable_release_request(release)
        except (TransportError, IoctlError) as exc:
            log.warning("no release request (%s): a hot-unplug will wait for us", exc)
            offered = False
        if offered:
            self.release = release
        else:
            release.close()

    def _try_msix(self) -> bool:
        """Vector 0 for config changes, 1 for the request queue; False (and MSI-X off
        again) when the function has fewer vectors or the device refuses one."""
        transport = self.transport
        vectors = self.vfio.irq_info(uapi.VFIO_PCI_MSIX_IRQ_INDEX).count
        if vectors < MSIX_VECTORS:
            log.info("%d MSI-X vectors: INTx", vectors)
            return False
        config_irq, queue_irq = EventFd(), EventFd()
        try:
            self.vfio.enable_irqs(uapi.VFIO_PCI_MSIX_IRQ_INDEX, [config_irq, queue_irq])
        except TransportError as exc:
            log.warning("MSI-X cannot be enabled (%s): falling back to INTx", exc)
            config_irq.close()
            queue_irq.close()
            return False
        if transport.set_config_vector(CONFIG_VECTOR) and transport.set_queue_vector(
            spec.REQUEST_QUEUE, QUEUE_VECTOR
        ):
            self.config_irq, self.irq = config_irq, queue_irq
            self.msix = True
            return True
        log.warning("the device refused its MSI-X vectors: falling back to INTx")
        transport.set_config_vector(vp.VIRTIO_MSI_NO_VECTOR)
        transport.set_queue_vector(spec.REQUEST_QUEUE, vp.VIRTIO_MSI_NO_VECTOR)
        self.vfio.disable_irqs()
        config_irq.close()
        queue_irq.close()
        return False

    @property
    def mode(self) -> InterruptMode:
        return InterruptMode.MSIX if self.msix else InterruptMode.INTX

    def _queue(self) -> EventFd:
        if self.irq is None:
            raise TransportError(f"{self.vfio.bdf} has no interrupt", bdf=self.vfio.bdf)
        return self.irq

    def queue_fd(self) -> int:
        return self._queue().fd

    def config_fd(self) -> int:
        return self.config_irq.fd if self.config_irq is not None else self.queue_fd()

    def wait(self, timeout: float) -> bool:
        return self._queue().wait(timeout)

    def take(self) -> Cause:
        """MSI-X: which eventfds fired. INTx: drain the eventfd, read ISR (clears
        it), unmask INTx."""
        causes = Cause.NONE
        if self.msix:
            if self.config_irq is not None and self.config_irq.drain():
                causes |= Cause.CONFIG
            if self.irq is not None and self.irq.drain():
                causes |= Cause.QUEUE
            return causes
        self._queue().drain()
        isr = self.transport.read_isr()
        self.vfio.unmask_intx()
        if isr & vp.ISR_QUEUE:
            causes |= Cause.QUEUE
        if isr & vp.ISR_CONFIG:
            causes |= Cause.CONFIG
        return causes

    def repost(self) -> None:
        self._queue().signal()

    def restore(self) -> None:
        """Route the existing eventfds again, and the MSI-X vectors the reset forgot
        (``virtio_pci_reset`` sets them to VIRTIO_MSI_NO_VECTOR).

        VFIO_DEVICE_SET_IRQS with the same eventfds rewrites the MSI-X table entries
        from the kernel's cached messages (``vfio_msi_set_vector_signal``: "The MSIx
        vector table resides in device memory which may be cleared via backdoor
        resets"); for INTx it rebinds the eventfd, and the unmask lets a line VFIO
        masked before the suspend fire again.
        """
        queue = self._queue()
        if not self.msix:
            self.vfio.enable_irqs(uapi.VFIO_PCI_INTX_IRQ_INDEX, [queue])
            self.vfio.unmask_intx()
            return
        assert self.config_irq is not None
        self.vfio.enable_irqs(uapi.VFIO_PCI_MSIX_IRQ_INDEX, [self.config_irq, queue])
        if not (
            self.transport.set_config_vector(CONFIG_VECTOR)
            and self.transport.set_queue_vector(spec.REQUEST_QUEUE, QUEUE_VECTOR)
        ):
            raise TransportError(
                f"{self.vfio.bdf} refused its MSI-X vectors after resume", bdf=self.vfio.bdf
            )

    def release_request_fd(self) -> int | None:
        return None if self.release is None else self.release.fd

    def close(self) -> None:
        """Interrupts off in VFIO (ENODEV: the device is already gone), fds closed."""
        try:
            self.vfio.disable_irqs()
        except IoctlError as exc:
            if exc.errno != errno.ENODEV:
                log.warning("disabling interrupts: %s", exc)
        for efd in (self.irq, self.config_irq, self.release):
            if efd is not None:
                efd.close()
        self.irq = self.config_irq = self.release = None


class VfioFunction:
    """:class:`~.function.PciFunction` over an open :class:`.vfio.VfioDevice`."""

    def __init__(
        self,
        vfio: VfioDevice,
        *,
        iova: int = DEFAULT_IOVA,
        pagemap_path: Path = pagemap.PAGEMAP,
    ) -> None:
        self.vfio = vfio
        self.bdf = vfio.bdf
        self.access: Access = vfio.mode
        self.iova = iova
        self.pagemap_path = pagemap_path

    @classmethod
    def open(
        cls,
        bdf: str,
        *,
        mode: Mode,
        sysfs_root: Path = SYSFS_ROOT,
        dev_root: Path = DEV_ROOT,
        iova: int = DEFAULT_IOVA,
        pagemap_path: Path = pagemap.PAGEMAP,
    ) -> VfioFunction:
        """Open ``bdf`` (bound to vfio-pci) in ``mode``."""
        vfio = VfioDevice.open(bdf, mode=mode, sysfs_root=sysfs_root, dev_root=dev_root)
        return cls(vfio, iova=iova, pagemap_path=pagemap_path)

    def config_space(self) -> bytes:
        return self.vfio.config_space()

    def bar_sizes(self) -> list[int]:
        return self.vfio.bar_sizes()

    def map_bar(self, index: int) -> MappedBar:
        return self.vfio.map_bar(index)

    def enable_bus_master(self) -> None:
        self.vfio.enable_bus_master()

    def dma_buffer(self, size: int, guard_ranges: Iterable[tuple[int, int]]) -> DmaBuffer:
        """type1: mapped at an IOVA inside the container's usable ranges; no-IOMMU:
        physical pages outside ``guard_ranges`` (:meth:`.dma.PhysBuffer.outside`)."""
        if self.access == "type1":
            container = self.vfio.container
            iova = choose_iova(container.iova_ranges(), size, self.iova, PAGE_SIZE)
            return IovaBuffer(size, container, iova)
        return PhysBuffer.outside(size, guard_ranges, pagemap_path=self.pagemap_path)

    def open_interrupts(self, transport: vp.VirtioPciTransport) -> VfioInterrupts:
        interrupts = VfioInterrupts(self.vfio, transport)
        try:
            interrupts.setup()
        except BaseException:
            interrupts.close()
            raise
        return interrupts

    def close(self) -> None:
        self.vfio.close()
