"""pci: listing virtio-mem functions and their IOMMU kinds, against a fake sysfs tree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fake_pci_sysfs import BDF, NET_BDF, FakeKernel

from vmem_guest import pci
from vmem_guest.binding import bind
from vmem_guest.errors import UsageError
from vmem_guest.pci import NOIOMMU_PARAM, VirtioMemPci, get_device, list_devices
from vmem_guest.transport.vfio import NOIOMMU_GROUP_NAME


def test_list_devices_noiommu(fk: FakeKernel) -> None:
    devs = list_devices(fk.sys)
    assert devs == [
        VirtioMemPci(
            bdf=BDF,
            driver="virtio-pci",
            iommu_group=None,
            iommu_kind="noiommu",
            numa_node=0,
            revision=1,
            sysfs_path=fk.devdir(BDF).resolve(),
        )
    ]
    assert devs[0].group_node(fk.dev) is None
    assert devs[0].as_dict()["sysfs_path"] == str(fk.devdir(BDF).resolve())


def test_list_devices_type1(fk_type1: FakeKernel) -> None:
    (dev,) = list_devices(fk_type1.sys)
    assert (dev.iommu_group, dev.iommu_kind) == (5, "type1")
    assert dev.group_node(fk_type1.dev) == fk_type1.dev / "vfio/5"


def test_list_devices_empty_tree(tmp_path: Path) -> None:
    assert list_devices(tmp_path) == []


def test_noiommu_group_is_not_type1(fk: FakeKernel) -> None:
    # Bound in no-IOMMU mode, with some IOMMU registered for other devices.
    (fk.sys / "class/iommu/dmar0").mkdir()
    fk.make_group(BDF, 0, name=NOIOMMU_GROUP_NAME, type_="unknown")
    (dev,) = list_devices(fk.sys)
    assert (dev.iommu_group, dev.iommu_kind) == (0, "noiommu")
    assert dev.group_node(fk.dev) == fk.dev / "vfio/noiommu-0"


def test_group_without_registered_iommu_is_noiommu(fk: FakeKernel) -> None:
    fk.make_group(BDF, 2, name=None, type_="DMA")  # /sys/class/iommu stays empty
    assert list_devices(fk.sys)[0].iommu_kind == "noiommu"


def test_no_iommu_and_no_noiommu_support(fk: FakeKernel) -> None:
    (fk.sys / NOIOMMU_PARAM).unlink()  # vfio loaded, no CONFIG_VFIO_NOIOMMU
    assert list_devices(fk.sys)[0].iommu_kind is None
    with pytest.raises(UsageError, match="CONFIG_VFIO_NOIOMMU"):
        bind(BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)


def test_vfio_not_loaded_counts_as_noiommu(fk: FakeKernel) -> None:
    (fk.sys / NOIOMMU_PARAM).unlink()
    (fk.sys / "module/vfio/parameters").rmdir()
    (fk.sys / "module/vfio").rmdir()
    assert list_devices(fk.sys)[0].iommu_kind == "noiommu"


def test_vfio_mode_is_type1_only_behind_a_real_iommu(fk: FakeKernel, tmp_path: Path) -> None:
    """The mode a function is opened in: a kind of None (nothing possible) opens as
    no-IOMMU, and VFIO's group check at open refuses it."""
    (dev,) = list_devices(fk.sys)
    modes = {
        kind: dataclasses.replace(dev, iommu_kind=kind).vfio_mode
        for kind in ("type1", "noiommu", None)
    }
    assert modes == {"type1": "type1", "noiommu": "noiommu", None: "noiommu"}
    unknown = dataclasses.replace(dev, iommu_group=4, iommu_kind=None)
    assert unknown.group_node(tmp_path) == tmp_path / "vfio/noiommu-4"


def test_get_device_errors(fk: FakeKernel) -> None:
    assert get_device("00:03.0", fk.sys).bdf == BDF
    with pytest.raises(UsageError, match=r"no PCI device 0000:00:09\.0"):
        get_device("00:09.0", fk.sys)
    with pytest.raises(UsageError, match="not a virtio-mem device") as info:
        get_device(NET_BDF, fk.sys)
    assert info.value.fields["device"] == 0x1041
    with pytest.raises(UsageError, match="not a PCI address"):
        get_device("nonsense", fk.sys)


def test_udev_needs_the_real_sysfs(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="pyudev reads only /sys"):
        list_devices(tmp_path, use_udev=True)


def test_udev_and_sysfs_readers_agree_on_this_host() -> None:
    """Both readers over the host's real /sys, every PCI function (not just virtio-mem)."""
    if not pci._udev_available():
        pytest.skip("pyudev or libudev not available")
    direct = pci._pci_records(use_udev=False)
    if not direct:
        pytest.skip("no PCI devices on this host")
    assert pci._pci_records(use_udev=True) == direct
    assert list_devices(use_udev=True) == list_devices(use_udev=False)


def test_the_in_kernel_virtio_driver_is_seen(tmp_path: Path) -> None:
    function_dir = tmp_path / "0000:00:03.0"
    (function_dir / "virtio1").mkdir(parents=True)
    dev = VirtioMemPci("0000:00:03.0", None, None, None, -1, 0, function_dir)
    assert dev.virtio_driver() is None
    (tmp_path / "virtio_mem").mkdir()
    (function_dir / "virtio1" / "driver").symlink_to(tmp_path / "virtio_mem")
    assert dev.virtio_driver() == "virtio_mem"
