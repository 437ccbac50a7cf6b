#!/usr/bin/env python3
"""``make bench``: vmem_guest against the in-kernel virtio_mem driver, in one VM.

One VM (TCG unless KVM was proven to work): 2 vCPUs, 1 GiB boot memory,
``memhp_default_state=online_movable`` (the in-kernel driver is on) and
``vfio.enable_unsafe_noiommu_mode=1``, with five identical virtio-mem devices
(4.5 GiB region, 2 MiB blocks, requested 0 at boot; every region starts on a 128 MiB
boundary, so 4 GiB is 32 whole memory blocks for both drivers):

* ``vm0``: the in-kernel driver, as booted.
* ``vm1``..``vm4`` are unbound from virtio-pci; the agent binds them to vfio-pci.
* ``vm1`` and ``vm2``: one ``vmem-guest run --noiommu --device vm1 --device vm2``
  (log level info), idle on one device while the other is measured. For ``vm1`` the
  kernel's ``auto_online_blocks`` stays ``online_movable``: the kernel onlines each block
  inside the agent's ``probe`` write, the agent finds it online and records it. For
  ``vm2`` it is set to ``offline`` during its turn: the agent onlines every block itself.
* ``vm3``: one 0 -> 4 GiB plug with the agent under cProfile, started (SIGUSR1 to a
  small wrapper that imports vmem_guest first) just before the resize; pstats printed in
  the guest. Its times are not timings: the profiler slows Python down.
* ``vm4``: the agent with wall-clock timers (no profiler) around its sysfs, device,
  tracker and planner calls, exclusive of each other: first plug (probe + online),
  unplug, plug of present blocks (online only), unplug.

vm0, vm1 and vm2 each go 0 -> 4 GiB -> 0 three times, interleaved run by run with the
order rotated. Time is taken from ``qom-set requested-size`` to QEMU's ``size`` reaching
the target (QMP polled every ~5 ms) and, separately, to the guest's MemTotal reaching
base + target (read every ~50 ms through the guest runner: coarser). Every device not
being measured is at 0.

Not like for like, and said so in the output: userspace cannot remove a memory block,
so only the agent's first plug of a device probes (adds) its blocks; later plugs find
them present and only online them, and its unplugs offline without removing. The
in-kernel driver adds and removes the blocks every time.

Every measured resize also records QEMU's size and MemTotal against time (a point per
change); the PNG next to the JSON shows them, one panel per step and run, all three
rows (in-kernel, agent with and without auto-online) side by side.

Prints a table and writes results/bench/agent-<time>.json (and agent-latest.json), and
the PNG, results/bench/agent-<time>.png (and agent-latest.png).
A benchmark, not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchplot
from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig, paths
from vmharness.guest_agent import REPO, VMEM_GUEST, status_devices, wait_for_control_socket
from vmharness.sizes import fmt_size
from vmharness.watch import Curve

RUNS = 3
TARGET = 4 * GiB
REGION = TARGET + 512 * MiB
TIMEOUT = 300.0
QMP_INTERVAL = 0.005  #: sleep between QMP polls of QEMU's size
MEMTOTAL_INTERVAL = 0.05  #: MemTotal is read through the guest runner: coarser
MEMORY_BLOCK = 128 * MiB
VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")
MEM = "/sys/devices/system/memory"
PROFILE = "/run/agent.prof"

DEVICES = ("vm0", "vm1", "vm2", "vm3", "vm4")
CONFIG = VMConfig(
    name="bench-agent",
    cpus=2,
    memory=1 * GiB,
    in_kernel_driver=True,
    noiommu=True,
    devices=tuple(MemDevice(d, size=REGION, block_size=2 * MiB) for d in DEVICES),
)

#: Guest: which PCI function owns which virtio-mem region (the in-kernel driver names its
#: region resource in /proc/iomem after the virtio device, virtioN).
BDF_SCRIPT = r"""
import json, os, re
out = {}
for line in open("/proc/iomem"):
    if line.startswith(" "):
        continue
    rng, _, name = line.strip().partition(" : ")
    if re.fullmatch(r"virtio\d+", name):
        start = int(rng.split("-")[0], 16)
        out[start] = os.path.basename(os.path.realpath(f"/sys/bus/virtio/devices/{name}/.."))
print(json.dumps(out))
"""

#: Guest: run ``vmem-guest`` (argv[3:]) with its modules imported up front, then either
#: cProfile (mode "profile") or wall-clock timers around the agent's calls (mode "timers",
#: exclusive times, no profiler). SIGUSR1 (re)starts measuring, SIGUSR2 appends the timers
#: so far to OUT as a JSON line; the profile is dumped to OUT when the agent exits.
WRAPPER_SCRIPT = r"""
import cProfile, functools, json, signal, sys, time
mode, out = sys.argv[1], sys.argv[2]
sys.argv = ["vmem-guest", *sys.argv[3:]]
from vmem_guest import agent, attach, cli, device, driver, hotplug, planner, service, tracker
prof = cProfile.Profile()
timers = {}
stack = []
def wrap(owner, name, key):
    fn = getattr(owner, name)
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        frame = [time.perf_counter(), 0.0]
        stack.append(frame)
        try:
            return fn(*args, **kwargs)
        finally:
            stack.pop()
            elapsed = time.perf_counter() - frame[0]
            entry = timers.setdefault(key, [0, 0.0])
            entry[0] += 1
            entry[1] += elapsed - frame[1]  # exclusive of wrapped callees
            if stack:
                stack[-1][1] += elapsed
    setattr(owner, name, timed)
if mode == "timers":
    wrap(agent.Agent, "_drive_devices", "python: agent loop, driver steps")
    wrap(agent.Agent, "_interrupt", "interrupt + config re-read")
    wrap(driver.DeviceDriver, "plan_input", "python: tracker snapshot -> plan input")
    wrap(planner, "next_step", "python: planner.next_step")
    for name in ("plug", "unplug", "state", "unplug_all"):
        wrap(device.VirtioMemDevice, name, "device request round trip")
    wrap(hotplug.SysfsMemory, "probe", "sysfs: probe write")
    wrap(hotplug.SysfsMemory, "online", "sysfs: online write")
    wrap(hotplug.SysfsMemory, "offline", "sysfs: offline write")
    wrap(hotplug.SysfsMemory, "block", "sysfs: memoryN state/zone/node reads")
    wrap(hotplug.SysfsMemory, "state", "sysfs: memoryN state/zone/node reads")
    wrap(hotplug.SysfsMemory, "node", "sysfs: memoryN state/zone/node reads")
    wrap(hotplug.SysfsMemory, "auto_online_blocks", "sysfs: auto_online_blocks read")
    wrap(hotplug.SysfsMemory, "block_size", "sysfs: block_size_bytes read")
    for name in ("set_intent", "clear_intent", "record_plugged", "record_unplugged",
                 "record_present", "record_online", "record_offline", "set_remainder",
                 "count_requests", "count_retry", "set_device_info"):
        wrap(tracker.Tracker, name, "tracker writes")
def start(signum, frame):
    timers.clear()
    if mode == "profile":
        prof.enable()
def dump(signum, frame):
    with open(out, "a") as f:
        f.write(json.dumps(timers) + "\n")
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, dump)
try:
    cli.main()
except SystemExit:
    pass
finally:
    if mode == "profile":
        prof.disable()
        prof.dump_stats(out)
"""

#: Guest: print a cProfile dump (top N by cumulative and by total time) and a JSON
#: summary of where the agent's working time went.
PROFILE_SCRIPT = r"""
import io, json, pstats, sys
path, top = sys.argv[1], int(sys.argv[2])
for key in ("cumulative", "tottime"):
    buf = io.StringIO()
    pstats.Stats(path, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
    text = buf.getvalue()
    print(f"===== agent under cProfile during the plug: top {top} by {key} =====")
    print(text[text.find("   ncalls"):].rstrip())
raw = pstats.Stats(path).stats
def cum(file_end, func):
    hits = [v for k, v in raw.items() if k[0].endswith(file_end) and k[2] == func]
    return {"calls": hits[0][1], "cumulative": hits[0][3], "total": hits[0][2]} if hits else None
def called_from(name, caller_file, caller_func):
    # time in builtin `name` when called from caller (pstats keeps per-caller totals)
    for k, v in raw.items():
        if k[0] == "~" and k[2] == name:
            for ck, cv in v[4].items():
                if ck[0].endswith(caller_file) and ck[2] == caller_func:
                    return {"calls": cv[1], "cumulative": cv[3], "total": cv[3]}
    return None
summary = {
    "drive_devices": cum("vmem_guest/agent.py", "_drive_devices"),
    "interrupt": cum("vmem_guest/agent.py", "_interrupt"),
    "driver_step": cum("vmem_guest/driver.py", "step"),
    "planner_next_step": cum("vmem_guest/planner.py", "next_step"),
    "plan_input": cum("vmem_guest/driver.py", "plan_input"),
    "tracker_snapshot": cum("vmem_guest/tracker/owner.py", "snapshot"),
    "device_request": cum("vmem_guest/driver.py", "request"),
    "online_block": cum("vmem_guest/driver.py", "online_block"),
    "sysfs_probe": cum("vmem_guest/hotplug.py", "probe"),
    "sysfs_online": cum("vmem_guest/hotplug.py", "online"),
    "sysfs_block_read": cum("vmem_guest/hotplug.py", "block"),
    "sysfs_block_size_read": cum("vmem_guest/hotplug.py", "block_size"),
    "sysfs_write_syscall": called_from("<built-in method posix.write>", "sysfs.py", "write_word"),
}
print("JSON " + json.dumps(summary))
"""


def stats(values: list[float]) -> dict[str, Any]:
    """Median, min, max and spread (max - min) of a list of seconds."""
    return {
        "runs": values,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "spread": max(values) - min(values),
    }


def timed_resize(vm: TestVM, dev_id: str, target: int, base_total: int) -> dict[str, Any]:
    """qom-set, then poll QEMU's size fast and MemTotal coarsely until both reached target;
    the size and MemTotal curves (a point per change) come back with the times."""
    t_qemu = t_guest = None
    qmp_polls = mem_polls = 0
    qmp_time = mem_time = 0.0
    next_mem = 0.0
    size_curve, mem_curve = Curve(), Curve()
    size_curve.record(0.0, vm.plugged(dev_id))
    mem_curve.record(0.0, vm.mem_total())
    t0 = time.perf_counter()
    vm.resize(dev_id, target)
    while t_qemu is None or t_guest is None:
        now = time.perf_counter() - t0
        if now > TIMEOUT:
            raise TimeoutError(
                f"{dev_id}: resize to {fmt_size(target)} not done after {TIMEOUT} s "
                f"(QEMU size {fmt_size(vm.plugged(dev_id))}, MemTotal {vm.mem_total()})"
            )
        if t_qemu is None:
            t = time.perf_counter()
            size = vm.plugged(dev_id)
            qmp_time += time.perf_counter() - t
            qmp_polls += 1
            size_curve.record(time.perf_counter() - t0, size)
            if size == target:
                t_qemu = time.perf_counter() - t0
        if t_guest is None and (t_qemu is not None or now >= next_mem):
            t = time.perf_counter()
            total = vm.mem_total()
            mem_time += time.perf_counter() - t
            mem_polls += 1
            mem_curve.record(time.perf_counter() - t0, total)
            next_mem = now + MEMTOTAL_INTERVAL
            if total == base_total + target:
                t_guest = time.perf_counter() - t0
        if t_qemu is None:
            time.sleep(QMP_INTERVAL)
    return {
        "qemu": t_qemu,
        "guest": t_guest,
        "qmp_poll_s": qmp_time / max(qmp_polls, 1),
        "memtotal_read_s": mem_time / max(mem_polls, 1),
        "curves": {"size": size_curve.as_dict(), "memtotal": mem_curve.as_dict()},
    }


def measure(vm: TestVM, rows: list[tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
    """RUNS x (0 -> TARGET, TARGET -> 0) for every (key, device, auto_online_blocks) row,
    interleaved run by run (order rotated) so that a change in host load, or what the
    previous step leaves behind, hits every row alike."""
    samples = {
        key: {step: {"qemu": [], "guest": []} for step in ("0->4G", "4G->0")} for key, _, _ in rows
    }
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {
        key: {"0->4G": [], "4G->0": []} for key, _, _ in rows
    }
    qmp_polls: list[float] = []
    mem_reads: list[float] = []
    for run in range(RUNS):
        # Rotate the order every run: no row always follows the same other row.
        shift = run % len(rows)
        for key, dev_id, auto_online in rows[shift:] + rows[:shift]:
            vm.sh(f"echo {auto_online} > {MEM}/auto_online_blocks")
            base_total = vm.mem_total()
            for step, target in (("0->4G", TARGET), ("4G->0", 0)):
                r = timed_resize(vm, dev_id, target, base_total)
                samples[key][step]["qemu"].append(r["qemu"])
                samples[key][step]["guest"].append(r["guest"])
                curves[key][step].append({**r["curves"], "base_memtotal": base_total})
                qmp_polls.append(r["qmp_poll_s"])
                mem_reads.append(r["memtotal_read_s"])
                print(
                    f"  run {run + 1} {key:<20} {dev_id} {step}: QEMU size {r['qemu']:.3f} s,"
                    f" MemTotal {r['guest']:.3f} s",
                    flush=True,
                )
                time.sleep(0.3)
    vm.sh(f"echo online_movable > {MEM}/auto_online_blocks")
    out: dict[str, dict[str, Any]] = {}
    for key, dev_id, auto_online in rows:
        out[key] = {"device": dev_id, "auto_online_blocks": auto_online}
        for step, sides in samples[key].items():
            out[key][step] = {side: stats(v) for side, v in sides.items()}
    out["_polling"] = {
        "qmp_poll_round_trip_s": statistics.mean(qmp_polls),
        "memtotal_read_s": statistics.mean(mem_reads),
    }
    out["_curves"] = curves
    return out


# ----- the agent in the guest -------------------------------------------------------------


def agent_files(tag: str) -> tuple[str, str]:
    return f"/run/vmem-agent-{tag}.log", f"/run/vmem-agent-{tag}.pid"


def start_agent(vm: TestVM, tag: str, bdfs: list[str], wrapper: str = "") -> None:
    """``vmem-guest run --noiommu --device BDF...`` detached, as systemd would run it; with
    wrapper ("MODE OUT"), under WRAPPER_SCRIPT instead of the console script."""
    log, pid = agent_files(tag)
    if wrapper:
        assert vm.paths is not None
        script = vm.paths.share / "agent_wrapper.py"
        script.write_text(WRAPPER_SCRIPT)
        prog = f"{VENV_PYTHON} {script} {wrapper}"
    else:
        prog = VMEM_GUEST
    devices = " ".join(f"--device {shlex.quote(b)}" for b in bdfs)
    vm.sh(
        f"setsid {prog} run --noiommu {devices} --log-level info"
        f" >{log} 2>&1 </dev/null & echo $! >{pid}"
    )
    wait_for_control_socket(vm, lambda: agent_died(vm, tag))
    if agent_died(vm, tag):
        raise RuntimeError(f"the agent ({tag}) died at start:\n{agent_log(vm, tag)}")


def agent_died(vm: TestVM, tag: str) -> bool:
    return vm.guest(f"kill -0 $(cat {agent_files(tag)[1]})")[0] != 0


def agent_log(vm: TestVM, tag: str, lines: int = 40) -> str:
    return vm.guest(f"tail -n {lines} {agent_files(tag)[0]}")[1]


def signal_agent(vm: TestVM, tag: str, sig: str) -> None:
    vm.sh(f"kill -{sig} $(cat {agent_files(tag)[1]})")


def stop_agent(vm: TestVM, tag: str) -> None:
    """SIGTERM, then wait for the agent (and, under cProfile, the profile dump) to exit."""
    vm.guest(f"kill -TERM $(cat {agent_files(tag)[1]})")
    vm.wait_until(lambda: agent_died(vm, tag), timeout=120, what="the agent to exit")


def agent_status(vm: TestVM) -> dict[str, dict[str, Any]]:
    """``vmem-guest status --json``, the interesting fields, by PCI address."""
    keys = ("plugged_size", "online_size", "requested_size", "broken", "retries", "remainder")
    return {dev["device"]: {k: dev.get(k) for k in keys} for dev in status_devices(vm)}


def log_problems(log: str) -> list[str]:
    words = ("ERROR", "WARNING", "Traceback", "retrying", "broken")
    return [line for line in log.splitlines() if any(w in line for w in words)][:20]


def profile_plug(vm: TestVM, dev_id: str, bdf: str) -> dict[str, Any]:
    """One 0 -> 4 GiB plug (auto-online off) with the agent under cProfile from just before
    the qom-set to its exit; pstats printed in the guest."""
    vm.sh(f"echo offline > {MEM}/auto_online_blocks")
    base_total = vm.mem_total()
    start_agent(vm, "prof", [bdf], wrapper=f"profile {PROFILE}")
    try:
        signal_agent(vm, "prof", "USR1")
        r = timed_resize(vm, dev_id, TARGET, base_total)
    finally:
        stop_agent(vm, "prof")
        vm.sh(f"echo online_movable > {MEM}/auto_online_blocks")
    assert vm.paths is not None
    script = vm.paths.share / "profile_summary.py"
    script.write_text(PROFILE_SCRIPT)
    out = vm.sh(f"{VENV_PYTHON} {script} {PROFILE} 15", timeout=120)
    text, _, js = out.rpartition("JSON ")
    return {
        "device": dev_id,
        "bdf": bdf,
        "auto_online_blocks": "offline",
        "profiled_plug_qemu_s": r["qemu"],
        "profiled_plug_memtotal_s": r["guest"],
        "pstats": text.rstrip(),
        "summary": json.loads(js),
        "agent_log_problems": log_problems(vm.sh(f"cat {agent_files('prof')[0]}")),
    }


def timed_phases(vm: TestVM, dev_id: str, bdf: str) -> list[dict[str, Any]]:
    """Wall-clock timers (no profiler) around the agent's calls, auto-online off:
    first plug (probe + online), unplug, second plug (online only), unplug."""
    out_file = "/run/agent-timers.jsonl"
    vm.sh(f"echo offline > {MEM}/auto_online_blocks; rm -f {out_file}")
    start_agent(vm, "timers", [bdf], wrapper=f"timers {out_file}")
    phases: list[dict[str, Any]] = []
    try:
        for name, target in (
            ("0->4G, first plug (probe + online)", TARGET),
            ("4G->0", 0),
            ("0->4G, blocks present (online only)", TARGET),
            ("4G->0 again", 0),
        ):
            base_total = vm.mem_total() if target else vm.mem_total() - TARGET
            signal_agent(vm, "timers", "USR1")
            r = timed_resize(vm, dev_id, target, base_total)
            time.sleep(0.3)  # let the agent finish its last step (status, remainder)
            signal_agent(vm, "timers", "USR2")
            want = len(phases) + 1
            vm.wait_until(
                lambda n=want: len(vm.read(out_file).splitlines()) >= n,
                timeout=30,
                what="the agent's timers",
            )
            timers = json.loads(vm.read(out_file).splitlines()[-1])
            phases.append({"phase": name, "qemu_s": r["qemu"], "memtotal_s": r["guest"], **timers})
    finally:
        stop_agent(vm, "timers")
        vm.sh(f"echo online_movable > {MEM}/auto_online_blocks")
    return phases


def timers_table(phases: list[dict[str, Any]]) -> list[str]:
    """Where the agent's wall-clock time went, per phase (exclusive times)."""
    lines = [
        "where vmem_guest's time goes (wall clock, no profiler; auto-online off; exclusive"
        " times: a call's time minus the timed calls inside it)",
    ]
    for p in phases:
        cats = {k: v for k, v in p.items() if isinstance(v, list)}
        work = sum(t for _, t in cats.values())
        lines.append(
            f"  {p['phase']}: QEMU size {p['qemu_s']:.3f} s, MemTotal {p['memtotal_s']:.3f} s;"
            f" agent busy {work:.3f} s"
        )
        for key, (calls, secs) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
            if secs < 0.0005:
                continue
            lines.append(
                f"    {key:<42} {secs:7.3f} s {secs / work * 100 if work else 0:5.1f} %"
                f"  {calls:5d} calls {secs / calls * 1000:7.2f} ms/call"
            )
    return lines


def profile_breakdown(p: dict[str, Any]) -> list[str]:
    """Where the profiled plug's time went (cProfile inclusive times, inflated)."""
    s = p["summary"]

    def c(key: str) -> float:
        return float(s[key]["cumulative"]) if s.get(key) else 0.0

    def n(key: str) -> int:
        return int(s[key]["calls"]) if s.get(key) else 0

    def each(key: str) -> str:
        return f"{n(key):4d} calls {c(key) / max(n(key), 1) * 1000:6.1f} ms each"

    work = c("drive_devices") + c("interrupt")
    probe, online, reads = c("sysfs_probe"), c("sysfs_online"), c("sysfs_block_read")
    requests = c("device_request")
    rest = work - probe - online - reads - requests
    return [
        f"cProfile, one 0->4G plug (QEMU size {p['profiled_plug_qemu_s']:.3f} s, MemTotal"
        f" {p['profiled_plug_memtotal_s']:.3f} s under the profiler): agent busy {work:.3f} s",
        f"  sysfs probe writes             {probe:7.3f} s  {each('sysfs_probe')}"
        f" (incl. block_size_bytes reads {c('sysfs_block_size_read'):.3f} s)",
        f"  sysfs online writes            {online:7.3f} s  {each('sysfs_online')}",
        f"  sysfs memoryN reads            {reads:7.3f} s  {each('sysfs_block_read')}",
        f"  device requests                {requests:7.3f} s  {each('device_request')}",
        f"  Python: planner, tracker, loop {rest:7.3f} s  (tracker snapshot"
        f" {c('tracker_snapshot'):.3f} s, planner {c('planner_next_step'):.3f} s,"
        f" {n('driver_step')} steps)",
    ]


LABELS = {
    "kernel": "in-kernel virtio_mem",
    "agent_auto_online": "vmem_guest, auto-online on",
    "agent_no_auto_online": "vmem_guest, auto-online off",
}


def curve_panels(
    curves: dict[str, dict[str, list[dict[str, Any]]]], rows: dict[str, dict[str, Any]]
) -> list[benchplot.Panel]:
    """One panel per run and step (a row of panels per run: 0->4G, 4G->0): QEMU's size
    and MemTotal - base against time, every driver row side by side."""
    panels = []
    for run in range(RUNS):
        for step in ("0->4G", "4G->0"):
            lines: list[benchplot.Line] = []
            title = f"run {run + 1}, {step}"
            for key, by_step in curves.items():
                if run >= len(by_step[step]):
                    continue
                c = by_step[step][run]
                size, mem = c["size"], c["memtotal"]
                lines += benchplot.time_lines(
                    LABELS[key],
                    size["t"],
                    size["bytes"],
                    size["end"],
                    mem["t"],
                    mem["bytes"],
                    mem["end"],
                    c["base_memtotal"],
                )
                s = rows[key][step]
                title += (
                    f"\n{LABELS[key]}: QEMU {s['qemu']['runs'][run]:.2f} s,"
                    f" MemTotal {s['guest']['runs'][run]:.2f} s"
                )
            panels.append(benchplot.Panel(title, lines, ylabel="GiB plugged"))
    return panels


def main() -> int:
    """Run the benchmark; print the table; write the JSON and the PNG."""
    # No options: the VM and the runs are fixed so results stay comparable; --help
    # explains what a run does (a VM and 18 timed resizes) before starting one.
    doc = __doc__ or ""
    argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    t_start = time.time()
    result: dict[str, Any] = {"when": datetime.now().isoformat(timespec="seconds")}
    with TestVM(CONFIG) as vm:
        assert vm.paths is not None
        print(f"VM up in {vm.boot_seconds:.1f} s ({vm.accel}); logs: {vm.paths.run_dir}")
        script = vm.paths.share / "bdfs.py"
        script.write_text(BDF_SCRIPT)
        by_addr = {int(a): b for a, b in json.loads(vm.sh(f"python3 -S {script}")).items()}
        query = vm.query()
        bdfs = {d: by_addr[int(query[d]["memaddr"])] for d in DEVICES}
        print("devices: " + ", ".join(f"{d}={bdfs[d]} @{query[d]['memaddr']:#x}" for d in DEVICES))
        result.update(
            accel=vm.accel,
            qemu=subprocess.run(
                ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
            ).stdout.splitlines()[0],
            kernel=str(vm.paths.kernel),
            guest_kernel=vm.sh("uname -r").strip(),
            cmdline=vm.read("/proc/cmdline").strip(),
            devices={d: {"bdf": bdfs[d], "memaddr": query[d]["memaddr"]} for d in DEVICES},
            vm={
                "cpus": CONFIG.cpus,
                "boot_memory": CONFIG.memory,
                "devices": f"{len(DEVICES)} x virtio-mem-pci, {fmt_size(REGION)} region,"
                " 2 MiB blocks, requested 0 at boot",
            },
        )
        # vm1..vm4 go to the agent: unbind from virtio-pci (the in-kernel driver lets go of
        # an empty device); the agent binds each device it is given to vfio-pci itself.
        for d in DEVICES[1:]:
            vm.sh(f"echo {bdfs[d]} > /sys/bus/pci/drivers/virtio-pci/unbind")
        print(
            "vm0: in-kernel driver; vm1 (auto-online on) and vm2 (auto-online off): one"
            " 'vmem-guest run --noiommu --device vm1 --device vm2' agent, idle between its"
            " turns; runs interleaved"
        )
        start_agent(vm, "main", [bdfs["vm1"], bdfs["vm2"]])
        try:
            rows = measure(
                vm,
                [
                    ("kernel", "vm0", "online_movable"),
                    ("agent_auto_online", "vm1", "online_movable"),
                    ("agent_no_auto_online", "vm2", "offline"),
                ],
            )
            status = agent_status(vm)
        except Exception:
            print(agent_log(vm, "main"))
            raise
        finally:
            stop_agent(vm, "main")
        log = vm.sh(f"cat {agent_files('main')[0]}")
        result["agent"] = {
            "command": f"{VMEM_GUEST} run --noiommu --device {bdfs['vm1']}"
            f" --device {bdfs['vm2']} --log-level info",
            "final_status": status,
            "log_lines": len(log.splitlines()),
            "log_problems": log_problems(log),
        }
        polling = rows.pop("_polling")
        curves = rows.pop("_curves")
        result["rows"] = rows
        result["polling"] = polling
        result["curves"] = curves

        profile: dict[str, Any] | None = None
        phases: list[dict[str, Any]] | None = None
        try:  # the table is worth having without the profile
            print("vm3: one 0 -> 4 GiB plug with the agent under cProfile (auto-online off)")
            profile = profile_plug(vm, "vm3", bdfs["vm3"])
            print("vm4: the agent with wall-clock timers around its calls (auto-online off)")
            phases = timed_phases(vm, "vm4", bdfs["vm4"])
        except Exception as exc:
            print(f"profile failed: {type(exc).__name__}: {exc}")
        result["profile"] = profile
        result["timers"] = phases
        result["run_dir"] = str(vm.paths.run_dir)
    result["wall_s"] = time.time() - t_start

    nblocks = TARGET // MEMORY_BLOCK
    kernel = rows["kernel"]
    lines = [
        f"time to converge, {RUNS} runs each (interleaved), {nblocks} x 128 MiB memory blocks"
        f" ({result['accel']}, one VM; QMP polled every ~{QMP_INTERVAL * 1000:.0f} ms"
        f" + {polling['qmp_poll_round_trip_s'] * 1000:.1f} ms round trip, MemTotal every"
        f" ~{MEMTOTAL_INTERVAL * 1000:.0f} ms + {polling['memtotal_read_s'] * 1000:.1f} ms)",
        f"{'driver':<30} {'step':<6} {'until':<9} {'median s':>9} {'min':>7} {'max':>7}"
        f" {'spread':>7} {'ratio':>6}  runs 1 2 3",
    ]
    ratios: dict[str, dict[str, float]] = {}
    for step in ("0->4G", "4G->0"):
        for side, until in (("qemu", "QEMU size"), ("guest", "MemTotal")):
            ref = kernel[step][side]["median"]
            for key, row in rows.items():
                s = row[step][side]
                ratio = s["median"] / ref
                if key != "kernel":
                    ratios.setdefault(key, {})[f"{step} {side}"] = ratio
                runs = " ".join(f"{v:.3f}" for v in s["runs"])
                lines.append(
                    f"{LABELS[key]:<30} {step:<6} {until:<9} {s['median']:>9.3f}"
                    f" {s['min']:>7.3f} {s['max']:>7.3f} {s['spread']:>7.3f} {ratio:>6.2f}  {runs}"
                )
        lines.append("")
    lines += [
        "ratio = vmem_guest median / in-kernel median, same step and end point (goal: <= 1.0).",
        "Not like for like: the agent's run 1 of 0->4G probes (adds) its 32 blocks; runs 2-3"
        " find them present (userspace cannot remove a block) and only online them, and its"
        " unplug offlines without removing. The in-kernel driver adds and removes every time.",
        "auto-online on: memhp_default_state=online_movable (needed by the in-kernel driver)"
        " makes the kernel online each block inside the agent's probe write; the agent finds"
        " it online and records it. auto-online off: auto_online_blocks=offline during the"
        " agent's turn, the agent onlines (online_movable) itself.",
    ]
    problems = result["agent"]["log_problems"]
    lines.append(
        f"agent log: {result['agent']['log_lines']} lines, "
        + (f"{len(problems)} warnings/errors (see JSON)" if problems else "no warnings or errors")
    )
    result["ratios"] = ratios
    if phases:
        lines += ["", *timers_table(phases)]
    if profile:
        lines += ["", *profile_breakdown(profile)]
    table = "\n".join(lines)
    if profile:
        print("\n" + profile["pstats"])
    print("\n" + table)
    result["table"] = table

    path = paths.write_bench_result("agent", result)
    print(f"wrote {path}")
    png = benchplot.save_png(
        path,
        f"make bench: one VM, 4.5 GiB regions, 2 MiB blocks ({result['accel']});"
        " solid: QEMU size, dashed: MemTotal - MemTotal before the run",
        curve_panels(curves, rows),
        columns=2,
    )
    if png:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
