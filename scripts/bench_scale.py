#!/usr/bin/env python3
"""``make bench-scale``: the seed's own example, vmem_guest against the in-kernel driver.

Two guests, one per driver, booted alike (TCG unless KVM was proven to work): the same
guest kernel and QEMU, 2 vCPUs, 2 GiB boot memory on two NUMA nodes, and two
``virtio-mem-pci`` devices with 256 GiB regions and 4 MiB blocks, ``vm0`` on node 0 and
``vm1`` on node 1, each backed by ``memory-backend-ram,reserve=off`` (the host reserves
nothing for 512 GiB it does not have; only what the guest touches is allocated),
``maxmem`` = 2 GiB + 512 GiB:

* in-kernel: ``memhp_default_state=online_movable``, the kernel's ``virtio_mem`` driver;
* vmem_guest, tuned boot (``agent``): the same ``memhp_default_state=online_movable`` and
  ``secretmem.enable=1``, ``initcall_blacklist=virtio_mem_driver_init`` and no-IOMMU VFIO,
  the agent ``vmem-guest run --noiommu`` (all devices, log level info) started as systemd
  would, and timed from the first step on once it has attached both devices;
* vmem_guest, README set-up (``readme``): the in-kernel driver kept off and
  ``vfio.enable_unsafe_noiommu_mode=1``, nothing else (the agent sets
  ``auto_online_blocks`` itself while it serves). As a user sees it: the first step's
  ``qom-set`` comes first and the agent is started right after it, so the first step's
  figures include the agent's start-up (``run`` to both devices attached).

Steps (the host's ``qom-set requested-size``): vm0 4160M and vm1 3G at once, then vm0 to
40960M, then vm0 to 1024M. Per step and driver:

* time from the first ``qom-set`` to QEMU's ``size`` at the driver's target on every
  resized device (QMP polled every ~5 ms from a thread of its own);
* time to the guest's MemTotal at boot MemTotal + everything plugged (read through the
  guest runner every ~50 ms);
* the ratio vmem_guest / in-kernel of both, each agent run against the same in-kernel run;
* the agent's CPU seconds in the step: utime + stime from ``/proc/PID/stat`` in the guest,
  read before the ``qom-set`` and 1 s after the step converged.

The agent plugs whole 128 MiB memory blocks (userspace can only online a block whole):
for vm0 4160M its target is 4096M, the in-kernel driver's is 4160M; each is timed to
its own target, and the table says so. Then the idle agent: its RSS and wakeups/s once
converged, here (two 256 GiB devices) and, from ``scripts/bench_idle.py``, with one
256 GiB and one 1 TiB device of 2 MiB blocks.

    make bench-scale               # or: .venv/bin/python scripts/bench_scale.py
    .venv/bin/python scripts/bench_scale.py --quick     # 16 GiB regions, small steps

Prints the table, writes results/bench/scale-<time>.json and a PNG next to it (QEMU
size and MemTotal against time, both drivers, one panel per step), and the -latest
copies. A benchmark, not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_idle
import benchplot
from bench_agent import agent_files, agent_log, agent_status, log_problems, start_agent, stop_agent
from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig, fmt_size, host, parse_size, paths
from vmharness.guest_agent import REPO, target
from vmharness.watch import Curve, watch_resize

DEVICE_IDS = ("vm0", "vm1")
REGION = 256 * GiB
QUICK_REGION = 16 * GiB
BLOCK = 4 * MiB
BOOT_MEMORY = 2 * GiB
NUMA_NODES = 2
STEP_TIMEOUT = 900.0
AFTER_STEP_SECONDS = 1.0  #: converged, then this long before the agent's CPU is read
AGENT_TAG = "scale"
DRIVERS = ("kernel", "agent", "readme")
AGENTS = ("agent", "readme")  #: the agent's guests: tuned boot, README set-up
LABELS = {
    "kernel": "in-kernel virtio_mem",
    "agent": "vmem_guest (tuned boot)",
    "readme": "vmem_guest (README set-up)",
}


@dataclass(frozen=True)
class ScaleStep:
    """One host request: requested-size per device (devices not named keep theirs)."""

    name: str
    requested: dict[str, int]


STEPS = (
    ScaleStep("0 -> vm0 4160M + vm1 3G", {"vm0": 4160 * MiB, "vm1": 3 * GiB}),
    ScaleStep("vm0 -> 40960M", {"vm0": 40960 * MiB}),
    ScaleStep("vm0 -> 1024M", {"vm0": 1024 * MiB}),
)
QUICK_STEPS = (
    ScaleStep("0 -> vm0 576M + vm1 256M", {"vm0": 576 * MiB, "vm1": 256 * MiB}),
    ScaleStep("vm0 -> 1536M", {"vm0": 1536 * MiB}),
    ScaleStep("vm0 -> 128M", {"vm0": 128 * MiB}),
)


def scale_config(driver: str, region: int, readme_extra: tuple[str, ...] = ()) -> VMConfig:
    """The guest for one driver; everything but the driver's switches is the same.
    ``readme_extra``: kernel command line words added to the README guest's (to measure
    what one boot flag buys)."""
    return VMConfig(
        name=f"bench-scale-{driver}",
        cpus=2,
        memory=BOOT_MEMORY,
        numa_nodes=NUMA_NODES,
        in_kernel_driver=driver == "kernel",
        noiommu=driver in AGENTS,
        # The README asks for neither memhp_default_state= nor secretmem.enable=1.
        secretmem=driver == "agent",
        # The tuned agent's kernel onlines new memory as the in-kernel driver's does
        # (that one needs it): each block is added and onlined by one probe write.
        extra_cmdline=("memhp_default_state=online_movable",)
        if driver == "agent"
        else readme_extra
        if driver == "readme"
        else (),
        devices=tuple(
            MemDevice(dev, size=region, block_size=BLOCK, node=node, reserve=False)
            for node, dev in enumerate(DEVICE_IDS)
        ),
    )


def driver_targets(driver: str, requested: dict[str, int]) -> dict[str, int]:
    """What each driver plugs for ``requested``: the in-kernel driver all of it (4 MiB
    blocks), the agent whole 128 MiB memory blocks."""
    if driver == "kernel":
        return dict(requested)
    return {dev: target(size, BLOCK) for dev, size in requested.items()}


def qemu_version() -> str:
    """The first line of ``qemu-system-x86_64 --version`` (the QEMU both guests run)."""
    exe = host.find_qemu()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return version.stdout.splitlines()[0] if version.stdout else exe


def run_step(
    vm: TestVM,
    driver: str,
    step: ScaleStep,
    plugged: dict[str, int],
    base_total: int,
    timeout: float,
    cpu: Callable[[], float] | None,
    after_request: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One step: qom-set, watch QEMU and MemTotal converge, the agent's CPU seconds.
    ``plugged`` (device -> target so far) is updated; ``cpu`` reads the agent's CPU
    seconds (None for the in-kernel driver; 0 before the agent runs);
    ``after_request`` runs right after the qom-set, inside the timing."""
    targets = driver_targets(driver, step.requested)
    plugged.update(targets)
    memtotal_target = base_total + sum(plugged.values())
    cpu_before = cpu() if cpu else None
    print(
        f"{LABELS[driver]}: {step.name}{' (the agent starts now)' if after_request else ''}"
        " (targets "
        + ", ".join(f"{d} {fmt_size(t)}" for d, t in targets.items())
        + f"; timeout {timeout:.0f} s)",
        flush=True,
    )

    def progress(elapsed: float, sizes: dict[str, int], total: int) -> None:
        spent = f", agent CPU {cpu() - cpu_before:.1f} s" if cpu else ""
        print(
            f"  ... {elapsed:5.0f} s: QEMU "
            + ", ".join(f"{d} {fmt_size(s)}" for d, s in sizes.items())
            + f"; MemTotal +{fmt_size(total - base_total)}{spent}",
            flush=True,
        )

    watch = watch_resize(
        vm,
        step.requested,
        targets,
        memtotal_target,
        timeout=timeout,
        progress=progress,
        after_request=after_request,
    )
    cpu_s = None
    if cpu:
        time.sleep(AFTER_STEP_SECONDS)
        cpu_s = cpu() - cpu_before
    settled = (
        ""
        if watch.memtotal_exact
        else f" (settled at +{fmt_size(watch.memtotal_final - base_total)}, not the target)"
    )
    print(
        f"  QEMU size {watch.qemu_s:.3f} s, MemTotal {watch.memtotal_s:.3f} s{settled}"
        + (f", agent CPU {cpu_s:.2f} s" if cpu_s is not None else ""),
        flush=True,
    )
    return {
        "step": step.name,
        "requested": step.requested,
        "targets": targets,
        "plugged_after": dict(plugged),
        "memtotal_target": memtotal_target,
        "agent_cpu_s": cpu_s,
        **watch.as_dict(),
    }


def run_driver(
    driver: str,
    region: int,
    steps: tuple[ScaleStep, ...],
    timeout: float,
    agent_env: str = "",
    readme_extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Boot the driver's guest, run every step, measure the idle agent; the record.
    ``agent_env``: the agent's environment (``PYTHONPATH=...`` runs another tree)."""
    cfg = scale_config(driver, region, readme_extra)
    # The two guests run one after the other: what else loads the host shows here.
    out: dict[str, Any] = {"driver": LABELS[driver], "host_load_at_boot": os.getloadavg()}
    with TestVM(cfg) as vm:
        assert vm.paths is not None
        print(
            f"{LABELS[driver]}: VM up in {vm.boot_seconds:.1f} s ({vm.accel}; host load"
            f" {out['host_load_at_boot'][0]:.2f}); logs: {vm.paths.run_dir}",
            flush=True,
        )
        base_total = vm.mem_total()
        out.update(
            accel=vm.accel,
            kernel=str(vm.paths.kernel),
            guest_kernel=vm.sh("uname -r").strip(),
            cmdline=vm.read("/proc/cmdline").strip(),
            qemu_cmdline=(vm.paths.run_dir / "qemu-cmdline.txt").read_text().strip(),
            base_memtotal=base_total,
            run_dir=str(vm.paths.run_dir),
        )
        cpu: Callable[[], float] | None = None
        agent: dict[str, Any] = {}

        def launch() -> None:
            """Start the agent; how long until it answered, its pid."""
            t_start = time.perf_counter()
            start_agent(vm, AGENT_TAG, [], env=agent_env)
            agent["start_s"] = time.perf_counter() - t_start
            agent["pid"] = bench_idle.agent_pid(vm, AGENT_TAG)

        if driver in AGENTS:
            ticks = bench_idle.clock_ticks(vm)

            def cpu() -> float:
                if "pid" not in agent:
                    return 0.0  # not started yet: it starts inside the first step
                return bench_idle.cpu_seconds(vm, agent["pid"], ticks)

        if driver == "agent":
            launch()  # timed from the first step on once attached
            out["agent_cpu_start_s"] = cpu()
        plugged = dict.fromkeys(DEVICE_IDS, 0)
        out["steps"] = []
        try:
            for index, step in enumerate(steps):
                starts = launch if driver == "readme" and index == 0 else None
                out["steps"].append(
                    run_step(vm, driver, step, plugged, base_total, timeout, cpu, starts)
                )
            out["agent_start_s"] = agent.get("start_s")
            if driver == "agent":
                idle = bench_idle.measure_idle(vm, agent["pid"])
                out["idle"] = {**asdict(idle), "wakeups_per_s": idle.wakeups_per_s}
            if driver in AGENTS:
                out["final_status"] = agent_status(vm)
        except Exception:
            if driver in AGENTS:
                print(agent_log(vm, AGENT_TAG))
            raise
        finally:
            if "pid" in agent:
                stop_agent(vm, AGENT_TAG)
        out["host_load_at_end"] = os.getloadavg()
        if driver in AGENTS:
            log = vm.sh(f"cat {agent_files(AGENT_TAG)[0]}")
            out["agent_log_lines"] = len(log.splitlines())
            out["agent_log_problems"] = log_problems(log)
            out["online_paths"] = sorted(set(re.findall(r"new memory blocks: (.*)", log)))
    return out


def ratio(agent: float | None, kernel: float | None) -> str:
    if agent is None or kernel is None or kernel <= 0:
        return "-"
    return f"{agent / kernel:.2f}"


def scale_table(result: dict[str, Any]) -> list[str]:
    """The per-step table: every driver, both end points, each agent's ratio to the
    in-kernel run and its CPU seconds."""
    runs = result["drivers"]
    kernel = runs.get("kernel")
    agents = [d for d in AGENTS if d in runs]
    names = [s["step"] for s in next(iter(runs.values()))["steps"]]
    short = {"agent": "tuned", "readme": "README"}
    header = f"{'step':<28} {'until':<10} {'in-kernel s':>12}"
    for d in agents:
        header += f" {short[d] + ' s':>9} {'ratio':>6} {'CPU s':>6}"
    lines = [
        f"bench-scale: 2 x virtio-mem-pci, {fmt_size(result['region'])} regions,"
        f" {fmt_size(BLOCK)} blocks, 2 NUMA nodes, {fmt_size(BOOT_MEMORY)} boot memory"
        f" ({result['accel']}; one guest per driver; QMP polled every ~5 ms)",
        header,
    ]
    if result.get("agent_src"):
        lines.insert(1, f"the agent from {result['agent_src']}")
    if result.get("readme_cmdline"):
        lines.insert(1, f"README guest booted with {' '.join(result['readme_cmdline'])} too")
    for i, name in enumerate(names):
        for key, until in (("qemu_s", "QEMU size"), ("memtotal_s", "MemTotal")):
            kv = kernel["steps"][i][key] if kernel else None
            row = f"{name if key == 'qemu_s' else '':<28} {until:<10}"
            row += f" {f'{kv:.3f}' if kv is not None else '-':>12}"
            for d in agents:
                step = runs[d]["steps"][i]
                av = step[key]
                cpu = step["agent_cpu_s"] if key == "qemu_s" else None
                row += f" {av:>9.3f} {ratio(av, kv):>6}"
                row += f" {f'{cpu:.2f}' if cpu is not None else '':>6}"
            lines.append(row)
    lines.append(
        "ratio = vmem_guest / in-kernel, same step, same end point (goal: <= 1.0); tuned:"
        " memhp_default_state=online_movable secretmem.enable=1, timed once attached;"
        " README: neither, the agent started right after the first qom-set (its start-up"
        " is in the first step)."
    )
    lines.append(
        "host load average (1 min) at boot / at the end: "
        + "; ".join(
            f"{LABELS[d]} {r['host_load_at_boot'][0]:.2f} / {r['host_load_at_end'][0]:.2f}"
            for d, r in runs.items()
        )
    )
    for driver, run in runs.items():
        base = run["base_memtotal"]
        notes = [
            f"{s['step']}: MemTotal settled at +{fmt_size(s['memtotal_final'] - base)}"
            f" (expected +{fmt_size(s['memtotal_target'] - base)})"
            for s in run["steps"]
            if not s["memtotal_exact"]
        ]
        targets = "; ".join(
            f"{s['step']}: " + ", ".join(f"{d} {fmt_size(t)}" for d, t in s["targets"].items())
            for s in run["steps"]
        )
        lines.append(f"{LABELS[driver]} targets: {targets}")
        lines.extend(f"  NOTE {n}" for n in notes)
    for d in agents:
        run = runs[d]
        problems = run["agent_log_problems"]
        lines.append(
            f"{LABELS[d]}: run -> ready (both devices attached) {run['agent_start_s']:.2f} s;"
            f" new blocks: {'; '.join(run['online_paths']) or '?'}; log"
            f" {run['agent_log_lines']} lines, "
            + (
                f"{len(problems)} warnings/errors (see JSON)"
                if problems
                else "no warnings or errors"
            )
        )
    return lines


def idle_lines(result: dict[str, Any]) -> list[str]:
    """The idle agent: this run's (two devices) and bench_idle's (one device each)."""
    lines: list[str] = []
    agent = result["drivers"].get("agent")
    if agent and "idle" in agent:
        idle = bench_idle.IdleFigures(
            **{k: v for k, v in agent["idle"].items() if k != "wakeups_per_s"}
        )
        lines += [
            f"idle agent after the last step (wakeups = context switches over"
            f" {idle.window_s:.1f} s)",
            bench_idle.idle_header(),
            bench_idle.idle_row(
                f"2 x {fmt_size(result['region'])} region, {fmt_size(BLOCK)} blocks", idle
            ),
        ]
    if result.get("idle_table"):
        lines += ["", *result["idle_table"]]
    return lines


def step_panels(result: dict[str, Any]) -> list[benchplot.Panel]:
    """One panel per step: total plugged size (QEMU) and MemTotal - boot MemTotal against
    time, both drivers."""
    runs = result["drivers"]
    first = next(iter(runs.values()))
    panels = []
    for i, step in enumerate(first["steps"]):
        lines: list[benchplot.Line] = []
        marks: list[tuple[float, str]] = []
        for driver, run in runs.items():
            s = run["steps"][i]
            resized = [Curve(c["t"], c["bytes"], c["end"]) for c in s["curves"]["size"].values()]
            others = sum(v for d, v in s["plugged_after"].items() if d not in s["targets"])
            total = Curve.total(resized)
            mem = s["curves"]["memtotal"]
            lines += benchplot.time_lines(
                LABELS[driver],
                total.times,
                [v + others for v in total.values],
                total.end,
                mem["t"],
                mem["bytes"],
                mem["end"],
                run["base_memtotal"],
            )
            goal = sum(s["plugged_after"].values()) / GiB
            if all(abs(goal - m[0]) > 1e-9 for m in marks):
                marks.append((goal, f"{LABELS[driver]} target {goal:.3g} GiB"))
        title = step["step"] + "".join(
            f"\n{LABELS[d]}: QEMU {r['steps'][i]['qemu_s']:.2f} s,"
            f" MemTotal {r['steps'][i]['memtotal_s']:.2f} s"
            for d, r in runs.items()
        )
        panels.append(
            benchplot.Panel(title, lines, ylabel="GiB plugged (all devices)", marks=marks)
        )
    return panels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 GiB regions, small steps")
    parser.add_argument("--region", help="region size per device (default 256G; 16G with --quick)")
    parser.add_argument("--drivers", default=",".join(DRIVERS), help="%(default)s")
    parser.add_argument("--timeout", type=float, default=STEP_TIMEOUT, help="per step, seconds")
    parser.add_argument(
        "--idle-regions",
        help="bench_idle.py region sizes, each in its own VM, after both drivers"
        " (default 256G,1T; none with --quick; '' for none)",
    )
    parser.add_argument(
        "--agent-src", help="run the agent from this source tree (PYTHONPATH; a before/after)"
    )
    parser.add_argument(
        "--readme-cmdline",
        default="",
        help="kernel command line words added to the README guest (what one flag buys)",
    )
    args = parser.parse_args()
    agent_env = f"PYTHONPATH={Path(args.agent_src).resolve()}" if args.agent_src else ""
    readme_extra = tuple(args.readme_cmdline.split())
    region = parse_size(args.region) if args.region else QUICK_REGION if args.quick else REGION
    steps = QUICK_STEPS if args.quick else STEPS
    drivers = [d for d in args.drivers.split(",") if d]
    if any(d not in DRIVERS for d in drivers):
        parser.error(f"--drivers: choose from {', '.join(DRIVERS)}")
    idle_spec = (
        args.idle_regions if args.idle_regions is not None else "" if args.quick else "256G,1T"
    )
    idle_regions = [parse_size(s) for s in idle_spec.split(",") if s]

    # A user's install holds bytecode (pip and dpkg compile at install); the guest's root
    # is read-only, so without this every agent start compiles each module again, in
    # the README agent's first step.
    for tree in (REPO, *([Path(args.agent_src)] if args.agent_src else [])):
        compileall.compile_dir(tree / "vmem_guest", quiet=1)
    t_start = time.time()
    result: dict[str, Any] = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "region": region,
        "block_size": BLOCK,
        "boot_memory": BOOT_MEMORY,
        "qemu": qemu_version(),
        "agent_src": args.agent_src,
        "readme_cmdline": readme_extra,
        "drivers": {},
    }
    for driver in drivers:
        result["drivers"][driver] = run_driver(
            driver, region, steps, args.timeout, agent_env, readme_extra
        )
    runs = result["drivers"]
    result["accel"] = ",".join(sorted({r["accel"] for r in runs.values()}))
    kernels = {r["kernel"] for r in runs.values()}
    if len(kernels) != 1:
        print(f"WARNING: the guests ran different kernels: {sorted(kernels)}")
    if idle_regions:
        try:  # the step table is worth having without the idle figures
            idle_runs, result["idle_table"] = bench_idle.run(idle_regions, bench_idle.IDLE_SECONDS)
            result["idle_runs"] = idle_runs
        except Exception as exc:
            result["idle_table"] = [f"bench_idle failed: {type(exc).__name__}: {exc}"]
            print(result["idle_table"][0])
    result["wall_s"] = time.time() - t_start
    if "kernel" in runs:
        result["ratios"] = {
            d: [
                {
                    "step": k["step"],
                    "qemu": a["qemu_s"] / k["qemu_s"],
                    "memtotal": a["memtotal_s"] / k["memtotal_s"],
                }
                for k, a in zip(runs["kernel"]["steps"], runs[d]["steps"], strict=True)
            ]
            for d in AGENTS
            if d in runs
        }
    lines = scale_table(result)
    extra = idle_lines(result)
    table = "\n".join([*lines, *(["", *extra] if extra else [])])
    result["table"] = table
    print("\n" + table)
    path = paths.write_bench_result("scale", result)
    print(f"wrote {path}")
    png = benchplot.save_png(
        path,
        f"bench-scale: 2 x {fmt_size(region)} virtio-mem ({fmt_size(BLOCK)} blocks), 2 NUMA"
        f" nodes, {fmt_size(BOOT_MEMORY)} boot; solid: QEMU size, dashed: MemTotal - boot",
        step_panels(result),
    )
    if png:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
