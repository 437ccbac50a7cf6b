"""Hand virtio-mem PCI functions to vfio-pci or uio_pci_generic, and back to the kernel.

* :func:`bind`: ``driver_override`` = ``vfio-pci``, unbind from the current driver,
  ``drivers_probe``; returns the ``/dev/vfio`` group node. Without an IOMMU this needs
  VFIO's no-IOMMU mode, which taints the kernel: only with ``allow_noiommu=True``.
* :func:`bind_uio`: the same with ``uio_pci_generic``, for guests without VFIO
  (docs/uio.md); returns ``/dev/uioN``.
* :func:`unbind`: clear ``driver_override``, unbind from vfio-pci or uio_pci_generic,
  ``drivers_probe``, so virtio-pci takes the device back.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmem_guest import requirements
from vmem_guest._linux.sysfs import SYSFS_ROOT, read_value_or_none, write_word
from vmem_guest.errors import TransportError, UsageError
from vmem_guest.pci import NOIOMMU_PARAM, VirtioMemPci, get_device
from vmem_guest.requirements import Requirement
from vmem_guest.transport import uio
from vmem_guest.transport.uio import UIO_PCI_GENERIC
from vmem_guest.transport.vfio import DEV_ROOT

log = logging.getLogger(__name__)

VFIO_PCI = "vfio-pci"
#: The drivers :func:`bind` and :func:`bind_uio` hand functions to, and :func:`unbind`
#: takes them back from.
OURS = (VFIO_PCI, UIO_PCI_GENERIC)
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


def _ensure_driver(
    sysfs_root: Path,
    timeout: float,
    driver: str = VFIO_PCI,
    requirement: Requirement = requirements.VFIO_PCI,
) -> None:
    """Load ``driver`` unless its driver directory exists (built in, or loaded)."""
    driver_dir = sysfs_root / "bus/pci/drivers" / driver
    if driver_dir.is_dir():
        return
    log.info("loading the %s module", driver)
    try:
        proc = subprocess.run(
            ["modprobe", driver], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TransportError(f"cannot run modprobe {driver}: {exc}") from None
    if proc.returncode != 0:
        raise TransportError(
            requirement.refusal(
                f"modprobe {driver} failed (exit status {proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            ),
            returncode=proc.returncode,
        )
    if not _wait_for(f"the {driver} driver", driver_dir.is_dir, timeout):
        raise TransportError(f"modprobe {driver} succeeded but {driver_dir} is missing")


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
    _ensure_driver(sysfs_root, timeout)
    if dev.iommu_kind == "noiommu":
        _enable_noiommu(sysfs_root)

    def node(now: VirtioMemPci) -> Path | None:
        return now.group_node(dev_root)

    return _hand_over(
        dev, VFIO_PCI, node, sysfs_root=sysfs_root, dev_root=dev_root, timeout=timeout
    )


def bind_uio(
    bdf: str,
    *,
    sysfs_root: Path = SYSFS_ROOT,
    dev_root: Path = DEV_ROOT,
    timeout: float = 5.0,
) -> Path:
    """Bind a virtio-mem function to uio_pci_generic; return its ``/dev/uioN``.

    For a guest without VFIO (docs/uio.md): no IOMMU protects anything, as in VFIO's
    no-IOMMU mode, and nothing taints the kernel; asking for it is the consent.
    Already bound: returns the node. Loads uio_pci_generic when it is missing; the
    rest as :func:`bind`.
    """
    dev = get_device(bdf, sysfs_root)
    _ensure_driver(sysfs_root, timeout, UIO_PCI_GENERIC, requirements.UIO_PCI_GENERIC)

    def node(now: VirtioMemPci) -> Path | None:
        number = uio.uio_number(now.bdf, sysfs_root)
        return None if number is None else uio.uio_node(number, dev_root)

    return _hand_over(
        dev, UIO_PCI_GENERIC, node, sysfs_root=sysfs_root, dev_root=dev_root, timeout=timeout
    )


def _hand_over(
    dev: VirtioMemPci,
    driver: str,
    node_of: Callable[[VirtioMemPci], Path | None],
    *,
    sysfs_root: Path,
    dev_root: Path,
    timeout: float,
) -> Path:
    """Give ``dev`` to ``driver`` (override, unbind, probe) and wait for the node
    ``node_of`` names; hand it back to its old driver if ``driver`` does not take it."""
    devdir = sysfs_root / "bus/pci/devices" / dev.bdf
    if dev.driver != driver:
        _check_free(dev, dev_root, sysfs_root)
        log.info("binding %s to %s (was %s)", dev.bdf, driver, dev.driver or "unbound")
        _write(devdir / "driver_override", driver)
        if dev.driver is not None:
            _write(devdir / "driver" / "unbind", dev.bdf)
        _write(sysfs_root / "bus/pci/drivers_probe", dev.bdf)

    def ready() -> Path | None:
        now = get_device(dev.bdf, sysfs_root, use_udev=False)
        found = node_of(now) if now.driver == driver else None
        return found if found is not None and found.exists() else None

    found: Path | None = _wait_for(f"{driver} on {dev.bdf}", ready, timeout)
    if found is not None:
        return found
    now = get_device(dev.bdf, sysfs_root, use_udev=False)
    if now.driver != driver:
        log.warning("%s did not take %s; handing it back", driver, dev.bdf)
        with contextlib.suppress(TransportError):
            _write(devdir / "driver_override", "\n")
            _write(sysfs_root / "bus/pci/drivers_probe", dev.bdf)
        raise TransportError(
            f"{driver} did not bind {dev.bdf} within {timeout:g} s (see dmesg)",
            bdf=dev.bdf,
            driver=now.driver,
        )
    raise TransportError(
        f"{dev.bdf} is bound to {driver} but its node "
        f"{node_of(now) or '(none)'} did not appear within {timeout:g} s",
        bdf=dev.bdf,
        iommu_group=now.iommu_group,
    )


def _check_free(dev: VirtioMemPci, dev_root: Path, sysfs_root: Path) -> None:
    """Refuse to take a function from vfio-pci or uio_pci_generic while an agent
    drives it (:func:`_check_group_free`, :func:`_check_uio_free`)."""
    if dev.driver == VFIO_PCI:
        _check_group_free(dev, dev_root)
    elif dev.driver == UIO_PCI_GENERIC:
        _check_uio_free(dev, sysfs_root)


def _check_uio_free(dev: VirtioMemPci, sysfs_root: Path) -> None:
    """Refuse to unbind a function an agent drives through UIO (its flock on the
    function's ``config``, :func:`uio.held`): uio would let it go at once, under a
    device still doing DMA."""
    if uio.held(dev.bdf, sysfs_root):
        raise TransportError(
            f"{dev.bdf} is in use: an agent drives it through UIO (is the agent running?)",
            bdf=dev.bdf,
        )


def unbind(
    bdf: str,
    *,
    sysfs_root: Path = SYSFS_ROOT,
    dev_root: Path = DEV_ROOT,
    timeout: float = 5.0,
) -> str | None:
    """Give a virtio-mem function back to the kernel; return the driver that took it.

    Clears ``driver_override``, unbinds from vfio-pci or uio_pci_generic (refused with
    TransportError while an agent holds it) and reprobes, so virtio-pci binds it again.
    A device bound to another driver is left there. Waits up to ``timeout`` s for a
    driver; None when no driver took the device.
    """
    dev = get_device(bdf, sysfs_root)
    devdir = sysfs_root / "bus/pci/devices" / dev.bdf
    if dev.driver is not None and dev.driver not in OURS:
        _write(devdir / "driver_override", "\n")
        log.info("%s is bound to %s, not %s: left alone", dev.bdf, dev.driver, " or ".join(OURS))
        return dev.driver
    _check_free(dev, dev_root, sysfs_root)
    log.info("unbinding %s from %s", dev.bdf, dev.driver or "no driver")
    _write(devdir / "driver_override", "\n")
    if dev.driver is not None:
        _write(devdir / "driver" / "unbind", dev.bdf)
    _write(sysfs_root / "bus/pci/drivers_probe", dev.bdf)

    def new_driver() -> str | None:
        driver = get_device(dev.bdf, sysfs_root, use_udev=False).driver
        return driver if driver not in OURS else None

    driver: str | None = _wait_for(f"a driver for {dev.bdf}", new_driver, timeout)
    if driver is not None:
        return driver
    still = get_device(dev.bdf, sysfs_root, use_udev=False).driver
    if still in OURS:
        raise TransportError(f"{dev.bdf} is still bound to {still} after unbinding it", bdf=dev.bdf)
    log.warning("no driver took %s after unbinding it from %s", dev.bdf, dev.driver)
    return None
