#!/usr/bin/env python3
"""The main job, watched live: a VM whose memory grows and shrinks under vmem_guest.

Boots a QEMU guest with two virtio-mem devices on two NUMA nodes (the in-kernel
driver kept off them), starts ``vmem-guest run`` inside as systemd would, then
plays the host: resizes both devices over QMP and prints, while each step
converges, what QEMU, the agent's tracker and the guest's MemTotal say. The
default sequence shrinks 3G -> 1000M: QEMU's size ends on exactly 1000M (not a
multiple of the 128 MiB memory block), the agent having taken the top 24 MiB of one
online block out of use (the ``holes`` column); their pages stay in MemTotal and
show in HardwareCorrupted until 512M gives that block back whole.

    make demo                      # or: .venv/bin/python scripts/demo.py
    .venv/bin/python scripts/demo.py --sequence 2G,512M,0 --block 4M
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmharness import GiB, MemDevice, TestVM, VMConfig, fmt_size, parse_size
from vmharness.guest_agent import start_agent, stop_agent, target
from vmharness.status_stream import FOLLOW_INTERVAL, GuestStatus, StatusStream, bdfs_by_device_id
from vmharness.watch import QMP_INTERVAL, SizePoller

DEVICE_IDS = ("vm0", "vm1")
#: Seconds between two refreshes of the table: a QMP query and one read of what the
#: guest's ``status --follow`` printed since (a runner round trip, no process).
POLL_SECONDS = 0.2
HEADER = (
    f"{'t':>6}  {'device':<6} {'requested':>10} {'qemu size':>10} {'tracker':>10}"
    f" {'online':>10} {'holes':>8} {'MemTotal':>10} {'HWCorrupt':>9}  state"
)


def row(
    elapsed: float,
    dev_id: str,
    qemu: dict[str, int],
    dev: dict[str, Any],
    guest: GuestStatus | None,
    converged: bool,
) -> str:
    """One line: QEMU's view, the tracker's (holes: subblocks of online blocks taken
    out of use and unplugged) and the guest's MemTotal and HardwareCorrupted as the
    same look at the tracker read them (the holes' poisoned pages count in the first
    and show in the second)."""
    requested = int(qemu["requested-size"])
    plugged = int(dev.get("plugged_size", 0))
    online = int(dev.get("online_size", 0))
    holes = int(dev.get("hole_bytes", 0))
    state = "converged" if converged else ("BROKEN" if dev.get("broken") else "working")
    return (
        f"{elapsed:6.1f}  {dev_id:<6} {fmt_size(requested):>10} {fmt_size(int(qemu['size'])):>10}"
        f" {fmt_size(plugged):>10} {fmt_size(online):>10} {fmt_size(holes):>8}"
        f" {fmt_size(guest.mem_total if guest else 0):>10}"
        f" {fmt_size(guest.hardware_corrupted if guest else 0):>9}  {state}"
    )


def converged(dev: dict[str, Any], goal: int) -> bool:
    """The tracker has ``goal`` plugged and exactly that in use online (the rest of
    what is online, if any, is holes: blocks holding them stay online), no intent."""
    if not dev or dev["intent"] is not None or dev["plugged_size"] != goal:
        return False
    online, holes = dev["online_size"], dev["hole_bytes"]
    assert isinstance(online, int) and isinstance(holes, int)
    return online - holes == goal


def play_step(
    vm: TestVM,
    stream: StatusStream,
    requested: int,
    previous_goal: int,
    block: int,
    bdfs: dict[str, str],
) -> tuple[float, float]:
    """Resize both devices; print a row per device whenever something changed; return
    (seconds until QEMU's size was at the target on both devices, seconds until the
    display saw the agent converged), both from just before the first qom-set.

    The first is the agent's real convergence time: a thread polls QEMU's size over QMP
    every ~5 ms (:class:`vmharness.watch.SizePoller`). The display refreshes every
    POLL_SECONDS: QEMU's sizes from a QMP query, the tracker and MemTotal from the
    guest's ``vmem-guest status --follow``, which looks every FOLLOW_INTERVAL seconds.
    """
    print(f"\n== host: qom-set requested-size {fmt_size(requested)} on {', '.join(DEVICE_IDS)}")
    print(HEADER)
    goal = target(requested, block, shrinking=requested < previous_goal)
    started = time.perf_counter()
    for dev_id in DEVICE_IDS:
        vm.resize(dev_id, requested)
    poller = SizePoller(vm, dict.fromkeys(DEVICE_IDS, goal), started)
    poller.start()
    last_rows: list[str] = []
    try:
        while True:
            if poller.error is not None:
                raise poller.error
            reached = poller.all_reached is not None
            guest = stream.poll()
            devices = guest.devices if guest else {}
            query = vm.query()
            elapsed = time.perf_counter() - started
            done = reached and all(converged(devices.get(bdfs[d], {}), goal) for d in DEVICE_IDS)
            rows = [
                row(elapsed, d, query[d], devices.get(bdfs[d], {}), guest, done) for d in DEVICE_IDS
            ]
            if [r[8:] for r in rows] != [r[8:] for r in last_rows]:
                print("\n".join(rows), flush=True)
                last_rows = rows
            if done:
                assert poller.all_reached is not None
                print(
                    f"QEMU size reached {fmt_size(goal)} on both devices"
                    f" {poller.all_reached:.3f} s after the qom-set"
                    f" (QMP polled every ~{QMP_INTERVAL * 1000:.0f} ms)"
                )
                return poller.all_reached, elapsed
            if elapsed > 300:
                raise SystemExit(f"demo: no convergence after {elapsed:.0f} s")
            time.sleep(POLL_SECONDS)
    finally:
        poller.halt()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sequence",
        default="1G,3G,1000M,512M,0",
        help="requested sizes, in order (default: %(default)s)",
    )
    parser.add_argument("--block", default="2M", help="device block size (default: 2M)")
    parser.add_argument("--region", default="4G", help="device region size (default: 4G)")
    args = parser.parse_args()
    block, region = parse_size(args.block), parse_size(args.region)
    sequence = [parse_size(item) for item in args.sequence.split(",")]
    cfg = VMConfig(
        name="demo",
        in_kernel_driver=False,
        noiommu=True,
        numa_nodes=2,
        memory=1 * GiB,
        devices=tuple(
            MemDevice(dev_id, size=region, block_size=block, node=node)
            for node, dev_id in enumerate(DEVICE_IDS)
        ),
    )
    print(
        f"booting a {cfg.cpus}-vCPU guest: 1 GiB boot memory, two {fmt_size(region)}"
        f" virtio-mem devices ({fmt_size(block)} blocks) on NUMA nodes 0 and 1 ..."
    )
    with TestVM(cfg) as vm:
        print(f"guest up; console log: {vm.paths.console_log if vm.paths else '?'}")
        print(f"guest MemTotal at boot: {fmt_size(vm.mem_total())}")
        start_agent(vm, "--noiommu")
        print("agent started in the guest: vmem-guest run --noiommu")
        stream = StatusStream(vm)
        times = []
        goals = []
        try:
            bdfs = bdfs_by_device_id(vm, stream.start())
            print(
                "watching it with vmem-guest status --follow --json"
                f" --interval {FOLLOW_INTERVAL} (started once, in the guest)"
            )
            previous_goal = 0
            for requested in sequence:
                times.append(play_step(vm, stream, requested, previous_goal, block, bdfs))
                previous_goal = target(requested, block, shrinking=requested < previous_goal)
                goals.append(previous_goal)
        finally:
            stream.stop()
            stop_agent(vm)
        print("\nagent stopped (SIGTERM); summary:")
        for requested, goal, (converged, shown) in zip(sequence, goals, times, strict=True):
            print(
                f"  requested {fmt_size(requested):>8}: converged in {converged:6.2f} s"
                f" (QEMU size at {fmt_size(goal)} on both devices;"
                f" the display saw it at {shown:4.1f} s)"
            )
    print("VM shut down.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
