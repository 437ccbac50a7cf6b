"""Hibernation of the systemd guest with device memory plugged and in use, and the resume.

The guest is the Debian 12 image of scripts/build-rootfs.sh (systemd, logind, the agent
run by vmem-guest.service, vmem-guest-hibernate@.service enabled), booted from a copy
of the image written in place (``persistent_root``) with a second disk for swap and
``resume=/dev/vdb``. One 1 GiB device requests 512 MiB on QEMU's command line; a
process fills 384 MiB with a pattern, most of it in device memory (movable user pages
go to ZONE_MOVABLE first). Then, as a user would: ``systemctl hibernate``. The unit
asks the agent to give every device's memory back (offline, UNPLUG_ALL) before
systemd-sleep writes the image; the guest powers off and QEMU exits. QEMU is started
again with the same command line and disks, as a host restarting the VM would: the
kernel resumes from the image (same boot id), the agent sees the resume, grows the
device back to the 512 MiB QEMU requests, and the process's pages all hold their
pattern. STATE is PLUGGED under every online block before and after; QEMU's plugged
size, polled until QEMU exits, was 0 when the guest powered off.

Where a device has no PERSISTENT_SUSPEND (QEMU 7.2) the agent holds logind's ``sleep``
lock while memory is plugged, and logind cannot tell hibernation from suspend (one
``sleep`` lock for both): a plain ``systemctl hibernate`` is refused, with the memory
left as it was, and root hibernates with ``systemctl -i hibernate`` (ignoring the
lock, not the unit). docs/lifecycle.md "Hibernation".
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from vmharness import NEWER_PAIR, GiB, HostUnavailable, MemDevice, MiB, Pair, TestVM, VMConfig
from vmharness import host as vmhost
from vmharness.config import userspace_driver_config
from vmharness.guest_agent import STATUS_PRINTED

BootVM = Callable[[VMConfig, Pair], AbstractContextManager[TestVM]]
VMEM_GUEST = "/opt/vmem-guest/bin/vmem-guest"
DEVICE = "vm0"
BLOCK = 2 * MiB
MEMORY_BLOCK = 128 * MiB
PLUGGED = 512 * MiB
#: The process's pattern: most of it lands in device memory.
HELD_MIB = 384
SWAP = 2 * GiB
SYSTEM_UP_TIMEOUT = 240.0
#: From ``systemctl hibernate`` to QEMU's exit: the give-back, then the image written
#: under TCG.
POWER_OFF_TIMEOUT = 240.0
PAGE_HOLDER = Path(__file__).resolve().parents[2] / "scripts" / "vmharness" / "page_holder.py"
HOLD = "/run/hold"


def hibernate_config(image: Path) -> VMConfig:
    """No memfd_secret: Linux offers no hibernation while any exists (``secretmem_active()``
    in ``hibernation_available()``), so the agent's DMA page is a locked anonymous one
    (6.12 enables secretmem by default: turned off)."""
    device = MemDevice(DEVICE, size=1 * GiB, block_size=BLOCK, requested_size=PLUGGED)
    words = ("resume=/dev/vdb", "secretmem.enable=0")
    cfg = userspace_driver_config("hibernate", device, extra_cmdline=words)
    return dataclasses.replace(
        cfg, root_image=image, persistent_root=True, swap_disk=SWAP, secretmem=False
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


#: The whole module is a long run (a systemd boot, a hibernation and a second boot per
#: pair: 2 min each under single-threaded TCG, 6-7 min multi-threaded): `make
#: hibernate`, not `make test`.
pytestmark = pytest.mark.long
PAIRS = [Pair(), NEWER_PAIR]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: p.label())
def vm(request: pytest.FixtureRequest, boot_vm: BootVM, image: Path) -> Iterator[TestVM]:
    with boot_vm(hibernate_config(image), request.param) as booted:
        yield booted


def status(vm: TestVM) -> dict[str, Any]:
    """The one device of ``vmem-guest status --json``."""
    rc, out = vm.guest(f"{VMEM_GUEST} status --json 2>/run/status.err")
    assert rc in STATUS_PRINTED, f"status --json: exit status {rc}: {vm.read('/run/status.err')}"
    (dev,) = json.loads(out)["devices"]
    return dict(dev)


def state_mismatches(vm: TestVM, dev: dict[str, Any]) -> list[str]:
    """STATE over every online memory block of the device (one request per block):
    anything but PLUGGED is memory the guest uses over an unplugged device block."""
    wrong = []
    for block in dev["online_blocks"]:
        addr = int(block["index"]) * MEMORY_BLOCK
        args = f"--device {dev['device']} --addr {addr:#x} --blocks {MEMORY_BLOCK // BLOCK}"
        answer = vm.sh(f"{VMEM_GUEST} state {args}").strip()
        if answer != "PLUGGED":
            wrong.append(f"memory{block['index']}: {answer}")
    return wrong


def start_page_holder(vm: TestVM) -> int:
    """scripts/vmharness/page_holder.py in the guest (the image has no copy of it),
    holding HELD_MIB; its pid once its pattern is written."""
    script = base64.b64encode(PAGE_HOLDER.read_bytes()).decode()
    vm.sh(f"echo {script} | base64 -d > /run/page_holder.py")
    vm.sh(
        f"setsid python3 /run/page_holder.py {HELD_MIB} {HOLD} >/run/holder.log 2>&1 &"
        " echo $! > /run/holder.pid"
    )
    vm.wait_until(
        lambda: vm.guest(f"test -e {HOLD}.ready")[0] == 0, timeout=180, what="the pattern"
    )
    return int(vm.read("/run/holder.pid"))


def pages_in(pfns: list[int], dev: dict[str, Any]) -> int:
    first, end = dev["addr"] // 4096, (dev["addr"] + dev["region_size"]) // 4096
    return sum(1 for pfn in pfns if first <= pfn < end)


class PluggedWatch:
    """QEMU's plugged size of the device, polled until QEMU exits: the last value
    seen is what the device held when the guest powered off."""

    def __init__(self, vm: TestVM) -> None:
        self.vm = vm
        self.seen: list[int] = []
        self.thread = threading.Thread(target=self._poll)
        self.thread.start()

    def _poll(self) -> None:
        while self.vm.alive:
            try:
                self.seen.append(self.vm.plugged(DEVICE))
            except Exception:  # QEMU went away mid-command: the guest powered off
                return
            time.sleep(0.2)

    def join(self) -> None:
        self.thread.join(30)


def wait_power_off(vm: TestVM, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while vm.alive:
        assert time.monotonic() < deadline, f"the guest did not power off in {timeout:.0f} s"
        time.sleep(0.2)


def test_hibernation_gives_memory_back_and_the_resume_grows_it_again(vm: TestVM) -> None:
    rc, state = vm.guest("systemctl is-system-running --wait", timeout=SYSTEM_UP_TIMEOUT)
    assert state.strip() == "running", vm.sh("systemctl --failed --no-pager")
    vm.sh("mkswap /dev/vdb >/dev/null && swapon /dev/vdb")
    vm.wait_until(lambda: vm.plugged(DEVICE) == PLUGGED, timeout=180, what="the plug")
    dev = status(vm)
    vm.wait_until(lambda: status(vm)["online_size"] == PLUGGED, timeout=60, what="onlining")
    assert state_mismatches(vm, dev) == []
    holder = start_page_holder(vm)
    in_device = pages_in(json.loads(vm.read(f"{HOLD}.pfns")), dev)
    assert in_device > 0, "the process holds no page of device memory: nothing is tested"
    mem_total, boot_id = vm.mem_total(), vm.boot_id
    start = time.monotonic()

    flag = ""
    if "PERSISTENT_SUSPEND" not in dev["device_features"]:
        # The agent's sleep lock (a suspend would lose the memory) stops hibernation
        # through logind too: refused, nothing changed. (Root without a terminal is
        # not held by a block lock in systemd 252 unless it asks to be.)
        rc, out = vm.guest("systemctl --check-inhibitors=yes hibernate")
        assert rc != 0 and "inhibited" in out, out
        assert vm.plugged(DEVICE) == PLUGGED
        flag = "-i "
    watch = PluggedWatch(vm)
    vm.sh(f"setsid sh -c 'sleep 1; systemctl {flag}hibernate' >/dev/null 2>&1 &")
    wait_power_off(vm, POWER_OFF_TIMEOUT)
    watch.join()
    powered_off = time.monotonic() - start
    assert watch.seen and watch.seen[-1] == 0, (
        f"QEMU's plugged size when the guest went: {watch.seen[-5:]}"
    )

    vm.restart()
    resumed = time.monotonic() - start
    assert vm.boot_id == boot_id, "the guest booted afresh instead of resuming from the image"
    assert "disk" in vm.read("/sys/power/state").split()  # no memfd_secret in the way
    vm.wait_until(lambda: vm.plugged(DEVICE) == PLUGGED, timeout=180, what="the plug after resume")
    vm.wait_until(lambda: vm.mem_total() == mem_total, timeout=60, what="MemTotal")
    after = status(vm)
    assert (after["plugged_size"], after["online_size"], after["broken"]) == (
        PLUGGED,
        PLUGGED,
        False,
    )
    assert state_mismatches(vm, after) == []
    vm.sh(f"kill -USR1 {holder}")
    vm.wait_until(lambda: vm.guest(f"test -e {HOLD}.check")[0] == 0, timeout=120, what="the check")
    check = json.loads(vm.read(f"{HOLD}.check"))
    assert (check["pages"], check["bad"]) == (HELD_MIB * 256, 0)

    unit = vm.sh("journalctl -u 'vmem-guest-hibernate@*' --no-pager -o cat")
    assert f"memory given back for hibernation: {dev['device']} 512MiB" in unit, unit
    agent = vm.sh("journalctl -u vmem-guest --no-pager -o cat")
    assert "memory given back for hibernation" in agent
    assert "hibernation hold ended (the guest resumed)" in agent
    for line in (unit + agent).splitlines():
        if "hibernat" in line or "resumed" in line or "re-initialised" in line:
            print(line)
    print(
        f"{vm.pair.label()}: {in_device} of {HELD_MIB * 256} pages in device memory;"
        f" powered off after {powered_off:.0f} s, resumed after {resumed:.0f} s;"
        f" QEMU plugged sizes seen: {sorted(set(watch.seen))}"
    )


@pytest.fixture(scope="module")
def secret_vm(boot_vm: BootVM, image: Path) -> Iterator[TestVM]:
    """The harness's usual no-IOMMU guest: the agent's ring in memfd_secret memory
    (``secretmem.enable=1``), so the kernel offers no hibernation while it runs."""
    cfg = dataclasses.replace(
        hibernate_config(image), secretmem=True, extra_cmdline=("resume=/dev/vdb",)
    )
    with boot_vm(cfg, Pair()) as booted:
        yield booted


def test_by_hand_the_ring_leaves_memfd_secret_and_the_kernel_hibernates(
    secret_vm: TestVM,
) -> None:
    """Without logind's path (which checks ``can_sleep`` before the unit could run):
    ``vmem-guest hibernate-prepare`` gives the memory back and moves the ring out of
    memfd_secret memory; ``disk`` appears in /sys/power/state and a hibernation by
    hand resumes with the device grown back."""
    vm = secret_vm
    vm.guest("systemctl is-system-running --wait", timeout=SYSTEM_UP_TIMEOUT)
    vm.sh("mkswap /dev/vdb >/dev/null && swapon /dev/vdb")
    vm.wait_until(lambda: vm.plugged(DEVICE) == PLUGGED, timeout=180, what="the plug")
    assert "disk" not in vm.read("/sys/power/state").split()  # secretmem_active()
    rc, out = vm.guest(f"{VMEM_GUEST} hibernate-prepare --json 2>/run/prepare.err")
    assert rc == 0, vm.read("/run/prepare.err")
    answer = json.loads(out)
    (bdf,) = answer["given_back"]
    assert answer["given_back"] == {bdf: PLUGGED} and answer["left_secret_memory"] == [bdf]
    assert vm.plugged(DEVICE) == 0
    assert "disk" in vm.read("/sys/power/state").split()
    boot_id = vm.boot_id
    vm.sh("setsid sh -c 'sleep 1; echo disk > /sys/power/state' >/dev/null 2>&1 &")
    wait_power_off(vm, POWER_OFF_TIMEOUT)
    vm.restart()
    assert vm.boot_id == boot_id, "the guest booted afresh instead of resuming from the image"
    vm.wait_until(lambda: vm.plugged(DEVICE) == PLUGGED, timeout=180, what="the plug after resume")
    assert state_mismatches(vm, status(vm)) == []
    agent = vm.sh("journalctl -u vmem-guest --no-pager -o cat")
    assert "ring moved out of memfd_secret memory" in agent
    assert "hibernation hold ended (the guest resumed)" in agent
