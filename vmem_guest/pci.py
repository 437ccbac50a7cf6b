"""Find virtio-mem PCI functions, and which VFIO mode each one can use.

:func:`list_devices` / :func:`get_device`: every PCI function with vendor 0x1af4 and
device 0x1058 (``spec.PCI_VENDOR_ID`` / ``spec.PCI_DEVICE_ID``) as a
:class:`VirtioMemPci`: its driver, IOMMU group and IOMMU mode (``transport.vfio.Mode``).
Handing a function to vfio-pci and back is :mod:`vmem_guest.binding`.

The OS seam: the real thing reads attributes through pyudev (``pyudev.Context``,
``list_devices(subsystem='pci')``, ``device.attributes``); the same records can be
read straight from ``<sysfs_root>/bus/pci/devices/*``, which is what tests do against a
fake tree under a temporary directory (libudev always reads the real ``/sys``). Both
readers feed the same code and give identical results on a real system.

Facts used (docs/test-vm.md section 4 and docs/protocol.md section 3; Linux
sysfs-bus-pci, vfio.rst):

* With no IOMMU a device has no ``iommu_group`` until vfio-pci binds it in no-IOMMU
  mode; vfio then creates a group named ``vfio-noiommu`` and ``/dev/vfio/noiommu-N``.
  Without ``enable_unsafe_noiommu_mode`` vfio-pci refuses such a device.
* A device behind a real IOMMU has its group before any binding, an IOMMU is listed in
  ``/sys/class/iommu``, and vfio gives ``/dev/vfio/N``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

from vmem_guest._linux.sysfs import SYSFS_ROOT, link_name, read_value_or_none
from vmem_guest.errors import UsageError
from vmem_guest.pci_address import normalize_bdf
from vmem_guest.spec import PCI_DEVICE_ID, PCI_VENDOR_ID
from vmem_guest.transport.vfio import DEV_ROOT, NOIOMMU_GROUP_NAME, Mode, group_node

#: The vfio module parameter that allows no-IOMMU groups (CONFIG_VFIO_NOIOMMU),
#: relative to the sysfs root.
NOIOMMU_PARAM = "module/vfio/parameters/enable_unsafe_noiommu_mode"


# ----------------------------------------------------------------------------------------
# What a device looks like.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VirtioMemPci:
    """One virtio-mem PCI function.

    Attributes:
        bdf: full PCI address, ``0000:00:03.0``.
        driver: the bound driver (``virtio-pci``, ``vfio-pci``) or None.
        iommu_group: the IOMMU group number, or None (no IOMMU and not bound to
            vfio-pci in no-IOMMU mode).
        iommu_kind: ``type1`` when a real IOMMU backs the group; ``noiommu`` when VFIO
            can only use no-IOMMU mode; None when neither is possible (no IOMMU and a
            kernel whose vfio has no ``enable_unsafe_noiommu_mode``).
        numa_node: the kernel's ``numa_node`` (-1: none).
        revision: PCI revision ID.
        sysfs_path: the device's directory (``/sys/devices/pci0000:00/0000:00:03.0``).
    """

    bdf: str
    driver: str | None
    iommu_group: int | None
    iommu_kind: Mode | None
    numa_node: int
    revision: int
    sysfs_path: Path

    @property
    def vfio_mode(self) -> Mode:
        """The mode to open the function in: ``type1`` behind a real IOMMU, else
        ``noiommu`` (VFIO refuses, at open, a group that is not no-IOMMU either)."""
        return "type1" if self.iommu_kind == "type1" else "noiommu"

    def virtio_driver(self) -> str | None:
        """The virtio driver bound under this function (``virtio_mem``), if any: the
        in-kernel driver that owns the device's memory while it is bound."""
        for child in sorted(self.sysfs_path.glob("virtio*")):
            name = link_name(child / "driver")
            if name is not None:
                return name
        return None

    def group_node(self, dev_root: Path = DEV_ROOT) -> Path | None:
        """``/dev/vfio/N`` or ``/dev/vfio/noiommu-N`` for the current group (None: no group)."""
        if self.iommu_group is None:
            return None
        return group_node(self.iommu_group, self.vfio_mode, dev_root)

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view (for ``vmem-guest devices --json``)."""
        return {
            "bdf": self.bdf,
            "driver": self.driver,
            "iommu_group": self.iommu_group,
            "iommu_kind": self.iommu_kind,
            "numa_node": self.numa_node,
            "revision": self.revision,
            "sysfs_path": str(self.sysfs_path),
        }


# ----------------------------------------------------------------------------------------
# Readers: pyudev (the real one) and the sysfs directory (the fallback and the fake).
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PciRecord:
    """The attributes of one PCI function, however they were read."""

    bdf: str
    sysfs_path: Path
    vendor: int
    device: int
    revision: int
    numa_node: int
    driver: str | None

    @property
    def is_virtio_mem(self) -> bool:
        return (self.vendor, self.device) == (PCI_VENDOR_ID, PCI_DEVICE_ID)


def _int(text: str | None, default: int) -> int:
    if text is None or not text.strip():
        return default
    return int(text.strip(), 0)


def _record_from_dir(path: Path) -> _PciRecord | None:
    """Read a device directory directly; None when it vanished or is not a PCI function."""
    real = Path(os.path.realpath(path))
    vendor, device = read_value_or_none(real / "vendor"), read_value_or_none(real / "device")
    if vendor is None or device is None:
        return None
    return _PciRecord(
        bdf=real.name,
        sysfs_path=real,
        vendor=_int(vendor, -1),
        device=_int(device, -1),
        revision=_int(read_value_or_none(real / "revision"), 0),
        numa_node=_int(read_value_or_none(real / "numa_node"), -1),
        driver=link_name(real / "driver"),
    )


def _record_from_udev(dev: Any) -> _PciRecord | None:
    """Read a ``pyudev.Device``; None when an attribute is missing (device going away)."""
    attrs = dev.attributes

    def attr(name: str) -> str | None:
        try:
            return str(attrs.asstring(name))
        except (KeyError, OSError, UnicodeDecodeError):
            return None

    vendor, device = attr("vendor"), attr("device")
    if vendor is None or device is None:
        return None
    return _PciRecord(
        bdf=str(dev.sys_name),
        sysfs_path=Path(dev.sys_path),
        vendor=_int(vendor, -1),
        device=_int(device, -1),
        revision=_int(attr("revision"), 0),
        numa_node=_int(attr("numa_node"), -1),
        driver=None if dev.driver is None else str(dev.driver),
    )


@functools.cache
def udev_context() -> Any | None:
    """The process's one ``pyudev.Context``; None without pyudev or libudev.so.1.

    One, not one per read: every new Context loads libudev again, and pyudev finds it
    with ``ctypes.util.find_library``, which runs ``ldconfig -p`` in a child process
    (pyudev 0.24 ``_ctypeslib/utils.py``, ``load_ctypes_library``). At start-up that was
    11 children, 3.3 s of the agent's start in the test VM under TCG and cProfile.
    """
    try:
        import pyudev

        return pyudev.Context()
    except (ImportError, OSError):  # no pyudev, or no libudev.so.1
        return None


def _udev_available() -> bool:
    return udev_context() is not None


def _choose_udev(sysfs_root: Path, use_udev: bool | None) -> bool:
    if use_udev is None:
        return sysfs_root == SYSFS_ROOT and _udev_available()
    if use_udev and sysfs_root != SYSFS_ROOT:
        raise UsageError(f"pyudev reads only {SYSFS_ROOT}, not {sysfs_root}")
    return use_udev


def _pci_records(
    sysfs_root: Path = SYSFS_ROOT, *, use_udev: bool | None = None
) -> list[_PciRecord]:
    """Every PCI function, sorted by address."""
    records: list[_PciRecord | None]
    context = udev_context() if _choose_udev(sysfs_root, use_udev) else None
    if context is not None:
        records = [_record_from_udev(d) for d in context.list_devices(subsystem="pci")]
    else:
        base = sysfs_root / "bus/pci/devices"
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            names = []
        records = [_record_from_dir(base / name) for name in names]
    return sorted((r for r in records if r is not None), key=lambda r: r.bdf)


def _pci_record(bdf: str, sysfs_root: Path, use_udev: bool | None) -> _PciRecord | None:
    path = sysfs_root / "bus/pci/devices" / bdf
    if not path.exists():
        return None
    if _choose_udev(sysfs_root, use_udev):
        import pyudev

        try:
            dev = pyudev.Devices.from_sys_path(udev_context(), os.path.realpath(path))
        except pyudev.DeviceNotFoundError:
            return None
        return _record_from_udev(dev)
    return _record_from_dir(path)


# ----------------------------------------------------------------------------------------
# IOMMU: type1, no-IOMMU or neither.
# ----------------------------------------------------------------------------------------


def _has_iommu(sysfs_root: Path) -> bool:
    """True when the kernel registered an IOMMU (``/sys/class/iommu`` is not empty)."""
    try:
        return bool(os.listdir(sysfs_root / "class/iommu"))
    except OSError:
        return False


def _noiommu_supported(sysfs_root: Path) -> bool:
    """False only when vfio is loaded and has no ``enable_unsafe_noiommu_mode``
    (a kernel without CONFIG_VFIO_NOIOMMU). A vfio module not loaded yet counts as
    supported: ``binding.bind`` loads it and checks again."""
    if (sysfs_root / NOIOMMU_PARAM).exists():
        return True
    return not (sysfs_root / "module/vfio").exists()


def _iommu_of(rec: _PciRecord, sysfs_root: Path) -> tuple[int | None, Mode | None]:
    name = link_name(rec.sysfs_path / "iommu_group")
    group = int(name) if name is not None and name.isdigit() else None
    if group is not None:
        group_dir = sysfs_root / "kernel/iommu_groups" / str(group)
        group_name = read_value_or_none(group_dir / "name") or ""
        if group_name == NOIOMMU_GROUP_NAME:
            return group, "noiommu"
        if _has_iommu(sysfs_root) and (group_dir / "type").exists():
            return group, "type1"
    return group, ("noiommu" if _noiommu_supported(sysfs_root) else None)


def _device(rec: _PciRecord, sysfs_root: Path) -> VirtioMemPci:
    group, kind = _iommu_of(rec, sysfs_root)
    return VirtioMemPci(
        bdf=rec.bdf,
        driver=rec.driver,
        iommu_group=group,
        iommu_kind=kind,
        numa_node=rec.numa_node,
        revision=rec.revision,
        sysfs_path=rec.sysfs_path,
    )


# ----------------------------------------------------------------------------------------
# Public: discovery.
# ----------------------------------------------------------------------------------------


def list_devices(
    sysfs_root: Path = SYSFS_ROOT, *, use_udev: bool | None = None
) -> list[VirtioMemPci]:
    """Every virtio-mem PCI function, sorted by address.

    ``use_udev``: None reads through pyudev when ``sysfs_root`` is ``/sys`` and pyudev
    with libudev is importable, else reads the directory; True insists on pyudev (only
    ``/sys``), False reads the directory.
    """
    return [
        _device(r, sysfs_root)
        for r in _pci_records(sysfs_root, use_udev=use_udev)
        if r.is_virtio_mem
    ]


def get_device(
    bdf: str, sysfs_root: Path = SYSFS_ROOT, *, use_udev: bool | None = None
) -> VirtioMemPci:
    """The virtio-mem function at ``bdf`` (short form accepted).

    Raises UsageError for a malformed address, an absent device, or a device that is
    not virtio-mem.
    """
    full = normalize_bdf(bdf)
    rec = _pci_record(full, sysfs_root, use_udev)
    if rec is None:
        raise UsageError(f"no PCI device {full}", bdf=full)
    if not rec.is_virtio_mem:
        raise UsageError(
            f"{full} is not a virtio-mem device (it is {rec.vendor:04x}:{rec.device:04x}, "
            f"virtio-mem is {PCI_VENDOR_ID:04x}:{PCI_DEVICE_ID:04x})",
            bdf=full,
            vendor=rec.vendor,
            device=rec.device,
        )
    return _device(rec, sysfs_root)
