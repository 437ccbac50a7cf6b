"""The pyudev calls vmem_guest makes, against the installed pyudev and this host's /sys.

vmem_guest supports pyudev from Debian 12's 0.24.0 on (setup.cfg); ``make
test-debian-packages`` runs this file with that pyudev, ``make test`` with the newest.
Every call the package makes is exercised here: ``Context.list_devices``,
``Devices.from_sys_path``, ``DeviceNotFoundError``, ``Device.attributes.asstring``,
``Monitor.from_netlink(source="kernel")``, ``start``, ``fileno`` and ``poll(timeout=0)``.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from vmem_guest import pci
from vmem_guest.pci_events import PciMonitor

pytestmark = pytest.mark.skipif(not pci._udev_available(), reason="no pyudev or libudev")


def host_pci_functions() -> list[str]:
    try:
        return sorted(os.listdir(pci.SYSFS_ROOT / "bus/pci/devices"))
    except FileNotFoundError:
        return []


def test_each_function_read_alone_through_pyudev_matches_sysfs() -> None:
    """``Devices.from_sys_path`` and the attributes, one function at a time."""
    bdfs = host_pci_functions()
    if not bdfs:
        pytest.skip("no PCI functions on this host")
    for bdf in bdfs:
        through_udev = pci._pci_record(bdf, pci.SYSFS_ROOT, use_udev=True)
        assert through_udev is not None, bdf
        assert through_udev == pci._pci_record(bdf, pci.SYSFS_ROOT, use_udev=False)


def test_a_function_gone_before_pyudev_reads_it_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the reader allows for: the directory was there, then pyudev does not
    find the device (``DeviceNotFoundError``)."""
    missing = "0000:ff:1f.7"
    assert not (pci.SYSFS_ROOT / "bus/pci/devices" / missing).exists()
    monkeypatch.setattr(Path, "exists", lambda self: True)
    assert pci._pci_record(missing, pci.SYSFS_ROOT, use_udev=True) is None


def test_the_uevent_monitor_opens_and_reads_without_blocking() -> None:
    monitor = PciMonitor.open()
    if monitor is None:  # an OSError (no netlink here), logged; an API change raises
        pytest.skip("the kernel's uevent socket cannot be opened here")
    try:
        mode = os.fstat(monitor.fileno()).st_mode
        assert stat.S_ISSOCK(mode)
        sock = socket.socket(fileno=os.dup(monitor.fileno()))
        with sock:
            assert sock.family == socket.AF_NETLINK
        # No PCI function is being added on this host now: nothing, at once.
        assert monitor.added() == []
    finally:
        monitor.close()
    with pytest.raises(ValueError, match="closed"):
        monitor.fileno()
