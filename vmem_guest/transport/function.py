"""What :class:`~vmem_guest.transport.channel.PciChannel` needs of a PCI function,
whoever hands it over: VFIO (:mod:`.vfio_function`) or UIO (:mod:`.uio`).

Three things differ between them (docs/uio.md):

* **BARs and config space**: VFIO regions of the device fd, or sysfs ``resourceN``
  and ``config`` files;
* **interrupts** (:class:`Interrupts`): eventfds VFIO signals (MSI-X vectors or
  INTx, unmasked with an ioctl), or ``/dev/uioN`` whose event count moves on each
  INTx (re-enabled through the command register);
* **DMA memory**: mapped at an IOVA (type1), or at physical addresses read from
  pagemap (VFIO no-IOMMU and UIO: :class:`~.dma.PhysBuffer`).

Everything else (capability walk, virtio handshake, queue, requests) is the
channel's and the same for both.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Protocol

from vmem_guest.device import Binding, Cause, InterruptMode
from vmem_guest.transport.dma import DmaBuffer
from vmem_guest.transport.virtio_pci import BarLike, VirtioPciTransport

#: How a function is opened: VFIO behind an IOMMU, VFIO without one, or UIO.
Access = Literal["type1", "noiommu", "uio"]

_BINDINGS: dict[str, Binding] = {
    "type1": Binding.VFIO_TYPE1,
    "noiommu": Binding.VFIO_NOIOMMU,
    "uio": Binding.UIO,
}


def binding_of(access: Access) -> Binding:
    """The :class:`~vmem_guest.device.Binding` a tracker records for ``access``."""
    return _BINDINGS[access]


class Interrupts(Protocol):
    """How a function's interrupts reach the agent: file descriptors a selector can
    wait on (never a busy poll), and what to do once one is readable."""

    @property
    def mode(self) -> InterruptMode:
        """INTx or MSI-X."""

    def queue_fd(self) -> int:
        """Readable on a queue interrupt (with INTx: on any interrupt)."""

    def config_fd(self) -> int:
        """Readable on a config change, or when :meth:`repost` was called (may be
        :meth:`queue_fd`)."""

    def wait(self, timeout: float) -> bool:
        """Block until :meth:`queue_fd` is readable or ``timeout`` s pass."""

    def take(self) -> Cause:
        """Consume what is pending and say its causes; with INTx read the ISR
        (which clears it) and let the line fire again."""

    def repost(self) -> None:
        """Make :meth:`config_fd` readable again: a config change :meth:`take` saw
        during a request is handed to the outer loop this way."""

    def restore(self) -> None:
        """After a device reset: route the same fds again (the selector keeps them)."""

    def release_request_fd(self) -> int | None:
        """Readable when the kernel asks for the device back; None if it cannot ask."""

    def close(self) -> None:
        """Interrupts off, fds closed."""


class PciFunction(Protocol):
    """One PCI function handed to userspace: config space, BARs, DMA memory and
    interrupts. Closing it gives everything back (the channel resets the device
    first)."""

    bdf: str
    #: How it was opened; ``type1`` needs ACCESS_PLATFORM (IOVAs), the others hand
    #: physical addresses to the device.
    access: Access

    def config_space(self) -> bytes:
        """The standard 256 bytes of config space (for the capability walk)."""

    def bar_sizes(self) -> list[int]:
        """Sizes of BARs 0-5 (0 for an unimplemented one)."""

    def map_bar(self, index: int) -> BarLike:
        """BAR ``index`` mapped read-write (kept until :meth:`close`)."""

    def enable_bus_master(self) -> None:
        """Memory Space and Bus Master on in the Command register: the device may DMA."""

    def dma_buffer(self, size: int, guard_ranges: Iterable[tuple[int, int]]) -> DmaBuffer:
        """Locked DMA memory of ``size`` bytes the device can reach, outside every
        ``[start, end)`` of ``guard_ranges`` when the device sees physical addresses."""

    def open_interrupts(self, transport: VirtioPciTransport) -> Interrupts:
        """Set up interrupts (``transport`` for MSI-X vectors and the ISR)."""

    def close(self) -> None:
        """Unmap the BARs and let the function go."""
