#!/usr/bin/env python3
"""The zone walk per online and offline (issue 20, lead 3), measured in bench-scale's guests.

Each online (``move_pfn_range_to_zone``) and each offline
(``remove_pfn_range_from_zone``) of a memory block ends in ``set_zone_contiguous``
(Linux 6.1 mm/memory_hotplug.c and mm/page_alloc.c; 6.12 mm/mm_init.c), which walks
the zone pageblock by pageblock from its start until it finds a hole: O(zone span)
per block when the zone has none. The guest kernel has no function tracer
(``CONFIG_FUNCTION_TRACER`` is off in the test kernel), so the walk is timed with
kprobe and kretprobe events (``CONFIG_KPROBE_EVENTS``) in the guest's trace buffer,
beside the kernel work it belongs to: ``online_pages`` and ``offline_pages``, and
the writes or calls that start it (the agent's ``probe_store`` and ``state_store``;
the in-kernel driver's ``add_memory_driver_managed`` and
``offline_and_remove_memory``).

The guests are ``make bench-scale``'s (``bench_scale.scale_config``: the in-kernel
driver's, and the agent's with the tuned boot), stepped as it steps them: vm0 4160M +
vm1 3G (not traced), vm0 -> 40960M and vm0 -> 1024M (traced). Then, with ``--hole``
(in-kernel guest only: the in-kernel driver leaves a block offlined by someone else
alone), the second memory block of vm0 is offlined, which leaves a hole near the start
of ZONE_MOVABLE, and vm0 grows to 40960M again, traced: what the walk costs when it
stops at a hole, the way a userspace driver could keep one.

Per traced step: the step's time to QEMU's size, the walk's calls, total and share of
the step and of the kernel work, and its median per call over the first and the last
tenth of the calls (the zone's span grows or shrinks through the step). A measurement,
not a test: nothing asserts on time.

    .venv/bin/python scripts/zone_walk_profile.py [--driver kernel --driver agent] [--hole]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent import start_agent, stop_agent
from bench_scale import AGENT_TAG, BLOCK, REGION, STEPS, ScaleStep, run_step, scale_config
from vmharness import MiB, TestVM, paths

TRACING = "/sys/kernel/tracing"
WALK = ("walk", "set_zone_contiguous")
#: (event, function) pairs traced in every guest, then per driver.
COMMON = (WALK, ("online", "online_pages"), ("offline", "offline_pages"))
PER_DRIVER = {
    "agent": (("probe", "probe_store"), ("state", "state_store")),
    "kernel": (("add", "add_memory_driver_managed"), ("remove", "offline_and_remove_memory")),
}
TRACE_LINE = re.compile(r"\s(\d+\.\d+): (\w+)_(in|out): ")
REGROW = ScaleStep("vm0 -> 40960M with a hole", {"vm0": 40960 * MiB})


def start_tracing(vm: TestVM, probes: tuple[tuple[str, str], ...]) -> None:
    """kprobe and kretprobe events on ``probes`` in an empty trace buffer (8 MiB a CPU)."""
    vm.guest(f"mountpoint -q {TRACING} || mount -t tracefs nodev {TRACING}")
    defs = "".join(
        f" echo 'p:zw/{e}_in {f}' >> {TRACING}/kprobe_events || echo no kprobe on {f};"
        f" echo 'r:zw/{e}_out {f}' >> {TRACING}/kprobe_events;"
        for e, f in probes
    )
    print(
        vm.sh(
            f"echo 0 > {TRACING}/tracing_on; echo > {TRACING}/trace;"
            f" echo 8192 > {TRACING}/buffer_size_kb;"
            f" echo > {TRACING}/kprobe_events; {defs} echo 1 > {TRACING}/events/zw/enable;"
            f" echo 1 > {TRACING}/tracing_on; cat {TRACING}/kprobe_events"
        ).strip(),
        flush=True,
    )


def stop_tracing(vm: TestVM, probes: tuple[tuple[str, str], ...]) -> dict[str, list[float]]:
    """Each probed function's call durations (seconds, in call order)."""
    text = vm.sh(
        f"echo 0 > {TRACING}/tracing_on; cat {TRACING}/trace;"
        f" echo 0 > {TRACING}/events/zw/enable; echo > {TRACING}/kprobe_events",
        timeout=300,
    )
    durations: dict[str, list[float]] = {e: [] for e, _ in probes}
    entered: dict[str, float] = {}
    for line in text.splitlines():
        found = TRACE_LINE.search(line)
        if found is None:
            continue
        stamp, event, edge = float(found[1]), found[2], found[3]
        if edge == "in":
            entered[event] = stamp
        elif event in entered:
            durations[event].append(stamp - entered.pop(event))
    return durations


def summary(durations: dict[str, list[float]], step_s: float) -> dict[str, Any]:
    """Totals per function; the walk's share of the step and of the kernel's work."""
    totals = {e: round(sum(d), 4) for e, d in durations.items()}
    walk = durations[WALK[0]]
    kernel_work = totals["online"] + totals["offline"]
    tenth = max(1, len(walk) // 10)
    return {
        "step_s": round(step_s, 3),
        "calls": {e: len(d) for e, d in durations.items()},
        "total_s": totals,
        "walk_share_of_step": round(totals["walk"] / step_s, 3) if step_s else None,
        "walk_share_of_online_offline": round(totals["walk"] / kernel_work, 3)
        if kernel_work
        else None,
        "walk_median_ms_first_tenth": round(statistics.median(walk[:tenth]) * 1e3, 3)
        if walk
        else None,
        "walk_median_ms_last_tenth": round(statistics.median(walk[-tenth:]) * 1e3, 3)
        if walk
        else None,
    }


def traced_step(
    vm: TestVM, driver: str, step: ScaleStep, plugged: dict[str, int], base_total: int
) -> dict[str, Any]:
    probes = COMMON + PER_DRIVER[driver]
    start_tracing(vm, probes)
    watched = run_step(vm, driver, step, plugged, base_total, 900.0, None)
    durations = stop_tracing(vm, probes)
    out = summary(durations, watched["qemu_s"])
    print(f"  {step.name}: {json.dumps(out)}", flush=True)
    return {"step": step.name, **out}


def make_hole(vm: TestVM) -> int:
    """Offline vm0's second memory block (ZONE_MOVABLE keeps spanning it: a hole)."""
    first = int(vm.query()["vm0"]["memaddr"]) // (128 * MiB)
    vm.sh(f"echo offline > /sys/devices/system/memory/memory{first + 1}/state")
    return first + 1


def run_driver(driver: str, hole: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"driver": driver, "steps": []}
    with TestVM(scale_config(driver, REGION)) as vm:
        print(f"{driver}: VM up in {vm.boot_seconds:.1f} s ({vm.accel})", flush=True)
        base_total = vm.mem_total()
        out["guest_kernel"] = vm.sh("uname -r").strip()
        if driver == "agent":
            start_agent(vm, AGENT_TAG, [])
        plugged: dict[str, int] = {"vm0": 0, "vm1": 0}
        try:
            run_step(vm, driver, STEPS[0], plugged, base_total, 900.0, None)
            for step in STEPS[1:]:
                out["steps"].append(traced_step(vm, driver, step, plugged, base_total))
            if hole and driver == "kernel":
                out["hole_block"] = make_hole(vm)
                base_total -= 128 * MiB  # the offlined block left MemTotal
                out["steps"].append(traced_step(vm, driver, REGROW, plugged, base_total))
        finally:
            if driver == "agent":
                stop_agent(vm, AGENT_TAG)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--driver", choices=("kernel", "agent"), action="append")
    ap.add_argument("--hole", action="store_true", help="regrow with a hole (in-kernel guest)")
    a = ap.parse_args()
    t0 = time.monotonic()
    result = {
        "block_size": BLOCK,
        "runs": [run_driver(d, a.hole) for d in a.driver or ("kernel", "agent")],
    }
    result["wall_s"] = round(time.monotonic() - t0, 1)
    print(f"wrote {paths.write_bench_result('zone-walk', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
