"""A :class:`~vmem_guest.transport.function.PciFunction` over UIO (uio_pci_generic).

For guests without VFIO (docs/uio.md). Facts used, read in Linux 6.1:

* uio_pci_generic registers ``/dev/uioN`` (``<device>/uio/uioN`` in sysfs) with the
  function's INTx line, shared. Its handler (drivers/uio/uio_pci_generic.c:
  ``irqhandler`` -> ``pci_check_and_mask_intx``) claims the interrupt when the
  Interrupt Status bit is set and sets Interrupt Disable in the Command register;
  the UIO core then bumps the event count. The driver has no ``irqcontrol``, so a
  write to ``/dev/uioN`` is ENOSYS (drivers/uio/uio.c: ``uio_write``): userspace
  re-enables INTx by clearing the bit through the sysfs ``config`` file
  (Documentation/driver-api/uio-howto.rst, "Writing userspace driver using
  uio_pci_generic"; DPDK lib/eal/linux/eal_interrupts.c: ``uio_intx_intr_enable``,
  a 1-byte read-modify-write at offset 5).
* ``read()`` of 4 bytes returns the event count once it changed since this open
  file last read it (EAGAIN under O_NONBLOCK); ``poll()`` says POLLIN while it has
  changed (drivers/uio/uio.c: ``uio_read``, ``uio_poll``): a selector can wait on it.
* uio_pci_generic does not set Bus Master, and clears it when ``/dev/uioN`` is
  closed (``release`` -> ``pci_clear_master``); DPDK sets it itself after opening
  (drivers/bus/pci/linux/pci_uio.c: ``pci_uio_alloc_resource``).
* BARs are mapped through ``<device>/resourceN`` (drivers/pci/pci-sysfs.c:
  ``pci_mmap_resource``), their sizes read from ``<device>/resource``
  (``resource_show``: start, end, flags per line).

Without an IOMMU the device sees physical addresses: DMA memory is built as in
VFIO's no-IOMMU mode (:meth:`.dma.PhysBuffer.outside`).

The sysfs and /dev roots are parameters, so all of it runs against a fake tree.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import select
from collections.abc import Iterable
from pathlib import Path

from vmem_guest._linux import pagemap
from vmem_guest._linux.eventfd import EventFd
from vmem_guest._linux.lifetime import close_fd
from vmem_guest._linux.sysfs import SYSFS_ROOT, link_name
from vmem_guest.device import Cause, InterruptMode
from vmem_guest.errors import TransportError
from vmem_guest.pci_address import check_bdf
from vmem_guest.transport import pci_config
from vmem_guest.transport import virtio_pci as vp
from vmem_guest.transport.dma import DmaBuffer, PhysBuffer
from vmem_guest.transport.function import Access
from vmem_guest.transport.vfio import DEV_ROOT, MappedBar

#: The driver's name in /sys/bus/pci/drivers.
UIO_PCI_GENERIC = "uio_pci_generic"
#: The byte of the Command register that holds Interrupt Disable (bit 10 = bit 2 of
#: byte 5), accessed alone as uio-howto.rst and DPDK do.
COMMAND_HIGH = pci_config.PCI_COMMAND + 1
INTX_DISABLE_HIGH = pci_config.PCI_COMMAND_INTX_DISABLE >> 8
#: ``include/linux/ioport.h``: IORESOURCE_MEM, a memory BAR (sysfs ``resource`` flags).
IORESOURCE_MEM = 0x0000_0200
#: The event count ``/dev/uioN`` hands out per read (an s32).
EVENT_COUNT_SIZE = 4

log = logging.getLogger(__name__)


def device_dir(bdf: str, sysfs_root: Path = SYSFS_ROOT) -> Path:
    return sysfs_root / "bus/pci/devices" / check_bdf(bdf)


def uio_number(bdf: str, sysfs_root: Path = SYSFS_ROOT) -> int | None:
    """N of the ``uioN`` uio_pci_generic registered for ``bdf`` (``<device>/uio/uioN``),
    None when there is none (not bound, or being unbound)."""
    try:
        names = os.listdir(device_dir(bdf, sysfs_root) / "uio")
    except OSError:
        return None
    numbers = sorted(int(name[3:]) for name in names if name[:3] == "uio" and name[3:].isdigit())
    return numbers[0] if numbers else None


def uio_node(number: int, dev_root: Path = DEV_ROOT) -> Path:
    return dev_root / f"uio{number}"


def held(bdf: str, sysfs_root: Path = SYSFS_ROOT) -> bool:
    """True when an agent drives ``bdf`` through UIO: it holds an exclusive flock on
    the function's sysfs ``config`` file (:meth:`UioFunction.open`).

    ``/dev/uioN`` can be opened any number of times (unlike a VFIO group), so a lock
    is what tells a second user, and ``unbind``, that the device is driven. The lock
    is not on ``/dev/uioN`` itself: every close of that node runs uio_pci_generic's
    ``release``, which clears Bus Master, so merely testing a lock there would stop
    the device's DMA under the agent. Opening and closing ``config`` does nothing.
    """
    try:
        fd = os.open(device_dir(bdf, sysfs_root) / "config", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@dataclasses.dataclass(frozen=True)
class Resource:
    """One line of ``<device>/resource``: ``[start, end]`` and IORESOURCE flags."""

    start: int
    end: int
    flags: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1 if self.end > self.start else 0

    @property
    def is_memory(self) -> bool:
        return bool(self.flags & IORESOURCE_MEM)


def parse_resources(text: str) -> list[Resource]:
    """The lines of ``<device>/resource`` (``0x%016llx 0x%016llx 0x%016llx``)."""
    resources = []
    for number, line in enumerate(text.splitlines()):
        words = line.split()
        try:
            start, end, flags = (int(word, 16) for word in words)
        except ValueError:
            raise TransportError(
                f"resource line {number}: {line!r} is not three hex numbers", line=line
            ) from None
        resources.append(Resource(start, end, flags))
    return resources


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise TransportError(f"cannot open {path}: {exc.strerror}", path=str(path)) from None


class SysfsConfig:
    """PCI config space through ``<device>/config``: ``pread``/``pwrite`` of 1, 2 or 4
    bytes at their offset are single config accesses (drivers/pci/pci-sysfs.c:
    ``pci_read_config``, ``pci_write_config``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = _open(path, os.O_RDWR)

    def config_read(self, offset: int, size: int) -> bytes:
        try:
            data = os.pread(self.fd, size, offset)
        except OSError as exc:
            raise TransportError(f"config read at {offset:#x} failed: {exc.strerror}") from None
        if len(data) != size:
            raise TransportError(f"config read at {offset:#x}: {len(data)} of {size} bytes")
        return data

    def config_write(self, offset: int, data: bytes) -> None:
        try:
            written = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise TransportError(f"config write at {offset:#x} failed: {exc.strerror}") from None
        if written != len(data):
            raise TransportError(f"config write at {offset:#x}: {written} of {len(data)} bytes")

    def set_intx(self, enabled: bool) -> None:
        """Clear (enabled) or set Interrupt Disable, by a 1-byte read-modify-write of
        the Command register's high byte (uio-howto.rst; DPDK ``uio_intx_intr_enable``).

        The low byte (Memory Space, Bus Master) is not touched. No read-back: the
        kernel's handler may set the bit again at once, which is what it is for.
        """
        high = self.config_read(COMMAND_HIGH, 1)[0]
        wanted = high & ~INTX_DISABLE_HIGH if enabled else high | INTX_DISABLE_HIGH
        if wanted != high:
            self.config_write(COMMAND_HIGH, bytes([wanted]))

    def close(self) -> None:
        self.fd = close_fd(self.fd)


class UioInterrupts:
    """:class:`~.function.Interrupts` from ``/dev/uioN``: INTx only.

    The fd handed out for both causes is an epoll instance over the uio fd (POLLIN
    while the event count moved) and an eventfd of ours that only :meth:`repost`
    signals, since nothing can be written into the uio fd to wake the outer loop
    again. An epoll fd is itself pollable (readable while one of its fds is), so
    the agent's selector and :meth:`wait` block on it like on VFIO's INTx eventfd.
    """

    def __init__(self, uio_fd: int, config: SysfsConfig, transport: vp.VirtioPciTransport) -> None:
        """``uio_fd`` is borrowed (the function owns it), non-blocking."""
        self.uio_fd = uio_fd
        self.config = config
        self.transport = transport
        self.reposted = EventFd()
        self.ready = select.epoll()
        self.ready.register(uio_fd, select.EPOLLIN)
        self.ready.register(self.reposted.fd, select.EPOLLIN)
        #: The last event count read (interrupts seen since the driver bound).
        self.event_count: int | None = None

    @property
    def mode(self) -> InterruptMode:
        return InterruptMode.INTX

    def queue_fd(self) -> int:
        return self.ready.fileno()

    def config_fd(self) -> int:
        return self.ready.fileno()

    def wait(self, timeout: float) -> bool:
        return bool(self.ready.poll(max(0.0, timeout)))

    def _read_count(self) -> None:
        """Consume the event count (EAGAIN: it did not move). EIO means the device
        was unregistered (unbound or hot-unplugged) under us."""
        try:
            data = os.read(self.uio_fd, EVENT_COUNT_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            raise TransportError(
                f"reading the uio event count failed: {exc.strerror}"
                + (" (the device was unbound or removed)" if exc.errno == errno.EIO else ""),
                errno=exc.errno,
            ) from None
        if len(data) == EVENT_COUNT_SIZE:
            self.event_count = int.from_bytes(data, "little", signed=True)

    def take(self) -> Cause:
        """Read the event count, read ISR (clears it and lowers the line, spec
        4.1.4.5), then clear Interrupt Disable: an interrupt raised after the ISR
        read keeps the level up and fires again once enabled."""
        self._read_count()
        self.reposted.drain()
        isr = self.transport.read_isr()
        self.config.set_intx(True)
        causes = Cause.NONE
        if isr & vp.ISR_QUEUE:
            causes |= Cause.QUEUE
        if isr & vp.ISR_CONFIG:
            causes |= Cause.CONFIG
        return causes

    def repost(self) -> None:
        self.reposted.signal()

    def enable(self) -> None:
        """INTx on: clear Interrupt Disable (set after a reset, or left set by the
        kernel's handler for an interrupt nobody took)."""
        self.config.set_intx(True)

    def restore(self) -> None:
        self.enable()

    def release_request_fd(self) -> int | None:
        """None: UIO does not ask before a hot-unplug (uio_unregister_device just
        wakes readers, which then read EIO)."""
        return None

    def close(self) -> None:
        """INTx off again (the device is reset next), epoll and eventfd closed."""
        try:
            self.config.set_intx(False)
        except TransportError as exc:
            log.warning("disabling INTx: %s", exc)
        self.ready.close()
        self.reposted.close()


class UioFunction:
    """One function bound to uio_pci_generic: ``/dev/uioN``, its sysfs ``config``
    (held with an exclusive flock, :func:`held`) and ``resourceN`` files."""

    def __init__(
        self,
        bdf: str,
        devdir: Path,
        uio_fd: int,
        config: SysfsConfig,
        *,
        pagemap_path: Path = pagemap.PAGEMAP,
    ) -> None:
        self.bdf = bdf
        self.access: Access = "uio"
        self.devdir = devdir
        self.uio_fd = uio_fd
        self.config = config
        self.pagemap_path = pagemap_path
        self._bars: list[MappedBar] = []

    @classmethod
    def open(
        cls,
        bdf: str,
        *,
        sysfs_root: Path = SYSFS_ROOT,
        dev_root: Path = DEV_ROOT,
        pagemap_path: Path = pagemap.PAGEMAP,
    ) -> UioFunction:
        """Open ``bdf``, which must be bound to uio_pci_generic (``bind --uio``)."""
        devdir = device_dir(bdf, sysfs_root)
        driver = link_name(devdir / "driver")
        if driver != UIO_PCI_GENERIC:
            raise TransportError(
                f"{bdf} is bound to {driver or 'no driver'}, not {UIO_PCI_GENERIC}"
                f" (vmem-guest bind --uio {bdf})",
                bdf=bdf,
                driver=driver,
            )
        number = uio_number(bdf, sysfs_root)
        if number is None:
            raise TransportError(f"{bdf} has no uio device under {devdir / 'uio'}", bdf=bdf)
        config = SysfsConfig(devdir / "config")
        try:
            fcntl.flock(config.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            config.close()
            raise TransportError(
                f"{bdf} is in use: another process drives it through UIO (is an agent running?)",
                bdf=bdf,
            ) from None
        node = uio_node(number, dev_root)
        try:
            uio_fd = _open(node, os.O_RDWR | os.O_NONBLOCK)
        except BaseException:
            config.close()
            raise
        log.info("opened %s through %s", bdf, node)
        return cls(bdf, devdir, uio_fd, config, pagemap_path=pagemap_path)

    def config_space(self) -> bytes:
        return self.config.config_read(0, pci_config.PCI_CONFIG_SIZE)

    def resources(self) -> list[Resource]:
        path = self.devdir / "resource"
        try:
            text = path.read_text()
        except OSError as exc:
            raise TransportError(f"cannot read {path}: {exc.strerror}", path=str(path)) from None
        return parse_resources(text)

    def bar_sizes(self) -> list[int]:
        bars = self.resources()[: vp.PCI_NUM_BARS]
        return [r.size for r in bars] + [0] * (vp.PCI_NUM_BARS - len(bars))

    def map_bar(self, index: int) -> MappedBar:
        """mmap ``resource<index>``, read-write, shared (a memory BAR only)."""
        resources = self.resources()
        bar = resources[index] if index < len(resources) else Resource(0, 0, 0)
        if bar.size == 0 or not bar.is_memory:
            raise TransportError(
                f"BAR {index} of {self.bdf} cannot be mmap'd (size {bar.size:#x},"
                f" flags {bar.flags:#x})",
                bar=index,
            )
        path = self.devdir / f"resource{index}"
        fd = _open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(
                fd, bar.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as exc:
            raise TransportError(f"mmap of {path} failed: {exc.strerror}", bar=index) from None
        finally:
            os.close(fd)  # the mapping keeps the BAR
        mapped = MappedBar(index, mapping)
        self._bars.append(mapped)
        return mapped

    def enable_bus_master(self) -> None:
        """uio_pci_generic leaves Bus Master to us (and clears it when we close)."""
        pci_config.enable_bus_master(self.config)

    def dma_buffer(self, size: int, guard_ranges: Iterable[tuple[int, int]]) -> DmaBuffer:
        """Physical pages outside ``guard_ranges``, as in VFIO's no-IOMMU mode."""
        return PhysBuffer.outside(size, guard_ranges, pagemap_path=self.pagemap_path)

    def open_interrupts(self, transport: vp.VirtioPciTransport) -> UioInterrupts:
        interrupts = UioInterrupts(self.uio_fd, self.config, transport)
        try:
            interrupts.enable()
        except BaseException:
            interrupts.close()
            raise
        return interrupts

    def close(self) -> None:
        """Unmap the BARs, close config and ``/dev/uioN`` (the kernel then clears Bus
        Master, uio_pci_generic.c ``release``)."""
        for bar in self._bars:
            bar.close()
        self._bars.clear()
        self.config.close()
        self.uio_fd = close_fd(self.uio_fd)
