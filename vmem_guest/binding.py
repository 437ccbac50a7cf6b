"""Hand virtio-mem PCI functions to vfio-pci, and back to the kernel.

* :func:`bind`: ``driver_override`` = ``vfio-pci``, unbind from the current driver,
  ``drivers_probe``; returns the ``/dev/vfio`` group node. Without an IOMMU this needs
  VFIO's no-IOMMU mode, which taints the kernel: only with ``allow_noiommu=True``.
* :func:`unbind`: clear ``driver_override``, unbind from vfio-pci, ``drivers_probe``,
  so virtio-pci takes the device back.

Functions are found and classified by :mod:`vmem_guest.pci`. Writes
(``driver_override``, ``unbind``, ``drivers_probe``, the vfio module parameter) go to
files under ``sysfs_root`` (a parameter, so tests use a fake tree); a failed write
raises :class:`~vmem_guest.errors.TransportError` with ``path``, ``value`` and
``errno``.

Facts used (docs/test-vm.md section 4 and docs/protocol.md section 3; Linux
sysfs-bus-pci, vfio.rst):

* ``vfio-pci.ids=`` on the command line does not win against virtio-pci, the rebind at
  run time does.
* A vfio group can be open only once: an open that fails with EBUSY means someone
  (the agent) holds the device, and unbinding would block until they let go.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from vmem_guest import requirements
from vmem_guest._linux.sysfs import SYSFS_ROOT, read_value_or_none, write_word
from vmem_guest.errors import TransportError, UsageError
from vmem_guest.pci import NOIOMMU_PARAM, VirtioMemPci, get_device
from vmem_guest.transport.vfio import DEV_ROOT

log = logging.getLogger(__name__)

VFIO_PCI = "vfio-pci"
_POLL_INTERVAL = 0.01


def _write(path: Path, value: str) -> None:
    """One write to a sysfs file, its old value replaced (in a test's tree too);
    TransportError (path, value, errno) when it fails."""
    size = len(value.encode())
    try:
        written = write_word(path, value, truncate=True)
    except OSError as exc:
        err = exc.errno or errno_mod.EIO
        name = errno_mod.errorcode.get(err, str(err))
        raise TransportError(
            f"writing {value.strip()!r} to {path} failed: {name} ({os.strerror(err)})",
            path=str(path),
            value=value,
            errno=err,
        ) from None
    if written != size:
        raise TransportError(
            f"short write to {path}: {written} of {size} bytes",
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
            requirements.VFIO_PCI.refusal(
                f"modprobe {VFIO_PCI} failed (exit status {proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            ),
            returncode=proc.returncode,
        )
    if not _wait_for("the vfio-pci driver", driver_dir.is_dir, timeout):
        raise TransportError(f"modprobe {VFIO_PCI} succeeded but {driver_dir} is missing")


def _enable_noiommu(sysfs_root: Path) -> None:
    """Turn on vfio's unsafe no-IOMMU mode unless it is on (warns: it taints the kernel)."""
    param = sysfs_root / NOIOMMU_PARAM
    current = read_value_or_none(param)
    if current is None:
        raise TransportError(
            requirements.DMA_ISOLATION.refusal(
                f"the kernel's vfio has no no-IOMMU mode: {param} is missing "
                "(CONFIG_VFIO_NOIOMMU is off)"
            ),
            path=str(param),
        )
    if current in ("Y", "1"):
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
        raise UsageError(requirements.no_iommu_mode(dev.bdf), bdf=dev.bdf)
    if dev.iommu_kind == "noiommu" and not allow_noiommu:
        raise UsageError(requirements.noiommu_not_allowed(dev.bdf), bdf=dev.bdf)
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
