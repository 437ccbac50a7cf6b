"""vmem-guest doctor: every check against fake trees, the verdict, the exit status,
and run's refusals in the same words."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import socket
import struct
import threading
from pathlib import Path

import pytest
from fake_pci_sysfs import BDF, FakeKernel
from test_cli import run_main
from test_kexec_exposure import write_iomem, write_memmap
from test_virtio_pci_caps import config_space, qemu_caps

from vmem_guest import (
    binding,
    control,
    doctor,
    kernel_setting,
    online_path,
    planner,
    requirements,
    service,
)
from vmem_guest.blocks import Geometry
from vmem_guest.doctor import Host, Options, Status
from vmem_guest.errors import RequirementMissing
from vmem_guest.hotplug import SysfsMemory
from vmem_guest.pci import NOIOMMU_PARAM, get_device
from vmem_guest.tracker import Tracker, TrackerIdentity

MIB = 1 << 20
RELEASE = "6.1.0-vmem"


class Guest:
    """A fake guest that has everything: one virtio-mem device without an IOMMU on
    virtio-pci, no in-kernel driver, a probe-capable kernel, secretmem on, the
    page-level interface, logind, libudev. Tests take one piece away each."""

    def __init__(self, root: Path) -> None:
        self.pci = FakeKernel(root)
        self.sys, self.dev = self.pci.sys, self.pci.dev
        self.proc = root / "proc"
        self.lib_modules = root / "lib/modules"
        self.systemd = root / "run/systemd/system"
        self.state_dir = root / "run/vmem-guest"
        self.uid = 0
        self.udev = True
        self.programs = {"systemd-inhibit": "/usr/bin/systemd-inhibit"}
        mem = self.memory
        mem.mkdir(parents=True)
        for name, text in (
            ("probe", ""),
            ("block_size_bytes", "8000000\n"),
            ("auto_online_blocks", "offline\n"),
            ("soft_offline_page", ""),
        ):
            (mem / name).write_text(text)
        (self.sys / "kernel/debug/hwpoison").mkdir(parents=True)
        (self.sys / "kernel/debug/hwpoison/unpoison-pfn").write_text("")
        (self.sys / "kernel/security").mkdir(parents=True)
        (self.sys / "kernel/security/lockdown").write_text("[none] integrity confidentiality\n")
        self.write(self.sys / "module/secretmem/parameters/enable", "Y\n")
        self.write(self.sys / "module/vfio/parameters/dummy", "")
        self.write(self.proc / "sys/kernel/osrelease", f"{RELEASE}\n")
        self.write(self.proc / "kpageflags", "")
        self.write(self.proc / "interrupts", "  9:  0  IO-APIC   9-fasteoi   acpi\n")
        self.write(self.proc / "cmdline", "initcall_blacklist=virtio_mem_driver_init\n")
        self.write(
            self.lib_modules / RELEASE / "modules.dep",
            "kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/vfio.ko\n"
            "kernel/drivers/uio/uio_pci_generic.ko: kernel/drivers/uio/uio.ko\n",
        )
        self.systemd.mkdir(parents=True)
        self.state_dir.mkdir(parents=True)
        # Boot memory only: nothing in the device region (1 << 32, 4 GiB) yet.
        write_memmap(self.sys, [(0x100000, 0x7FFDFFFF, "System RAM")])
        write_iomem(self.proc, [(0x100000, 0x7FFDFFFF, "System RAM")])
        self.set_device_config()
        # vfio-pci is a module not loaded yet: only virtio-pci is registered.
        (self.sys / "bus/pci/drivers/vfio-pci/unbind").unlink()
        (self.sys / "bus/pci/drivers/vfio-pci/bind").unlink()
        (self.sys / "bus/pci/drivers/vfio-pci").rmdir()

    def set_device_config(
        self, *, block: int = 2 * MIB, region: int = 4096 * MIB, addr: int = 1 << 32
    ) -> None:
        """The device's config space (QEMU's capabilities, BAR 4 of 16 KiB) and its
        BAR as sysfs shows them: ``config``, ``resource``, ``resource4``."""
        devdir = self.pci.devdir(BDF)
        (devdir / "config").write_bytes(bytes(config_space(qemu_caps())))
        bars = ["0x0 0x0 0x0"] * 6
        bars[4] = "0x0000000800000000 0x0000000800003fff 0x000000000014220c"
        (devdir / "resource").write_text("\n".join(bars) + "\n")
        body = bytearray(0x4000)
        struct.pack_into("<QH6xQQQQQ", body, 0x2000, block, 0, addr, region, region, 0, 0)
        (devdir / "resource4").write_bytes(bytes(body))

    @property
    def memory(self) -> Path:
        return self.sys / "devices/system/memory"

    @staticmethod
    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def host(self) -> Host:
        return Host(
            sys=self.sys,
            proc=self.proc,
            dev=self.dev,
            boot=self.proc.parent / "boot",
            lib_modules=self.lib_modules,
            systemd_runtime=self.systemd,
            state_dir=self.state_dir,
            euid=lambda: self.uid,
            udev_loads=lambda: self.udev,
            which=self.programs.get,
        )

    def examine(self, **options: object) -> doctor.Report:
        opts = Options(noiommu=True)
        return doctor.examine(self.host(), dataclasses.replace(opts, **options))  # type: ignore[arg-type]

    def add_viommu(self, *, remapping: bool) -> None:
        """A vIOMMU (dmar0) and the device in IOMMU group 3."""
        (self.sys / "class/iommu/dmar0").mkdir()
        self.pci.make_group(BDF, 3, name=None, type_="DMA")
        if remapping:
            self.write(self.proc / "interrupts", "  9:  0  IR-IO-APIC   9-fasteoi   acpi\n")

    def bind_in_kernel_driver(self) -> None:
        """virtio-pci's child virtio0 driven by virtio_mem, as without the blacklist."""
        drivers = self.sys / "bus/virtio/drivers/virtio_mem"
        drivers.mkdir(parents=True)
        child = self.pci.devdir(BDF) / "virtio0"
        child.mkdir()
        os.symlink(drivers, child / "driver")


@pytest.fixture
def guest(tmp_path: Path) -> Guest:
    return Guest(tmp_path)


def by_name(report: doctor.Report) -> dict[str, doctor.Result]:
    return {result.requirement.name: result for result in report.results}


def status(report: doctor.Report, name: str) -> Status:
    return by_name(report)[name].finding.status


def detail(report: doctor.Report, name: str) -> str:
    return by_name(report)[name].finding.detail


def test_a_complete_noiommu_guest_is_ready(guest: Guest) -> None:
    report = guest.examine()
    statuses = {name: result.finding.status for name, result in by_name(report).items()}
    assert statuses == {name: Status.OK for name in statuses if name != "interrupt remapping"} | {
        "interrupt remapping": Status.NOT_NEEDED
    }
    assert report.ready
    assert [row["bdf"] for row in report.devices] == [BDF]
    assert report.devices[0]["iommu_kind"] == "noiommu"
    assert "vfio-pci is a module" in detail(report, "vfio-pci")
    assert "ready: every requirement is met" in doctor.report_text(report)


def test_every_check_is_listed_once_with_its_requirement() -> None:
    names = [check.requirement.name for check in doctor.CHECKS]
    assert len(names) == len(set(names))
    defined = vars(requirements).values()
    assert {check.requirement for check in doctor.CHECKS} == {
        value for value in defined if isinstance(value, requirements.Requirement)
    }


def test_not_root_is_required(guest: Guest) -> None:
    guest.uid = 1000
    report = guest.examine()
    assert status(report, "root") is Status.MISSING
    assert detail(report, "root") == requirements.not_root(1000)
    assert not report.ready


@pytest.mark.parametrize(
    ("release", "expected"),
    [("6.1.0-13-amd64", Status.OK), ("6.12.48+deb13", Status.OK), ("5.10.0-26", Status.MISSING)],
)
def test_linux_version(guest: Guest, release: str, expected: Status) -> None:
    guest.write(guest.proc / "sys/kernel/osrelease", release)
    guest.pci.add_driver("vfio-pci")  # the modules of RELEASE no longer count
    report = guest.examine()
    assert status(report, "linux") is expected
    assert report.ready  # optional


def test_no_probe_file_is_required_and_said_as_run_says_it(guest: Guest) -> None:
    (guest.memory / "probe").unlink()
    report = guest.examine()
    assert status(report, "memory probe") is Status.MISSING
    assert detail(report, "memory probe") == requirements.no_probe(str(guest.memory / "probe"))
    assert not report.ready
    assert "not ready: run would stop for memory probe" in doctor.report_text(report)


@pytest.mark.parametrize("text", ["3000000", "zz", None])
def test_bad_block_size(guest: Guest, text: str | None) -> None:
    path = guest.memory / "block_size_bytes"
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    report = guest.examine()
    assert status(report, "memory block size") is Status.MISSING


def tracked(guest: Guest, name: str, region: int, addr: int = 1 << 32) -> None:
    geometry = Geometry(addr, region, 2 * MIB, 128 * MIB)
    Tracker.open(guest.state_dir, TrackerIdentity(name, geometry)).close()


def test_block_size_against_the_device_config(guest: Guest) -> None:
    report = guest.examine()
    assert status(report, "memory block size") is Status.OK
    assert detail(report, "memory block size") == (
        "128MiB memory blocks; 0000:00:03.0: device block 2MiB, Sub Block Mode,"
        " 32 whole memory blocks in its 4GiB region at 0x100000000"
    )
    guest.set_device_config(block=256 * MIB, region=1024 * MIB)
    assert "device block 256MiB, Big Block Mode, 8 whole memory blocks" in detail(
        guest.examine(), "memory block size"
    )


def test_a_region_without_a_whole_memory_block_is_required(guest: Guest) -> None:
    guest.set_device_config(region=64 * MIB)
    report = guest.examine()
    assert status(report, "memory block size") is Status.MISSING
    assert "0 whole memory blocks in its 64MiB region" in detail(report, "memory block size")
    assert not report.ready
    guest.set_device_config(region=256 * MIB, addr=(1 << 32) + 64 * MIB)  # cut at both ends
    assert "1 whole memory blocks in its 256MiB region" in detail(
        guest.examine(), "memory block size"
    )


def test_the_tracker_is_read_before_the_device(guest: Guest) -> None:
    tracked(guest, BDF, 64 * MIB)
    guest.set_device_config(block=0)  # would not validate: the tracker decides
    report = guest.examine()
    assert status(report, "memory block size") is Status.MISSING
    assert "0000:00:03.0: device block 2MiB, Sub Block Mode, 0 whole memory blocks" in detail(
        report, "memory block size"
    )


def test_a_config_that_cannot_be_read_says_why(guest: Guest) -> None:
    bar = guest.pci.devdir(BDF) / "resource4"
    bar.write_bytes(b"\xff" * len(bar.read_bytes()))  # a function in D3: all ones
    report = guest.examine()
    assert status(report, "memory block size") is Status.OK
    assert "0000:00:03.0: device block size unknown: its config does not read as virtio-mem" in (
        detail(report, "memory block size")
    )
    bar.unlink()
    assert "cannot read its config through sysfs: No such file or directory" in detail(
        guest.examine(), "memory block size"
    )


def test_vfio_pci_registered_module_or_missing(guest: Guest) -> None:
    (guest.lib_modules / RELEASE / "modules.dep").write_text("kernel/fs/fuse/fuse.ko:\n")
    report = guest.examine()
    assert status(report, "vfio-pci") is Status.MISSING
    assert not report.ready
    guest.pci.add_driver("vfio-pci")
    assert status(guest.examine(), "vfio-pci") is Status.OK


def test_vfio_pci_from_the_kernel_config(guest: Guest) -> None:
    (guest.lib_modules / RELEASE / "modules.dep").unlink()
    (guest.proc / "config.gz").write_bytes(gzip.compress(b"CONFIG_VFIO_PCI=y\n"))
    report = guest.examine()
    assert status(report, "vfio-pci") is Status.OK
    assert detail(report, "vfio-pci") == "CONFIG_VFIO_PCI=y"


def test_noiommu_device_needs_the_noiommu_option(guest: Guest) -> None:
    report = guest.examine(noiommu=False)
    assert status(report, "iommu") is Status.MISSING
    assert detail(report, "iommu") == requirements.noiommu_not_allowed(BDF)
    assert not report.ready


def test_no_iommu_and_no_noiommu_mode(guest: Guest) -> None:
    (guest.sys / NOIOMMU_PARAM).unlink()  # vfio loaded without CONFIG_VFIO_NOIOMMU
    report = guest.examine()
    assert detail(report, "iommu") == requirements.no_iommu_mode(BDF)
    assert not report.ready


def test_without_devices_the_host_decides(guest: Guest) -> None:
    (guest.sys / "bus/pci/devices" / BDF).unlink()
    assert status(guest.examine(noiommu=False), "iommu") is Status.MISSING
    report = guest.examine()
    assert status(report, "iommu") is Status.OK
    assert report.devices == ()
    assert "virtio-mem devices: none found" in doctor.report_text(report)


def test_type1_needs_interrupt_remapping(guest: Guest) -> None:
    guest.add_viommu(remapping=False)
    report = guest.examine(noiommu=False)
    assert status(report, "iommu") is Status.OK
    assert status(report, "interrupt remapping") is Status.MISSING
    assert status(report, "secretmem") is Status.NOT_NEEDED
    assert not report.ready
    guest.write(guest.sys / "module/vfio_iommu_type1/parameters/allow_unsafe_interrupts", "Y\n")
    assert guest.examine(noiommu=False).ready


def test_type1_with_interrupt_remapping_is_ready(guest: Guest) -> None:
    guest.add_viommu(remapping=True)
    report = guest.examine(noiommu=False)
    assert status(report, "interrupt remapping") is Status.OK
    assert report.ready


@pytest.mark.parametrize(("value", "expected"), [("N", Status.MISSING), (None, Status.MISSING)])
def test_secretmem_off_is_optional(guest: Guest, value: str | None, expected: Status) -> None:
    param = guest.sys / "module/secretmem/parameters/enable"
    if value is None:
        param.unlink()
    else:
        param.write_text(value)
    report = guest.examine()
    assert status(report, "secretmem") is expected
    assert report.ready
    text = doctor.report_text(report)
    assert "optional; costs: the DMA page is locked anonymous memory" in text
    assert "ready; optional items missing: secretmem" in text


def test_in_kernel_driver_on_the_device(guest: Guest) -> None:
    guest.bind_in_kernel_driver()
    report = guest.examine()
    assert detail(report, "in-kernel driver") == requirements.driven_by(BDF, "virtio_mem")
    assert report.devices[0]["virtio_driver"] == "virtio_mem"
    assert not report.ready


def test_in_kernel_driver_registered_without_devices(guest: Guest) -> None:
    (guest.sys / "bus/virtio/drivers/virtio_mem").mkdir(parents=True)
    report = guest.examine()
    assert status(report, "in-kernel driver") is Status.MISSING
    assert "virtio_mem is registered" in detail(report, "in-kernel driver")


def test_page_level_pieces_are_optional(guest: Guest) -> None:
    (guest.memory / "soft_offline_page").unlink()
    (guest.proc / "kpageflags").unlink()
    guest.write(guest.sys / "kernel/security/lockdown", "none [integrity] confidentiality\n")
    report = guest.examine()
    for name in ("soft offline", "page flags", "lockdown"):
        assert status(report, name) is Status.MISSING, name
    assert "CONFIG_MEMORY_FAILURE" in detail(report, "soft offline")
    assert "CONFIG_PROC_PAGE_MONITOR" in detail(report, "page flags")
    assert "locked down (integrity)" in detail(report, "lockdown")
    assert report.ready
    text = doctor.report_text(report)
    assert text.count("no subblock unplug: shrinking goes in whole memory blocks") == 3


def test_debugfs_not_mounted_then_module_not_loaded(guest: Guest) -> None:
    debug = guest.sys / "kernel/debug"
    (debug / "hwpoison/unpoison-pfn").unlink()
    (debug / "hwpoison").rmdir()
    report = guest.examine()
    assert status(report, "debugfs") is Status.MISSING
    assert status(report, "hwpoison_inject") is Status.UNKNOWN
    (debug / "tracing").mkdir()  # mounted, no hwpoison directory
    report = guest.examine()
    assert status(report, "debugfs") is Status.OK
    assert status(report, "hwpoison_inject") is Status.MISSING
    assert report.ready


@pytest.mark.parametrize(
    ("value", "policy", "held"),
    [
        ("offline", planner.OnlinePolicy.AUTO, "online_movable"),
        ("online_movable", planner.OnlinePolicy.MOVABLE, "online_movable"),
        ("online_movable", planner.OnlinePolicy.KERNEL, "online_kernel"),
        ("online", planner.OnlinePolicy.MOVABLE, "online_movable"),
        ("online_kernel", planner.OnlinePolicy.KERNEL, "online_kernel"),
    ],
)
def test_auto_online_is_reported_with_what_the_agent_holds_it_at(
    guest: Guest, value: str, policy: planner.OnlinePolicy, held: str
) -> None:
    """The agent sets auto_online_blocks itself while it serves (online_path): any value
    is fine, and the report says which the policy holds it at."""
    (guest.memory / "auto_online_blocks").write_text(value)
    guest.write(guest.proc / "cmdline", f"memhp_default_state={value} quiet\n")
    report = guest.examine(online_policy=policy)
    assert status(report, "auto-online") is Status.OK
    said = detail(report, "auto-online")
    assert f"auto_online_blocks is {value} (memhp_default_state={value} at boot)" in said
    assert f"holds it at {held} while it serves" in said
    assert "killed agent" not in said
    assert report.ready


def test_auto_online_names_a_killed_agents_record(guest: Guest) -> None:
    record = kernel_setting.record_path(guest.state_dir, online_path.AUTO_ONLINE_BLOCKS)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("{}")
    report = guest.examine()
    assert "killed agent's record" in detail(report, "auto-online")


def test_auto_online_record_of_a_running_agent_is_its_own(guest: Guest) -> None:
    """A record with an agent answering on the control socket is that agent's, live."""
    record = kernel_setting.record_path(guest.state_dir, online_path.AUTO_ONLINE_BLOCKS)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("{}")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(control.socket_path(guest.state_dir)))
    server.listen(1)

    def answer_one_ping() -> None:
        conn, _ = server.accept()
        with conn:
            conn.makefile("rb").readline()
            conn.sendall(b'{"ok": true, "result": {"pid": 1}}\n')

    agent = threading.Thread(target=answer_one_ping, daemon=True)
    agent.start()
    with server:
        report = guest.examine()
    agent.join(timeout=10)
    assert "killed agent" not in detail(report, "auto-online")


def test_auto_online_unreadable_is_missing(guest: Guest) -> None:
    (guest.memory / "auto_online_blocks").unlink()
    report = guest.examine()
    assert status(report, "auto-online") is Status.MISSING
    assert report.ready


def test_no_systemd_no_inhibitor_program_no_udev(guest: Guest) -> None:
    guest.systemd.rmdir()
    guest.udev = False
    report = guest.examine()
    assert status(report, "sleep inhibitor") is Status.MISSING
    assert status(report, "uevents") is Status.MISSING
    assert report.ready
    guest.systemd.mkdir()
    guest.programs.clear()
    assert detail(guest.examine(), "sleep inhibitor") == "systemd-inhibit is not installed"


def test_json_has_every_field(guest: Guest) -> None:
    (guest.memory / "probe").unlink()
    data = guest.examine().as_dict()
    assert data["ready"] is False and data["kernel"] == RELEASE
    assert data["options"] == {"noiommu": True, "online_policy": "movable"}
    checks = {c["name"]: c for c in data["checks"]}  # type: ignore[attr-defined]
    assert checks["memory probe"] == {
        "name": "memory probe",
        "level": "required",
        "status": "missing",
        "detail": requirements.no_probe(str(guest.memory / "probe")),
        "need": requirements.PROBE.need,
        "cost": requirements.PROBE.cost,
        "fix": requirements.PROBE.fix,
    }
    json.dumps(data)


@pytest.mark.parametrize(("take_probe", "code"), [(False, 0), (True, 1)])
def test_cli_exit_status_and_json(
    guest: Guest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    take_probe: bool,
    code: int,
) -> None:
    if take_probe:
        (guest.memory / "probe").unlink()
    host = guest.host()
    fake_host = functools.partial(dataclasses.replace, host)
    monkeypatch.setattr(doctor, "Host", fake_host)
    status_, out, err = run_main(["doctor", "--noiommu", "--json"], capsys)
    assert (status_, err) == (code, "")
    assert json.loads(out)["ready"] is (code == 0)
    status_, out, _ = run_main(["doctor", "--noiommu"], capsys)
    assert status_ == code
    assert out.splitlines()[0] == (
        f"vmem-guest doctor: Linux {RELEASE}; as for run --noiommu --online-policy movable"
    )


# --- run refuses in the doctor's words ---------------------------------------------------


def test_run_refuses_without_probe_in_the_doctors_words(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    (guest.memory / "probe").unlink()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(service, "SysfsMemory", functools.partial(SysfsMemory, guest.memory))
    with pytest.raises(RequirementMissing) as info:
        service._kernel()
    seen = detail(guest.examine(), "memory probe")
    assert info.value.message == requirements.PROBE.refusal(seen)
    assert info.value.fields == {"requirement": "memory probe"}


def test_run_refuses_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(RequirementMissing) as info:
        service._kernel()
    assert info.value.message == requirements.ROOT.refusal(requirements.not_root(1000))


def test_run_refuses_a_device_the_in_kernel_driver_holds(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest.bind_in_kernel_driver()
    bound: list[str] = []
    monkeypatch.setattr(binding, "bind", lambda bdf, **kw: bound.append(bdf))
    dev = get_device(BDF, guest.sys, use_udev=False)
    with pytest.raises(RequirementMissing) as info:
        service.bind_device(dev, allow_noiommu=True)
    seen = detail(guest.examine(), "in-kernel driver")
    assert info.value.message == requirements.KERNEL_DRIVER.refusal(seen)
    assert bound == []  # nothing was unbound from the in-kernel driver


def test_kexec_is_fine_before_the_agent_adds_memory(guest: Guest) -> None:
    report = guest.examine()
    assert status(report, "kexec and kdump") is Status.OK
    assert detail(report, "kexec and kdump").startswith("no memmap entry")


def test_kexec_after_a_growth_is_reported_with_the_reason(guest: Guest) -> None:
    """What probe leaves behind for good: a memmap entry and a plain System RAM
    resource per block, in the device region at 1 << 32, whatever was unplugged."""
    start = 1 << 32
    write_memmap(guest.sys, [(start, start + 128 * MIB - 1, "System RAM")])
    write_iomem(guest.proc, [(start, start + 128 * MIB - 1, "System RAM")])
    (guest.sys / "kernel").mkdir(exist_ok=True)
    (guest.sys / "kernel/kexec_crash_loaded").write_text("1\n")
    report = guest.examine()
    assert status(report, "kexec and kdump") is Status.MISSING
    found = detail(report, "kexec and kdump")
    assert "1 /sys/firmware/memmap RAM entries (128MiB)" in found
    assert "a crash kernel loaded" in found
    assert report.ready  # optional: run still starts
    text = doctor.report_text(report)
    assert "fix: reboot instead of kexec" in text
    assert "optional items missing: kexec and kdump" in text


def test_kexec_reads_the_region_from_the_tracker_file(guest: Guest) -> None:
    """The agent holds the device (its config cannot be read through sysfs then): the
    region comes from the tracker, here at 8 GiB where nothing was added."""
    (guest.pci.devdir(BDF) / "resource4").unlink()
    write_memmap(guest.sys, [(1 << 32, (1 << 32) + 128 * MIB - 1, "System RAM")])
    assert status(guest.examine(), "kexec and kdump") is Status.UNKNOWN
    tracked(guest, BDF, 4096 * MIB, addr=8 << 30)
    assert status(guest.examine(), "kexec and kdump") is Status.OK


def test_kexec_without_a_device_is_not_needed(guest: Guest) -> None:
    (guest.sys / "bus/pci/devices" / BDF).unlink()
    assert status(guest.examine(), "kexec and kdump") is Status.NOT_NEEDED
