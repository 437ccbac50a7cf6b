"""Fixtures shared by the unit tests: fake PCI/VFIO kernels (test_pci, test_binding) and
the write(2) calls of the sysfs writers (test_linux_sysfs, test_hotplug)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_pci_sysfs import FakeKernel


@pytest.fixture
def fk(tmp_path: Path) -> Iterator[FakeKernel]:
    """A fake /sys and /dev with one virtio-mem function and no IOMMU."""
    with FakeKernel(tmp_path).running() as k:
        yield k


@pytest.fixture
def fk_type1(tmp_path: Path) -> Iterator[FakeKernel]:
    """The same function in IOMMU group 5 (type1)."""
    with FakeKernel(tmp_path, iommu_group=5).running() as k:
        yield k


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write(2), recorded and made (test_hotplug_deadline has its own, which makes none)."""
    calls: list[bytes] = []
    real_write = os.write

    def recording_write(fd: int, data: bytes) -> int:
        calls.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", recording_write)
    return calls
