#!/usr/bin/env python3
"""The idle agent: its memory (RSS) and its wakeups once converged (issue 9, item 5).

One VM per region size (TCG unless KVM was proven to work; 2 vCPUs, 1 GiB boot memory,
in-kernel driver blacklisted, no-IOMMU VFIO) with one virtio-mem device of that size,
2 MiB blocks, ``memory-backend-ram,reserve=off`` (the host reserves nothing for it).
``vmem-guest run --noiommu`` is started as systemd would, the host requests 1 GiB, and
once QEMU's size and MemTotal are there (and 2 s more) the agent is measured:

* memory: ``VmRSS``, ``RssAnon``, ``RssFile``, ``RssShmem`` and ``VmHWM`` from
  ``/proc/PID/status`` (the tracker file is shared memory in /run: its pages count in
  RssShmem once touched), and the tracker file's size;
* wakeups while idle: the agent's context switches (voluntary + involuntary, summed over
  its threads in ``/proc/PID/task/*/status``) over 5 s, as wakeups/s. An agent that blocks
  with no timeout shows 0;
* its CPU seconds (utime + stime from ``/proc/PID/stat``) to start and to converge.

``scripts/bench_scale.py`` runs this after its two drivers and measures its own agent
(two 256 GiB devices, 4 MiB blocks) the same way.

    .venv/bin/python scripts/bench_idle.py [--regions 256G,1T] [--seconds 5] [--json]

Prints a table and writes results/bench/idle-<time>.json (and idle-latest.json).
A benchmark, not a test: nothing here asserts on time or size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent import agent_files, agent_log, log_problems, start_agent, stop_agent
from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig, fmt_size, parse_size, paths
from vmharness.guest_agent import target
from vmharness.watch import watch_resize

REQUESTED = 1 * GiB  #: plugged before the agent is measured
BLOCK = 2 * MiB
IDLE_SECONDS = 5.0
SETTLE_SECONDS = 2.0  #: after convergence, before measuring
TIMEOUT = 900.0
TRACKER_DIR = "/run/vmem-guest"
#: QEMU under TCG gives the guest 40 physical address bits (1 TiB) unless told otherwise;
#: the region, boot memory, slots and the 64-bit PCI hole must fit below 2**phys_bits.
ADDRESS_SPACE_SLACK = 64 * GiB
#: QEMU 7.2 with an AMD vCPU (TCG's ``max``) moves memory above 4 GiB to start at 1 TiB
#: when it would reach AMD's HyperTransport hole at 1 TiB - 12 GiB
#: (``x86_update_above_4g_mem_start``): a 1 TiB region then ends above 2 TiB.
AMD_HT_START = (1 << 40) - 12 * GiB
AMD_ABOVE_1TB_START = 1 << 40


@dataclass(frozen=True)
class IdleFigures:
    """One idle agent, measured from the guest's /proc (bytes, counts, seconds)."""

    vm_rss: int
    rss_anon: int
    rss_file: int
    rss_shmem: int
    vm_hwm: int
    threads: int
    context_switches: int  #: voluntary + involuntary over the window, all threads
    window_s: float
    tracker_bytes: int  #: summed over the agent's tracker files

    @property
    def wakeups_per_s(self) -> float:
        return self.context_switches / self.window_s


def agent_pid(vm: TestVM, tag: str) -> int:
    """The pid of the agent started by bench_agent.start_agent(vm, tag, ...)."""
    return int(vm.read(agent_files(tag)[1]).strip())


def clock_ticks(vm: TestVM) -> int:
    """The guest's USER_HZ (units of utime and stime in /proc/PID/stat)."""
    return int(vm.sh("getconf CLK_TCK").strip())


def cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from a /proc/PID/stat line (all threads of the process)."""
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 on
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def cpu_seconds(vm: TestVM, pid: int, ticks: int) -> float:
    """utime + stime of process pid (all its threads) from /proc/PID/stat, in seconds."""
    return cpu_ticks(vm.read(f"/proc/{pid}/stat")) / ticks


def status_fields(text: str) -> dict[str, int]:
    """The numeric fields of a /proc/PID/status text, kB values in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) in (1, 2) and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def context_switches(vm: TestVM, pid: int) -> tuple[int, int]:
    """(threads, voluntary + involuntary context switches summed over every thread)."""
    text = vm.sh(f"cat /proc/{pid}/task/*/status")
    threads = switches = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Pid":
            threads += 1
        if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            switches += int(value)
    return threads, switches


def tracker_bytes(vm: TestVM) -> int:
    """Total size of the tracker files (``/run/vmem-guest/*.state``)."""
    out = vm.sh(f"stat -c %s {TRACKER_DIR}/*.state 2>/dev/null || true")
    return sum(int(word) for word in out.split())


def measure_idle(vm: TestVM, pid: int, seconds: float = IDLE_SECONDS) -> IdleFigures:
    """The agent's memory now, and its context switches over ``seconds`` of idling.
    The host only reads /proc files meanwhile: nothing reaches the agent."""
    threads, before = context_switches(vm, pid)
    started = time.perf_counter()
    time.sleep(seconds)
    _, after = context_switches(vm, pid)
    window = time.perf_counter() - started
    status = status_fields(vm.read(f"/proc/{pid}/status"))
    return IdleFigures(
        vm_rss=status.get("VmRSS", 0),
        rss_anon=status.get("RssAnon", 0),
        rss_file=status.get("RssFile", 0),
        rss_shmem=status.get("RssShmem", 0),
        vm_hwm=status.get("VmHWM", 0),
        threads=threads,
        context_switches=after - before,
        window_s=window,
        tracker_bytes=tracker_bytes(vm),
    )


def idle_header() -> str:
    return (
        f"{'agent':<34} {'tracker':>9} {'VmRSS':>9} {'RssAnon':>9} {'RssFile':>9}"
        f" {'RssShmem':>9} {'VmHWM':>9} {'wakeups/s':>10}"
    )


def idle_row(label: str, f: IdleFigures) -> str:
    """One table line: sizes in MiB (KiB below 1 MiB), wakeups/s over the window."""

    def mib(n: int) -> str:
        return f"{n / MiB:.1f}M" if n >= MiB or n == 0 else f"{n / 1024:.1f}K"

    return (
        f"{label:<34} {mib(f.tracker_bytes):>9} {mib(f.vm_rss):>9} {mib(f.rss_anon):>9}"
        f" {mib(f.rss_file):>9} {mib(f.rss_shmem):>9} {mib(f.vm_hwm):>9}"
        f" {f.wakeups_per_s:>10.2f}"
    )


def phys_bits_for(boot_memory: int, region: int) -> int | None:
    """Physical address bits a VM with one region needs (None: QEMU's default, 40)."""
    above_4g = boot_memory + region + ADDRESS_SPACE_SLACK
    need = 4 * GiB + above_4g
    if need >= AMD_HT_START:
        need = AMD_ABOVE_1TB_START + above_4g
    bits = (need - 1).bit_length()
    return bits if bits > 40 else None


def idle_config(region: int) -> VMConfig:
    """One device of ``region`` bytes with 2 MiB blocks, for the agent alone."""
    memory = 1 * GiB
    return VMConfig(
        name=f"bench-idle-{fmt_size(region)}",
        cpus=2,
        memory=memory,
        in_kernel_driver=False,
        noiommu=True,
        devices=(MemDevice("vm0", size=region, block_size=BLOCK, reserve=False),),
        phys_bits=phys_bits_for(memory, region),
    )


def measure_region(region: int, seconds: float) -> dict[str, Any]:
    """Boot, start the agent, plug REQUESTED, converge, measure the idle agent."""
    cfg = idle_config(region)
    with TestVM(cfg) as vm:
        assert vm.paths is not None
        print(
            f"{fmt_size(region)} region: VM up in {vm.boot_seconds:.1f} s ({vm.accel});"
            f" logs: {vm.paths.run_dir}",
            flush=True,
        )
        ticks = clock_ticks(vm)
        base_total = vm.mem_total()
        tag = "idle"
        t_start = time.perf_counter()
        start_agent(vm, tag, [])
        pid = agent_pid(vm, tag)
        start_s = time.perf_counter() - t_start
        cpu_start = cpu_seconds(vm, pid, ticks)
        try:
            goal = target(REQUESTED, BLOCK)
            watch = watch_resize(
                vm,
                {"vm0": REQUESTED},
                {"vm0": goal},
                base_total + goal,
                timeout=TIMEOUT,
                progress=lambda t, sizes, total: print(
                    f"  ... {t:.0f} s: QEMU size {fmt_size(sizes.get('vm0', 0))},"
                    f" MemTotal +{fmt_size(total - base_total)}",
                    flush=True,
                ),
            )
            time.sleep(SETTLE_SECONDS)
            cpu_converged = cpu_seconds(vm, pid, ticks)
            idle = measure_idle(vm, pid, seconds)
            cpu_idle = cpu_seconds(vm, pid, ticks) - cpu_converged
        except Exception:
            print(agent_log(vm, tag))
            raise
        finally:
            stop_agent(vm, tag)
        problems = log_problems(vm.sh(f"cat {agent_files(tag)[0]}"))
        return {
            "region": region,
            "block_size": BLOCK,
            "requested": REQUESTED,
            "phys_bits": cfg.phys_bits,
            "accel": vm.accel,
            "agent_start_s": start_s,
            "agent_cpu_start_s": cpu_start,
            "agent_cpu_converge_s": cpu_converged - cpu_start,
            "agent_cpu_idle_s": cpu_idle,
            "converge_qemu_s": watch.qemu_s,
            "converge_memtotal_s": watch.memtotal_s,
            "idle": {**asdict(idle), "wakeups_per_s": idle.wakeups_per_s},
            "agent_log_problems": problems,
            "run_dir": str(vm.paths.run_dir),
        }


def idle_table(runs: list[dict[str, Any]]) -> list[str]:
    """The idle table for bench_idle's own runs."""
    lines = [
        f"idle agent: vmem-guest run --noiommu, one device, {fmt_size(REQUESTED)} plugged and"
        f" converged; wakeups = context switches over {runs[0]['idle']['window_s']:.1f} s"
        if runs
        else "idle agent: no runs",
        idle_header(),
    ]
    for r in runs:
        figures = IdleFigures(**{k: v for k, v in r["idle"].items() if k != "wakeups_per_s"})
        label = f"{fmt_size(r['region'])} region, {fmt_size(r['block_size'])} blocks"
        lines.append(idle_row(label, figures))
    for r in runs:
        lines.append(
            f"  {fmt_size(r['region'])}: agent up in {r['agent_start_s']:.1f} s"
            f" ({r['agent_cpu_start_s']:.2f} CPU s), {fmt_size(r['requested'])} converged in"
            f" {r['converge_qemu_s']:.2f} s (QEMU size) / {r['converge_memtotal_s']:.2f} s"
            f" (MemTotal), {r['agent_cpu_converge_s']:.2f} CPU s;"
            f" CPU while idle {r['agent_cpu_idle_s']:.2f} s"
        )
    return lines


def run(regions: list[int], seconds: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Measure every region size in its own VM; return the runs and the table lines."""
    runs = [measure_region(region, seconds) for region in regions]
    return runs, idle_table(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regions", default="256G,1T", help="region sizes (%(default)s)")
    parser.add_argument("--seconds", type=float, default=IDLE_SECONDS, help="idle window")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    regions = [parse_size(s) for s in args.regions.split(",")]
    runs, lines = run(regions, args.seconds)
    result = {"runs": runs, "table": "\n".join(lines)}
    print(json.dumps(result, indent=2) if args.json else "\n" + result["table"])
    path = paths.write_bench_result("idle", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
