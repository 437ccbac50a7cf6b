"""A fake /sys and /dev for PCI discovery and binding tests (test_pci, test_binding,
test_uio).

:class:`FakeKernel` builds the tree (``devices/pci0000:00/<bdf>`` with the
``bus/pci/devices`` links, drivers, iommu groups, the vfio module parameter, /dev/vfio)
and, in a thread, plays the kernel's part: it consumes writes to ``drivers/*/unbind``
and ``drivers_probe`` the way the PCI core, vfio-pci and uio_pci_generic do (driver
links, no-IOMMU groups and their /dev/vfio nodes, ``<device>/uio/uioN`` and a
``/dev/uioN`` that is a FIFO, so reads and polls behave), and logs what it did.
:meth:`FakeKernel.raise_uio_interrupt` plays uio_pci_generic's interrupt handler.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from vmem_guest.binding import VFIO_PCI
from vmem_guest.pci import NOIOMMU_PARAM
from vmem_guest.transport.pci_config import PCI_COMMAND, PCI_COMMAND_INTX_DISABLE
from vmem_guest.transport.uio import UIO_PCI_GENERIC
from vmem_guest.transport.vfio import NOIOMMU_GROUP_NAME

BDF = "0000:00:03.0"
NET_BDF = "0000:00:02.0"


class FakeKernel:
    """A fake /sys and /dev, and a thread that reacts to binding writes."""

    def __init__(self, root: Path, *, iommu_group: int | None = None) -> None:
        self.sys = root / "sys"
        self.dev = root / "dev"
        self.log: list[tuple[str, ...]] = []
        self.refuse_vfio = False  # vfio-pci's probe fails (as without no-IOMMU mode)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_noiommu_group = 0
        self._next_uio = 0
        self._uio_counts: dict[str, int] = {}
        (self.dev / "vfio").mkdir(parents=True)
        (self.sys / "bus/pci").mkdir(parents=True)
        (self.sys / "bus/pci/drivers_probe").write_text("")
        (self.sys / "class/iommu").mkdir(parents=True)
        for drv in ("virtio-pci", VFIO_PCI):
            self.add_driver(drv)
        self.add_device(BDF, vendor=0x1AF4, device=0x1058, numa_node=0, revision=1)
        self.add_device(NET_BDF, vendor=0x1AF4, device=0x1041)
        param = self.sys / NOIOMMU_PARAM
        param.parent.mkdir(parents=True)
        param.write_text("N\n")
        if iommu_group is not None:  # a vIOMMU: every device has a group from boot
            (self.sys / "class/iommu/dmar0").mkdir()
            self.make_group(BDF, iommu_group, name=None, type_="DMA")

    # ----- building the tree --------------------------------------------------------
    def add_driver(self, name: str) -> None:
        d = self.sys / "bus/pci/drivers" / name
        d.mkdir(parents=True)
        (d / "unbind").write_text("")
        (d / "bind").write_text("")

    def devdir(self, bdf: str) -> Path:
        return self.sys / "devices/pci0000:00" / bdf

    def add_device(
        self,
        bdf: str,
        *,
        vendor: int,
        device: int,
        numa_node: int = -1,
        revision: int = 0,
        driver: str | None = "virtio-pci",
    ) -> None:
        d = self.devdir(bdf)
        d.mkdir(parents=True)
        (d / "vendor").write_text(f"{vendor:#06x}\n")
        (d / "device").write_text(f"{device:#06x}\n")
        (d / "revision").write_text(f"{revision:#04x}\n")
        (d / "numa_node").write_text(f"{numa_node}\n")
        (d / "driver_override").write_text("(null)\n")
        links = self.sys / "bus/pci/devices"
        links.mkdir(exist_ok=True)
        os.symlink(f"../../../devices/pci0000:00/{bdf}", links / bdf)
        if driver is not None:
            self.link_driver(bdf, driver)

    def link_driver(self, bdf: str, driver: str) -> None:
        os.symlink(f"../../../bus/pci/drivers/{driver}", self.devdir(bdf) / "driver")

    def make_group(self, bdf: str, number: int, *, name: str | None, type_: str) -> None:
        g = self.sys / "kernel/iommu_groups" / str(number)
        g.mkdir(parents=True)
        (g / "type").write_text(type_ + "\n")
        if name is not None:
            (g / "name").write_text(name + "\n")
        os.symlink(f"../../../kernel/iommu_groups/{number}", self.devdir(bdf) / "iommu_group")

    def driver_of(self, bdf: str) -> str | None:
        link = self.devdir(bdf) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def uio_number(self, bdf: str) -> int | None:
        names = list((self.devdir(bdf) / "uio").glob("uio*"))
        return int(names[0].name[3:]) if names else None

    def raise_uio_interrupt(self, bdf: str) -> None:
        """What uio_pci_generic's handler does: Interrupt Disable set in the Command
        register (``<device>/config``, when there is one), the event count bumped and
        handed to ``/dev/uioN`` readers (4 bytes into the FIFO)."""
        config = self.devdir(bdf) / "config"
        if config.exists():
            data = bytearray(config.read_bytes())
            command = int.from_bytes(data[PCI_COMMAND : PCI_COMMAND + 2], "little")
            data[PCI_COMMAND : PCI_COMMAND + 2] = (command | PCI_COMMAND_INTX_DISABLE).to_bytes(
                2, "little"
            )
            config.write_bytes(bytes(data))
        number = self.uio_number(bdf)
        assert number is not None, f"{bdf} is not bound to {UIO_PCI_GENERIC}"
        self._uio_counts[bdf] = self._uio_counts.get(bdf, 0) + 1
        fd = os.open(self.dev / f"uio{number}", os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, self._uio_counts[bdf].to_bytes(4, "little"))
        finally:
            os.close(fd)

    def override(self, bdf: str) -> str:
        return (self.devdir(bdf) / "driver_override").read_text()

    # ----- the kernel's part --------------------------------------------------------
    def _group(self, bdf: str) -> tuple[int, str] | None:
        link = self.devdir(bdf) / "iommu_group"
        if not link.is_symlink():
            return None
        number = int(os.path.basename(os.readlink(link)))
        name_file = self.sys / "kernel/iommu_groups" / str(number) / "name"
        return number, (name_file.read_text().strip() if name_file.exists() else "")

    def _unbind(self, bdf: str, driver: str) -> None:
        if self.driver_of(bdf) != driver:
            self.log.append(("unbind-ignored", driver, bdf))
            return
        (self.devdir(bdf) / "driver").unlink()
        self.log.append(("unbind", driver, bdf))
        group = self._group(bdf)
        if driver == VFIO_PCI and group is not None:
            number, name = group
            if name == NOIOMMU_GROUP_NAME:  # vfio drops its made-up group
                (self.devdir(bdf) / "iommu_group").unlink()
                for f in (self.sys / "kernel/iommu_groups" / str(number)).iterdir():
                    f.unlink()
                (self.sys / "kernel/iommu_groups" / str(number)).rmdir()
                (self.dev / f"vfio/noiommu-{number}").unlink()
            else:
                (self.dev / f"vfio/{number}").unlink()
        number = self.uio_number(bdf)
        if driver == UIO_PCI_GENERIC and number is not None:  # uio_unregister_device
            (self.devdir(bdf) / f"uio/uio{number}").rmdir()
            (self.dev / f"uio{number}").unlink()

    def _probe(self, bdf: str) -> None:
        if self.driver_of(bdf) is not None:
            self.log.append(("probe-bound", bdf))
            return
        override = self.override(bdf).strip()
        target = "virtio-pci" if override in ("", "(null)") else override
        if target == VFIO_PCI:
            group = self._group(bdf)
            param = (self.sys / NOIOMMU_PARAM).read_text().strip()
            if self.refuse_vfio or (group is None and param != "Y"):
                self.log.append(("probe-failed", bdf, target))
                return
            if group is None:
                number = self._next_noiommu_group
                self._next_noiommu_group += 1
                self.make_group(bdf, number, name=NOIOMMU_GROUP_NAME, type_="unknown")
                (self.dev / f"vfio/noiommu-{number}").touch()
            else:
                (self.dev / f"vfio/{group[0]}").touch()
        if target == UIO_PCI_GENERIC:  # uio_register_device: uio/uioN and /dev/uioN
            number = self._next_uio
            self._next_uio += 1
            (self.devdir(bdf) / f"uio/uio{number}").mkdir(parents=True)
            os.mkfifo(self.dev / f"uio{number}")
        self.link_driver(bdf, target)
        self.log.append(("probe", bdf, target))

    def tick(self) -> None:
        probe_file = self.sys / "bus/pci/drivers_probe"
        probe = probe_file.read_text().strip()  # read first: unbinds written before it
        for drv in (self.sys / "bus/pci/drivers").iterdir():
            unbind_file = drv / "unbind"
            if unbind_file.exists() and (bdf := unbind_file.read_text().strip()):
                unbind_file.write_text("")
                self._unbind(bdf, drv.name)
        if probe:
            probe_file.write_text("")
            self._probe(probe)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            time.sleep(0.001)

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeKernel]:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
