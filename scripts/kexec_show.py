#!/usr/bin/env python3
"""What a kexec'd or crash kernel would be handed after the agent grows and shrinks.

Boots the agent's guest (in-kernel driver blacklisted, no-IOMMU VFIO, one 4 GiB
device with 2 MiB blocks, ``crashkernel=128M``), then prints /sys/firmware/memmap
and the "System RAM" lines of /proc/iomem at boot, after the agent grew the device
to 1 GiB and after it shrank it to 0; then what kexec-tools 2.0.25 (Debian 12's,
fetched into the cache by scripts/vmharness/kexec_tools.py) reads when it loads the
guest's kernel as a kexec image (``kexec -d -l``: "MEMORY RANGES") and as a crash
kernel (``kexec -d -p``: "CRASH MEMORY RANGES", what goes into elfcorehdr), what
``vmem-guest doctor`` says, and the agent's warning when it starts with them loaded.

    .venv/bin/python scripts/kexec_show.py [--pair system/6.1] [--pair 10.0/6.12]

Without ``--pair``: the default pair (the system QEMU, 7.2 on Debian 12, with Linux
6.1) and QEMU 10.0 with Linux 6.12. See docs/kexec.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from vmharness import (  # noqa: E402
    NEWER_PAIR,
    GiB,
    MemDevice,
    Pair,
    TestVM,
    VMConfig,
    kexec_tools,
    userspace_driver_config,
)
from vmharness.guest_agent import (  # noqa: E402
    AGENT_LOG,
    cli_result,
    start_agent,
    stop_agent,
)

DEVICE = "vm0"
GROWN = 1 * GiB
MEMORY_BLOCK = 128 << 20
#: Room for the crash kernel (``kexec -p`` needs a reservation).
CRASHKERNEL = "crashkernel=128M"
#: One process prints every memmap attribute as ``path:value`` (a loop of cats forks
#: dozens of processes off the 9p root: tens of seconds under TCG).
MEMMAP = (
    "grep -H . /sys/firmware/memmap/*/start /sys/firmware/memmap/*/end /sys/firmware/memmap/*/type"
)


def config() -> VMConfig:
    return userspace_driver_config(
        "kexec-show", MemDevice(DEVICE, size=4 * GiB), extra_cmdline=(CRASHKERNEL,)
    )


@dataclasses.dataclass
class Snapshot:
    """The guest's memmap entries and iomem System RAM lines at one moment."""

    memmap: list[str]
    iomem: list[str]

    def in_region(self, start: int, end: int) -> tuple[list[str], list[str]]:
        """The lines whose range overlaps [start, end]."""
        return _overlapping(self.memmap, start, end), _overlapping(self.iomem, start, end)


def _overlapping(lines: list[str], start: int, end: int) -> list[str]:
    found = []
    for line in lines:
        low, high = _range_of(line)
        if low <= end and start <= high:
            found.append(line)
    return found


def _range_of(line: str) -> tuple[int, int]:
    """(start, end) of a memmap line (``0x.. 0x.. type``) or an iomem line (``a-b : n``)."""
    words = line.split()
    if words[0].startswith("0x"):
        return int(words[0], 16), int(words[1], 16)
    low, high = words[0].split("-")
    return int(low, 16), int(high, 16)


def memmap_lines(grep_output: str) -> list[str]:
    """``start end type`` per memmap entry, in entry order, from :data:`MEMMAP`'s output.
    An entry the kernel is still creating (its directory before all three files; seen
    in make test) is left out: the callers wait and read again."""
    entries: dict[int, dict[str, str]] = {}
    for line in grep_output.splitlines():
        path, _, value = line.partition(":")
        *_, index, name = path.split("/")
        entries.setdefault(int(index), {})[name] = value
    whole = (e for _, e in sorted(entries.items()) if {"start", "end", "type"} <= e.keys())
    return [f"{e['start']} {e['end']} {e['type']}" for e in whole]


def snapshot(vm: TestVM) -> Snapshot:
    memmap = memmap_lines(vm.sh(MEMMAP))
    iomem = [line.strip() for line in vm.read("/proc/iomem").splitlines() if "System RAM" in line]
    return Snapshot(memmap, iomem)


@dataclasses.dataclass
class Shown:
    """Everything one run saw."""

    region: tuple[int, int]
    phases: dict[str, Snapshot]
    kexec_ranges: list[tuple[int, int]]
    crash_ranges: list[tuple[int, int]]
    doctor: dict[str, str]
    warning: str
    states: str

    def device_ranges(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        start, end = self.region
        return [(low, high) for low, high in ranges if low <= end and start <= high]


def show(vm: TestVM, root: Path) -> Shown:
    """Grow to GROWN, shrink to 0, snapshot each phase, load both images, ask doctor,
    restart the agent to see its warning; unload and stop the agent at the end."""
    addr = int(vm.query()[DEVICE]["memaddr"])
    region = (addr, addr + 4 * GiB - 1)
    phases = {"boot": snapshot(vm)}
    start_agent(vm)
    try:
        vm.resize(DEVICE, GROWN)
        vm.wait_until(lambda: vm.plugged(DEVICE) == GROWN, timeout=120, what="the growth")
        grown_blocks = GROWN // MEMORY_BLOCK
        vm.wait_until(
            lambda: len(snapshot(vm).in_region(*region)[0]) >= grown_blocks,
            timeout=60,
            what="the memmap entries of the growth",
        )
        phases["grown"] = snapshot(vm)
        vm.resize(DEVICE, 0)
        vm.wait_until(lambda: vm.plugged(DEVICE) == 0, timeout=120, what="the shrink")
        phases["shrunk"] = snapshot(vm)
        first = addr // MEMORY_BLOCK
        paths = " ".join(
            f"/sys/devices/system/memory/memory{i}/state"
            for i in range(first, first + grown_blocks)
        )
        states = "\n".join(
            f"{line.split('/')[-2]} {line.partition(':')[2]}"
            for line in vm.sh(f"grep -H . {paths}").splitlines()
        )
        kexec_out = kexec_tools.load(vm, root, crash=False)
        crash_out = kexec_tools.load(vm, root, crash=True)
        _, out, _ = cli_result(vm, "doctor --noiommu --json")
        check = next(c for c in json.loads(out)["checks"] if c["name"] == "kexec and kdump")
        stop_agent(vm)
        start_agent(vm)
        warning = next((line for line in vm.read(AGENT_LOG).splitlines() if "loaded:" in line), "")
    finally:
        kexec_tools.unload(vm, root)
        stop_agent(vm)
    return Shown(
        region=region,
        phases=phases,
        kexec_ranges=kexec_tools.debug_ranges(kexec_out, "MEMORY RANGES"),
        crash_ranges=kexec_tools.debug_ranges(crash_out, "CRASH MEMORY RANGES"),
        doctor=check,
        warning=warning,
        states=states,
    )


def report(vm: TestVM, shown: Shown) -> str:
    start, end = shown.region
    lines = [
        f"== QEMU {vm.qemu_version}, Linux {vm.sh('uname -r').strip()};"
        f" device region {start:#x}-{end:#x}"
    ]
    for phase, snap in shown.phases.items():
        memmap, iomem = snap.in_region(start, end)
        lines.append(
            f"-- {phase}: /sys/firmware/memmap {len(snap.memmap)} entries,"
            f" {len(memmap)} in the device region; /proc/iomem System RAM"
            f" {len(snap.iomem)} lines, {len(iomem)} in the device region"
        )
        lines += [f"   memmap {line}" for line in memmap[:3]]
        lines += [f"   iomem  {line}" for line in iomem[:3]]
    lines.append("-- block states after the shrink:")
    lines += [f"   {line}" for line in shown.states.splitlines()[:3]]
    for title, ranges in (
        ("kexec -d -l: MEMORY RANGES", shown.kexec_ranges),
        ("kexec -d -p: CRASH MEMORY RANGES", shown.crash_ranges),
    ):
        inside = shown.device_ranges(ranges)
        lines.append(f"-- {title}: {len(ranges)} ranges, {len(inside)} in the device region")
        lines += [f"   {low:#018x}-{high:#018x}" for low, high in inside[:3]]
    lines.append(f"-- doctor: {shown.doctor['status']}: {shown.doctor['detail']}")
    lines.append(f"-- agent log at start: {shown.warning}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", action="append", help="QEMU/Linux, e.g. 10.0/6.12")
    args = parser.parse_args()
    pairs = [Pair(*spec.split("/")) for spec in args.pair] if args.pair else [Pair(), NEWER_PAIR]
    root = kexec_tools.kexec_tools_root()
    for pair in pairs:
        with TestVM(config(), pair=pair) as vm:
            print(report(vm, show(vm, root)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
