"""One pyudev Context per process: each new one runs ldconfig in a child process."""

from __future__ import annotations

import os
from typing import Any

import pytest

from vmem_guest import pci
from vmem_guest.pci_events import PciMonitor

pytestmark = pytest.mark.skipif(not pci._udev_available(), reason="no pyudev or libudev")


def test_reads_and_the_monitor_share_one_context(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyudev

    made: list[Any] = []
    real = pyudev.Context

    def counted() -> Any:
        made.append(real())
        return made[-1]

    monkeypatch.setattr(pyudev, "Context", counted)
    pci.udev_context.cache_clear()
    try:
        pci.list_devices()
        for bdf in sorted(os.listdir(pci.SYSFS_ROOT / "bus/pci/devices"))[:3]:
            pci._pci_record(bdf, pci.SYSFS_ROOT, use_udev=None)
        monitor = PciMonitor.open()
        if monitor is not None:
            monitor.close()
        assert len(made) == 1
    finally:
        pci.udev_context.cache_clear()
