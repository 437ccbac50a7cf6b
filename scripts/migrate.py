#!/usr/bin/env python3
"""``make migrate``: live-migrate a guest at random moments while the agent resizes.

Boots one migratable guest (``VMConfig.migratable``: it runs from its RAM root with
nothing of 9p mounted, which QEMU refuses to migrate; the in-kernel virtio-mem driver
blacklisted, VFIO no-IOMMU mode, virtio-mem devices with 2 MiB blocks) and starts
``vmem-guest run --noiommu`` in it, as ``make chaos`` does. Then, N times, one of five
moves, in a shuffled cycle so that each comes up every five migrations:

- ``grow``, ``shrink`` (whole memory blocks) or ``take`` (a few subblocks of online
  blocks): the host sets a new ``requested-size`` on every device (QMP ``qom-set``),
  waits a random part of the time the agent's work should take under TCG and
  migrates while the agent is at it;
- ``idle``: migrates the converged guest;
- ``resize during migration``: starts the migration, then resizes the source's
  devices while it runs (the size is migrated with the device's state).

Each migration goes to a second QEMU on this host, started with the same command
line and ``-incoming unix:...`` (``scripts/vmharness/migration.py``); the harness
then drives the destination and quits the source. While a migration runs QEMU
answers the agent's PLUG and UNPLUG requests with BUSY, so the devices' sizes read
right after the ``migrate`` command are frozen until the destination runs: the
phase the migration landed in is judged from them (below the agent's target:
growing; a memory block or more above it: shrinking; less: subblock take; at it:
idle). The agent waits BUSY out with its bounded backoff; its tracker counts the
retries. After each migration, on the destination:

1. QEMU's ``size`` equals the source's frozen size and ``requested-size`` the
   host's last request (migrated, not reset);
2. the agent (the same process) converges on the request, with ``make chaos``'s
   checks (``scripts/chaos.py`` ``Chaos.converged``): QEMU's size = the tracker's
   plugged, the remainder rules, no intent, nothing taken but plugged, plugged +
   holes = online, MemTotal grown by the online size, HardwareCorrupted = the
   holes, and (``chaos_guest.py converged``) STATE through the agent over every run
   in use and every hole of the online blocks, the holes' pages HWPOISON;
3. ``migrate_guest.py running``: chaos's raw check with STATE through the agent:
   every plugged subblock found by STATE, tracker = device over the whole region,
   tracker = sysfs on every block, every page of every online block plugged or
   HWPOISON.

At the end the agent is stopped and ``chaos_guest.py dead`` checks with raw STATE.

    .venv/bin/python scripts/migrate.py [--migrations 20] [--seed S] [--devices 2]
        [--region 2G]

Prints one line per migration, the phase counts and ``K/N migrations converged, V
violations``; writes ``results/migrate/migrate-<time>.json``. Exit status 1 on any
violation or any migration the agent did not converge after.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import datetime

import chaos
from migration_run import MigrationRun, migration_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--migrations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--devices", type=int, choices=(1, 2), default=2)
    parser.add_argument("--region", default="2G", help="region size of each device")
    args = parser.parse_args()

    vmh = chaos._harness()
    from vmharness import paths

    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    cfg = migration_config(args.devices, vmh.parse_size(args.region))
    chaos.precompile()  # before the boot: the RAM root copies the bytecode too
    t0 = time.monotonic()
    with vmh.TestVM(cfg) as vm:
        print(
            f"VM up in {vm.boot_seconds:.0f} s (QEMU {vm.qemu_version}, {vm.accel},"
            f" thread={vm.config.tcg_thread}, Linux {vm.pair.linux}); run dir {vm.paths.run_dir}"
        )
        print(
            f"{args.devices} device(s), region {args.region}, 2 MiB blocks; seed {seed};"
            f" {args.migrations} migrations",
            flush=True,
        )
        run = MigrationRun(vm, seed=seed, log=_flush_print)
        run.start()
        try:
            run.run(args.migrations)
            if not run.stopped:
                run.final_check()
        finally:
            report = run.as_dict()
            report["run_dir"] = str(vm.paths.run_dir)
            report["qemu"] = vm.qemu_version
            report["linux"] = vm.pair.linux
            report["seconds"] = time.monotonic() - t0
            out = paths.results_dir() / "migrate" / f"migrate-{datetime.now():%Y%m%d-%H%M%S}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"results: {out}")
    for line in run.summary_lines():
        print(line)
    return 0 if run.summary()["ok"] else 1


def _flush_print(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
