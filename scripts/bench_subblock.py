#!/usr/bin/env python3
"""``make bench-subblock``: time to unplug 64 MiB out of an online 128 MiB memory block,
and to give it back, vmem_guest against the in-kernel virtio_mem driver.

What it measures. One VM (TCG unless KVM was proven to work): 2 vCPUs, 1 GiB boot
memory, ``memhp_default_state=online_movable``, two identical virtio-mem devices (2 GiB
region, 2 MiB blocks): ``vm0`` stays with the in-kernel driver, ``vm1`` is unbound from
virtio-pci and driven by one ``vmem-guest run --noiommu --device vm1 --log-level debug``.
Both are plugged to 1 GiB (8 memory blocks, all online movable) and left to settle.
Then, RUNS times, interleaved driver by driver with the order rotated:

* shrink 1 GiB -> 960 MiB: 32 subblocks (64 MiB) out of the top online block. The
  in-kernel driver fake-offlines them (``alloc_contig_range``) and UNPLUGs them; the
  agent soft-offlines every 4 KiB page of each subblock, checks HWPOISON in
  /proc/kpageflags, and UNPLUGs it. Nothing else runs in the guest: the pages are free;
* give back 960 MiB -> 1 GiB: the in-kernel driver PLUGs and fake-onlines, the agent
  PLUGs the holes and unpoisons their pages.

Each step is timed from the host's ``qom-set requested-size`` to QEMU's ``size`` at the
target (polled over QMP every ~5 ms), and to the guest's end point (read through the guest
runner every ~50 ms): for the in-kernel driver MemTotal (it adjusts the managed pages),
for the agent HardwareCorrupted (holes stay in MemTotal; their pages count as
poisoned). The giving-back PLUG reaches QEMU's size before the agent has unpoisoned a
page: for the give-back the guest end point is the figure that says "usable again".

Besides the medians and the ratio vmem_guest / in-kernel, the agent's own counters:
soft-offline writes, /proc/kpageflags reads and unpoison writes per 2 MiB subblock (the
agent runs under a small wrapper that reads the counters ``ProcPages`` keeps, on SIGUSR2,
between steps; nothing is wrapped on the hot path), and where its time went, from the
timestamps of its debug log (millisecond resolution): soft offline with its page-flag
checks, the UNPLUG or PLUG requests, the unpoisoning, and the planner, tracker and loop
between them.

Prints a table and writes results/bench/subblock-<time>.json (and subblock-latest.json).
A benchmark, not a test: nothing here asserts on time; it exits 1 only when the scenario
did not happen as described (holes, HardwareCorrupted or MemTotal not as expected).
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent import BDF_SCRIPT, VENV_PYTHON, stats
from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig, paths
from vmharness.guest_agent import (
    CONTROL_SOCKET,
    status_devices,
    wait_for_control_socket,
)

RUNS = 5
PLUGGED = 1 * GiB
TARGET = 960 * MiB
SUBBLOCK = 2 * MiB
REGION = 2 * GiB
TIMEOUT = 300.0
SETTLE = 5.0  #: seconds of quiet after the plug, before the first measured step
QMP_INTERVAL = 0.005  #: sleep between QMP polls of QEMU's size
MEMINFO_INTERVAL = 0.05  #: /proc/meminfo is read through the guest runner: coarser
KERNEL_DEV, AGENT_DEV = "vm0", "vm1"
AGENT_LOG = "/run/vmem-agent-subblock.log"
AGENT_PID = "/run/vmem-agent-subblock.pid"
COUNTERS = "/run/vmem-agent-subblock.counters"
LABELS = {"kernel": "in-kernel virtio_mem", "agent": "vmem_guest agent"}
#: The guest end point of each driver: the /proc/meminfo field that shows the step done.
GUEST_FIELD = {"kernel": "MemTotal", "agent": "HardwareCorrupted"}
STEPS = (("1G->960M", TARGET), ("960M->1G", PLUGGED))

CONFIG = VMConfig(
    name="bench-subblock",
    cpus=2,
    memory=1 * GiB,
    in_kernel_driver=True,
    noiommu=True,
    devices=tuple(MemDevice(d, size=REGION, block_size=SUBBLOCK) for d in (KERNEL_DEV, AGENT_DEV)),
)

#: Guest: run ``vmem-guest`` (argv[2:]) with the page-level counters that ProcPages keeps
#: reachable: every ProcPages made is remembered, and SIGUSR2 appends their summed
#: counters to OUT (argv[1]) as a JSON line. Nothing on the agent's hot path is wrapped.
WRAPPER_SCRIPT = r"""
import json, signal, sys
out = sys.argv[1]
sys.argv = ["vmem-guest", *sys.argv[2:]]
from vmem_guest import cli, pages
made = []
init = pages.ProcPages.__init__
def remember(self, *args, **kwargs):
    init(self, *args, **kwargs)
    made.append(self)
pages.ProcPages.__init__ = remember
KEYS = ("soft_offline_writes", "flag_reads", "unpoison_writes")
def dump(signum, frame):
    with open(out, "a") as f:
        f.write(json.dumps({k: sum(getattr(p, k) for p in made) for k in KEYS}) + "\n")
signal.signal(signal.SIGUSR2, dump)
try:
    cli.main()
except SystemExit:
    pass
"""

#: A debug line of the agent's tracker: its time and what it recorded.
TRACKER_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG vmem_guest\.tracker\.\S+: "
    r"(taking|intent UNPLUG|intent PLUG|unplugged|plugged|given back) addr="
)
#: What the agent did between two consecutive tracker lines (the earlier, the later).
PHASES = {
    ("taking", "intent UNPLUG"): "soft offline + page-flag checks",
    ("intent UNPLUG", "unplugged"): "UNPLUG requests + their tracker records",
    ("intent PLUG", "plugged"): "PLUG requests + their tracker records",
    ("plugged", "given back"): "unpoison (give back)",
}
BETWEEN = "planner, tracker, loop"


def device_bdfs(vm: TestVM) -> dict[str, str]:
    """QEMU device id -> guest PCI address (the in-kernel driver names each region)."""
    assert vm.paths is not None
    script = vm.paths.share / "bdfs.py"
    script.write_text(BDF_SCRIPT)
    by_addr = {int(a): b for a, b in json.loads(vm.sh(f"python3 -S {script}")).items()}
    query = vm.query()
    return {d: by_addr[int(query[d]["memaddr"])] for d in (KERNEL_DEV, AGENT_DEV)}


def start_agent(vm: TestVM, bdf: str) -> None:
    """The agent on ``bdf`` alone, under WRAPPER_SCRIPT, debug log; wait for its socket."""
    assert vm.paths is not None
    script = vm.paths.share / "agent_counters.py"
    script.write_text(WRAPPER_SCRIPT)
    vm.sh(
        f"rm -f {CONTROL_SOCKET} {COUNTERS}; setsid {VENV_PYTHON} {script} {COUNTERS}"
        f" run --noiommu --device {shlex.quote(bdf)} --log-level debug"
        f" >{AGENT_LOG} 2>&1 </dev/null & echo $! >{AGENT_PID}"
    )
    wait_for_control_socket(vm, lambda: agent_died(vm))
    if agent_died(vm):
        raise RuntimeError("the agent died at start:\n" + vm.guest(f"tail -n 40 {AGENT_LOG}")[1])


def agent_died(vm: TestVM) -> bool:
    return vm.guest(f"kill -0 $(cat {AGENT_PID})")[0] != 0


def stop_agent(vm: TestVM) -> None:
    vm.guest(f"kill -TERM $(cat {AGENT_PID})")
    vm.wait_until(lambda: agent_died(vm), timeout=60, what="the agent to exit")


def agent_counters(vm: TestVM) -> dict[str, int]:
    """The agent's page-level system calls so far (SIGUSR2 to the wrapper)."""
    before = len(vm.read(COUNTERS).splitlines()) if vm.guest(f"test -e {COUNTERS}")[0] == 0 else 0
    vm.sh(f"kill -USR2 $(cat {AGENT_PID})")
    vm.wait_until(
        lambda: (
            vm.guest(f"test -e {COUNTERS}")[0] == 0 and len(vm.read(COUNTERS).splitlines()) > before
        ),
        timeout=30,
        what="the agent's counters",
    )
    counters: dict[str, int] = json.loads(vm.read(COUNTERS).splitlines()[-1])
    return counters


def agent_device(vm: TestVM) -> dict[str, Any]:
    (dev,) = status_devices(vm)
    assert isinstance(dev, dict)
    return dev


def wait_agent_settled(vm: TestVM, holes: int) -> dict[str, Any]:
    """Until the agent's status shows nothing in flight and ``holes`` bytes of holes."""

    def settled() -> dict[str, Any] | None:
        dev = agent_device(vm)
        busy = dev["intent"] is not None or any("o" in b["subblocks"] for b in dev["holed_blocks"])
        return dev if not busy and dev["hole_bytes"] == holes else None

    dev = vm.wait_until(settled, timeout=TIMEOUT, interval=0.5, what="the agent to settle")
    assert dev is not None
    return dev


def timed_resize(vm: TestVM, dev_id: str, target: int, field: str, want: int) -> dict[str, float]:
    """qom-set, then poll QEMU's size fast and /proc/meminfo ``field`` coarsely until QEMU's
    size is ``target`` and the field is ``want``; seconds to each."""
    t_qemu = t_guest = None
    next_guest = 0.0
    t0 = time.perf_counter()
    vm.resize(dev_id, target)
    while t_qemu is None or t_guest is None:
        now = time.perf_counter() - t0
        if now > TIMEOUT:
            raise TimeoutError(f"{dev_id}: resize to {target} not done after {TIMEOUT} s")
        if t_qemu is None and vm.plugged(dev_id) == target:
            t_qemu = time.perf_counter() - t0
        if t_guest is None and (t_qemu is not None or now >= next_guest):
            next_guest = now + MEMINFO_INTERVAL
            if vm.meminfo().get(field, 0) == want:
                t_guest = time.perf_counter() - t0
        if t_qemu is None:
            time.sleep(QMP_INTERVAL)
    return {"qemu": t_qemu, "guest": t_guest}


def log_phases(lines: list[str]) -> dict[str, float]:
    """Seconds the agent spent per phase (PHASES), from its tracker's debug lines; the
    ``window`` from the first such line to the last."""
    marks = [
        (datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp(), m[2])
        for m in map(TRACKER_LINE.match, lines)
        if m
    ]
    out: dict[str, float] = {name: 0.0 for name in (*PHASES.values(), BETWEEN)}
    for (t0, a), (t1, b) in itertools.pairwise(marks):
        name = PHASES.get((a, b), BETWEEN)
        out[name] += t1 - t0
    out["window"] = marks[-1][0] - marks[0][0] if marks else 0.0
    return out


def expected_guest(driver: str, step: str, base: dict[str, int]) -> int:
    """The guest end point's value once ``step`` is done (see GUEST_FIELD)."""
    field = GUEST_FIELD[driver]
    taken = PLUGGED - TARGET if step == "1G->960M" else 0
    return base[field] - taken if driver == "kernel" else base[field] + taken


def one_step(
    vm: TestVM, driver: str, step: str, target: int, base: dict[str, int]
) -> dict[str, Any]:
    """Time one step of one driver; for the agent also its counters and log phases."""
    dev_id = KERNEL_DEV if driver == "kernel" else AGENT_DEV
    field = GUEST_FIELD[driver]
    agent = driver == "agent"
    if agent:
        counters0 = agent_counters(vm)
        lines0 = len(vm.read(AGENT_LOG).splitlines())
    r: dict[str, Any] = dict(
        timed_resize(vm, dev_id, target, field, expected_guest(driver, step, base))
    )
    if agent:
        dev = wait_agent_settled(vm, PLUGGED - target)
        counters = agent_counters(vm)
        r["counters"] = {k: counters[k] - counters0[k] for k in counters}
        r["phases"] = log_phases(vm.read(AGENT_LOG).splitlines()[lines0:])
        r["status"] = {k: dev[k] for k in ("plugged_size", "online_size", "hole_bytes")}
    info = vm.meminfo()
    r["meminfo"] = {k: info.get(k, 0) for k in ("MemTotal", "HardwareCorrupted")}
    return r


def measure(
    vm: TestVM, base: dict[str, int], log: Callable[[str], None]
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """RUNS x (shrink, give back) for both drivers, interleaved run by run (order rotated)
    so that a change in host load hits both alike. ``base``: MemTotal and
    HardwareCorrupted with both devices at 1 GiB."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {d: {s: [] for s, _ in STEPS} for d in LABELS}
    order = list(LABELS)
    for run in range(RUNS):
        for driver in order[run % 2 :] + order[: run % 2]:
            for step, target in STEPS:
                r = one_step(vm, driver, step, target, base)
                out[driver][step].append(r)
                log(
                    f"  run {run + 1} {LABELS[driver]:<22} {step}: QEMU size {r['qemu']:.3f} s,"
                    f" {GUEST_FIELD[driver]} {r['guest']:.3f} s"
                )
                time.sleep(0.3)
    return out


def check_runs(runs: dict[str, dict[str, list[dict[str, Any]]]], base: dict[str, int]) -> list[str]:
    """The scenario as described: the agent's 64 MiB are holes in one online block after
    the shrink (MemTotal unchanged, HardwareCorrupted +64 MiB), none after the give-back;
    the in-kernel driver's MemTotal down by 64 MiB, then back."""
    problems = []
    taken = PLUGGED - TARGET
    for step, _ in STEPS:
        shrink = step == "1G->960M"
        for i, r in enumerate(runs["agent"][step]):
            want = taken if shrink else 0
            corrupted = r["meminfo"]["HardwareCorrupted"] - base["HardwareCorrupted"]
            got = (r["status"]["hole_bytes"], corrupted)
            if got != (want, want) or r["meminfo"]["MemTotal"] != base["MemTotal"]:
                problems.append(f"agent run {i + 1} {step}: holes, HardwareCorrupted {got}")
        for i, r in enumerate(runs["kernel"][step]):
            want_total = base["MemTotal"] - (taken if shrink else 0)
            if r["meminfo"]["MemTotal"] != want_total:
                problems.append(f"in-kernel run {i + 1} {step}: MemTotal {r['meminfo']}")
    return problems


def per_subblock(runs: list[dict[str, Any]], key: str) -> float:
    """Median over runs of the agent's ``key`` counter per 2 MiB subblock moved."""
    count = (PLUGGED - TARGET) // SUBBLOCK
    return float(statistics.median(r["counters"][key] / count for r in runs))


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Medians and spreads per driver, step and end point; ratios agent / in-kernel."""
    out: dict[str, Any] = {}
    for driver, steps in runs.items():
        out[driver] = {
            step: {side: stats([r[side] for r in rs]) for side in ("qemu", "guest")}
            for step, rs in steps.items()
        }
    out["ratios"] = {
        f"{step} {side}": out["agent"][step][side]["median"] / out["kernel"][step][side]["median"]
        for step, _ in STEPS
        for side in ("qemu", "guest")
    }
    agent = runs["agent"]
    out["per_subblock"] = {
        "soft_offline_writes": per_subblock(agent["1G->960M"], "soft_offline_writes"),
        "flag_reads_shrink": per_subblock(agent["1G->960M"], "flag_reads"),
        "unpoison_writes": per_subblock(agent["960M->1G"], "unpoison_writes"),
        "flag_reads_give_back": per_subblock(agent["960M->1G"], "flag_reads"),
    }
    out["phases"] = {
        step: {
            name: statistics.median(r["phases"][name] for r in agent[step])
            for name in agent[step][0]["phases"]
        }
        for step, _ in STEPS
    }
    return out


def table(result: dict[str, Any]) -> str:
    """The figures: time per driver, step and end point; ratios; the agent's costs."""
    s = result["summary"]
    lines = [
        f"unplug 64 MiB out of an online 128 MiB block (1 GiB plugged -> 960 MiB) and give it"
        f" back (-> 1 GiB): {RUNS} runs each, interleaved ({result['accel']}, one VM,"
        f" 2 MiB blocks, idle guest)",
        f"{'driver':<22} {'step':<9} {'until':<18} {'median s':>9} {'min':>7} {'max':>7}"
        f" {'spread':>7} {'ratio':>6}  runs",
    ]
    for step, _ in STEPS:
        for side in ("qemu", "guest"):
            for driver in LABELS:
                st = s[driver][step][side]
                until = "QEMU size" if side == "qemu" else GUEST_FIELD[driver]
                ratio = s["ratios"][f"{step} {side}"] if driver == "agent" else 1.0
                runs = " ".join(f"{v:.3f}" for v in st["runs"])
                lines.append(
                    f"{LABELS[driver]:<22} {step:<9} {until:<18} {st['median']:>9.3f}"
                    f" {st['min']:>7.3f} {st['max']:>7.3f} {st['spread']:>7.3f}"
                    f" {ratio:>6.2f}  {runs}"
                )
        lines.append("")
    p = s["per_subblock"]
    lines += [
        "ratio = vmem_guest median / in-kernel median, same step and end point. Guest end"
        " point: the in-kernel driver's MemTotal, the agent's HardwareCorrupted (its holes"
        " stay in MemTotal).",
        f"vmem_guest per 2 MiB subblock (median of runs): soft-offline writes"
        f" {p['soft_offline_writes']:.1f} (512 = one per 4 KiB page), kpageflags reads"
        f" {p['flag_reads_shrink']:.1f}; give-back: unpoison writes {p['unpoison_writes']:.1f},"
        f" kpageflags reads {p['flag_reads_give_back']:.1f}",
        "where vmem_guest's time went (debug log timestamps, ms resolution; median of runs):",
    ]
    for step, _ in STEPS:
        ph = s["phases"][step]
        window = ph["window"] or 1.0
        parts = ", ".join(
            f"{name} {secs:.3f} s ({secs / window * 100:.0f} %)"
            for name, secs in ph.items()
            if name != "window" and secs > 0
        )
        # The give-back's PLUG reaches QEMU's size before a page is unpoisoned.
        side, until = (
            ("qemu", "QEMU size") if step == "1G->960M" else ("guest", "HardwareCorrupted")
        )
        host = s["agent"][step][side]["median"]
        lines.append(
            f"  {step} ({until} median {host:.3f} s): busy {ph['window']:.3f} s from its first"
            f" to its last tracker record: {parts}"
        )
    return "\n".join(lines)


def main() -> int:
    """Boot, plug, settle, measure; print the table; write the JSON."""
    t_start = time.time()
    result: dict[str, Any] = {"when": datetime.now().isoformat(timespec="seconds")}
    with TestVM(CONFIG) as vm:
        assert vm.paths is not None
        print(f"VM up in {vm.boot_seconds:.1f} s ({vm.accel}); logs: {vm.paths.run_dir}")
        bdfs = device_bdfs(vm)
        result.update(accel=vm.accel, devices=bdfs, guest_kernel=vm.sh("uname -r").strip())
        vm.sh(f"echo {bdfs[AGENT_DEV]} > /sys/bus/pci/drivers/virtio-pci/unbind")
        start_agent(vm, bdfs[AGENT_DEV])
        try:
            total0 = vm.mem_total()
            for dev_id in (KERNEL_DEV, AGENT_DEV):
                vm.resize(dev_id, PLUGGED)
            vm.wait_until(
                lambda: vm.mem_total() == total0 + 2 * PLUGGED, timeout=TIMEOUT, what="the plug"
            )
            wait_agent_settled(vm, 0)
            time.sleep(SETTLE)
            base = {k: vm.meminfo().get(k, 0) for k in ("MemTotal", "HardwareCorrupted")}
            print(f"plugged 1 GiB on each device; {RUNS} runs per driver and step")
            runs = measure(vm, base, lambda line: print(line, flush=True))
        finally:
            vm.guest(f"cp {AGENT_LOG} {vm.paths.share}/agent.log")
            stop_agent(vm)
        result["run_dir"] = str(vm.paths.run_dir)
    result["runs"] = runs
    result["summary"] = summarize(runs)
    result["base_meminfo"] = base
    result["problems"] = check_runs(runs, base)
    result["wall_s"] = time.time() - t_start
    result["table"] = table(result)
    print("\n" + result["table"])
    for problem in result["problems"]:
        print(f"PROBLEM: {problem}")
    print(f"wrote {paths.write_bench_result('subblock', result)}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
