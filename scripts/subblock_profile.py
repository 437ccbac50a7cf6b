#!/usr/bin/env python3
"""Where the time of a subblock take goes: the kernel's floor against the agent.

One VM with ``make bench-subblock``'s configuration (both devices plugged to 1 GiB,
``vm0`` in-kernel, ``vm1`` the agent's). Then, on the top 64 MiB of ``vm0``'s top
memory block (32 subblocks of 2 MiB, free pages of an idle guest):

1. the floor: bench/soft_offline_floor.c, compiled static on the host and run in the
   guest over the shared root: per subblock one kpageflags pread, 512
   ``soft_offline_page`` writes, one pread; then 512 ``unpoison-pfn`` writes per
   subblock; no Python anywhere;
2. the same pages taken and given back by ``vmem_guest.pages.take`` / ``give_back``
   over ``ProcPages``, one subblock per call, as the agent's driver calls them;
3. what Python alone costs per page: 512 writes to /dev/null, in a loop or a map();
4. the agent itself, 1 GiB -> 960 MiB on ``vm1`` under cProfile (from just before the
   resize until it exits), timed to QEMU's size; the profile's top entries.

Prints each and writes results/bench/subblock-profile-<time>.json. A measurement, not
a test: it asserts nothing on time.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent import VENV_PYTHON, signal_agent, start_agent, stop_agent
from bench_subblock import (
    AGENT_DEV,
    CONFIG,
    KERNEL_DEV,
    PLUGGED,
    SUBBLOCK,
    TARGET,
    device_bdfs,
    timed_resize,
    wait_agent_settled,
)
from vmharness import TestVM, paths

FLOOR_SOURCE = Path(__file__).resolve().parent.parent / "bench" / "soft_offline_floor.c"
PROFILE = "/run/vmem-agent-subblock.prof"
TAKEN = PLUGGED - TARGET
PAGE = 4096
TOP = 30

#: Guest: take and give back NR subblocks of 2 MiB from FIRST_PFN with vmem_guest.pages,
#: one call per subblock; one JSON line per call.
PYTHON_TAKE = r"""
import json, sys, time
from vmem_guest.pages import ProcPages, give_back, take
first, nr, per = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
pages = ProcPages()
for phase, fn in (("take", take), ("give_back", give_back)):
    for s in range(nr):
        t0 = time.perf_counter()
        fn(pages, first + s * per, per)
        print(json.dumps({"phase": phase, "subblock": s, "seconds": time.perf_counter() - t0}))
print(json.dumps({"phase": "counters", "soft_offline_writes": pages.soft_offline_writes,
                  "flag_reads": pages.flag_reads, "unpoison_writes": pages.unpoison_writes}))
"""

#: Guest: what Python costs per page around the write, with no kernel work behind it:
#: 512 writes of formatted addresses to /dev/null, written by a Python loop or by map().
LOOP_VARIANTS = r"""
import os, time
from itertools import repeat
fd = os.open("/dev/null", os.O_WRONLY)
first = 0x100000
pfns = list(range(first, first + 512))
PS = 4096
def loop():
    addresses = [b"%#x" % (p * PS) for p in pfns]
    pwrite = os.pwrite
    done = 0
    for a in addresses:
        if pwrite(fd, a, 0) != len(a): raise RuntimeError
        done += 1
def mapped():
    addresses = list(map(b"%#x".__mod__, map(PS.__mul__, pfns)))
    it = iter(addresses)
    written = list(map(os.pwrite, repeat(fd, len(addresses)), it, repeat(0, len(addresses))))
    if written != list(map(len, addresses)): raise RuntimeError
def fmt_listcomp():
    [b"%#x" % (p * PS) for p in pfns]
def fmt_map():
    list(map(b"%#x".__mod__, map(PS.__mul__, pfns)))
def bare_map():
    a = b"0x12345000"
    list(map(os.pwrite, repeat(fd, 512), repeat(a, 512), repeat(0, 512)))
for f in (fmt_listcomp, fmt_map, bare_map, loop, mapped, loop, mapped):
    t = time.perf_counter()
    for _ in range(20): f()
    print(f"{f.__name__}: {(time.perf_counter() - t) / 20 * 1e3:.2f} ms per 512", flush=True)
"""

#: Guest: the top TOP entries of a cProfile dump by internal and by cumulative time.
PSTATS = r"""
import io, pstats, sys
for key in ("tottime", "cumulative"):
    buf = io.StringIO()
    pstats.Stats(sys.argv[1], stream=buf).strip_dirs().sort_stats(key).print_stats(int(sys.argv[2]))
    text = buf.getvalue()
    print(f"===== top {sys.argv[2]} by {key} =====")
    print(text[text.find("   ncalls"):].rstrip())
"""


def per_phase(lines: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Total and median seconds per phase over the subblocks."""
    out: dict[str, dict[str, float]] = {}
    for phase in sorted({r["phase"] for r in lines if "subblock" in r}):
        secs = [r["seconds"] for r in lines if r["phase"] == phase and "subblock" in r]
        out[phase] = {"total_s": sum(secs), "median_per_subblock_s": statistics.median(secs)}
        writes = [r["writes_s"] for r in lines if r["phase"] == phase and "writes_s" in r]
        if writes:
            out[phase]["writes_total_s"] = sum(writes)
    return out


def run_lines(vm: TestVM, cmd: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in vm.sh(cmd, timeout=600).splitlines() if line.strip()]


def main() -> int:
    result: dict[str, Any] = {"when": datetime.now().isoformat(timespec="seconds")}
    with TestVM(CONFIG) as vm:
        assert vm.paths is not None
        share = vm.paths.share
        binary = share / "soft_offline_floor"
        subprocess.run(["gcc", "-O2", "-static", "-o", str(binary), str(FLOOR_SOURCE)], check=True)
        (share / "python_take.py").write_text(PYTHON_TAKE)
        (share / "pstats_top.py").write_text(PSTATS)
        (share / "loop_variants.py").write_text(LOOP_VARIANTS)
        print(f"VM up in {vm.boot_seconds:.1f} s ({vm.accel})")
        bdfs = device_bdfs(vm)
        result.update(accel=vm.accel, guest_kernel=vm.sh("uname -r").strip())
        vm.sh(f"echo {bdfs[AGENT_DEV]} > /sys/bus/pci/drivers/virtio-pci/unbind")
        start_agent(vm, "prof", [bdfs[AGENT_DEV]], wrapper=f"profile {PROFILE}")
        try:
            total0 = vm.mem_total()
            for dev_id in (KERNEL_DEV, AGENT_DEV):
                vm.resize(dev_id, PLUGGED)
            vm.wait_until(
                lambda: vm.mem_total() == total0 + 2 * PLUGGED, timeout=300, what="the plug"
            )
            wait_agent_settled(vm, 0)
            time.sleep(3)
            memaddr = int(vm.query()[KERNEL_DEV]["memaddr"])
            first_pfn = (memaddr + PLUGGED - TAKEN) // PAGE
            nr, per = TAKEN // SUBBLOCK, SUBBLOCK // PAGE
            floor = run_lines(vm, f"{binary} {first_pfn} {nr} {per}")
            result["floor"] = {"lines": floor, "phases": per_phase(floor)}
            print("floor (C, no Python):", json.dumps(result["floor"]["phases"]))
            print("  ", [r for r in floor if r["phase"] == "einval_writes"])
            print(
                "   free pages before, first subblocks:", [r.get("free_before") for r in floor[:4]]
            )
            py = run_lines(vm, f"{VENV_PYTHON} {share}/python_take.py {first_pfn} {nr} {per}")
            result["python"] = {"lines": py, "phases": per_phase(py)}
            print("vmem_guest.pages take/give_back:", json.dumps(result["python"]["phases"]))
            print("  ", py[-1])
            variants = vm.sh(f"{VENV_PYTHON} {share}/loop_variants.py", timeout=300)
            result["python_loop_variants"] = variants
            print("Python per 512 writes to /dev/null:\n" + variants)
            base = vm.meminfo().get("HardwareCorrupted", 0)
            signal_agent(vm, "prof", "USR1")
            r = timed_resize(vm, AGENT_DEV, TARGET, "HardwareCorrupted", base + TAKEN)
            wait_agent_settled(vm, TAKEN)
            result["agent_profiled_shrink"] = r
            print(f"agent under cProfile, 1G -> 960M: QEMU size {r['qemu']:.3f} s")
        finally:
            stop_agent(vm, "prof")
        text = vm.sh(f"{VENV_PYTHON} {share}/pstats_top.py {PROFILE} {TOP}", timeout=120)
        result["pstats"] = text
        print(text)
        result["run_dir"] = str(vm.paths.run_dir)
    print(f"wrote {paths.write_bench_result('subblock-profile', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
