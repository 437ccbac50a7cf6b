#!/usr/bin/env python3
"""``make pressure``: shrink requests while a guest workload holds most plugged memory.

Issue 5, item 6. For each driver, one VM (TCG unless KVM was proven to work):
2 vCPUs, ``--boot-memory`` (1 GiB), one virtio-mem device ``vm0`` (``--region``
4 GiB, 2 MiB blocks):

* ``kernel``: the in-kernel ``virtio_mem`` driver, ``memhp_default_state=online_movable``;
* ``vmem_guest``: the agent, ``vmem-guest run --noiommu --offline-timeout T``, the
  in-kernel driver blacklisted.

Each VM grows the device to ``--grow`` (2 GiB) and starts the same workload in the
guest (``WORKLOAD``, one process), in this order: ``--mlocked`` (512 MiB) of anonymous
memory locked with mlock(2), one page every ``--pin-stride`` (1 MiB) of it also held by
a pipe (vmsplice); ``--anon`` (512 MiB) of anonymous memory, every page written; and
``--cache`` (768 MiB) of page cache: a sparse file on an ext4 image (made on the host
with mke2fs on the run's writable share, loop-mounted in the guest; the share is 9p
without a guest cache, so the pages are cached once, by ext4), read twice so that it
shows in Cached and Active(file). The workload reports, from /proc/self/pagemap, which
memory blocks hold its pages. Then the host asks for ``--shrink-to`` (0), waits
``--settle`` seconds (the same for both drivers; QEMU's size is sampled over QMP,
nothing runs in the guest meanwhile) and measures: unplugged bytes (QEMU's ``size``
before minus after), MemTotal before and after, whether the workload is alive and the
OOM killer stayed away (``dmesg``), that every memory block holding a pinned page is
still online, and for vmem_guest ``vmem-guest status --json`` (plugged, online,
remainder, retries), which must agree with QEMU's size, sysfs and MemTotal. Then the
workload ends and the agent must converge to the request.

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
and what is left plugged is what the pins hold: whole 128 MiB memory blocks for the
agent, 2 MiB subblocks for the in-kernel driver.

Prints a table (both drivers' unplugged amounts and the ratio vmem_guest/in-kernel)
and writes ``results/bench/pressure-<time>.json`` (and ``pressure-latest.json``).
Exit status 1 when vmem_guest reported something that disagrees with QEMU or sysfs,
the workload died (either VM), the agent died, or the agent did not converge after
the workload ended. The ratio is a figure, not a pass mark.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig, fmt_size, parse_size, paths
from vmharness.guest_agent import AGENT_LOG, agent_died, agent_log, start_agent, status, stop_agent

#: What boots a VM: TestVM itself, or the VM tests' boot_vm fixture.
Boot = Callable[[VMConfig], AbstractContextManager[TestVM]]
DEV = "vm0"
MEMORY_BLOCK = 128 * MiB
DRIVERS = ("kernel", "vmem_guest")
LABELS = {"kernel": "in-kernel virtio_mem", "vmem_guest": "vmem_guest agent"}
WORKLOAD_PID = "/run/pressure-workload.pid"
WORKLOAD_LOG = "/run/pressure-workload.log"
WORKLOAD_READY = "/run/pressure-workload.ready"
WORKLOAD_WHERE = "/run/pressure-workload.where"
CACHE_MOUNT = "/run/pressure-cache"
GUEST_PYTHON = "/usr/bin/python3"
MKE2FS = "/usr/sbin/mke2fs"
#: The dmesg line of each process the OOM killer killed.
OOM_KILLED = "Killed process"

#: The guest workload, one process holding, until SIGTERM: ``pinned`` bytes of anonymous
#: memory locked with mlock(2), one page every ``stride`` of it also held by a pipe
#: nobody reads (vmsplice: an extra page reference, which migration cannot move; mlock
#: alone does not stop memory offlining from migrating a page); ``anon`` bytes of
#: anonymous memory, every page written; ``cache`` bytes of page cache (a sparse file on
#: ext4, read twice: the second read moves the pages to Active(file)). The pinned part
#: is allocated first, while the plugged (ZONE_MOVABLE) memory is empty, so that it lands
#: there. It writes READY (JSON: meminfo before and after, and which 128 MiB memory
#: blocks hold its pages, from /proc/self/pagemap) and, on SIGUSR1, WHERE (the blocks
#: again). argv: pinned anon cache stride cache_file ready where.
WORKLOAD = r"""
import collections, ctypes, fcntl, json, mmap, os, signal, struct, sys
pinned, anon, cache, stride = map(int, sys.argv[1:5])
cache_file, ready, where = sys.argv[5:8]
PAGE, BLOCK = mmap.PAGESIZE, 128 << 20
def meminfo():
    out = {}
    for line in open("/proc/meminfo"):
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out
def address(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))
def blocks(addr, length, step=PAGE):
    # memory block index -> pages of [addr, addr+length) (every step-th page) in it
    counts = collections.Counter()
    with open("/proc/self/pagemap", "rb") as f:
        for offset in range(0, length, max(step, 1 << 20)):
            f.seek((addr + offset) // PAGE * 8)
            n = min(1 << 20, length - offset) // PAGE
            entries = struct.unpack(f"{n}Q", f.read(n * 8))
            for e in entries[:: max(1, step // PAGE)]:
                if e >> 63:
                    counts[(e & ((1 << 55) - 1)) * PAGE // BLOCK] += 1
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
write(ready, {"pid": os.getpid(), "before": before, "after": meminfo(), "blocks": placement()})
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
    sample_every: float = 3.0
    offline_timeout: float = 2.0
    converge_timeout: float = 300.0
    drivers: tuple[str, ...] = DRIVERS


def vm_config(driver: str, p: Params) -> VMConfig:
    """The same VM and device for both drivers; only the driver differs."""
    agent = driver == "vmem_guest"
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


def dmesg_counts(vm: TestVM) -> dict[str, int]:
    """OOM kills and page migration failures the kernel logged."""
    log = vm.guest("dmesg")[1]
    lines = log.splitlines()
    return {
        "oom": sum(OOM_KILLED in line for line in lines),
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
        f" {p.cache} {p.pin_stride} {cache_file} {WORKLOAD_READY} {WORKLOAD_WHERE}"
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
    log(
        f"  workload up in {time.monotonic() - t0:.0f} s:"
        f" AnonPages +{fmt_size(grown['AnonPages'])},"
        f" Mlocked +{fmt_size(grown['Mlocked'])}, Cached +{fmt_size(grown['Cached'])}"
        f" (Active(file) +{fmt_size(grown['Active(file)'])}), MemFree {fmt_size(a['MemFree'])};"
        f" pinned pages in {len(pinned)} of the device's memory blocks {pinned}"
    )
    return {
        "seconds": time.monotonic() - t0,
        "grown": grown,
        "meminfo": a,
        "blocks": seen["blocks"],
        "pinned_device_blocks": pinned,
        "pages_in_device": in_device(seen["blocks"], region),
    }


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
    (dev,) = status(vm).values()
    keys = ("plugged_size", "online_size", "requested_size", "remainder", "retries")
    view = {k: dev[k] for k in keys}
    view.update(broken=dev["broken"], intent=dev["intent"], requests=dev["requests"])
    return view


def agent_snapshot(vm: TestVM, tries: int = 5) -> tuple[dict[str, Any], dict[str, int], list[int]]:
    """The agent's status, QEMU's size, MemTotal and sysfs's online blocks of the region,
    taken between two equal status reads (the agent may be between a step and its record:
    read again)."""
    view = agent_view(vm)
    for _ in range(tries):
        check = {"qemu_size": vm.plugged(DEV), "mem_total": vm.mem_total()}
        online = region_online(vm)
        again = agent_view(vm)
        if again == view:
            break
        view = again
    return view, check, online


def run_driver(
    driver: str, p: Params, log: Callable[[str], None] = print, boot: Boot = TestVM
) -> dict[str, Any]:
    """Boot one VM with ``driver`` (through ``boot``: the VM tests pass theirs, which skips
    when the host cannot run VMs), grow, load, shrink under the load; return the figures."""
    agent = driver == "vmem_guest"
    t_start = time.monotonic()
    out: dict[str, Any] = {"driver": driver}
    with boot(vm_config(driver, p)) as vm:
        assert vm.paths is not None
        log(f"{LABELS[driver]}: VM up in {vm.boot_seconds:.1f} s ({vm.accel}); {vm.paths.run_dir}")
        out.update(accel=vm.accel, run_dir=str(vm.paths.run_dir))
        base_total = vm.mem_total()
        out["base_mem_total"] = base_total
        if agent:
            start_agent(vm, f"--noiommu --offline-timeout {p.offline_timeout:g}")
        vm.resize(DEV, p.grow)
        vm.wait_until(lambda: vm.plugged(DEV) == p.grow, timeout=300, what="the plug")
        vm.wait_until(
            lambda: vm.mem_total() == base_total + p.grow, timeout=300, what="MemTotal after plug"
        )
        out["workload"] = start_workload(vm, p, log)
        before = vm.plugged(DEV)
        out["before"] = {"qemu_size": before, "meminfo": guest_meminfo(vm)}
        if agent:
            out["before"]["agent"] = agent_view(vm)

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
        # Cheapest first: anything run in the guest now allocates under pressure.
        meminfo = guest_meminfo(vm)
        after_total = meminfo["MemTotal"]
        res: dict[str, Any] = {
            "qemu_size": after,
            "unplugged": before - after,
            "samples": samples,
            "last_change_s": last_change,
            "meminfo": meminfo,
            "workload_alive_at_settle": workload_alive(vm),
        }
        online = region_online(vm)
        if agent:
            res["agent_alive"] = not agent_died(vm)
            res["agent"] = None
            if res["agent_alive"]:
                res["agent"], res["check"], online = agent_snapshot(vm)
        res["region_online_sysfs"] = len(online) * MEMORY_BLOCK
        pinned = out["workload"]["pinned_device_blocks"]
        res["pinned_blocks_offline"] = sorted(set(pinned) - set(online))
        placement = workload_placement(vm) if res["workload_alive_at_settle"] else None
        if placement is not None:
            res["blocks"] = placement
            res["pages_in_device"] = in_device(placement, region_blocks(vm))
        res["dmesg"] = dmesg_counts(vm)
        res["workload_alive"] = workload_alive(vm)  # also after everything measured here
        out["after"] = res
        log(
            f"  shrink {fmt_size(before)} -> {fmt_size(p.shrink_to)}: after {p.settle:g} s QEMU"
            f" size {fmt_size(after)} (unplugged {fmt_size(before - after)}, last change at"
            f" {last_change:g} s), MemTotal {fmt_size(out['before']['meminfo']['MemTotal'])} ->"
            f" {fmt_size(after_total)}, workload {'alive' if res['workload_alive'] else 'DEAD'},"
            f" OOM kills {res['dmesg']['oom']}"
        )
        if agent and res["agent"]:
            log(f"  vmem-guest status: {res['agent']}")
        if "pages_in_device" in res:
            moved = {
                k: out["workload"]["pages_in_device"].get(k, 0) - v
                for k, v in res["pages_in_device"].items()
            }
            log(f"  workload pages that left the device's memory since the start: {moved}")

        if agent and res["agent_alive"]:
            # The workload ends: the agent must now converge on the request.
            if res["workload_alive"]:
                stop_workload(vm)
            t1 = time.monotonic()
            try:

                def converged() -> dict[str, Any] | None:
                    view = agent_view(vm)
                    ok = (
                        vm.plugged(DEV) == view["plugged_size"] == p.shrink_to
                        and view["online_size"] == p.shrink_to
                        and view["intent"] is None
                    )
                    return view if ok else None

                final = vm.wait_until(
                    converged, timeout=p.converge_timeout, interval=1.0, what="convergence"
                )
                out["converged"] = {
                    "ok": True,
                    "seconds": time.monotonic() - t1,
                    "agent": final,
                    "mem_total": vm.mem_total(),
                }
                log(
                    f"  workload ended: converged to {fmt_size(p.shrink_to)} in"
                    f" {out['converged']['seconds']:.1f} s"
                )
            except Exception as exc:  # reported; the run fails
                out["converged"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
                log(f"  workload ended: did NOT converge: {out['converged']['error'][:300]}")
            out["agent_alive_at_end"] = not agent_died(vm)
            vm.guest(f"cp {AGENT_LOG} {vm.paths.share}/agent.log")
            if not out["agent_alive_at_end"]:
                out["agent_log"] = agent_log(vm)
            else:
                stop_agent(vm)
    out["wall_s"] = time.monotonic() - t_start
    return out


def problems(result: dict[str, Any]) -> list[str]:
    """What makes the run fail: the agent disagreeing with QEMU or sysfs, a dead workload
    or agent, no convergence once the workload ended. (The ratio is never a failure.)"""
    out: list[str] = []
    p = result["params"]
    for driver, r in result["drivers"].items():
        after = r["after"]
        if not after["workload_alive"]:
            out.append(f"{driver}: the workload died (OOM kills in dmesg: {after['dmesg']['oom']})")
        if after["pinned_blocks_offline"]:
            out.append(
                f"{driver}: memory blocks holding pinned pages are offline:"
                f" {after['pinned_blocks_offline']}"
            )
        if driver != "vmem_guest":
            continue
        if not after["agent_alive"]:
            out.append("vmem_guest: the agent died under pressure")
            continue
        a, check = after["agent"], after["check"]
        if a["plugged_size"] != check["qemu_size"]:
            out.append(
                f"vmem_guest: reports plugged {a['plugged_size']}, QEMU's size is"
                f" {check['qemu_size']}"
            )
        if a["online_size"] > a["plugged_size"]:
            out.append(f"vmem_guest: online {a['online_size']} > plugged {a['plugged_size']}")
        if after["region_online_sysfs"] != a["online_size"]:
            out.append(
                f"vmem_guest: reports online {a['online_size']}, sysfs has"
                f" {after['region_online_sysfs']} of the region online"
            )
        if after["region_online_sysfs"] > check["qemu_size"]:
            out.append("vmem_guest: memory online in sysfs that the device has unplugged")
        if check["mem_total"] != r["base_mem_total"] + a["online_size"]:
            out.append(
                f"vmem_guest: MemTotal {check['mem_total']} is not boot"
                f" {r['base_mem_total']} + online {a['online_size']}"
            )
        if a["broken"]:
            out.append("vmem_guest: the device is marked broken")
        if after["qemu_size"] > p["shrink_to"] and a["retries"] == 0:
            out.append("vmem_guest: fell short of the request but counted no retries")
        if not r.get("converged", {}).get("ok"):
            out.append("vmem_guest: did not converge after the workload ended")
        if not r.get("agent_alive_at_end", False):
            out.append("vmem_guest: the agent died after the workload ended")
    return out


def table(result: dict[str, Any]) -> str:
    """Both drivers' figures and the ratio vmem_guest / in-kernel of the unplugged bytes."""
    p = result["params"]
    drivers = result["drivers"]
    lines = [
        f"memory pressure: boot {fmt_size(p['boot_memory'])}, vm0 {fmt_size(p['grow'])} plugged"
        f" ({fmt_size(p['region'])} region, {fmt_size(p['block_size'])} blocks); workload"
        f" mlocked {fmt_size(p['mlocked'])} (a page every {fmt_size(p['pin_stride'])} pinned)"
        f" + anon {fmt_size(p['anon'])} + page cache"
        f" {fmt_size(p['cache'])}; shrink to {fmt_size(p['shrink_to'])}, settle"
        f" {p['settle']:g} s ({result['accel']})",
        f"{'driver':<22} {'QEMU before':>11} {'after':>9} {'unplugged':>10} {'MemTotal':>19}"
        f" {'workload':>9} {'OOM':>4} {'retries':>8} {'pinned blocks':>14}",
    ]
    for driver, r in drivers.items():
        b, a = r["before"], r["after"]
        retries = a["agent"]["retries"] if a.get("agent") else "-"
        mt = f"{fmt_size(b['meminfo']['MemTotal'])}->{fmt_size(a['meminfo']['MemTotal'])}"
        lines.append(
            f"{LABELS[driver]:<22} {fmt_size(b['qemu_size']):>11} {fmt_size(a['qemu_size']):>9}"
            f" {fmt_size(a['unplugged']):>10} {mt:>19}"
            f" {'alive' if a['workload_alive'] else 'DEAD':>9} {a['dmesg']['oom']:>4}"
            f" {retries!s:>8} {len(r['workload']['pinned_device_blocks']):>14}"
        )
    ratio = result.get("ratio")
    if "kernel" in drivers and "vmem_guest" in drivers:
        k = fmt_size(drivers["kernel"]["after"]["unplugged"])
        v = fmt_size(drivers["vmem_guest"]["after"]["unplugged"])
        shown = f"{ratio:.2f}" if ratio is not None else "n/a (the in-kernel driver unplugged 0)"
        lines.append(
            f"unplugged: vmem_guest {v}, in-kernel {k}, ratio vmem_guest/in-kernel {shown}"
        )
    return "\n".join(lines)


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
    if "kernel" in d and "vmem_guest" in d:
        k = d["kernel"]["after"]["unplugged"]
        result["ratio"] = d["vmem_guest"]["after"]["unplugged"] / k if k else None
    result["problems"] = problems(result)
    result["table"] = table(result)
    result["wall_s"] = time.monotonic() - t0
    return result


def parse_args(argv: list[str] | None = None) -> tuple[Params, bool]:
    d = Params()
    ap = argparse.ArgumentParser(
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
    )
    return p, a.json


def main(argv: list[str] | None = None) -> int:
    p, as_json = parse_args(argv)
    stream = sys.stderr if as_json else sys.stdout

    def log(line: str) -> None:
        print(line, file=stream, flush=True)

    result = compare(p, log)
    path = paths.write_bench_result("pressure", result)
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
