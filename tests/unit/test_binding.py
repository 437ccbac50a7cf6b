"""binding: bind to vfio-pci and back, against a fake sysfs tree and a fake kernel thread."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fake_pci_sysfs import BDF, NET_BDF, FakeKernel

from vmem_guest import binding
from vmem_guest.binding import VFIO_PCI, bind, unbind
from vmem_guest.errors import TransportError, UsageError
from vmem_guest.pci import NOIOMMU_PARAM, get_device


def test_bind_noiommu_and_back(fk: FakeKernel, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vmem_guest.binding"):
        node = bind("00:03.0", allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)
    assert node == fk.dev / "vfio/noiommu-0"
    assert node.exists()
    assert (fk.sys / NOIOMMU_PARAM).read_text() == "Y"
    assert any("taint" in r.getMessage() for r in caplog.records)
    assert fk.override(BDF) == VFIO_PCI
    assert fk.log == [("unbind", "virtio-pci", BDF), ("probe", BDF, VFIO_PCI)]
    dev = get_device(BDF, fk.sys)
    assert (dev.driver, dev.iommu_group, dev.iommu_kind) == (VFIO_PCI, 0, "noiommu")

    # Binding again is a no-op that returns the same node.
    assert bind(BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev) == node
    assert len(fk.log) == 2

    assert unbind(BDF, sysfs_root=fk.sys, dev_root=fk.dev) == "virtio-pci"
    assert fk.override(BDF) == "\n"
    assert fk.log[2:] == [("unbind", VFIO_PCI, BDF), ("probe", BDF, "virtio-pci")]
    assert not node.exists()
    assert get_device(BDF, fk.sys).iommu_group is None


def test_bind_noiommu_already_enabled_does_not_rewrite(fk: FakeKernel) -> None:
    param = fk.sys / NOIOMMU_PARAM
    param.write_text("Y\n")
    bind(BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)
    assert param.read_text() == "Y\n"


def test_bind_noiommu_refused_without_permission(fk: FakeKernel) -> None:
    with pytest.raises(UsageError, match="no-IOMMU") as info:
        bind(BDF, allow_noiommu=False, sysfs_root=fk.sys, dev_root=fk.dev)
    assert "taints the kernel" in str(info.value)
    # Nothing was touched.
    assert (fk.sys / NOIOMMU_PARAM).read_text() == "N\n"
    assert fk.override(BDF) == "(null)\n"
    assert fk.driver_of(BDF) == "virtio-pci"
    assert fk.log == []


def test_bind_type1(fk_type1: FakeKernel) -> None:
    fk = fk_type1
    node = bind(BDF, allow_noiommu=False, sysfs_root=fk.sys, dev_root=fk.dev)
    assert node == fk.dev / "vfio/5"
    assert (fk.sys / NOIOMMU_PARAM).read_text() == "N\n"  # untouched
    assert unbind(BDF, sysfs_root=fk.sys, dev_root=fk.dev) == "virtio-pci"
    assert get_device(BDF, fk.sys).iommu_group == 5  # a real group stays


def test_bind_unbound_device_skips_unbind(fk: FakeKernel) -> None:
    (fk.devdir(BDF) / "driver").unlink()
    bind(BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)
    assert fk.log == [("probe", BDF, VFIO_PCI)]


def test_bind_errors_before_touching_anything(fk: FakeKernel) -> None:
    with pytest.raises(UsageError, match=r"no PCI device 0000:00:07\.0"):
        bind("00:07.0", allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)
    with pytest.raises(UsageError, match="not a virtio-mem device"):
        bind(NET_BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)
    with pytest.raises(UsageError, match="not a PCI address"):
        bind("0000:00:03", allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)
    assert fk.log == []


def test_bind_refused_by_vfio_hands_the_device_back(fk: FakeKernel) -> None:
    fk.refuse_vfio = True
    with pytest.raises(TransportError, match="did not bind"):
        bind(BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev, timeout=0.3)
    deadline = time.monotonic() + 2
    while fk.driver_of(BDF) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fk.driver_of(BDF) == "virtio-pci"
    assert fk.override(BDF) == "\n"


def test_bind_without_a_kernel_times_out(tmp_path: Path) -> None:
    fk = FakeKernel(tmp_path)  # not running: nobody answers the writes
    with pytest.raises(TransportError, match=r"did not bind .* within 0\.1 s"):
        bind(BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev, timeout=0.1)
    assert (fk.sys / "bus/pci/drivers/virtio-pci/unbind").read_text() == BDF
    assert (fk.sys / "bus/pci/drivers_probe").read_text() == BDF
    assert fk.override(BDF) == "\n"  # the rollback's write came last


def test_sysfs_write_failure_is_a_transport_error(fk: FakeKernel) -> None:
    override = fk.devdir(BDF) / "driver_override"
    override.unlink()
    override.mkdir()  # writing it now fails with EISDIR
    with pytest.raises(TransportError) as info:
        bind(BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)
    assert info.value.fields["errno"] == errno.EISDIR
    assert info.value.fields["path"] == str(fk.sys / "bus/pci/devices" / BDF / "driver_override")
    assert "EISDIR" in str(info.value)
    assert fk.driver_of(BDF) == "virtio-pci"


def test_modprobe_when_vfio_pci_is_missing(fk: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    vfio_dir = fk.sys / "bus/pci/drivers" / VFIO_PCI
    for f in vfio_dir.iterdir():
        f.unlink()
    vfio_dir.rmdir()
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        fk.add_driver(VFIO_PCI)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(binding.subprocess, "run", fake_run)
    bind(BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)
    assert calls == [["modprobe", VFIO_PCI]]
    assert fk.driver_of(BDF) == VFIO_PCI


def test_modprobe_failure(fk: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    vfio_dir = fk.sys / "bus/pci/drivers" / VFIO_PCI
    for f in vfio_dir.iterdir():
        f.unlink()
    vfio_dir.rmdir()

    def fake_run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(
            argv, 1, "", "modprobe: FATAL: Module vfio-pci not found"
        )

    monkeypatch.setattr(binding.subprocess, "run", fake_run)
    with pytest.raises(TransportError, match="Module vfio-pci not found"):
        bind(BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)
    assert fk.log == []


def test_unbind_refuses_an_open_group(fk: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    node = bind(BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)
    real_open = os.open

    def busy_open(path: Any, flags: int, *args: Any) -> int:
        if Path(path) == node:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(binding.os, "open", busy_open)
    with pytest.raises(TransportError, match="in use"):
        unbind(BDF, sysfs_root=fk.sys, dev_root=fk.dev)
    assert fk.driver_of(BDF) == VFIO_PCI
    assert fk.override(BDF) == VFIO_PCI


def test_unbind_leaves_other_drivers_alone(fk: FakeKernel) -> None:
    assert unbind(BDF, sysfs_root=fk.sys, dev_root=fk.dev) == "virtio-pci"
    assert fk.log == []
    assert fk.override(BDF) == "\n"


def test_unbind_unbound_device_probes_it(fk: FakeKernel) -> None:
    (fk.devdir(BDF) / "driver").unlink()
    assert unbind(BDF, sysfs_root=fk.sys, dev_root=fk.dev) == "virtio-pci"
    assert fk.log == [("probe", BDF, "virtio-pci")]


def test_unbind_errors(fk: FakeKernel) -> None:
    with pytest.raises(UsageError, match="no PCI device"):
        unbind("00:1f.0", sysfs_root=fk.sys, dev_root=fk.dev)
    with pytest.raises(UsageError, match="not a virtio-mem device"):
        unbind(NET_BDF, sysfs_root=fk.sys, dev_root=fk.dev)
