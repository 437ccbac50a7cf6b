"""Benchmark: the device model, and the planner + driver core that drives it.

``make bench-sim`` runs this. It prints figures; it passes or fails nothing.
What each line measures:

1. ``device model``: requests/s through :class:`VirtioMemDevice` into the
   :class:`DeviceModel` (encode, QEMU's checks, parse and validate the
   response). No transport, no tracker, no planner: the ceiling for the model.
   These are bench/bench_model.py's workloads, run from here. Aim: >= 20,000/s.
2. ``simulation``: :class:`vmem_guest.sim.runner.Simulation` resizing a region
   from 0 to all of it and back to 0, as ``vmem-guest sim`` does: per driver
   step the planner runs once on the tracker owner's live state, then one request
   (PLUG/UNPLUG) or one probe+online / offline on the fake kernel, each
   written to the tracker file (mmap, tmpfs or disk under $TMPDIR). Printed:
   driver steps/s (steps that did something: requests, onlines, offlines),
   planner calls/s, requests/s end to end, and the share of the time spent
   inside ``planner.next_step``.
3. ``planner alone``: :func:`planner.next_step` on one fixed PlanInput of the
   same region (no tracker, no device): empty region growing, every unit
   online and settled (Done), every unit online and shrinking to 0.
4. ``per step vs region``: the cost of one driver step against the size of the
   region (4 GiB, 64 GiB, 256 GiB, 1 TiB, 16 TiB; 2 MiB device blocks, 128 MiB
   memory blocks), over the same change in every region: plug 2 GiB from
   nothing, then unplug those 2 GiB, so the work is the same and only the region
   differs (flat is the goal). A step is one loop of the agent for one device,
   as ``Simulation.converge`` runs it: config interrupt, planner on the tracker,
   one request or one probe+online / offline on the fake kernel, its tracker
   writes. Printed per region: ms per step (planner's share), the ratio to the
   4 GiB region, the tracker file's size, attach time and one full snapshot of
   the tracker (what a reader decodes). Each region gets at most
   ``--scale-seconds`` of stepping: a region that is slow today reports the
   ``n steps in t s`` it managed.

Writes results/bench/sim-<time>.json and a PNG next to it (ms per step against
region size), and the -latest copies.

    .venv/bin/python bench/bench_sim.py [--seconds 1.0] [--region 64G] [--block-size 2M]
                                        [--scale-regions 4G,64G,256G,1T,16T]
                                        [--scale-seconds 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import bench_model

from vmem_guest import planner
from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.device import DeviceConfig
from vmem_guest.driver import Outcome
from vmem_guest.sim.device_model import usable_region_for
from vmem_guest.sim.runner import SimOptions, Simulation
from vmem_guest.units import format_size, parse_size

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import benchplot
from vmharness import paths

MiB = 1 << 20
GiB = 1 << 30
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


#: Region sizes of the per-step benchmark, the change measured in each, its geometry.
SCALE_REGIONS = "4G,64G,256G,1T,16T"
SCALE_CHANGE = 2 * GiB
SCALE_BLOCK = 2 * MiB
SCALE_SECONDS = 30.0  #: stepping time allowed per region (plug and unplug together)
SCALE_MIN_SECONDS = 1.0  #: a region is cycled until this much stepping time is spent...
SCALE_MAX_CYCLES = 20  #: ... or this many plug + unplug cycles ran


@dataclasses.dataclass(frozen=True)
class PhaseCost:
    """One resize of the per-step benchmark: the driver steps it took, their wall time and
    the planner's part of it; ``converged`` False when the time cap ended it first."""

    phase: str
    steps: int
    seconds: float
    planner_seconds: float
    converged: bool

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.steps if self.steps else float("nan")


@dataclasses.dataclass(frozen=True)
class RegionCost:
    """The per-step benchmark in one region."""

    region: int
    attach_s: float  #: Simulation (attach: tracker created, driver started)
    snapshot_s: float | None  #: one full tracker snapshot, as a reader decodes it
    tracker_bytes: int  #: the tracker file(s) in the state directory
    phases: tuple[PhaseCost, ...]
    cycles: int = 1  #: plug + unplug cycles, each in a fresh simulation

    @property
    def ms_per_step(self) -> float:
        """Over all phases: total stepping time / total steps."""
        steps = sum(p.steps for p in self.phases)
        return 1e3 * sum(p.seconds for p in self.phases) / steps if steps else float("nan")


def drive(sim: Simulation, requested: int, phase: str, seconds: float) -> PhaseCost:
    """The host requests ``requested``; then the agent's loop for one device, as
    ``Simulation.converge`` runs it, until Done or ``seconds`` of stepping have passed."""
    sim.channel.host_resize(requested)
    steps = 0
    converged = False
    with CountingPlanner() as counter:
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            sim.driver.interrupt(sim.channel.handle_interrupt())
            result = sim.driver.step()
            if result.outcome is Outcome.DONE:
                converged = True
                break
            if result.outcome is Outcome.BROKEN:
                raise SystemExit(f"bench_sim: {phase}: device broken: {result.detail}")
            if result.outcome is Outcome.WAIT:
                sim.clock.advance(result.wait_seconds)
            else:
                steps += 1
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - start
    return PhaseCost(phase, steps, elapsed, counter.seconds, converged)


def tracker_bytes(state_dir: Path) -> int:
    """Bytes of the tracker file(s): everything in the state directory but the lock
    files and the boot-memory record."""
    return sum(
        f.stat().st_size
        for f in state_dir.rglob("*")
        if f.is_file() and f.suffix != ".lock" and f.name != "boot-memory"
    )


def timed_snapshot(sim: Simulation) -> float | None:
    """One full decode of the tracker file (``Tracker.snapshot``), if the tracker has one."""
    snapshot = getattr(sim.tracker, "snapshot", None)
    if snapshot is None:
        return None
    start = time.perf_counter()
    snapshot()
    return time.perf_counter() - start


def one_cycle(region: int, seconds: float) -> RegionCost:
    """Plug SCALE_CHANGE into a fresh, empty region and unplug it again, each phase given
    half of ``seconds`` (a capped plug leaves less to unplug: still per step)."""
    options = SimOptions(region_size=region, block_size=SCALE_BLOCK, memory_block_size=MEMORY_BLOCK)
    with tempfile.TemporaryDirectory(prefix="bench-sim-scale-") as tmp:
        state_dir = Path(tmp)
        start = time.perf_counter()
        with Simulation(options, state_dir) as sim:
            attach_s = time.perf_counter() - start
            change = format_size(SCALE_CHANGE)
            plug = drive(sim, SCALE_CHANGE, f"plug {change}", seconds / 2)
            unplug = drive(sim, 0, f"unplug {change}", seconds / 2)
            return RegionCost(
                region, attach_s, timed_snapshot(sim), tracker_bytes(state_dir), (plug, unplug)
            )


def region_cost(region: int, seconds: float) -> RegionCost:
    """:func:`one_cycle` in fresh simulations until SCALE_MIN_SECONDS of stepping are spent
    (or SCALE_MAX_CYCLES cycles ran), so that a fast region is timed over more than a few
    milliseconds; the steps and seconds of every cycle added up (the mean per step)."""
    cycles: list[RegionCost] = []
    spent = 0.0
    while spent < min(SCALE_MIN_SECONDS, seconds) and len(cycles) < SCALE_MAX_CYCLES:
        cycle = one_cycle(region, seconds - spent)
        cycles.append(cycle)
        spent += sum(p.seconds for p in cycle.phases)
    phases = tuple(
        PhaseCost(
            first.phase,
            sum(c.phases[i].steps for c in cycles),
            sum(c.phases[i].seconds for c in cycles),
            sum(c.phases[i].planner_seconds for c in cycles),
            all(c.phases[i].converged for c in cycles),
        )
        for i, first in enumerate(cycles[0].phases)
    )
    snapshots = [c.snapshot_s for c in cycles if c.snapshot_s is not None]
    return RegionCost(
        region,
        min(c.attach_s for c in cycles),
        min(snapshots) if snapshots else None,
        cycles[0].tracker_bytes,
        phases,
        len(cycles),
    )


def phase_text(p: PhaseCost) -> str:
    capped = "" if p.converged else " (capped)"
    return f"{p.ms_per_step:8.2f} ms/step ({p.steps:3d} steps in {p.seconds:7.3f} s{capped})"


def bench_scale(regions: list[int], seconds: float) -> list[RegionCost]:
    """Print and return the per-step cost of every region size."""
    print(
        f"per step vs region: plug {format_size(SCALE_CHANGE)} then unplug it, "
        f"{format_size(SCALE_BLOCK)} device blocks, {format_size(MEMORY_BLOCK)} memory blocks,"
        f" at most {seconds:.0f} s of stepping per region; ratio = ms/step / the first region's"
    )
    costs: list[RegionCost] = []
    for region in regions:
        cost = region_cost(region, seconds)
        costs.append(cost)
        ref = costs[0]
        snap = f"{cost.snapshot_s * 1e3:9.2f} ms" if cost.snapshot_s is not None else "      -"
        print(
            f"per step        {format_size(region):>8}: {cost.ms_per_step:8.2f} ms/step,"
            f" ratio {cost.ms_per_step / ref.ms_per_step:6.2f};"
            f" tracker file {cost.tracker_bytes:>10,} bytes; attach {cost.attach_s:7.2f} s;"
            f" full snapshot {snap}; {cost.cycles} cycle(s)",
            flush=True,
        )
        for p in cost.phases:
            planner_share = 100 * p.planner_seconds / p.seconds if p.seconds else 0.0
            ref_phase = next(r for r in ref.phases if r.phase == p.phase)
            print(
                f"                {'':>8}  {p.phase:<12} {phase_text(p)},"
                f" ratio {p.ms_per_step / ref_phase.ms_per_step:6.2f},"
                f" planner {planner_share:3.0f}%",
                flush=True,
            )
    return costs


def scale_panels(costs: list[RegionCost]) -> list[benchplot.Panel]:
    """ms per step against region size (log-log), per phase and overall; ratio to 4 GiB."""
    x = [c.region / GiB for c in costs]
    ticks = [(c.region / GiB, format_size(c.region).removesuffix("iB")) for c in costs]
    phases = [p.phase for p in costs[0].phases]
    lines = [
        benchplot.Line(
            phase,
            x,
            [next(p for p in c.phases if p.phase == phase).ms_per_step for c in costs],
            steps=False,
            markers=True,
        )
        for phase in phases
    ]
    lines.append(
        benchplot.Line("all steps", x, [c.ms_per_step for c in costs], steps=False, markers=True)
    )
    ratio = [
        benchplot.Line(
            "ms/step / first region's",
            x,
            [c.ms_per_step / costs[0].ms_per_step for c in costs],
            steps=False,
            markers=True,
        )
    ]
    return [
        benchplot.Panel(
            f"driver step cost (planner + tracker + model + fake kernel),"
            f" {format_size(SCALE_CHANGE)} plugged and unplugged",
            lines,
            xlabel="region size, GiB",
            ylabel="ms per step",
            xlog=True,
            ylog=True,
            xticks=ticks,
        ),
        benchplot.Panel(
            "ratio to the smallest region (goal: flat, <= 2 at 16 TiB)",
            ratio,
            xlabel="region size, GiB",
            ylabel="ratio",
            xlog=True,
            ylog=True,
            marks=((1.0, "flat"), (2.0, "goal bound")),
            xticks=ticks,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="device model and driver core benchmark")
    parser.add_argument("--seconds", type=float, default=1.0, help="per timed workload")
    parser.add_argument("--region", default="64G", help="region size for the core (64G)")
    parser.add_argument("--block-size", default="2M", help="device block size (2M)")
    parser.add_argument(
        "--scale-regions", default=SCALE_REGIONS, help="per-step benchmark (%(default)s)"
    )
    parser.add_argument(
        "--scale-seconds",
        type=float,
        default=SCALE_SECONDS,
        help="stepping time allowed per region (%(default)s)",
    )
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
    regions = [parse_size(item) for item in args.scale_regions.split(",") if item]
    if not regions:
        return
    costs = bench_scale(regions, args.scale_seconds)
    result: dict[str, Any] = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "change": SCALE_CHANGE,
        "block_size": SCALE_BLOCK,
        "memory_block_size": MEMORY_BLOCK,
        "seconds_per_region": args.scale_seconds,
        "regions": [
            {
                **dataclasses.asdict(c),
                "ms_per_step": c.ms_per_step,
                "ratio": c.ms_per_step / costs[0].ms_per_step,
            }
            for c in costs
        ],
    }
    path = paths.write_bench_result("sim", result)
    print(f"wrote {path}")
    png = benchplot.save_png(
        path, "bench-sim: per driver step cost against region size", scale_panels(costs), 2
    )
    if png:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
