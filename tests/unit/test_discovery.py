"""discovery: listing, IOMMU kinds, bind/unbind against a fake sysfs tree.

:class:`FakeKernel` builds the tree (``devices/pci0000:00/<bdf>`` with the
``bus/pci/devices`` links, drivers, iommu groups, the vfio module parameter, /dev/vfio)
and, in a thread, plays the kernel's part: it consumes writes to ``drivers/*/unbind``
and ``drivers_probe`` the way the PCI core and vfio-pci do (driver links, no-IOMMU
groups and their /dev/vfio nodes), and logs what it did.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmem_guest import discovery
from vmem_guest.discovery import (
    VFIO_PCI,
    VirtioMemPci,
    bind,
    get_device,
    list_devices,
    normalize_bdf,
    unbind,
)
from vmem_guest.errors import TransportError, UsageError

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
        (self.dev / "vfio").mkdir(parents=True)
        (self.sys / "bus/pci").mkdir(parents=True)
        (self.sys / "bus/pci/drivers_probe").write_text("")
        (self.sys / "class/iommu").mkdir(parents=True)
        for drv in ("virtio-pci", VFIO_PCI):
            self.add_driver(drv)
        self.add_device(BDF, vendor=0x1AF4, device=0x1058, numa_node=0, revision=1)
        self.add_device(NET_BDF, vendor=0x1AF4, device=0x1041)
        param = self.sys / discovery.NOIOMMU_PARAM
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
            if name == discovery.NOIOMMU_GROUP_NAME:  # vfio drops its made-up group
                (self.devdir(bdf) / "iommu_group").unlink()
                for f in (self.sys / "kernel/iommu_groups" / str(number)).iterdir():
                    f.unlink()
                (self.sys / "kernel/iommu_groups" / str(number)).rmdir()
                (self.dev / f"vfio/noiommu-{number}").unlink()
            else:
                (self.dev / f"vfio/{number}").unlink()

    def _probe(self, bdf: str) -> None:
        if self.driver_of(bdf) is not None:
            self.log.append(("probe-bound", bdf))
            return
        override = self.override(bdf).strip()
        target = "virtio-pci" if override in ("", "(null)") else override
        if target == VFIO_PCI:
            group = self._group(bdf)
            param = (self.sys / discovery.NOIOMMU_PARAM).read_text().strip()
            if self.refuse_vfio or (group is None and param != "Y"):
                self.log.append(("probe-failed", bdf, target))
                return
            if group is None:
                number = self._next_noiommu_group
                self._next_noiommu_group += 1
                self.make_group(bdf, number, name=discovery.NOIOMMU_GROUP_NAME, type_="unknown")
                (self.dev / f"vfio/noiommu-{number}").touch()
            else:
                (self.dev / f"vfio/{group[0]}").touch()
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


@pytest.fixture
def fk(tmp_path: Path) -> Iterator[FakeKernel]:
    with FakeKernel(tmp_path).running() as k:
        yield k


@pytest.fixture
def fk_type1(tmp_path: Path) -> Iterator[FakeKernel]:
    with FakeKernel(tmp_path, iommu_group=5).running() as k:
        yield k


# ----------------------------------------------------------------------------------------
# Addresses.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "full"),
    [
        ("0000:00:03.0", "0000:00:03.0"),
        ("00:03.0", "0000:00:03.0"),
        ("0000:0A:1f.7", "0000:0a:1f.7"),
        (" 01:00.1\n", "0000:01:00.1"),
        ("10000:00:02.0", "10000:00:02.0"),  # VMD-style domains
    ],
)
def test_normalize_bdf(text: str, full: str) -> None:
    assert normalize_bdf(text) == full


@pytest.mark.parametrize(
    "text",
    ["", "3.0", "00:03", "0000:00:03.8", "0000:00:20.0", "../../etc", "00:03.0/x", "g0:03.0"],
)
def test_normalize_bdf_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="not a PCI address"):
        normalize_bdf(text)


# ----------------------------------------------------------------------------------------
# Discovery.
# ----------------------------------------------------------------------------------------


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
    fk.make_group(BDF, 0, name=discovery.NOIOMMU_GROUP_NAME, type_="unknown")
    (dev,) = list_devices(fk.sys)
    assert (dev.iommu_group, dev.iommu_kind) == (0, "noiommu")
    assert dev.group_node(fk.dev) == fk.dev / "vfio/noiommu-0"


def test_group_without_registered_iommu_is_noiommu(fk: FakeKernel) -> None:
    fk.make_group(BDF, 2, name=None, type_="DMA")  # /sys/class/iommu stays empty
    assert list_devices(fk.sys)[0].iommu_kind == "noiommu"


def test_no_iommu_and_no_noiommu_support(fk: FakeKernel) -> None:
    (fk.sys / discovery.NOIOMMU_PARAM).unlink()  # vfio loaded, no CONFIG_VFIO_NOIOMMU
    assert list_devices(fk.sys)[0].iommu_kind is None
    with pytest.raises(UsageError, match="CONFIG_VFIO_NOIOMMU"):
        bind(BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)


def test_vfio_not_loaded_counts_as_noiommu(fk: FakeKernel) -> None:
    (fk.sys / discovery.NOIOMMU_PARAM).unlink()
    (fk.sys / "module/vfio/parameters").rmdir()
    (fk.sys / "module/vfio").rmdir()
    assert list_devices(fk.sys)[0].iommu_kind == "noiommu"


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
    if not discovery._udev_available():
        pytest.skip("pyudev or libudev not available")
    direct = discovery._pci_records(use_udev=False)
    if not direct:
        pytest.skip("no PCI devices on this host")
    assert discovery._pci_records(use_udev=True) == direct
    assert list_devices(use_udev=True) == list_devices(use_udev=False)


# ----------------------------------------------------------------------------------------
# bind / unbind.
# ----------------------------------------------------------------------------------------


def test_bind_noiommu_and_back(fk: FakeKernel, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vmem_guest.discovery"):
        node = bind("00:03.0", allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)
    assert node == fk.dev / "vfio/noiommu-0"
    assert node.exists()
    assert (fk.sys / discovery.NOIOMMU_PARAM).read_text() == "Y"
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
    param = fk.sys / discovery.NOIOMMU_PARAM
    param.write_text("Y\n")
    bind(BDF, allow_noiommu=True, sysfs_root=fk.sys, dev_root=fk.dev)
    assert param.read_text() == "Y\n"


def test_bind_noiommu_refused_without_permission(fk: FakeKernel) -> None:
    with pytest.raises(UsageError, match="no-IOMMU") as info:
        bind(BDF, allow_noiommu=False, sysfs_root=fk.sys, dev_root=fk.dev)
    assert "taints the kernel" in str(info.value)
    # Nothing was touched.
    assert (fk.sys / discovery.NOIOMMU_PARAM).read_text() == "N\n"
    assert fk.override(BDF) == "(null)\n"
    assert fk.driver_of(BDF) == "virtio-pci"
    assert fk.log == []


def test_bind_type1(fk_type1: FakeKernel) -> None:
    fk = fk_type1
    node = bind(BDF, allow_noiommu=False, sysfs_root=fk.sys, dev_root=fk.dev)
    assert node == fk.dev / "vfio/5"
    assert (fk.sys / discovery.NOIOMMU_PARAM).read_text() == "N\n"  # untouched
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

    monkeypatch.setattr(discovery.subprocess, "run", fake_run)
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

    monkeypatch.setattr(discovery.subprocess, "run", fake_run)
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

    monkeypatch.setattr(discovery.os, "open", busy_open)
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
