"""Find virtio-mem PCI functions, hand them to vfio-pci and back, watch for new ones.

* :func:`list_devices` / :func:`get_device`: every PCI function with vendor 0x1af4 and
  device 0x1058 (``spec.PCI_VENDOR_ID`` / ``spec.PCI_DEVICE_ID``) as a
  :class:`VirtioMemPci`: its driver, IOMMU group and which VFIO mode it can use.
* :func:`bind`: ``driver_override`` = ``vfio-pci``, unbind from the current driver,
  ``drivers_probe``; returns the ``/dev/vfio`` group node. Without an IOMMU this needs
  VFIO's no-IOMMU mode, which taints the kernel: only with ``allow_noiommu=True``.
* :func:`unbind`: clear ``driver_override``, unbind from vfio-pci, ``drivers_probe``,
  so virtio-pci takes the device back.
* :class:`DeviceMonitor` / :func:`watch`: kernel uevents (add, remove, bind, unbind)
  for virtio-mem functions through a pyudev netlink monitor (no udevd needed).

The OS seam: the real thing reads attributes through pyudev (``pyudev.Context``,
``list_devices(subsystem='pci')``, ``device.attributes``); the same records can be
read straight from ``<sysfs_root>/bus/pci/devices/*``, which is what tests do against a
fake tree under a temporary directory (libudev always reads the real ``/sys``). Both
readers feed the same code and give identical results on a real system. Writes
(``driver_override``, ``unbind``, ``drivers_probe``, the vfio module parameter) always go
to files under ``sysfs_root``; a failed write raises
:class:`~vmem_guest.errors.TransportError` with ``path``, ``value`` and ``errno``.

Facts used (docs/test-vm.md section 4 and docs/protocol.md section 3; Linux
sysfs-bus-pci, vfio.rst):

* ``vfio-pci.ids=`` on the command line does not win against virtio-pci, the rebind at
  run time does.
* With no IOMMU a device has no ``iommu_group`` until vfio-pci binds it in no-IOMMU
  mode; vfio then creates a group named ``vfio-noiommu`` and ``/dev/vfio/noiommu-N``.
  Without ``enable_unsafe_noiommu_mode`` vfio-pci refuses such a device.
* A device behind a real IOMMU has its group before any binding, an IOMMU is listed in
  ``/sys/class/iommu``, and vfio gives ``/dev/vfio/N``.
* A vfio group can be open only once: an open that fails with EBUSY means someone
  (the agent) holds the device, and unbinding would block until they let go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as errno_mod
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from vmem_guest.errors import TransportError, UsageError
from vmem_guest.spec import PCI_DEVICE_ID, PCI_VENDOR_ID

log = logging.getLogger(__name__)

SYSFS_ROOT = Path("/sys")
DEV_ROOT = Path("/dev")
VFIO_PCI = "vfio-pci"
#: The vfio module parameter that allows no-IOMMU groups (CONFIG_VFIO_NOIOMMU).
NOIOMMU_PARAM = "module/vfio/parameters/enable_unsafe_noiommu_mode"
#: The name vfio gives the IOMMU groups it makes up for devices without an IOMMU.
NOIOMMU_GROUP_NAME = "vfio-noiommu"
#: ``PCI_ID`` of a virtio-mem function as the kernel writes it in uevents.
PCI_ID = f"{PCI_VENDOR_ID:04X}:{PCI_DEVICE_ID:04X}"

IommuKind = Literal["type1", "noiommu"]

_BDF_RE = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{4,8}):)?(?P<bus>[0-9a-fA-F]{2}):"
    r"(?P<dev>[0-9a-fA-F]{2})\.(?P<fn>[0-7])$"
)
_POLL_INTERVAL = 0.01


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
    iommu_kind: IommuKind | None
    numa_node: int
    revision: int
    sysfs_path: Path

    def group_node(self, dev_root: Path = DEV_ROOT) -> Path | None:
        """``/dev/vfio/N`` or ``/dev/vfio/noiommu-N`` for the current group (None: no group)."""
        if self.iommu_group is None:
            return None
        if self.iommu_kind == "type1":
            return dev_root / "vfio" / str(self.iommu_group)
        return dev_root / "vfio" / f"noiommu-{self.iommu_group}"

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


def normalize_bdf(text: str) -> str:
    """``0000:00:03.0`` from ``0000:00:03.0`` or ``00:03.0`` (any case); UsageError otherwise."""
    m = _BDF_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None or int(m["dev"], 16) > 0x1F:
        raise UsageError(
            f"not a PCI address: {text!r} (expected DDDD:BB:DD.F or BB:DD.F)", bdf=text
        )
    domain = m["domain"] or "0000"
    return f"{domain}:{m['bus']}:{m['dev']}.{m['fn']}".lower()


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


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _link_name(path: Path) -> str | None:
    """The last component of a symlink's target (None: no such link)."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _record_from_dir(path: Path) -> _PciRecord | None:
    """Read a device directory directly; None when it vanished or is not a PCI function."""
    real = Path(os.path.realpath(path))
    vendor, device = _read_text(real / "vendor"), _read_text(real / "device")
    if vendor is None or device is None:
        return None
    return _PciRecord(
        bdf=real.name,
        sysfs_path=real,
        vendor=_int(vendor, -1),
        device=_int(device, -1),
        revision=_int(_read_text(real / "revision"), 0),
        numa_node=_int(_read_text(real / "numa_node"), -1),
        driver=_link_name(real / "driver"),
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


def _udev_available() -> bool:
    try:
        import pyudev

        pyudev.Context()
    except (ImportError, OSError):  # no pyudev, or no libudev.so.1
        return False
    return True


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
    if _choose_udev(sysfs_root, use_udev):
        import pyudev

        context = pyudev.Context()
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
            dev = pyudev.Devices.from_sys_path(pyudev.Context(), os.path.realpath(path))
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
    supported: :func:`bind` loads it and checks again."""
    if (sysfs_root / NOIOMMU_PARAM).exists():
        return True
    return not (sysfs_root / "module/vfio").exists()


def _iommu_of(rec: _PciRecord, sysfs_root: Path) -> tuple[int | None, IommuKind | None]:
    name = _link_name(rec.sysfs_path / "iommu_group")
    group = int(name) if name is not None and name.isdigit() else None
    if group is not None:
        group_dir = sysfs_root / "kernel/iommu_groups" / str(group)
        group_name = (_read_text(group_dir / "name") or "").strip()
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


# ----------------------------------------------------------------------------------------
# Public: binding.
# ----------------------------------------------------------------------------------------


def _write(path: Path, value: str) -> None:
    """One write to a sysfs file; TransportError (path, value, errno) when it fails."""
    data = value.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        err = exc.errno or errno_mod.EIO
        name = errno_mod.errorcode.get(err, str(err))
        raise TransportError(
            f"writing {value.strip()!r} to {path} failed: {name} ({os.strerror(err)})",
            path=str(path),
            value=value,
            errno=err,
        ) from None
    if written != len(data):
        raise TransportError(
            f"short write to {path}: {written} of {len(data)} bytes",
            path=str(path),
            value=value,
            errno=errno_mod.EIO,
        )
    log.debug("wrote %r to %s", value, path)


def _wait_for(what: str, check: Any, timeout: float) -> Any:
    """Poll ``check()`` every 10 ms until it returns something truthy, at most timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            if not value:
                log.debug("gave up waiting for %s after %.1f s", what, timeout)
            return value
        time.sleep(_POLL_INTERVAL)


def _ensure_vfio_pci(sysfs_root: Path, timeout: float) -> None:
    """Load vfio-pci unless its driver directory exists (built in, or loaded)."""
    driver_dir = sysfs_root / "bus/pci/drivers" / VFIO_PCI
    if driver_dir.is_dir():
        return
    log.info("loading the vfio-pci module")
    try:
        proc = subprocess.run(
            ["modprobe", VFIO_PCI], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TransportError(f"cannot run modprobe {VFIO_PCI}: {exc}") from None
    if proc.returncode != 0:
        raise TransportError(
            f"modprobe {VFIO_PCI} failed (exit status {proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()}",
            returncode=proc.returncode,
        )
    if not _wait_for("the vfio-pci driver", driver_dir.is_dir, timeout):
        raise TransportError(f"modprobe {VFIO_PCI} succeeded but {driver_dir} is missing")


def _enable_noiommu(sysfs_root: Path) -> None:
    """Turn on vfio's unsafe no-IOMMU mode unless it is on (warns: it taints the kernel)."""
    param = sysfs_root / NOIOMMU_PARAM
    current = _read_text(param)
    if current is None:
        raise TransportError(
            "the kernel's vfio has no no-IOMMU mode (CONFIG_VFIO_NOIOMMU is off): "
            f"{param} is missing; a vIOMMU (type1) is needed",
            path=str(param),
        )
    if current.strip() in ("Y", "1"):
        return
    log.warning(
        "enabling VFIO no-IOMMU mode (%s=Y): the device can DMA anywhere in guest memory "
        "and the kernel will be tainted",
        param,
    )
    _write(param, "Y")


def _check_group_free(dev: VirtioMemPci, dev_root: Path) -> None:
    """Refuse to unbind a device whose vfio group is open: the unbind would block until
    its user lets go (a vfio group can be open only once, a second open is EBUSY)."""
    node = dev.group_node(dev_root)
    if node is None:
        return
    try:
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno_mod.EBUSY:
            raise TransportError(
                f"{dev.bdf} is in use: {node} is open (is the agent running?)",
                bdf=dev.bdf,
                path=str(node),
                errno=exc.errno,
            ) from None
        return  # absent node, or no permission: let the kernel decide
    os.close(fd)


def bind(
    bdf: str,
    *,
    allow_noiommu: bool,
    sysfs_root: Path = SYSFS_ROOT,
    dev_root: Path = DEV_ROOT,
    timeout: float = 5.0,
) -> Path:
    """Bind a virtio-mem function to vfio-pci; return its group node in ``dev_root``.

    ``/dev/vfio/N`` under a real IOMMU (type1); ``/dev/vfio/noiommu-N`` without one, which
    needs ``allow_noiommu`` (it turns vfio's ``enable_unsafe_noiommu_mode`` on, which
    taints the kernel). Already bound: returns the node. Loads vfio-pci when it is
    missing. Waits up to ``timeout`` s for the driver and the node; when vfio-pci does
    not take the device, the override is cleared and the old driver reprobed before
    TransportError is raised.

    Raises UsageError (bad or unknown address, not virtio-mem, no IOMMU and not
    allowed) and TransportError (a sysfs write failed, modprobe failed, no binding).
    """
    dev = get_device(bdf, sysfs_root)
    if dev.iommu_kind is None:
        raise UsageError(
            f"{dev.bdf} has no IOMMU and this kernel's vfio has no no-IOMMU mode "
            "(CONFIG_VFIO_NOIOMMU); give the VM a vIOMMU",
            bdf=dev.bdf,
        )
    if dev.iommu_kind == "noiommu" and not allow_noiommu:
        raise UsageError(
            f"{dev.bdf} is not behind an IOMMU: binding it needs VFIO's unsafe no-IOMMU "
            "mode, which lets the device DMA anywhere and taints the kernel; allow it "
            "explicitly (--noiommu) or give the VM a vIOMMU",
            bdf=dev.bdf,
        )
    _ensure_vfio_pci(sysfs_root, timeout)
    if dev.iommu_kind == "noiommu":
        _enable_noiommu(sysfs_root)

    devdir = sysfs_root / "bus/pci/devices" / dev.bdf
    if dev.driver != VFIO_PCI:
        log.info("binding %s to %s (was %s)", dev.bdf, VFIO_PCI, dev.driver or "unbound")
        _write(devdir / "driver_override", VFIO_PCI)
        if dev.driver is not None:
            _write(devdir / "driver" / "unbind", dev.bdf)
        _write(sysfs_root / "bus/pci/drivers_probe", dev.bdf)

    def ready() -> Path | None:
        now = get_device(dev.bdf, sysfs_root, use_udev=False)
        node = now.group_node(dev_root) if now.driver == VFIO_PCI else None
        return node if node is not None and node.exists() else None

    node: Path | None = _wait_for(f"{VFIO_PCI} on {dev.bdf}", ready, timeout)
    if node is not None:
        return node
    now = get_device(dev.bdf, sysfs_root, use_udev=False)
    if now.driver != VFIO_PCI:
        log.warning("%s did not take %s; handing it back", VFIO_PCI, dev.bdf)
        with contextlib.suppress(TransportError):
            _write(devdir / "driver_override", "\n")
            _write(sysfs_root / "bus/pci/drivers_probe", dev.bdf)
        raise TransportError(
            f"{VFIO_PCI} did not bind {dev.bdf} within {timeout:g} s (see dmesg)",
            bdf=dev.bdf,
            driver=now.driver,
        )
    raise TransportError(
        f"{dev.bdf} is bound to {VFIO_PCI} but its group node "
        f"{now.group_node(dev_root) or '(no IOMMU group)'} did not appear within {timeout:g} s",
        bdf=dev.bdf,
        iommu_group=now.iommu_group,
    )


def unbind(
    bdf: str,
    *,
    sysfs_root: Path = SYSFS_ROOT,
    dev_root: Path = DEV_ROOT,
    timeout: float = 5.0,
) -> str | None:
    """Give a virtio-mem function back to the kernel; return the driver that took it.

    Clears ``driver_override``, unbinds from vfio-pci (refused with TransportError while
    its vfio group is open) and reprobes, so virtio-pci binds it again. A device bound to
    another driver than vfio-pci is left there. Waits up to ``timeout`` s for a driver;
    None when no driver took the device.
    """
    dev = get_device(bdf, sysfs_root)
    devdir = sysfs_root / "bus/pci/devices" / dev.bdf
    if dev.driver not in (None, VFIO_PCI):
        _write(devdir / "driver_override", "\n")
        log.info("%s is bound to %s, not %s: left alone", dev.bdf, dev.driver, VFIO_PCI)
        return dev.driver
    if dev.driver == VFIO_PCI:
        _check_group_free(dev, dev_root)
    log.info("unbinding %s from %s", dev.bdf, dev.driver or "no driver")
    _write(devdir / "driver_override", "\n")
    if dev.driver == VFIO_PCI:
        _write(devdir / "driver" / "unbind", dev.bdf)
    _write(sysfs_root / "bus/pci/drivers_probe", dev.bdf)

    def new_driver() -> str | None:
        driver = get_device(dev.bdf, sysfs_root, use_udev=False).driver
        return driver if driver != VFIO_PCI else None

    driver: str | None = _wait_for(f"a driver for {dev.bdf}", new_driver, timeout)
    if driver is not None:
        return driver
    if get_device(dev.bdf, sysfs_root, use_udev=False).driver == VFIO_PCI:
        raise TransportError(
            f"{dev.bdf} is still bound to {VFIO_PCI} after unbinding it", bdf=dev.bdf
        )
    log.warning("no driver took %s after unbinding it from %s", dev.bdf, VFIO_PCI)
    return None


# ----------------------------------------------------------------------------------------
# Public: hotplug events.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceEvent:
    """A kernel uevent for a virtio-mem function: ``add``, ``remove``, ``bind``,
    ``unbind`` or ``change``; ``driver`` as the event reports it."""

    action: str
    bdf: str
    driver: str | None


class DeviceMonitor:
    """Kernel uevents for virtio-mem PCI functions, for a selector loop.

    A pyudev netlink monitor on the kernel's own messages (``source='kernel'``: no
    udevd needed, root needed). ``fileno()`` is readable when events wait; :meth:`poll`
    returns the next virtio-mem event or None.
    """

    def __init__(self, *, source: str = "kernel") -> None:
        import pyudev

        self._monitor: Any = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
        self._monitor.filter_by("pci")
        self._monitor.start()

    def fileno(self) -> int:
        if self._monitor is None:
            raise ValueError("DeviceMonitor is closed")
        return int(self._monitor.fileno())

    def poll(self, timeout: float | None = 0) -> DeviceEvent | None:
        """The next virtio-mem event; waits up to ``timeout`` s (None: forever) for one."""
        if self._monitor is None:
            raise ValueError("DeviceMonitor is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            dev = self._monitor.poll(left)
            if dev is None:
                # A timeout, or a message libudev dropped (then wait out the rest).
                if deadline is None or (timeout and time.monotonic() < deadline):
                    continue
                return None
            props = dev.properties
            if props.get("PCI_ID", "").upper() == PCI_ID:
                return DeviceEvent(
                    action=str(dev.action),
                    bdf=str(props.get("PCI_SLOT_NAME") or dev.sys_name),
                    driver=props.get("DRIVER"),
                )

    def close(self) -> None:
        """Stop listening (closes the netlink socket)."""
        # pyudev has no close: dropping the monitor unrefs it, which closes the socket.
        self._monitor = None

    def __enter__(self) -> DeviceMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watch(timeout: float | None = None) -> Iterator[DeviceEvent]:
    """Yield virtio-mem events as they come; stop after ``timeout`` s without one
    (None: never)."""
    with DeviceMonitor() as monitor:
        while (event := monitor.poll(timeout)) is not None:
            yield event
