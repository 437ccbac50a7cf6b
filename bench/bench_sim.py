"""Benchmark: the device model, and the planner + driver core that drives it.

``make bench-sim`` runs this. It prints figures; it passes or fails nothing.
What each line measures:

1. ``device model``: requests/s through :class:`VirtioMemDevice` into the
   :class:`DeviceModel` (encode, QEMU's checks, parse and validate the
   response). No transport, no tracker, no planner: the ceiling for the model.
   These are bench/bench_model.py's workloads, run from here. Aim: >= 20,000/s.
2. ``simulation``: :class:`vmem_guest.sim.runner.Simulation` resizing a region
   from 0 to all of it and back to 0, as ``vmem-guest sim`` does: per driver
   step the planner runs once on a fresh tracker snapshot, then one request
   (PLUG/UNPLUG) or one probe+online / offline on the fake kernel, each
   written to the tracker file (mmap, tmpfs or disk under $TMPDIR). Printed:
   driver steps/s (steps that did something: requests, onlines, offlines),
   planner calls/s, requests/s end to end, and the share of the time spent
   inside ``planner.next_step``.
3. ``planner alone``: :func:`planner.next_step` on one fixed PlanInput of the
   same region (no tracker, no device): empty region growing, every unit
   online and settled (Done), every unit online and shrinking to 0.

    .venv/bin/python bench/bench_sim.py [--seconds 1.0] [--region 64G] [--block-size 2M]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench_model

from vmem_guest import planner
from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.device import DeviceConfig
from vmem_guest.sim.device_model import usable_region_for
from vmem_guest.sim.runner import SimOptions, Simulation
from vmem_guest.units import parse_size

MiB = 1 << 20
MEMORY_BLOCK = 128 * MiB
ADDR = 4 << 30


class CountingPlanner:
    """Wraps ``planner.next_step`` (which the driver looks up at each call)."""

    def __init__(self) -> None:
        self.real = planner.next_step
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, inp: planner.PlanInput) -> planner.Step:
        start = time.perf_counter()
        try:
            return self.real(inp)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def __enter__(self) -> CountingPlanner:
        planner.next_step = self  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        planner.next_step = self.real


#: The issue's aim for requests/s through the device model.
TARGET_REQUESTS_PER_SECOND = 20_000


def bench_model_requests(seconds: float) -> None:
    rates = []
    for name in bench_model.WORKLOADS:
        rate = bench_model.requests_per_second(name, seconds)
        rates.append(rate)
        print(f"device model    {name:<40} {rate:>12,.0f} requests/s")
    slowest = min(rates)
    verdict = "above" if slowest >= TARGET_REQUESTS_PER_SECOND else "BELOW"
    print(
        f"device model    slowest workload {slowest:,.0f} requests/s: {verdict} the "
        f"{TARGET_REQUESTS_PER_SECOND:,}/s aim"
    )


def bench_simulation(region: int, block_size: int) -> None:
    options = SimOptions(region_size=region, block_size=block_size, memory_block_size=MEMORY_BLOCK)
    with (
        tempfile.TemporaryDirectory(prefix="bench-sim-") as state_dir,
        Simulation(options, Path(state_dir)) as sim,
    ):
        for requested in (region, 0):
            with CountingPlanner() as counter:
                start = time.perf_counter()
                report = sim.resize(requested)
                elapsed = time.perf_counter() - start
            label = f"resize to {requested // MiB} MiB"
            if not report.converged:
                raise SystemExit(f"bench_sim: {label} did not converge: {report}")
            print(
                f"simulation      {label:<26} {elapsed:7.2f} s: "
                f"{report.steps:>6} steps {report.steps / elapsed:>9,.0f}/s, "
                f"{counter.calls:>6} planner calls {counter.calls / elapsed:>9,.0f}/s, "
                f"{report.requests:>5} requests {report.requests / elapsed:>9,.0f}/s, "
                f"planner {100 * counter.seconds / elapsed:3.0f}% of the time"
            )


def plan_input(region: int, block_size: int, *, requested: int, full: bool) -> planner.PlanInput:
    """Everything plugged and online (``full``) or nothing, with ``requested``."""
    geometry = Geometry(ADDR, region, block_size, MEMORY_BLOCK)
    nbits = geometry.nr_subblocks
    bitmap = bytearray((nbits + 7) // 8)
    blocks: dict[int, planner.BlockInfo] = {}
    if full:
        bitmap[:] = b"\xff" * len(bitmap)
        if nbits % 8:
            bitmap[-1] = (1 << (nbits % 8)) - 1
        online = planner.BlockInfo(MemoryBlockState.ONLINE, Zone.MOVABLE)
        blocks = dict.fromkeys(geometry.memory_blocks(), online)
    else:
        blocks = dict.fromkeys(
            geometry.memory_blocks(), planner.BlockInfo(MemoryBlockState.UNPLUGGED)
        )
    usable = max(
        usable_region_for(requested, region, block_size), region if full else 0, block_size
    )
    config = DeviceConfig(
        block_size=block_size,
        node_id=0,
        addr=ADDR,
        region_size=region,
        usable_region_size=min(usable, region),
        plugged_size=region if full else 0,
        requested_size=requested,
    )
    return planner.PlanInput(config, geometry, blocks, bytes(bitmap))


def calls_per_second(fn: Callable[[], object], seconds: float) -> float:
    fn()  # warm up (and fill the layout cache)
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        now = time.perf_counter()
        if now - start >= seconds:
            return calls / (now - start)


def bench_planner(region: int, block_size: int, seconds: float) -> None:
    cases = {
        "empty, growing": plan_input(region, block_size, requested=region, full=False),
        "all online, settled (Done)": plan_input(region, block_size, requested=region, full=True),
        "all online, shrinking to 0": plan_input(region, block_size, requested=0, full=True),
    }
    for label, inp in cases.items():
        step = planner.next_step(inp)
        rate = calls_per_second(functools.partial(planner.next_step, inp), seconds)
        print(
            f"planner alone   {label:<26} {rate:>9,.0f} calls/s "
            f"({1e3 / rate:6.2f} ms/call) -> {type(step).__name__}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="device model and driver core benchmark")
    parser.add_argument("--seconds", type=float, default=1.0, help="per timed workload")
    parser.add_argument("--region", default="64G", help="region size for the core (64G)")
    parser.add_argument("--block-size", default="2M", help="device block size (2M)")
    args = parser.parse_args()
    region = parse_size(args.region)
    block_size = parse_size(args.block_size)
    units = region // max(block_size, MEMORY_BLOCK)
    print(
        f"# region {region // MiB} MiB, device block {block_size // MiB} MiB, "
        f"memory block {MEMORY_BLOCK // MiB} MiB: {region // block_size} subblocks, "
        f"{units} units"
    )
    bench_model_requests(args.seconds)
    bench_simulation(region, block_size)
    bench_planner(region, block_size, args.seconds)


if __name__ == "__main__":
    main()
