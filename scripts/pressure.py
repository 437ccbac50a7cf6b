#!/usr/bin/env python3
"""``make pressure``: shrink requests while a guest workload holds most plugged memory.

Issue 5, item 6. For each driver, one VM (TCG unless KVM was proven to work):
2 vCPUs, ``--boot-memory`` (1 GiB), one virtio-mem device ``vm0`` (``--region``
4 GiB, 2 MiB blocks):

* ``kernel``: the in-kernel ``virtio_mem`` driver, ``memhp_default_state=online_movable``;
* ``vmem_guest``: the agent, ``vmem-guest run --noiommu --offline-timeout T``, the
  in-kernel driver blacklisted. It shrinks at subblock granularity: whole memory blocks
  while one is in excess, then single 2 MiB subblocks of online blocks (soft offline of
  every page, then UNPLUG), so a block it cannot offline still gives what is movable;
* ``vmem_guest_whole``: the same agent with ``--no-subblock-unplug`` (whole memory
  blocks only, as before subblocks), so the figure before and after is in one run.

Two workloads (``--workload``, ``make pressure`` runs both): ``pinned`` as described
below, and ``movable``: the same memory, nothing pinned (``--pin-stride 0``: every page
in use is movable), shrunk to 1000 MiB, not a whole number of 128 MiB memory blocks.
Besides the bytes, the run times how soon each driver unplugged what the in-kernel driver
did, and how soon each reached its target once the workload ended
(``vmharness/pressure_timing.py``).

Each VM grows the device to ``--grow`` (2 GiB) and starts the same workload in the
guest (``WORKLOAD``, one process), in this order: ``--mlocked`` (512 MiB) of anonymous
memory locked with mlock(2), one page every ``--pin-stride`` (1 MiB) of it also held by
a pipe (vmsplice); ``--anon`` (512 MiB) of anonymous memory, every page written; and
``--cache`` (768 MiB) of page cache: a sparse file on an ext4 image (made on the host
with mke2fs on the run's writable share, loop-mounted in the guest; the share is 9p
without a guest cache, so the pages are cached once, by ext4), read twice so that it
shows in Cached and Active(file). The workload reports, from /proc/self/pagemap, which
memory blocks hold its pages. Then the host asks for ``--shrink-to`` (0), waits
``--settle`` seconds (the same for every run; QEMU's size is sampled over QMP,
nothing runs in the guest meanwhile) and measures: unplugged bytes (QEMU's ``size``
before minus after), MemTotal before and after, whether the workload is alive and the
OOM killer stayed away (``oom_kill`` in /proc/vmstat), that every memory block
holding a pinned page is still online, and for vmem_guest ``vmem-guest status --json``
(plugged, online, remainder, retries, holes), which must agree with QEMU's size, sysfs,
MemTotal and HardwareCorrupted. Then the workload ends and the agent must converge to the request.

Holes (subblocks the agent took out of an online block and unplugged) stay in MemTotal:
soft-offlined pages are not removed from the zone, they count in HardwareCorrupted. So
for the agent: MemTotal = boot + online blocks (holes included), HardwareCorrupted grows
by the holes (plus any take in flight), every hole's pages are HWPOISON in
/proc/kpageflags, no hole holds a pinned page, and memory in use (online minus holes)
never exceeds what QEMU has plugged. Every driver keeps plugged each 2 MiB subblock that
holds a pinned page.

Why pinned pages: mlock(2) keeps pages in RAM but does not pin them against migration
(offlining migrates mlocked pages like any other; the ``pages that left the device``
line shows it). Without pins the only limit is pressure, and there the two drivers
part: the in-kernel driver fake-offlines 2 MiB subblocks with alloc_contig_range(),
which fails fast with ENOMEM, while a userspace ``offline`` write keeps the block
isolated and retries migration until the agent's deadline, holding the guest at the
OOM edge for that long: with ``--mlocked 384M --pin-stride 0 --anon 1G --cache 640M``
both unplugged 1408 MiB, but in the agent's VM a command run during one of its
retried offlines met the OOM killer, which killed the workload (in the in-kernel
driver's VM the same commands did not). With the defaults about 300 MiB stay
available (MemAvailable) once everything movable has moved, so both workloads live,
and what is left plugged is what the pins hold: 2 MiB subblocks for the in-kernel
driver and the agent, whole 128 MiB memory blocks for ``--no-subblock-unplug``.

For each agent run the table is followed by what its debug log says the kernel refused:
offlines per memory block and soft offlines per block, with their errnos, and how many of
the refused subblocks hold a pinned page (those can never go).

Prints a table (every driver's unplugged amount and the ratio vmem_guest/in-kernel)
and writes ``results/bench/pressure-<time>.json`` (and ``pressure-latest.json``).
Exit status 1 when an agent reported something that disagrees with QEMU, sysfs or the
page flags, the workload died (any VM), an agent died, or an agent did not converge
after the workload ended. The ratio is a figure, not a pass mark.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig, fmt_size, parse_size, paths
from vmharness import pressure_timing as timing
from vmharness.guest_agent import (
    AGENT_LOG,
    AGENT_PID,
    StateMidWrite,
    agent_died,
    agent_log,
    start_agent,
    status_document,
    stop_agent,
)

#: What boots a VM: TestVM itself, or the VM tests' boot_vm fixture.
Boot = Callable[[VMConfig], AbstractContextManager[TestVM]]
DEV = "vm0"
MEMORY_BLOCK = 128 * MiB
PAGE = 4096
#: Bit of /proc/kpageflags set for a poisoned page (Linux uapi kernel-page-flags.h).
KPF_HWPOISON = 19
DRIVERS = ("kernel", "vmem_guest", "vmem_guest_whole")
AGENTS = ("vmem_guest", "vmem_guest_whole")
LABELS = {
    "kernel": "in-kernel virtio_mem",
    "vmem_guest": "vmem_guest agent",
    "vmem_guest_whole": "vmem_guest whole-block",
}
#: The agent's arguments beyond ``--noiommu --offline-timeout T``, per run.
AGENT_ARGS = {"vmem_guest": "", "vmem_guest_whole": " --no-subblock-unplug"}
WORKLOAD_PID = "/run/pressure-workload.pid"
WORKLOAD_LOG = "/run/pressure-workload.log"
WORKLOAD_READY = "/run/pressure-workload.ready"
WORKLOAD_WHERE = "/run/pressure-workload.where"
CACHE_MOUNT = "/run/pressure-cache"
GUEST_PYTHON = "/usr/bin/python3"
MKE2FS = "/usr/sbin/mke2fs"
#: The dmesg line of each process the OOM killer killed.
OOM_KILLED = "Killed process"
#: The agent's log line for a refused offline (driver._avoid after hotplug.offline).
OFFLINE_REFUSED = re.compile(r"offline memory(\d+) failed: (\w+) .*; retrying memory\d+ later")
#: The agent's log line for a refused take (driver._avoid_subblocks after pages.take).
TAKE_REFUSED = re.compile(
    r"soft offline of pfn (0x[0-9a-f]+) failed: (\w+) \([^)]*\)(?:: ([^;]*))?;"
    r" subblocks (\d+)\+(\d+) later"
)
#: The tracker's debug lines for a take begun and an UNPLUG ACKed.
TAKING = re.compile(r"taking addr=(0x[0-9a-f]+) nb_blocks=(\d+)")

#: The guest workload, one process holding, until SIGTERM: ``pinned`` bytes of anonymous
#: memory locked with mlock(2), one page every ``stride`` of it also held by a pipe
#: nobody reads (vmsplice: an extra page reference, which migration cannot move; mlock
#: alone does not stop memory offlining from migrating a page); ``anon`` bytes of
#: anonymous memory, every page written; ``cache`` bytes of page cache (a sparse file on
#: ext4, read twice: the second read moves the pages to Active(file)). The pinned part
#: is allocated first, while the plugged (ZONE_MOVABLE) memory is empty, so that it lands
#: there. It writes READY (JSON: meminfo before and after, which 128 MiB memory blocks
#: hold its pages, from /proc/self/pagemap, and which device-block-sized subblocks hold a
#: pinned page) and, on SIGUSR1, WHERE (the blocks again). argv: pinned anon cache stride
#: subblock cache_file ready where.
WORKLOAD = r"""
import collections, ctypes, fcntl, json, mmap, os, signal, struct, sys
pinned, anon, cache, stride, subblock = map(int, sys.argv[1:6])
cache_file, ready, where = sys.argv[6:9]
PAGE, BLOCK = mmap.PAGESIZE, 128 << 20
def meminfo():
    out = {}
    for line in open("/proc/meminfo"):
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out
def address(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))
def blocks(addr, length, step=PAGE, unit=BLOCK):
    # index of the unit-sized block -> pages of [addr, addr+length) (every step-th page) in it
    counts = collections.Counter()
    with open("/proc/self/pagemap", "rb") as f:
        for offset in range(0, length, max(step, 1 << 20)):
            f.seek((addr + offset) // PAGE * 8)
            n = min(1 << 20, length - offset) // PAGE
            entries = struct.unpack(f"{n}Q", f.read(n * 8))
            for e in entries[:: max(1, step // PAGE)]:
                if e >> 63:
                    counts[(e & ((1 << 55) - 1)) * PAGE // unit] += 1
    return {str(k): v for k, v in sorted(counts.items())}
before = meminfo()
libc = ctypes.CDLL(None, use_errno=True)
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
regions = {}
if pinned:
    m = mmap.mmap(-1, pinned, flags=flags)
    base = address(m)
    if libc.mlock(ctypes.c_void_p(base), ctypes.c_size_t(pinned)) != 0:
        raise OSError(ctypes.get_errno(), "mlock")
    for offset in range(0, pinned, PAGE):
        m[offset] = 2
    regions["mlocked"] = (m, base, pinned, PAGE)
    if stride:
        reader, writer = os.pipe()
        fcntl.fcntl(writer, 1031, pinned // stride * PAGE)  # F_SETPIPE_SZ: a slot a page
        class iovec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
        for offset in range(0, pinned, stride):
            if libc.vmsplice(writer, ctypes.byref(iovec(base + offset, PAGE)), 1, 0) != PAGE:
                raise OSError(ctypes.get_errno(), "vmsplice")
        regions["pinned"] = (m, base, pinned, stride)
if anon:
    a = mmap.mmap(-1, anon, flags=flags | mmap.MAP_POPULATE)
    for offset in range(0, anon, PAGE):
        a[offset] = 1
    regions["anon"] = (a, address(a), anon, PAGE)
if cache:
    with open(cache_file, "wb") as f:
        f.truncate(cache)
    for _ in range(2):
        with open(cache_file, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
def placement():
    return {name: blocks(base, size, step) for name, (_, base, size, step) in regions.items()}
def write(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.rename(path + ".tmp", path)
pins = blocks(base, pinned, stride, subblock) if pinned and stride else {}
seen = {"pid": os.getpid(), "before": before, "after": meminfo(), "blocks": placement()}
write(ready, {**seen, "pinned_subblocks": pins})
signal.signal(signal.SIGUSR1, lambda *_: write(where, {"blocks": placement()}))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    signal.pause()
"""


@dataclass(frozen=True)
class Params:
    """One comparison: the VM, the sizes, the workload and the timing."""

    boot_memory: int = 1 * GiB
    region: int = 4 * GiB
    block_size: int = 2 * MiB
    grow: int = 2 * GiB
    shrink_to: int = 0
    mlocked: int = 512 * MiB
    pin_stride: int = 1 * MiB
    anon: int = 512 * MiB
    cache: int = 768 * MiB
    settle: float = 60.0
    sample_every: float = 0.25
    offline_timeout: float = 2.0
    converge_timeout: float = 300.0
    #: The in-kernel driver retries on a timer of 50 s doubling to 300 s (virtio_mem.c).
    kernel_converge_timeout: float = 330.0
    drivers: tuple[str, ...] = DRIVERS
    workload: str = "pinned"


def is_agent(driver: str) -> bool:
    return driver in AGENTS


def reachable(driver: str, size: int, block_size: int, *, growing: bool) -> int:
    """Where QEMU's size ends for a request of ``size``: the in-kernel driver plugs and
    unplugs device blocks; the agent grows in whole memory blocks (a new block cannot be
    onlined in part: the block below the request), and shrinks to device blocks only when
    it takes subblocks (else to the block above the request)."""
    whole = is_agent(driver) and (growing or driver == "vmem_guest_whole")
    unit = max(MEMORY_BLOCK, block_size) if whole else block_size
    return size // unit * unit if growing else -(-size // unit) * unit


def vm_config(driver: str, p: Params) -> VMConfig:
    """The same VM and device for every run; only the driver (or its flags) differs."""
    agent = is_agent(driver)
    return VMConfig(
        name=f"pressure-{driver}",
        cpus=2,
        memory=p.boot_memory,
        in_kernel_driver=not agent,
        noiommu=agent,
        devices=(MemDevice(DEV, size=p.region, block_size=p.block_size),),
    )


def guest_meminfo(vm: TestVM) -> dict[str, int]:
    keys = (
        "MemTotal",
        "HardwareCorrupted",
        "MemFree",
        "MemAvailable",
        "Cached",
        "Active(file)",
        "Inactive(file)",
        "AnonPages",
        "Mlocked",
        "Unevictable",
    )
    info = vm.meminfo()
    return {k: info[k] for k in keys if k in info}


def hardware_corrupted(vm: TestVM) -> int:
    """HardwareCorrupted of the guest's /proc/meminfo: the pages soft offline poisoned."""
    return vm.meminfo().get("HardwareCorrupted", 0)


def region_blocks(vm: TestVM) -> range:
    """Indices of the memory blocks of the device region."""
    q = vm.query()[DEV]
    first = int(q["memaddr"]) // MEMORY_BLOCK
    return range(first, first + int(q["max-size"]) // MEMORY_BLOCK)


def region_online(vm: TestVM) -> list[int]:
    """The device region's memory blocks online in sysfs (what the kernel says, not the
    agent)."""
    blocks = region_blocks(vm)
    first, count = blocks.start, len(blocks)
    out = vm.sh(
        f"for i in $(seq {first} {first + count - 1}); do"
        " f=/sys/devices/system/memory/memory$i/state;"
        ' [ -e $f ] && echo "$i $(cat $f)"; done; true'
    )
    # "going-offline": the block is still online while the kernel migrates its pages.
    return [
        int(i) for i, state in (line.split() for line in out.splitlines()) if state != "offline"
    ]


def workload_alive(vm: TestVM) -> bool:
    return vm.guest(f"kill -0 $(cat {WORKLOAD_PID})")[0] == 0


def oom_kills(vm: TestVM) -> int:
    """The kernel's count of OOM kills since boot (``oom_kill`` in /proc/vmstat)."""
    for line in vm.read("/proc/vmstat").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def dmesg_counts(vm: TestVM) -> dict[str, int]:
    """OOM kills and page migration failures the kernel logged. ``oom`` is the kernel's
    counter, not the log: soft offline logs a line per page-cache page it drops
    (``soft_offline: <pfn>: invalidated``), thousands in one shrink, enough to push
    older lines out of the log buffer."""
    log = vm.guest("dmesg")[1]
    lines = log.splitlines()
    return {
        "oom": oom_kills(vm),
        "oom_in_dmesg": sum(OOM_KILLED in line for line in lines),
        "soft_offline_lines": sum("soft_offline" in x or "soft offline" in x for x in lines),
        # offline_pages() warns (rate-limited) for each page it could not migrate.
        "migration_failures": sum("migrating pfn" in line and "failed" in line for line in lines),
        "virtio_mem_lines": sum("virtio_mem" in line for line in lines),
    }


def make_cache_image(vm: TestVM, p: Params) -> str:
    """An ext4 image on the writable share (made on the host), loop-mounted in the guest."""
    assert vm.paths is not None
    image = vm.paths.share / "pressure-cache.ext4"
    image.unlink(missing_ok=True)
    size_mib = (p.cache + 256 * MiB) // MiB
    subprocess.run(
        [MKE2FS, "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0", str(image), f"{size_mib}M"],
        check=True,
        capture_output=True,
    )
    vm.sh(f"mkdir -p {CACHE_MOUNT} && mount -o loop {image} {CACHE_MOUNT}")
    return f"{CACHE_MOUNT}/data"


def start_workload(vm: TestVM, p: Params, log: Callable[[str], None]) -> dict[str, Any]:
    """Start WORKLOAD detached; wait until it holds everything; return what it saw."""
    assert vm.paths is not None
    cache_file = make_cache_image(vm, p)
    script = vm.paths.share / "pressure-workload.py"
    script.write_text(WORKLOAD)
    vm.sh(
        f"rm -f {WORKLOAD_READY}; setsid {GUEST_PYTHON} -S {script} {p.mlocked} {p.anon}"
        f" {p.cache} {p.pin_stride} {p.block_size} {cache_file} {WORKLOAD_READY}"
        f" {WORKLOAD_WHERE}"
        f" >{WORKLOAD_LOG} 2>&1 </dev/null &"
        f" echo $! >{WORKLOAD_PID}"
    )
    t0 = time.monotonic()

    def ready() -> bool:
        if vm.guest(f"test -e {WORKLOAD_READY}")[0] == 0:
            return True
        if not workload_alive(vm):
            raise RuntimeError("the workload died while starting: " + vm.sh(f"cat {WORKLOAD_LOG}"))
        return False

    vm.wait_until(ready, timeout=600, interval=1.0, what="the workload")
    seen = json.loads(vm.read(WORKLOAD_READY))
    b, a = seen["before"], seen["after"]
    grown = {k: a[k] - b[k] for k in ("AnonPages", "Mlocked", "Cached", "Active(file)", "MemFree")}
    region = region_blocks(vm)
    pinned = sorted(int(i) for i in seen["blocks"].get("pinned", {}) if int(i) in region)
    subblocks = region_subblocks(vm, p)
    pinned_sb = sorted(int(i) for i in seen["pinned_subblocks"] if int(i) in subblocks)
    log(
        f"  workload up in {time.monotonic() - t0:.0f} s:"
        f" AnonPages +{fmt_size(grown['AnonPages'])},"
        f" Mlocked +{fmt_size(grown['Mlocked'])}, Cached +{fmt_size(grown['Cached'])}"
        f" (Active(file) +{fmt_size(grown['Active(file)'])}), MemFree {fmt_size(a['MemFree'])};"
        f" pinned pages in {len(pinned)} of the device's memory blocks {pinned},"
        f" in {len(pinned_sb)} of its {fmt_size(p.block_size)} subblocks"
        f" ({fmt_size(len(pinned_sb) * p.block_size)})"
    )
    return {
        "seconds": time.monotonic() - t0,
        "grown": grown,
        "meminfo": a,
        "blocks": seen["blocks"],
        "pinned_device_blocks": pinned,
        "pinned_device_subblocks": pinned_sb,
        "pages_in_device": in_device(seen["blocks"], region),
    }


def region_subblocks(vm: TestVM, p: Params) -> range:
    """Indices (physical address // block size) of the device region's subblocks."""
    q = vm.query()[DEV]
    first = int(q["memaddr"]) // p.block_size
    return range(first, first + int(q["max-size"]) // p.block_size)


def in_device(blocks: dict[str, dict[str, int]], region: range) -> dict[str, int]:
    """Pages of each workload region that sit in the device's memory blocks."""
    return {
        name: sum(n for i, n in counts.items() if int(i) in region)
        for name, counts in blocks.items()
    }


def workload_placement(vm: TestVM) -> dict[str, dict[str, int]] | None:
    """Ask the workload where its pages are now (SIGUSR1, then read WHERE); None when it
    is gone (the OOM killer may strike while we measure)."""
    if vm.guest(f"rm -f {WORKLOAD_WHERE}; kill -USR1 $(cat {WORKLOAD_PID})")[0] != 0:
        return None

    def written() -> bool:
        return vm.guest(f"test -e {WORKLOAD_WHERE}")[0] == 0 or not workload_alive(vm)

    vm.wait_until(written, timeout=120, interval=0.5, what="the workload's placement")
    if vm.guest(f"test -e {WORKLOAD_WHERE}")[0] != 0:
        return None
    blocks: dict[str, dict[str, int]] = json.loads(vm.read(WORKLOAD_WHERE))["blocks"]
    return blocks


def stop_workload(vm: TestVM) -> None:
    vm.guest(f"kill -TERM $(cat {WORKLOAD_PID})")
    vm.wait_until(lambda: not workload_alive(vm), timeout=60, what="the workload to exit")
    vm.guest(f"rm -f {CACHE_MOUNT}/data; umount {CACHE_MOUNT}")


def agent_view(vm: TestVM) -> dict[str, Any]:
    """What ``vmem-guest status --json`` says of the device, with the holes spelled out:
    ``holes`` (physical address of each unplugged subblock of an online block) and
    ``taking_bytes`` (subblocks being taken or given back: poisoned in part, plugged)."""
    document = status_document(vm)
    (dev,) = document["devices"]
    keys = ("plugged_size", "online_size", "requested_size", "remainder", "retries")
    view = {k: dev[k] for k in keys}
    view.update(broken=dev["broken"], intent=dev["intent"], requests=dev["requests"])
    view.update(hole_bytes=dev["hole_bytes"], holed_blocks=len(dev["holed_blocks"]))
    view["guest_hardware_corrupted"] = document["guest"]["hardware_corrupted"]
    glyphs = [(b["index"], b["subblocks"]) for b in dev["holed_blocks"]]
    mb_size, sb_size = dev["memory_block_size"], dev["block_size"]
    view["holes"] = [
        mb * mb_size + k * sb_size for mb, g in glyphs for k, c in enumerate(g) if c == "."
    ]
    view["taking_bytes"] = sum(g.count("o") for _, g in glyphs) * sb_size
    return view


#: Guest: how many pages of each range are HWPOISON in /proc/kpageflags.
#: argv: page count per range, then the ranges' first page frame numbers.
POISON_SCRIPT = f"""
import os, struct, sys
count = int(sys.argv[1])
fd = os.open("/proc/kpageflags", os.O_RDONLY)
for pfn in map(int, sys.argv[2:]):
    data = os.pread(fd, count * 8, pfn * 8)
    print(sum(v >> {KPF_HWPOISON} & 1 for (v,) in struct.iter_unpack("=Q", data)))
"""


def unpoisoned_holes(vm: TestVM, holes: list[int], block_size: int) -> list[int]:
    """The holes (physical addresses) not every page of which is HWPOISON: the agent
    unplugged memory the kernel may still hand out. Read in the guest, one process."""
    if not holes:
        return []
    assert vm.paths is not None
    script = vm.paths.share / "pressure-poison.py"
    script.write_text(POISON_SCRIPT)
    pages = block_size // PAGE
    pfns = " ".join(str(addr // PAGE) for addr in holes)
    counts = [int(n) for n in vm.sh(f"{GUEST_PYTHON} -S {script} {pages} {pfns}").split()]
    return [addr for addr, n in zip(holes, counts, strict=True) if n != pages]


def agent_snapshot(vm: TestVM, tries: int = 10) -> tuple[dict[str, Any], dict[str, int], list[int]]:
    """The agent's status, QEMU's size, MemTotal, HardwareCorrupted and sysfs's online
    blocks of the region, read while the agent is frozen (SIGSTOP), so that they describe
    one moment: with subblocks the agent changes state every few tens of milliseconds, a
    status read takes seconds under TCG, and two equal reads in a row may never come. A
    moment inside a step (a request's intent pending, sysfs and the tracker apart on a
    block just offlined, or the agent stopped inside a write of its state file, which
    then cannot be read) is skipped: thawed for a moment, frozen again."""
    last: tuple[dict[str, Any], dict[str, int], list[int]] | None = None
    for tried in range(1, tries + 1):
        read = frozen_read(vm)
        if read is not None:
            last = read
            view, check, online = read
            check["frozen_tries"] = tried
            if view["intent"] is None and len(online) * MEMORY_BLOCK == view["online_size"]:
                break
        time.sleep(0.2)
    if last is None:
        raise AssertionError(f"the agent stopped inside a state write {tries} times in a row")
    return last


def frozen_read(vm: TestVM) -> tuple[dict[str, Any], dict[str, int], list[int]] | None:
    """One read of :func:`agent_snapshot`'s figures, the agent stopped meanwhile; None
    when it was stopped inside a write of its state file."""
    vm.sh(f"kill -STOP $(cat {AGENT_PID})")
    try:
        try:
            view = agent_view(vm)
        except StateMidWrite:
            return None
        info = vm.meminfo()
        check = {
            "qemu_size": vm.plugged(DEV),
            "mem_total": info["MemTotal"],
            "hardware_corrupted": info.get("HardwareCorrupted", 0),
        }
        online = region_online(vm)
    finally:
        vm.sh(f"kill -CONT $(cat {AGENT_PID})")
    return view, check, online


def sample_shrink(vm: TestVM, p: Params) -> dict[str, Any]:
    """Ask for ``shrink_to`` and sample QEMU's size for ``settle`` seconds (over QMP only:
    nothing runs in the guest meanwhile)."""
    t0 = time.monotonic()
    vm.resize(DEV, p.shrink_to)
    samples: list[tuple[float, int]] = []
    while (now := time.monotonic() - t0) < p.settle:
        samples.append((round(now, 1), vm.plugged(DEV)))
        time.sleep(min(p.sample_every, max(0.0, p.settle - now)))
    after = vm.plugged(DEV)
    samples.append((round(time.monotonic() - t0, 1), after))
    last_change = next(
        (
            t
            for (t, s), (_, s_prev) in zip(samples[::-1], samples[-2::-1], strict=False)
            if s != s_prev
        ),
        0.0,
    )
    return {"qemu_size": after, "samples": samples, "last_change_s": last_change}


def measure_after(vm: TestVM, driver: str, p: Params, out: dict[str, Any]) -> dict[str, Any]:
    """Everything measured at the end of the settle time, cheapest first: anything run
    in the guest now allocates under pressure."""
    res = sample_shrink(vm, p)
    if is_agent(driver):
        # Where the settle time ends in the agent's log (read by the guest runner: no
        # process is started); what it refused before then explains the figure.
        res["agent_log_lines_at_settle"] = len(vm.read(AGENT_LOG).splitlines())
    res["unplugged"] = out["before"]["qemu_size"] - res["qemu_size"]
    res["meminfo"] = guest_meminfo(vm)
    res["workload_alive_at_settle"] = workload_alive(vm)
    online = region_online(vm)
    if is_agent(driver):
        res["agent_alive"] = not agent_died(vm)
        res["agent"] = None
        if res["agent_alive"]:
            res["agent"], res["check"], online = agent_snapshot(vm)
            res["unpoisoned_holes"] = unpoisoned_holes(vm, res["agent"]["holes"], p.block_size)
    res["region_online_sysfs"] = len(online) * MEMORY_BLOCK
    pinned = out["workload"]["pinned_device_blocks"]
    res["pinned_blocks_offline"] = sorted(set(pinned) - set(online))
    placement = workload_placement(vm) if res["workload_alive_at_settle"] else None
    if placement is not None:
        res["blocks"] = placement
        res["pages_in_device"] = in_device(placement, region_blocks(vm))
    res["dmesg"] = dmesg_counts(vm)
    res["workload_alive"] = workload_alive(vm)  # also after everything measured here
    return res


def log_after(driver: str, p: Params, out: dict[str, Any], log: Callable[[str], None]) -> None:
    """One line on the shrink, the agent's status, and where the workload's pages went."""
    before, res = out["before"], out["after"]
    holes = ""
    if res.get("agent"):
        a = res["agent"]
        holes = (
            f", holes {fmt_size(a['hole_bytes'])} in {a['holed_blocks']} online blocks,"
            f" HardwareCorrupted {fmt_size(res['meminfo'].get('HardwareCorrupted', 0))}"
        )
    log(
        f"  shrink {fmt_size(before['qemu_size'])} -> {fmt_size(p.shrink_to)}: after"
        f" {p.settle:g} s QEMU size {fmt_size(res['qemu_size'])} (unplugged"
        f" {fmt_size(res['unplugged'])}, last change at {res['last_change_s']:g} s), MemTotal"
        f" {fmt_size(before['meminfo']['MemTotal'])} -> {fmt_size(res['meminfo']['MemTotal'])}"
        f"{holes}, workload {'alive' if res['workload_alive'] else 'DEAD'},"
        f" OOM kills {res['dmesg']['oom']}"
    )
    if res.get("agent"):
        shown = {k: v for k, v in res["agent"].items() if k != "holes"}
        log(f"  vmem-guest status: {shown}")
    if "pages_in_device" in res:
        moved = {
            k: out["workload"]["pages_in_device"].get(k, 0) - v
            for k, v in res["pages_in_device"].items()
        }
        log(f"  workload pages that left the device's memory since the start: {moved}")


def converge_agent(
    vm: TestVM, driver: str, p: Params, out: dict[str, Any], log: Callable[[str], None]
) -> None:
    """End the workload; the agent must now reach the request: QEMU's size and its own
    plugged size on target, the memory it keeps online in use exactly the target (holes
    stay online), nothing in flight."""
    target = reachable(driver, p.shrink_to, p.block_size, growing=False)
    t1 = time.monotonic()  # the workload is gone and QEMU's size at the target: ended

    def converged() -> dict[str, Any] | None:
        view = agent_view(vm)
        ok = (
            vm.plugged(DEV) == view["plugged_size"] == target
            and view["online_size"] - view["hole_bytes"] == target
            and view["taking_bytes"] == 0
            and view["intent"] is None
        )
        return view if ok else None

    try:
        final = vm.wait_until(
            converged, timeout=p.converge_timeout, interval=1.0, what="convergence"
        )
        assert final is not None  # wait_until returns only a truthy answer
        out["converged"] = {
            "ok": True,
            "seconds": time.monotonic() - t1,
            "target": target,
            "qemu_size": vm.plugged(DEV),
            "agent": final,
            "mem_total": vm.mem_total(),
            "hardware_corrupted": hardware_corrupted(vm),
            "unpoisoned_holes": unpoisoned_holes(vm, final["holes"], p.block_size),
        }
        log(
            f"  workload ended: converged to {fmt_size(target)} in"
            f" {out['converged']['seconds']:.1f} s (online {fmt_size(final['online_size'])},"
            f" holes {fmt_size(final['hole_bytes'])}, HardwareCorrupted"
            f" {fmt_size(out['converged']['hardware_corrupted'])})"
        )
    except Exception as exc:  # reported; the run fails
        out["converged"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        log(f"  workload ended: did NOT converge: {out['converged']['error'][:300]}")


def finish_agent(
    vm: TestVM, driver: str, p: Params, out: dict[str, Any], log: Callable[[str], None]
) -> None:
    """Converge, keep the agent's debug log (share/agent.log), read its refusals."""
    assert vm.paths is not None
    converge_agent(vm, driver, p, out, log)
    out["agent_alive_at_end"] = not agent_died(vm)
    vm.guest(f"cp {AGENT_LOG} {vm.paths.share}/agent.log")
    if not out["agent_alive_at_end"]:
        out["agent_log"] = agent_log(vm)
    else:
        stop_agent(vm)
    text = (vm.paths.share / "agent.log").read_text(errors="replace")
    lines = text.splitlines()
    settle = out["after"].get("agent_log_lines_at_settle", len(lines))
    ended = out["ended"]
    out["agent_waits"] = timing.agent_waits(text, ended["guest_stop"], timing.since_stop(ended))
    pinned = set(out["workload"]["pinned_device_subblocks"])
    out["refusals"] = refusals(lines[:settle], pinned, p.block_size)
    out["refusals_after_settle"] = refusals(lines[settle:], pinned, p.block_size)
    out["subblocks_on"] = "subblock unplug on" in text
    log("  " + refusals_line(out["refusals"], "during the settle", p.offline_timeout))


def refusals(lines: list[str], pinned: set[int], block_size: int) -> dict[str, Any]:
    """What the agent's log says the kernel refused: offlines by memory block and errno;
    soft offlines by memory block and errno, the subblocks they hit (by physical address
    // block size) and how many of those hold a pinned page; takes begun."""
    offline: dict[int, Counter[str]] = {}
    take: dict[int, Counter[str]] = {}
    refused: set[int] = set()
    details: Counter[str] = Counter()
    takes = 0
    for line in lines:
        if m := OFFLINE_REFUSED.search(line):
            offline.setdefault(int(m[1]), Counter())[m[2]] += 1
        elif m := TAKE_REFUSED.search(line):
            addr = int(m[1], 16) * PAGE
            take.setdefault(addr // MEMORY_BLOCK, Counter())[m[2]] += 1
            refused.add(addr // block_size)
            details[f"{m[2]}: {m[3] or 'the write failed'}"] += 1
        elif TAKING.search(line):
            takes += 1
    return {
        "offline": {mb: dict(c) for mb, c in sorted(offline.items())},
        "take": {mb: dict(c) for mb, c in sorted(take.items())},
        "take_details": dict(details),
        "refused_subblocks": len(refused),
        "refused_pinned_subblocks": len(refused & pinned),
        "refused_unpinned_subblocks": sorted(refused - pinned),
        "takes_begun": takes,
    }


def refusals_line(r: dict[str, Any], when: str, offline_timeout: float) -> str:
    """The refusals of :func:`refusals` in one line, with the time the timed-out offlines
    held the agent (each blocks it for the whole ``--offline-timeout``)."""

    def by_block(d: dict[int, dict[str, int]]) -> str:
        return (
            ", ".join(
                f"memory{mb} " + "/".join(f"{e} x{n}" for e, n in c.items()) for mb, c in d.items()
            )
            or "none"
        )

    unpinned = r["refused_unpinned_subblocks"]
    timeouts = sum(c.get("ETIMEDOUT", 0) for c in r["offline"].values())
    return (
        f"agent log, {when}: offline refused: {by_block(r['offline'])} ({timeouts} timed out:"
        f" {timeouts * offline_timeout:g} s blocked); soft offline refused"
        f" in {r['refused_subblocks']} subblocks ({r['refused_pinned_subblocks']} hold a pinned"
        f" page, {len(unpinned)} none): {by_block(r['take'])}; takes begun {r['takes_begun']}"
    )


def grow(vm: TestVM, driver: str, p: Params, base_total: int) -> None:
    """Plug ``grow`` and wait until the guest has it all (MemTotal)."""
    target = reachable(driver, p.grow, p.block_size, growing=True)
    vm.resize(DEV, p.grow)
    vm.wait_until(lambda: vm.plugged(DEV) == target, timeout=300, what="the plug")
    vm.wait_until(
        lambda: vm.mem_total() == base_total + target, timeout=300, what="MemTotal after plug"
    )


def run_driver(
    driver: str, p: Params, log: Callable[[str], None] = print, boot: Boot = TestVM
) -> dict[str, Any]:
    """Boot one VM with ``driver`` (through ``boot``: the VM tests pass theirs, which skips
    when the host cannot run VMs), grow, load, shrink under the load; return the figures."""
    agent = is_agent(driver)
    t_start = time.monotonic()
    out: dict[str, Any] = {"driver": driver}
    with boot(vm_config(driver, p)) as vm:
        assert vm.paths is not None
        log(f"{LABELS[driver]}: VM up in {vm.boot_seconds:.1f} s ({vm.accel}); {vm.paths.run_dir}")
        out.update(accel=vm.accel, run_dir=str(vm.paths.run_dir))
        base_total = vm.mem_total()
        out["base_mem_total"] = base_total
        out["base_hardware_corrupted"] = hardware_corrupted(vm)
        out["block_size"] = p.block_size
        if agent:
            start_agent(
                vm, f"--noiommu --offline-timeout {p.offline_timeout:g}{AGENT_ARGS[driver]}"
            )
        grow(vm, driver, p, base_total)
        out["workload"] = start_workload(vm, p, log)
        out["before"] = {"qemu_size": vm.plugged(DEV), "meminfo": guest_meminfo(vm)}
        if agent:
            out["before"]["agent"] = agent_view(vm)
        out["after"] = measure_after(vm, driver, p, out)
        log_after(driver, p, out, log)
        target = reachable(driver, p.shrink_to, p.block_size, growing=False)
        timeout = p.converge_timeout if agent else p.kernel_converge_timeout
        out["ended"] = timing.end_workload(vm, DEV, target, timeout, stop_workload)
        if agent and out["after"]["agent_alive"]:
            finish_agent(vm, driver, p, out, log)
    out["wall_s"] = time.monotonic() - t_start
    return out


def driver_problems(driver: str, r: dict[str, Any], p: dict[str, Any]) -> list[str]:
    """What fails any driver's run: a dead workload, pinned memory given back."""
    out: list[str] = []
    after = r["after"]
    if not after["workload_alive"]:
        out.append(f"{driver}: the workload died (OOM kills: {after['dmesg']['oom']})")
    if after["pinned_blocks_offline"]:
        out.append(
            f"{driver}: memory blocks holding pinned pages are offline:"
            f" {after['pinned_blocks_offline']}"
        )
    pinned_bytes = len(r["workload"]["pinned_device_subblocks"]) * p["block_size"]
    if after["qemu_size"] < pinned_bytes:
        out.append(
            f"{driver}: QEMU's size {after['qemu_size']} is below the {pinned_bytes} bytes of"
            " subblocks that hold a pinned page"
        )
    corrupted = after["meminfo"].get("HardwareCorrupted", 0) - r["base_hardware_corrupted"]
    if driver != "vmem_guest" and corrupted:
        out.append(f"{driver}: HardwareCorrupted grew by {corrupted} without subblock unplug")
    return out


def agent_problems(driver: str, r: dict[str, Any], p: dict[str, Any]) -> list[str]:
    """What fails an agent's run: its status disagreeing with QEMU, sysfs, MemTotal,
    HardwareCorrupted or the page flags; no convergence once the workload ended."""
    after = r["after"]
    if not after["agent_alive"]:
        return [f"{driver}: the agent died under pressure"]
    out = status_problems(driver, after["agent"], after["check"], r["base_mem_total"])
    out += holes_problems(driver, r, after["agent"], after["check"], after["unpoisoned_holes"])
    if after["workload_alive"]:
        out += pinned_holes_problems(driver, r, p)
    if after["region_online_sysfs"] != after["agent"]["online_size"]:
        out.append(
            f"{driver}: reports online {after['agent']['online_size']}, sysfs has"
            f" {after['region_online_sysfs']} of the region online"
        )
    if after["region_online_sysfs"] - after["agent"]["hole_bytes"] > after["check"]["qemu_size"]:
        out.append(f"{driver}: memory in use online in sysfs that the device has unplugged")
    target = reachable(driver, p["shrink_to"], p["block_size"], growing=False)
    if after["qemu_size"] > target and after["agent"]["retries"] == 0:
        out.append(f"{driver}: fell short of the request but counted no retries")
    if r.get("subblocks_on") != (driver == "vmem_guest"):
        out.append(f"{driver}: the agent's log says subblock unplug is {r.get('subblocks_on')}")
    out += converged_problems(driver, r)
    if not r.get("agent_alive_at_end", False):
        out.append(f"{driver}: the agent died after the workload ended")
    return out


def status_problems(
    driver: str, a: dict[str, Any], check: dict[str, int], base_mem_total: int
) -> list[str]:
    """The agent's sizes against QEMU's and the guest's. Holes stay in MemTotal (their
    pages are poisoned, not removed), so MemTotal is boot + every online block."""
    out: list[str] = []
    if a["plugged_size"] != check["qemu_size"]:
        out.append(
            f"{driver}: reports plugged {a['plugged_size']}, QEMU's size is {check['qemu_size']}"
        )
    if a["online_size"] - a["hole_bytes"] > a["plugged_size"]:
        out.append(
            f"{driver}: online {a['online_size']} minus holes {a['hole_bytes']} > plugged"
            f" {a['plugged_size']}"
        )
    if check["mem_total"] != base_mem_total + a["online_size"]:
        out.append(
            f"{driver}: MemTotal {check['mem_total']} is not boot {base_mem_total} + online"
            f" {a['online_size']}"
        )
    if a["broken"]:
        out.append(f"{driver}: the device is marked broken")
    return out


def addresses(addrs: list[int], shown: int = 4) -> str:
    """A few addresses in hex, and how many there are."""
    head = ", ".join(hex(x) for x in addrs[:shown])
    return f"{len(addrs)}: {head}{', ...' if len(addrs) > shown else ''}"


def pinned_holes_problems(driver: str, r: dict[str, Any], p: dict[str, Any]) -> list[str]:
    """While the workload holds its pins: no hole may be a subblock holding a pinned page
    (its page cannot have moved, so it cannot have been poisoned)."""
    pinned = set(r["workload"]["pinned_device_subblocks"])
    holes = r["after"]["agent"]["holes"]
    pinned_holes = sorted(addr for addr in holes if addr // p["block_size"] in pinned)
    if not pinned_holes:
        return []
    return [f"{driver}: holes that hold a pinned page: {addresses(pinned_holes)}"]


def holes_problems(
    driver: str, r: dict[str, Any], a: dict[str, Any], check: dict[str, int], unpoisoned: list[int]
) -> list[str]:
    """Holes against the page flags and HardwareCorrupted: every hole's pages poisoned,
    HardwareCorrupted grown by the holes (and by no more than the holes and the takes in
    flight)."""
    out: list[str] = []
    if unpoisoned:
        out.append(f"{driver}: holes with pages not HWPOISON: {addresses(unpoisoned)}")
    grown = check["hardware_corrupted"] - r["base_hardware_corrupted"]
    if not a["hole_bytes"] <= grown <= a["hole_bytes"] + a["taking_bytes"]:
        out.append(
            f"{driver}: HardwareCorrupted grew by {grown}, holes {a['hole_bytes']}, taking"
            f" {a['taking_bytes']}"
        )
    return out


def converged_problems(driver: str, r: dict[str, Any]) -> list[str]:
    """After the workload: converged, MemTotal = boot + online, HardwareCorrupted grown by
    exactly the holes (nothing is in flight), every hole poisoned. (The pins are gone:
    their subblocks may be holes now.)"""
    c = r.get("converged", {})
    if not c.get("ok"):
        return [f"{driver}: did not converge after the workload ended"]
    a = c["agent"]
    check = {k: c[k] for k in ("qemu_size", "mem_total", "hardware_corrupted")}
    out = status_problems(driver, a, check, r["base_mem_total"])
    out += holes_problems(driver, r, a, check, c["unpoisoned_holes"])
    return [f"{x} (after the workload ended)" for x in out]


def problems(result: dict[str, Any]) -> list[str]:
    """What makes the run fail: an agent disagreeing with QEMU, sysfs or the page flags, a
    dead workload or agent, no convergence once the workload ended. (The ratio is never a
    failure.)"""
    out: list[str] = []
    p = result["params"]
    for driver, r in result["drivers"].items():
        out += driver_problems(driver, r, p)
        if is_agent(driver):
            out += agent_problems(driver, r, p)
    return out


def table(result: dict[str, Any]) -> str:
    """Every driver's figures and the ratio vmem_guest / in-kernel of the unplugged bytes."""
    p = result["params"]
    drivers = result["drivers"]
    lines = [
        f"memory pressure: boot {fmt_size(p['boot_memory'])}, vm0 {fmt_size(p['grow'])} plugged"
        f" ({fmt_size(p['region'])} region, {fmt_size(p['block_size'])} blocks); workload"
        f" {p['workload']}: mlocked {fmt_size(p['mlocked'])}"
        f" ({pins_text(p['pin_stride'])})"
        f" + anon {fmt_size(p['anon'])} + page cache"
        f" {fmt_size(p['cache'])}; shrink to {fmt_size(p['shrink_to'])}, settle"
        f" {p['settle']:g} s ({result['accel']})",
        f"{'driver':<22} {'QEMU before':>11} {'after':>9} {'unplugged':>10} {'MemTotal':>19}"
        f" {'HWCorrupted':>11} {'holes':>8} {'workload':>9} {'OOM':>4} {'retries':>8}"
        f" {'pinned blocks':>14} {'pinned 2M':>9} {'of possible':>11}",
    ]
    for driver, r in drivers.items():
        lines.append(table_row(driver, r))
    lines.append(
        "after, unplugged, MemTotal: at the end of the settle time; holes, HWCorrupted"
        " (HardwareCorrupted grown; holes stay in MemTotal), retries: the agent's snapshot just"
        " after; of possible: unplugged / (plugged before - the subblocks holding a pinned page)"
    )
    for driver in AGENTS:
        line = ratio_line(result, driver)
        if line:
            lines.append(line)
    return "\n".join(lines)


def pins_text(stride: int) -> str:
    return f"a page every {fmt_size(stride)} pinned" if stride else "nothing pinned"


def table_row(driver: str, r: dict[str, Any]) -> str:
    b, a = r["before"], r["after"]
    retries = a["agent"]["retries"] if a.get("agent") else "-"
    holes = fmt_size(a["agent"]["hole_bytes"]) if a.get("agent") else "-"
    # The agent's holes and HardwareCorrupted from one snapshot (see agent_snapshot).
    corrupted_now = a["check"]["hardware_corrupted"] if a.get("check") else None
    if corrupted_now is None:
        corrupted_now = a["meminfo"].get("HardwareCorrupted", 0)
    corrupted = corrupted_now - r["base_hardware_corrupted"]
    mt = f"{fmt_size(b['meminfo']['MemTotal'])}->{fmt_size(a['meminfo']['MemTotal'])}"
    w = r["workload"]
    # What could go at all: everything but the subblocks that hold a pinned page.
    possible = b["qemu_size"] - len(w["pinned_device_subblocks"]) * r["block_size"]
    share = f"{a['unplugged'] / possible * 100:.0f} %" if possible > 0 else "-"
    return (
        f"{LABELS[driver]:<22} {fmt_size(b['qemu_size']):>11} {fmt_size(a['qemu_size']):>9}"
        f" {fmt_size(a['unplugged']):>10} {mt:>19} {fmt_size(corrupted):>11} {holes:>8}"
        f" {'alive' if a['workload_alive'] else 'DEAD':>9} {a['dmesg']['oom']:>4}"
        f" {retries!s:>8} {len(w['pinned_device_blocks']):>14}"
        f" {len(w['pinned_device_subblocks']):>9} {share:>11}"
    )


def ratio_line(result: dict[str, Any], driver: str) -> str | None:
    """``unplugged: <agent> X, in-kernel Y, ratio ...`` when both ran."""
    drivers = result["drivers"]
    if "kernel" not in drivers or driver not in drivers:
        return None
    k = drivers["kernel"]["after"]["unplugged"]
    v = drivers[driver]["after"]["unplugged"]
    ratio = result["ratios"].get(driver)
    shown = f"{ratio:.2f}" if ratio is not None else "n/a (the in-kernel driver unplugged 0)"
    name = "vmem_guest" if driver == "vmem_guest" else "vmem_guest --no-subblock-unplug"
    return (
        f"unplugged: {name} {fmt_size(v)}, in-kernel {fmt_size(k)}, ratio"
        f" {name.split()[0]}/in-kernel {shown}"
    )


def compare(p: Params, log: Callable[[str], None] = print, boot: Boot = TestVM) -> dict[str, Any]:
    """Run every driver of ``p`` in turn; the result dict with problems and the table."""
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "params": asdict(p),
        "drivers": {},
    }
    for driver in p.drivers:
        result["drivers"][driver] = run_driver(driver, p, log, boot)
    result["accel"] = next(iter(result["drivers"].values()))["accel"]
    d = result["drivers"]
    result["ratios"] = {}
    if "kernel" in d:
        k = d["kernel"]["after"]["unplugged"]
        for driver in AGENTS:
            if driver in d:
                result["ratios"][driver] = d[driver]["after"]["unplugged"] / k if k else None
    result["ratio"] = result["ratios"].get("vmem_guest")
    result["problems"] = problems(result)
    result["table"] = "\n".join([table(result), *timing.timing_lines(result)])
    result["wall_s"] = time.monotonic() - t0
    return result


def parse_args(argv: list[str] | None = None) -> tuple[Params, bool]:
    workloads = argparse.ArgumentParser(add_help=False)
    workloads.add_argument(
        "--workload",
        choices=timing.WORKLOADS,
        default="pinned",
        help="pinned: a page every --pin-stride pinned, shrink to 0; movable: nothing"
        " pinned, shrink to 1000M (the other options default to the workload's) [pinned]",
    )
    workload = workloads.parse_known_args(argv)[0].workload
    d = Params(**timing.WORKLOADS[workload], workload=workload)  # the preset's defaults
    ap = argparse.ArgumentParser(
        parents=[workloads],
        description=__doc__.split("\n\n")[0],
        epilog="Sizes take K/M/G/T. Writes results/bench/pressure-<time>.json.",
    )

    def size(name: str, default: int, what: str) -> None:
        ap.add_argument(
            name, type=parse_size, default=default, help=f"{what} [{fmt_size(default)}]"
        )

    size("--boot-memory", d.boot_memory, "boot memory")
    size("--region", d.region, "virtio-mem region size")
    size("--grow", d.grow, "plugged before the workload starts")
    size("--shrink-to", d.shrink_to, "the shrink request")
    size("--anon", d.anon, "workload: anonymous memory, every page written")
    size("--mlocked", d.mlocked, "workload: anonymous memory locked with mlock, allocated first")
    size(
        "--pin-stride",
        d.pin_stride,
        "one page of the mlocked memory every this many bytes is also held by a pipe"
        " (vmsplice), which migration cannot move; 0: none",
    )
    size("--cache", d.cache, "workload: page cache (a file on a loop-mounted ext4, read twice)")
    ap.add_argument("--settle", type=float, default=d.settle, help=f"seconds [{d.settle:g}]")
    ap.add_argument(
        "--offline-timeout",
        type=float,
        default=d.offline_timeout,
        help=f"the agent's --offline-timeout, seconds [{d.offline_timeout:g}]",
    )
    ap.add_argument(
        "--driver", choices=DRIVERS, action="append", help="run only this driver (repeatable)"
    )
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    a = ap.parse_args(argv)
    p = Params(
        boot_memory=a.boot_memory,
        region=a.region,
        grow=a.grow,
        shrink_to=a.shrink_to,
        anon=a.anon,
        mlocked=a.mlocked,
        pin_stride=a.pin_stride,
        cache=a.cache,
        settle=a.settle,
        offline_timeout=a.offline_timeout,
        drivers=tuple(a.driver) if a.driver else DRIVERS,
        workload=workload,
    )
    return p, a.json


def main(argv: list[str] | None = None) -> int:
    p, as_json = parse_args(argv)
    stream = sys.stderr if as_json else sys.stdout

    def log(line: str) -> None:
        print(line, file=stream, flush=True)

    result = compare(p, log)
    kind = "pressure" if p.workload == "pinned" else f"pressure-{p.workload}"
    path = paths.write_bench_result(kind, result)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(result["table"])
        for problem in result["problems"]:
            print(f"PROBLEM: {problem}")
        print(f"wrote {path}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
