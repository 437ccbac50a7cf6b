"""The agent as a user runs it: a Debian 12 guest booted with systemd, vmem_guest
installed the way docs/install.md and docs/systemd.md say.

The guest's root is the image of scripts/build-rootfs.sh (Debian's systemd, udev,
logind, python3-click and python3-pyudev; the project built from the checkout's
sources into /opt/vmem-guest with Debian's setuptools; the unit, /etc/default/vmem-guest
with --noiommu and the udev rule installed, the unit enabled) on a virtio-blk disk that
QEMU keeps unchanged (``snapshot=on``). Nothing starts the agent but systemd. The
harness's command runner runs from a unit of its own in the image.

The tests run in order on one guest, as a user's session would: the unit is up after
boot, ``vmem-guest doctor`` finds what it needs, ``systemctl status`` shows the
agent's STATUS= line, a host resize is followed,
a refusal reaches ``journalctl -p warning``, ``systemctl stop``/``start`` keep the
memory as it is, a device hot-plugged later is served by the running agent, logind
lists the agent's sleep inhibitor while memory is plugged, and a device hot-plugged
while the agent is stopped starts it (the udev rule). What systemctl, journalctl and
systemd-inhibit printed is kept in ``systemd.txt`` of the run's results directory
(docs/test-vm.md section 11).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from vmharness import GiB, HostUnavailable, MemDevice, MiB, TestVM, VMConfig
from vmharness import host as vmhost
from vmharness.config import userspace_driver_config
from vmharness.guest_agent import STATUS_PRINTED

BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]
#: Where docs/install.md puts the command (the unit runs it from there too).
VMEM_GUEST = "/opt/vmem-guest/bin/vmem-guest"
UNIT = "vmem-guest"
DEVICE = "vm0"
HOTPLUG_ID = "hp0"
#: Hot-plugged while the agent is stopped: the udev rule starts it.
LATE_ID = "hp1"
BLOCK = 2 * MiB
STEP = 256 * MiB
#: systemd's own boot under TCG on a busy 2-core host (the runner answers earlier).
SYSTEM_UP_TIMEOUT = 240.0


def systemd_guest_config(image: Path) -> VMConfig:
    """One 1 GiB device at boot, two PCIe root ports for two more later (native PCIe
    hotplug, as in tests/vm/test_hotplug_vm.py), the Debian image as the root."""
    cfg = userspace_driver_config("systemd", MemDevice(DEVICE, size=1 * GiB, block_size=BLOCK))
    return dataclasses.replace(
        cfg,
        root_image=image,
        # Room for the two devices added later, plus QEMU's 1 GiB of alignment slack.
        maxmem=cfg.memory + 1 * GiB + 2 * GiB + 1 * GiB,
        extra_qemu_args=(
            *("-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"),
            *("-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1"),
            *("-device", "pcie-root-port,id=rp2,bus=pcie.0,chassis=2"),
        ),
    )


@pytest.fixture(scope="module")
def image() -> Path:
    """The image, built when missing: a skip only where it cannot be built at all."""
    if os.geteuid() != 0:
        pytest.skip("the systemd guest image is built as root (mmdebstrap, chroot)")
    try:
        return vmhost.find_rootfs()
    except HostUnavailable as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def vm(boot_vm: BootVM, image: Path) -> Iterator[TestVM]:
    with boot_vm(systemd_guest_config(image)) as booted:
        yield booted


class Transcript:
    """Commands run in the guest and what they printed, appended to ``systemd.txt``
    in the run's results directory (what a user would see, to quote)."""

    def __init__(self, vm: TestVM) -> None:
        assert vm.paths is not None
        self.vm = vm
        self.path = vm.paths.run_dir / "systemd.txt"

    def run(self, cmd: str, timeout: float = 60.0) -> tuple[int, str]:
        rc, out = self.vm.guest(cmd, timeout=timeout)
        with self.path.open("a") as f:
            f.write(f"# {cmd}\n{out.rstrip()}\n[exit status {rc}]\n\n")
        print(f"# {cmd}\n{out.rstrip()}")
        return rc, out


@pytest.fixture(scope="module")
def transcript(vm: TestVM) -> Transcript:
    return Transcript(vm)


def show(vm: TestVM, prop: str) -> str:
    """``systemctl show -p PROP --value vmem-guest``."""
    return vm.sh(f"systemctl show -p {prop} --value {UNIT}").strip()


def status(vm: TestVM) -> dict[str, dict[str, Any]]:
    """The devices of ``vmem-guest status --json`` (docs/status-json.md) by PCI address,
    whatever their verdict (the exit status); an error raises."""
    rc, out = vm.guest(f"{VMEM_GUEST} status --json 2>/run/status.err")
    assert rc in STATUS_PRINTED, f"status --json: exit status {rc}: {vm.read('/run/status.err')}"
    return {dev["device"]: dev for dev in json.loads(out)["devices"]}


def device_bdf(vm: TestVM, device_id: str) -> str:
    """The guest PCI address of a QEMU device, matched by region address."""
    addr = int(vm.query()[device_id]["memaddr"])
    (bdf,) = [bdf for bdf, dev in status(vm).items() if dev["addr"] == addr]
    return bdf


def test_the_unit_starts_the_agent_at_boot(vm: TestVM, transcript: Transcript) -> None:
    _, state = transcript.run("systemctl is-system-running --wait", timeout=SYSTEM_UP_TIMEOUT)
    transcript.run("systemctl --failed --no-pager")
    transcript.run("systemd-analyze")
    assert state.strip() == "running", "a unit failed at boot (systemctl --failed above)"
    assert vm.sh(f"systemctl is-enabled {UNIT}").strip() == "enabled"
    assert vm.sh(f"systemctl is-active {UNIT}").strip() == "active"
    main_pid = show(vm, "MainPID")
    cmdline = vm.read(f"/proc/{main_pid}/cmdline").split("\0")
    assert cmdline[1:4] == [VMEM_GUEST, "run", "--noiommu"], cmdline
    assert show(vm, "NRestarts") == "0"
    (bdf,) = status(vm)
    assert vm.sh(f"basename $(readlink /sys/bus/pci/devices/{bdf}/driver)").strip() == "vfio-pci"


def test_doctor_finds_what_the_service_needs(vm: TestVM, transcript: Transcript) -> None:
    """``vmem-guest doctor`` as a user runs it in this guest, with the unit's options:
    every required item present, and here (systemd as PID 1) the sleep inhibitor too."""
    rc, text = transcript.run(f"{VMEM_GUEST} doctor --noiommu")
    assert rc == 0, "doctor says run would stop (above)"
    rc, out = vm.guest(f"{VMEM_GUEST} doctor --noiommu --json 2>/run/doctor.err")
    assert rc == 0, vm.read("/run/doctor.err")
    report = json.loads(out)
    assert report["ready"] is True
    checks = {check["name"]: check for check in report["checks"]}
    for check in checks.values():
        assert check["name"] in text
        if check["level"] == "required":
            assert check["status"] in ("ok", "not needed"), check
    assert checks["sleep inhibitor"]["status"] == "ok", checks["sleep inhibitor"]
    assert checks["memory probe"]["status"] == "ok"


def test_systemctl_status_shows_the_agents_status_line(vm: TestVM, transcript: Transcript) -> None:
    _, out = transcript.run(f"systemctl status {UNIT} --no-pager --lines=10")
    match = re.search(r'^\s*Status: "(.+)"$', out, re.M)
    assert match, "no Status: line in systemctl status"
    assert match.group(1) == show(vm, "StatusText")


def test_a_host_resize_is_followed(vm: TestVM, transcript: Transcript) -> None:
    before = vm.mem_total()
    vm.resize(DEVICE, STEP)
    vm.wait_until(lambda: vm.plugged(DEVICE) == STEP, timeout=120, what="QEMU's plugged size")
    vm.wait_until(lambda: vm.mem_total() == before + STEP, timeout=60, what="MemTotal")
    dev = status(vm)[device_bdf(vm, DEVICE)]
    assert (dev["requested_size"], dev["plugged_size"], dev["online_size"]) == (STEP,) * 3
    # The STATUS= line follows too (vmem_guest/sdstatus.py).
    line = f"requested/plugged: {device_bdf(vm, DEVICE)} 256MiB/256MiB"
    vm.wait_until(lambda: show(vm, "StatusText") == line, timeout=30, what="the STATUS= line")
    transcript.run(f"systemctl status {UNIT} --no-pager --lines=10")


def test_a_refusal_reaches_the_journal_as_a_warning(vm: TestVM, transcript: Transcript) -> None:
    # The agent follows the host: a manual plug through its socket is refused, and
    # the agent logs the refusal at warning.
    rc, out = transcript.run(f"{VMEM_GUEST} plug 128M")
    assert rc != 0
    assert "follows the host's requested size" in out
    _, journal = transcript.run(f"journalctl -p warning -u {UNIT} --no-pager")
    assert "control request 'plug' refused: the agent follows the host's requested size" in (
        journal
    )
    # Only warnings and worse: the info lines of the resize before are not there.
    assert "resize done" in vm.sh(f"journalctl -u {UNIT} --no-pager")
    assert "resize done" not in journal


def test_stop_keeps_the_memory_and_start_picks_it_up(vm: TestVM, transcript: Transcript) -> None:
    bdf = device_bdf(vm, DEVICE)
    total, old_pid = vm.mem_total(), show(vm, "MainPID")
    online_before = status(vm)[bdf]["online_blocks"]
    seen: set[int] = set()
    done = threading.Event()

    def watch_qemu() -> None:  # an unplug and plug again would show here
        while not done.is_set():
            seen.add(vm.plugged(DEVICE))
            done.wait(0.02)

    watcher = threading.Thread(target=watch_qemu)
    watcher.start()
    try:
        transcript.run(f"systemctl stop {UNIT}")
        assert vm.sh(f"systemctl is-active {UNIT} || true").strip() == "inactive"
        assert vm.mem_total() == total
        transcript.run(f"systemctl start {UNIT}", timeout=300)
        assert vm.sh(f"systemctl is-active {UNIT}").strip() == "active"
        new_pid = show(vm, "MainPID")
        dev = status(vm)[bdf]
    finally:
        done.set()
        watcher.join()
    transcript.run(f"journalctl -u {UNIT} --no-pager -n 15")
    assert new_pid != old_pid
    assert seen == {STEP}, f"QEMU's plugged size moved while the agent restarted: {seen}"
    assert vm.mem_total() == total
    assert (dev["plugged_size"], dev["owner_pid"]) == (STEP, int(new_pid))
    assert dev["online_blocks"] == online_before


def device_add(vm: TestVM, device_id: str, bus: str) -> None:
    """A 1 GiB virtio-mem-pci device, nothing requested, behind root port ``bus``."""
    backend = f"mem-{device_id}"
    vm.qmp("object-add", **{"qom-type": "memory-backend-ram", "id": backend, "size": GiB})
    vm.qmp(
        "device_add",
        driver="virtio-mem-pci",
        id=device_id,
        memdev=backend,
        bus=bus,
        **{"block-size": BLOCK, "requested-size": 0},
    )


def test_a_device_hot_plugged_later_is_served_without_a_restart(
    vm: TestVM, transcript: Transcript
) -> None:
    pid, restarts, total = show(vm, "MainPID"), show(vm, "NRestarts"), vm.mem_total()
    device_add(vm, HOTPLUG_ID, "rp1")
    vm.wait_until(lambda: len(status(vm)) == 2, timeout=120, what="the agent to take hp0")
    vm.resize(HOTPLUG_ID, STEP)
    vm.wait_until(lambda: vm.plugged(HOTPLUG_ID) == STEP, timeout=120, what="hp0's plug")
    vm.wait_until(lambda: vm.mem_total() == total + STEP, timeout=60, what="MemTotal")
    assert (show(vm, "MainPID"), show(vm, "NRestarts")) == (pid, restarts)
    transcript.run(f"systemctl status {UNIT} --no-pager --lines=10")


def inhibitor_listed(vm: TestVM) -> bool:
    """True when ``systemd-inhibit --list`` shows the agent's sleep lock in block mode."""
    out = vm.sh("systemd-inhibit --list --no-pager")
    return re.search(r"^vmem-guest\s.*\ssleep\s.*\sblock$", out, re.M) is not None


def test_logind_lists_the_agents_sleep_inhibitor_while_memory_is_plugged(
    vm: TestVM, transcript: Transcript
) -> None:
    # A device without PERSISTENT_SUSPEND (QEMU 7.2 offers none; 10.0 does) would lose
    # its plugged memory in a suspend: the agent holds a sleep lock for as long as one
    # holds any (vmem_guest/inhibit.py).
    at_risk = [
        bdf
        for bdf, dev in status(vm).items()
        if dev["plugged_size"] and "PERSISTENT_SUSPEND" not in dev["device_features"]
    ]
    transcript.run("systemd-inhibit --list --no-pager")
    assert inhibitor_listed(vm) == bool(at_risk), f"devices at risk: {at_risk}"
    for device_id in (DEVICE, HOTPLUG_ID):
        vm.resize(device_id, 0)
    for device_id in (DEVICE, HOTPLUG_ID):
        vm.wait_until(lambda d=device_id: vm.plugged(d) == 0, timeout=180, what="the unplug")
    vm.wait_until(lambda: not inhibitor_listed(vm), timeout=30, what="the lock to go")
    transcript.run("systemd-inhibit --list --no-pager")
    transcript.run(f"systemctl status {UNIT} --no-pager --lines=10")


def test_a_device_hot_plugged_while_the_agent_is_stopped_starts_it(
    vm: TestVM, transcript: Transcript
) -> None:
    # contrib/70-vmem-guest.rules: the new function's SYSTEMD_WANTS starts the unit.
    transcript.run(f"systemctl stop {UNIT}")
    assert vm.sh(f"systemctl is-active {UNIT} || true").strip() == "inactive"
    device_add(vm, LATE_ID, "rp2")
    vm.wait_until(
        lambda: vm.guest(f"systemctl is-active {UNIT}")[1].strip() == "active",
        timeout=180,
        what="udev to start the unit",
    )
    vm.wait_until(lambda: len(status(vm)) == 3, timeout=60, what="the agent to take hp1")
    transcript.run(f"journalctl -u {UNIT} --no-pager -n 6")
    vm.resize(LATE_ID, STEP)
    vm.wait_until(lambda: vm.plugged(LATE_ID) == STEP, timeout=120, what="hp1's plug")
    transcript.run(f"systemctl status {UNIT} --no-pager --lines=5")
